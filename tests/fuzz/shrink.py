"""Shrink a failing program to a small reproducer: greedy delta debugging over its statement
tree.  A candidate is kept when it still fails the same way (``still_fails(source)``); one
that no longer runs eagerly (a removed definition, ``break`` hoisted out of its loop) simply
does not fail the same way, so no dependency tracking is needed.

Cuts, tried in this order and repeated until none helps: halves of a body, single
statements, a compound statement replaced by its body, single lines of a multi-line
statement, smaller loop counts.
"""
from __future__ import annotations

import copy
import re
import time

from .program import Block, Program, Stmt


def bodies(stmts: list):
    """Every statement list in the tree, pre-order (the same order on a deep copy)."""
    yield stmts
    for s in stmts:
        if isinstance(s, Block):
            for body in s.bodies():
                yield from bodies(body)


def candidates(program: Program):
    """Cuts as (kind, body number, index, extra), biggest first."""
    all_bodies = list(bodies(program.body))
    for bi, body in enumerate(all_bodies):
        free = [i for i, s in enumerate(body) if not s.keep]
        if len(free) >= 4:
            half = len(free) // 2
            yield ("remove", bi, tuple(free[:half]), None)
            yield ("remove", bi, tuple(free[half:]), None)
    for bi, body in enumerate(all_bodies):
        for i, s in enumerate(body):
            if not s.keep:
                yield ("remove", bi, (i,), None)
    for bi, body in enumerate(all_bodies):
        for i, s in enumerate(body):
            if isinstance(s, Block) and not s.keep:
                for j in range(len(s.bodies())):
                    yield ("hoist", bi, (i,), j)
    for bi, body in enumerate(all_bodies):
        for i, s in enumerate(body):
            if isinstance(s, Stmt) and not s.keep and s.text.strip().count("\n") >= 1:
                for j in range(len(s.text.strip("\n").splitlines())):
                    yield ("line", bi, (i,), j)
            if isinstance(s, Block):
                for m in re.finditer(r"(range\(|< )(\d+)", s.header):
                    if int(m.group(2)) > 1:
                        yield ("count", bi, (i,), m.start(2))


def apply(program: Program, cut) -> Program | None:
    kind, bi, idx, extra = cut
    p = copy.deepcopy(program)
    body = list(bodies(p.body))[bi]
    if kind == "remove":
        for i in sorted(idx, reverse=True):
            del body[i]
    elif kind == "hoist":
        block = body[idx[0]]
        pre = [Stmt(block.pre)] if block.pre.strip() else []
        body[idx[0]:idx[0] + 1] = pre + block.bodies()[extra]
    elif kind == "line":
        stmt = body[idx[0]]
        lines = stmt.text.strip("\n").splitlines()
        # (the text is dedented when rendered: drop the line, keep the rest's indentation)
        del lines[extra]
        if not "".join(lines).strip():
            return None
        body[idx[0]] = Stmt("\n".join(lines))
    elif kind == "count":
        block = body[idx[0]]
        m = re.match(r"\d+", block.header[extra:])
        n = int(m.group(0))
        block.header = block.header[:extra] + str(max(1, n // 2 if n > 3 else n - 1)) + block.header[extra + len(m.group(0)):]
    return p


def shrink(program: Program, still_fails, budget_s: float = 600.0, log=None) -> Program:
    """The smallest variant of ``program`` found within ``budget_s`` that still fails."""
    deadline = time.monotonic() + budget_s
    current, skip = program, 0
    while time.monotonic() < deadline:
        cuts = list(candidates(current))
        for n, cut in enumerate(cuts[skip:], start=skip):
            if time.monotonic() >= deadline:
                break
            trial = apply(current, cut)
            if trial is None:
                continue
            if still_fails(trial.source()):
                current, skip = trial, max(0, n - 2)
                if log:
                    log(f"shrink: {cut[0]} ok, {len(trial.source().splitlines())} lines")
                break
        else:
            if skip == 0:
                return current
            skip = 0  # one more full scan: a cut skipped earlier may help now
    return current
