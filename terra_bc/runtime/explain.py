"""``terra_bc.explain``: a text report of what a unit recorded and why it runs as it does."""
from __future__ import annotations

from . import compiling
from .events import FeedIn, key_name
from .units import Unit, all_units


def explain(fn=None):
    """A text report of a unit's TraceGraph (of every unit with fn=None): its paths, where
    each leaves the others (the case Python decided there), fetches, feeds and graph breaks
    with their source lines, segments with their op counts, and compiles."""
    if fn is None:
        return "\n\n".join(explain(u) for u in list(all_units)) or "no units yet"
    unit = getattr(fn, "__terra_bc_unit__", fn)
    if not isinstance(unit, Unit):
        raise TypeError("explain() takes a @terra_bc.function (or a unit)")
    name = getattr(unit.fn, "__qualname__", None) or unit.name
    state = (f"runs eagerly: {unit.eager_reason}" if unit.eager_reason else
             f"{len(unit.paths)} path(s)" + (f"; no new paths: {unit.frozen}" if unit.frozen else ""))
    lines = [f"unit {name}: {state}; {unit.compiles} compile(s), {unit.eager_launches} segment "
             f"launch(es) run eagerly; next trace: {unit.tracing_mode()}"]
    for n, path in enumerate(unit.paths):
        lines.extend(_describe_path(unit, n, path))
    return "\n".join(lines)


def _describe_path(unit, n, path):
    shared, parent = 0, None  # the earlier path it shares most events with
    for m, other in enumerate(unit.paths[:n]):
        k = path.shared_prefix(other)
        if k > shared:
            shared, parent = k, m
    head = f"  path {n + 1}: {len(path.events)} events, {path.recorder.mark()} equations"
    if parent is not None:
        at = path.events[shared] if shared < len(path.events) else None
        head += (f"; shares its first {shared} events with path {parent + 1}, then " +
                 (f"{at.kind} {key_name(at.key) if at.key else ''} at {at.where}" if at else "ends"))
    lines = [head]
    for ev in path.events[shared:]:
        lines.extend(_describe_event(ev))
    for (start, stop, outs), entry in path.segments.items():
        seg = entry.segment
        lines.append(f"    segment [{start}, {stop}): {len(seg.jaxpr.eqns)} ops, "
                     f"{len(seg.inputs)} inputs, {len(outs)} outputs, "
                     f"{compiling.state(entry)}")
    return lines


def _describe_event(ev):
    if ev.kind == "fetch":
        return [f"    fetch ({ev.key}) of value {ev.id} at {ev.where}"]
    if ev.kind == "eager":
        return [f"    graph break: {key_name(ev.key)} runs eagerly at {ev.where}"]
    if ev.kind in ("op", "enter"):
        feeds = sum(1 for spec in ev.args if type(spec) is FeedIn)
        if feeds:
            what = key_name(ev.key) if ev.key else "the unit"
            return [f"    feed of {feeds} value(s) into {what} at {ev.where}"]
    return []
