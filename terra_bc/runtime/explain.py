"""``terra_bc.explain``: a report of what units recorded and why they run as they do."""
from __future__ import annotations

import collections

from .report import Report, unit_report
from .units import all_units, unit_of


def explain(fn=None):
    """A ``Report`` (prints as text, renders as HTML in a notebook) of a unit's TraceGraph,
    or of every unit that has paths with fn=None: its paths, where each leaves the others
    (the case Python decided there), fetches, feeds and graph breaks with their source
    lines, ops with their shapes, segments and compiles.  A snapshot: it does not change
    when the unit does."""
    if fn is not None:
        unit = unit_of(fn, "explain")
        return Report((unit_report(unit, _name(unit)),))
    units = sorted((u for u in list(all_units) if u.paths or u.eager_reason),
                   key=lambda u: u.serial)
    labels = _told_apart(units, [_name(u) for u in units])
    return Report(tuple(unit_report(u, label) for u, label in zip(units, labels)))


def _name(unit):
    return getattr(unit.fn, "__qualname__", None) or unit.name


def _told_apart(units, names):
    """Names, with where each was defined added where several units share one (a function
    redefined in a notebook), and a number where even that is shared."""
    counts = collections.Counter(names)
    names = [f"{n} ({_defined_at(u)})" if counts[n] > 1 and _defined_at(u) else n
             for u, n in zip(units, names)]
    counts, seen = collections.Counter(names), collections.Counter()
    told = []
    for n in names:
        seen[n] += 1
        told.append(f"{n} #{seen[n]}" if counts[n] > 1 else n)
    return told


def _defined_at(unit):
    code = getattr(getattr(unit.fn, "__wrapped__", unit.fn), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
