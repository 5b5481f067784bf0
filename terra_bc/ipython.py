"""``%load_ext terra_bc``: terra_bc in IPython and Jupyter.

Loading the extension enables the frame hook in the thread that runs cells, with loop and
function units on (as ``python -m terra_bc`` does), so a ``for`` loop in a cell becomes a
unit.  ``%%terra_bc`` runs one cell so (whether or not the extension's hook is on) and then
shows what terra_bc did in it: the counters that changed.

Imported only by ``load_ipython_extension``: ``import terra_bc`` never imports IPython.
"""
from __future__ import annotations

import ast
import html
from typing import NamedTuple

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.display import display

import terra_bc

# The counters a summary shows first (the others follow when they changed).
HEADLINE = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
            "compiles", "ops_skipped", "ops_traced", "fetches", "feeds")


class CellStats(NamedTuple):
    """What terra_bc counted while one cell ran: (counter, change) pairs, headline first."""
    changes: tuple

    def __str__(self):
        if not self.changes:
            return "terra_bc: no units ran in this cell"
        return "terra_bc: " + ", ".join(f"{k} {v:+g}" for k, v in self.changes)

    def _repr_pretty_(self, printer, cycle):
        printer.text(str(self))

    def _repr_html_(self):
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:+g}</td></tr>"
                       for k, v in self.changes)
        return (f"<table><tr><th>terra_bc</th><th>this cell</th></tr>{rows}</table>"
                if rows else "<p>terra_bc: no units ran in this cell</p>")


def cell_stats(before, after):
    """The counters that changed between two ``terra_bc.stats()`` snapshots."""
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    order = [k for k in HEADLINE if k in changed] + sorted(k for k in changed if k not in HEADLINE)
    return CellStats(tuple((k, round(changed[k], 3)) for k in order))


@magics_class
class TerraMagics(Magics):
    @cell_magic("terra_bc")
    def terra_bc(self, line, cell):
        """Run the cell under terra_bc (loop and function units on) and show its stats.
        The cell runs as this cell's own code, as ``%%time`` runs it: its last expression's
        value is this cell's (``Out[n]``) and an error it raises is this cell's (the
        notebook stops there).  Run as a cell of its own (``run_cell``), its error was
        shown but the cell succeeded, and its value was stored as the cell before's."""
        __tracebackhide__ = True  # (IPython shows the cell's frames, not the magic's)
        shell = self.shell
        source = shell.transform_cell(cell)
        # (named as this cell: IPython has advanced the count past it already)
        name = shell.compile.cache(source, shell.execution_count - 1, raw_code=cell)
        tree = shell.compile.ast_parse(source, filename=name)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        was = terra_bc.is_enabled()
        before = terra_bc.stats()
        terra_bc.enable(loops=True, functions=True)
        try:
            exec(shell.compile(tree, name, "exec"), shell.user_ns)
            value = None if last is None else eval(shell.compile(last, name, "eval"), shell.user_ns)
        finally:
            if not was:
                terra_bc.disable()
            display(cell_stats(before, terra_bc.stats()))
        return value


def load_ipython_extension(shell):
    shell.register_magics(TerraMagics)
    terra_bc.enable(loops=True, functions=True)


def unload_ipython_extension(shell):
    terra_bc.disable()
