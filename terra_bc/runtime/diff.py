"""``terra_bc.diff``: how two reports differ (two paths, two units, or two whole reports taken
before and after an edit).

Events are compared by their signature (kind, op, inputs' and outputs' kinds, avals and
static values; not value ids nor source lines, which shift with any edit).  Runs of equal
events are folded ("N shared events"); differing events are shown side by side with what
differs between them.  Sequences are aligned with ``difflib``, so an event inserted on one
side does not make every later event differ.
"""
from __future__ import annotations

import difflib
import html
from dataclasses import dataclass
from typing import NamedTuple

from .report import (PathReport, Report, UnitReport, Shown, event_color, event_html, journal_html,
                     shown_location)

MAX_ROWS = 40      # differing events shown per path pair (the rest are counted)
COLUMN = 72        # width of the left column in text


class Row(NamedTuple):
    """Two events aligned (None: the event is only on the other side), and what differs."""
    left: object
    right: object
    differences: tuple


def event_differences(a, b):
    """What differs between events ``a`` and ``b``, one phrase each."""
    if a is None or b is None:
        return ("only on the " + ("right" if a is None else "left"),)
    found = []
    if a.kind != b.kind:
        found.append(f"kind: {a.kind} vs {b.kind}")
    if a.name != b.name:
        found.append(f"{a.kind if a.kind == b.kind else 'name'}: {a.name} vs {b.name}")
    for what, xs, ys in (("input", a.ins, b.ins), ("output", a.outs, b.outs)):
        if len(xs) != len(ys):
            found.append(f"{len(xs)} vs {len(ys)} {what}s")
        found.extend(f"{what} {k + 1}: {x} vs {y}" for k, (x, y) in enumerate(zip(xs, ys))
                     if x.signature() != y.signature())
    return tuple(found)


def _rows(left, right):
    """Folded runs (ints) and differing Rows, aligned on the events' signatures."""
    matcher = difflib.SequenceMatcher(None, [e.signature() for e in left],
                                      [e.signature() for e in right], autojunk=False)
    items = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            items.append(i2 - i1)
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            a = left[i1 + k] if i1 + k < i2 else None
            b = right[j1 + k] if j1 + k < j2 else None
            items.append(Row(a, b, event_differences(a, b)))
    return tuple(items)


@dataclass(frozen=True, slots=True, repr=False)
class PathDiff(Shown):
    """Two paths' events: ``items`` holds folded runs (the number of equal events) and Rows;
    ``last_fetch``: the last value Python read from the graph before the paths part (the
    fetch a data-dependent branch decided on), None when none was read."""
    left: str
    right: str
    items: tuple
    last_fetch: object = None

    @property
    def rows(self):
        return [item for item in self.items if isinstance(item, Row)]

    @property
    def first(self):
        """The first differing Row (None: the paths do the same)."""
        return next(iter(self.rows), None)

    @property
    def shared(self):
        """Events equal on both sides before the first difference."""
        return self.items[0] if self.items and isinstance(self.items[0], int) else 0

    def lines(self):
        lines = [f"{self.left:<{COLUMN}} | {self.right}"]
        if self.first is None:
            return lines + [f"  {self.shared} shared events: no difference"]
        lines.append(f"  {self.parting()}")
        shown = 0
        for item in self.items:
            if isinstance(item, int):
                lines.append(f"  {item} shared events")
            elif shown < MAX_ROWS:
                shown += 1
                lines.extend(_row_lines(item))
        if shown < len(self.rows):
            lines.append(f"  ... {len(self.rows) - shown} more differing events")
        return lines

    def parting(self):
        """Where the paths part, in words: after which fetch, if any."""
        if self.last_fetch is None:
            return ("they part with no value read from the graph before: Python decided on "
                    "values of its own (NumPy, Python numbers), or the code differs")
        return f"they part after Python read {self.last_fetch}"

    def __str__(self):
        return "\n".join(self.lines())

    def _repr_html_(self):
        if self.first is None:
            return _html_table(self)
        return f'<div style="margin:2px 0">{html.escape(self.parting())}</div>{_html_table(self)}'


def _row_lines(row):
    left = str(row.left) if row.left is not None else "-"
    right = str(row.right) if row.right is not None else "-"
    return [f"≠ {left:<{COLUMN - 2}} | {right}"] + [f"      {d}" for d in row.differences]


def diff_paths(a, b):
    items = _rows(a.events, b.events)
    shared = items[0] if items and isinstance(items[0], int) else 0
    fetches = [e for e in a.events[:shared] if e.kind == "fetch"]
    return PathDiff(f"unit {a.unit}, path {a.number}", f"unit {b.unit}, path {b.number}",
                    items, fetches[-1] if fetches else None)


# **** units and reports ****

@dataclass(frozen=True, slots=True, repr=False)
class UnitDiff(Shown):
    """Two units: their differing headers, and each path paired with the other side's path
    sharing most events with it (``paths``); ``unpaired`` paths are on one side only;
    ``journal``: the right side's journal records the left's does not hold (what happened
    between two reports of one unit: its divergences, compiles, fallbacks)."""
    left: str
    right: str
    headers: tuple
    paths: tuple
    unpaired: tuple
    journal: tuple = ()

    def lines(self):
        lines = [f"unit {self.left} vs unit {self.right}"] + [f"  {h}" for h in self.headers]
        for d in self.paths:
            lines.extend("  " + line for line in d.lines())
        since = [f"    {shown_location(str(r))}" for r in self.journal]
        return (lines + [f"  only {side}: path {p.number} ({len(p.events)} events)"
                         for side, p in self.unpaired]
                + (["  since the left report:"] + since if since else []))

    def __str__(self):
        return "\n".join(self.lines())

    def _repr_html_(self):
        heads = "".join(f"<li>{html.escape(h)}</li>" for h in self.headers)
        only = "".join(f"<li>only {side}: path {p.number}</li>" for side, p in self.unpaired)
        return (f"<div><b>unit {html.escape(self.left)} vs unit {html.escape(self.right)}</b>"
                f"<ul>{heads}{only}</ul>{''.join(_html_table(d) for d in self.paths)}"
                f"{journal_html(self.journal, 'since the left report')}</div>")


def _common(a, b):
    n = 0
    while (n < min(len(a.events), len(b.events))
           and a.events[n].signature() == b.events[n].signature()):
        n += 1
    return n


def diff_units(a, b):
    headers = tuple(f"{what}: {x} vs {y}" for what, x, y in (
        ("state", a.state, b.state), ("compiles", a.compiles, b.compiles),
        ("next trace", a.next_trace, b.next_trace)) if x != y)
    free, pairs = list(b.paths), []
    for p in a.paths:
        best = max(free, key=lambda q: _common(p, q), default=None)
        if best is None:
            break
        free.remove(best)
        pairs.append(diff_paths(p, best))
    paired = len(pairs)
    unpaired = tuple(("left", p) for p in a.paths[paired:]) + tuple(("right", q) for q in free)
    seen = {r.number for r in a.journal}
    return UnitDiff(a.name, b.name, headers, tuple(pairs), unpaired,
                    tuple(r for r in b.journal if r.number not in seen))


@dataclass(frozen=True, slots=True, repr=False)
class ReportDiff(Shown):
    """Two reports: units paired by name (``units``), and those on one side only."""
    units: tuple
    unpaired: tuple

    def __str__(self):
        only = [f"only {side}: unit {u.name}" for side, u in self.unpaired]
        return "\n\n".join([str(d) for d in self.units] + only) or "no units"

    def _repr_html_(self):
        only = "".join(f"<li>only {side}: unit {html.escape(u.name)}</li>"
                       for side, u in self.unpaired)
        return "".join(d._repr_html_() for d in self.units) + (f"<ul>{only}</ul>" if only else "")


def diff_reports(a, b):
    right = {u.name: u for u in reversed(b.units)}  # (the first of a name)
    pairs = [(u, right.pop(u.name)) for u in a.units if u.name in right]
    left = [u for u in a.units if all(u is not x for x, _ in pairs)]
    rest = [u for u in b.units if all(u is not y for _, y in pairs)]
    if len(left) == 1 and len(rest) == 1:  # one unit each (renamed by an edit): the pair
        pairs, left, rest = pairs + [(left[0], rest[0])], [], []
    return ReportDiff(tuple(diff_units(x, y) for x, y in pairs),
                      tuple(("left", u) for u in left) + tuple(("right", u) for u in rest))


def diff(a, b):
    """``terra_bc.diff(a, b)``: two path reports, two unit reports, or two reports."""
    if isinstance(a, PathReport) and isinstance(b, PathReport):
        return diff_paths(a, b)
    if isinstance(a, UnitReport) and isinstance(b, UnitReport):
        return diff_units(a, b)
    a, b = (Report((x,)) if isinstance(x, UnitReport) else x for x in (a, b))
    if isinstance(a, Report) and isinstance(b, Report):
        return diff_reports(a, b)
    raise TypeError("diff() takes two path reports, two unit reports or two reports "
                    f"(terra_bc.explain), not {type(a).__name__} and {type(b).__name__}")


# **** HTML ****

def _html_cell(ev):
    if ev is None:
        return '<td style="border:1px solid #ccc">-</td>'
    return (f'<td style="border:1px solid #ccc;padding:2px 4px;background:'
            f'{event_color(ev) or "white"}">{event_html(ev)}</td>')


def _html_table(d):
    rows = [f"<tr><th>{html.escape(d.left)}</th><th>{html.escape(d.right)}</th>"
            "<th>differs</th></tr>"]
    for item in d.items[:MAX_ROWS * 2]:
        if isinstance(item, int):
            rows.append(f'<tr><td colspan="3" style="color:#777">{item} shared events</td></tr>')
        else:
            why = "<br>".join(html.escape(x) for x in item.differences)
            rows.append(f"<tr>{_html_cell(item.left)}{_html_cell(item.right)}"
                        f'<td style="color:#c00">{why}</td></tr>')
    return ('<table style="border-collapse:collapse;font-family:monospace;font-size:12px;'
            f'text-align:left">{"".join(rows)}</table>')
