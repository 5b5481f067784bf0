"""Reports: snapshots of what units recorded, as plain data that prints (text) and renders
(HTML, for notebooks).

A report is copied out of the live paths when it is taken, so one taken before a code edit
or ``terra_bc.reset`` still reads (and diffs) the same afterwards.  Events of a unit's paths
that are the same object (a shared prefix, ``Path.fork``) get the same ``node`` number:
that is how a report knows where each path leaves the others without holding the paths.

Source lines are shown as the user knows them: ``Cell In[2], line 21`` for code compiled
from an IPython cell (IPython's compile cache, read only when IPython is already imported),
``file:line`` otherwise.
"""
from __future__ import annotations

import html
import types
from dataclasses import dataclass
from typing import NamedTuple

from . import compiling, journal
from .journal import shown_location
from .events import (BeginEvent, BreakEvent, EnterEvent, FeedIn, FetchEvent, ForwardEndEvent,
                     GradEndEvent, OpEvent, PlaceholderIn, PlaceholderOut, StaticIn, StaticOut,
                     key_name)

# **** records ****

_aval_text = journal.aval_text


class ValueReport(NamedTuple):
    """One input or output of an event: ``kind`` is "value" (a recorded value, ``id``),
    "feed" (from Python into the graph), "static" (baked in: ``static`` is its repr) or
    "computed" (a graph break's input).  ``detail``: a static's repr, a feed's Python type."""
    kind: str
    aval: str
    detail: str = ""
    id: int | None = None

    def signature(self):
        """What a diff compares: not the id (ids shift when a path records more values)."""
        return (self.kind, self.aval, self.detail)

    def __str__(self):
        if self.kind == "static":
            return f"static {self.detail}"
        if self.kind == "value":
            return f"v{self.id} {self.aval}" if self.id is not None else self.aval
        return f"{self.kind} {self.aval}" + (f" ({self.detail})" if self.detail else "")


class EventReport(NamedTuple):
    """One event of a path.  ``node``: events with the same node are one recorded event
    (paths share it); ``source``: for a fetch, the op and line that made the value read;
    ``value``: what Python got from it when the path was traced (a number, a bool: what a
    data-dependent branch decided on)."""
    node: int
    kind: str
    name: str
    ins: tuple
    outs: tuple
    where: str
    source: str = ""
    value: str = ""

    def signature(self):
        """What a diff compares: the event's kind, op, inputs and outputs (not its line,
        which moves with any edit above it)."""
        return (self.kind, self.name, tuple(v.signature() for v in self.ins),
                tuple(v.signature() for v in self.outs))

    def feeds(self):
        return sum(1 for v in self.ins if v.kind == "feed")

    def summary(self):
        """The event in one line, without its location."""
        ins = ", ".join(map(str, self.ins))
        outs = ", ".join(map(str, self.outs))
        if self.kind == "fetch":
            return (f"fetch ({self.name}) of {ins}" + (f" = {self.value}" if self.value else "")
                    + (f" ({self.source})" if self.source else ""))
        if self.kind == "eager":
            return f"graph break: {self.name}({ins}) runs eagerly"
        if self.kind == "enter":
            return f"enter: arguments ({ins})"
        head = "op " if self.kind == "op" else f"{self.kind} "
        return head + f"{self.name}({ins})" + (f" -> {outs}" if outs else "")

    def __str__(self):
        return f"{self.summary()} at {self.where}"


class SegmentReport(NamedTuple):
    """A segment of a path: equations [start, stop), its primitives, inputs, outputs and
    how it runs now (``compiling.state``); ``jaxpr``: the segment as JAX runs it, and
    ``lines``: (equations recorded up to, source line) of each op of the path in its range,
    shown on request (``source()``)."""
    start: int
    stop: int
    ops: tuple
    inputs: int
    outputs: int
    state: str
    jaxpr: object = None
    lines: tuple = ()

    def __str__(self):
        return (f"segment [{self.start}, {self.stop}): {len(self.ops)} ops, {self.inputs} inputs, "
                f"{self.outputs} outputs, {self.state}")

    def source(self):
        """The segment's jaxpr, then the source lines whose ops recorded its equations (the
        equation count once each op was recorded: where each line's equations end)."""
        head = [str(self), str(self.jaxpr), "recorded by:"]
        return "\n".join(head + [f"  equations up to {mark}: {where}" for mark, where in self.lines])


class Shown:
    """Text everywhere: ``repr`` (a REPL), IPython's pretty printer; HTML in notebooks."""
    __slots__ = ()

    def __repr__(self):
        return str(self)

    def _repr_pretty_(self, printer, cycle):
        printer.text(str(self))


@dataclass(frozen=True, slots=True, repr=False)
class PathReport(Shown):
    """One recorded path: its events, where it leaves an earlier path (``parent``, after
    ``shared`` events), its equations and segments."""
    unit: str
    number: int
    events: tuple
    equations: int
    parent: int | None
    shared: int
    segments: tuple
    eager_reason: str | None

    def header(self):
        head = f"path {self.number}: {len(self.events)} events, {self.equations} equations"
        if self.parent is not None:
            at = self.events[self.shared] if self.shared < len(self.events) else None
            head += (f"; shares its first {self.shared} events with path {self.parent}, then "
                     + (f"{at.kind} {at.name} at {at.where}" if at else "ends"))
        if self.eager_reason:
            head += f"; runs eagerly: {self.eager_reason}"
        return head

    def lines(self, skip_shared):
        """Its text, indented; without the events it shares with its parent if asked."""
        events = self.events[self.shared:] if skip_shared else self.events
        return ([f"  {self.header()}"] + [f"    {ev}" for ev in events]
                + [f"    {seg}" for seg in self.segments])

    def __str__(self):
        return f"unit {self.unit}, " + "\n".join(self.lines(skip_shared=False)).lstrip()

    def _repr_html_(self):
        return _html_unit_table(self.unit, f"path {self.number}", [self])


@dataclass(frozen=True, slots=True, repr=False)
class UnitReport(Shown):
    """One unit: why it runs as it does, its compiles, its paths, and its journal (the
    last divergences, compiles and eager fallbacks, oldest first: ``journal.py``)."""
    name: str
    state: str
    compiles: int
    eager_launches: int
    next_trace: str
    paths: tuple
    journal: tuple = ()

    def header(self):
        return (f"unit {self.name}: {self.state}; {self.compiles} compile(s), "
                f"{self.eager_launches} segment launch(es) run eagerly; "
                f"next trace: {self.next_trace}")

    def __str__(self):
        happened = [f"    {shown_location(str(r))}" for r in self.journal]
        return "\n".join([self.header()] + [line for p in self.paths for line in p.lines(True)]
                         + (["  journal:"] + happened if happened else []))

    def _repr_html_(self):
        return _html_unit_table(self.name, self.header(), self.paths) + journal_html(self.journal)


@dataclass(frozen=True, slots=True, repr=False)
class Report(Shown):
    """What ``terra_bc.explain`` returns: reports of units (``units``) and all their paths
    (``paths``), taken when it was called."""
    units: tuple

    @property
    def paths(self):
        return [p for u in self.units for p in u.paths]

    def __str__(self):
        return "\n\n".join(map(str, self.units)) or "no units yet"

    def _repr_html_(self):
        body = "".join(u._repr_html_() for u in self.units) or "<p>no units yet</p>"
        return f'<div class="terra-bc-report">{body}</div>'


# **** taking a snapshot ****

def unit_report(unit, name):
    """A snapshot of ``unit`` (shown as ``name``)."""
    frozen = f"; no new paths: {unit.frozen}" if unit.frozen else ""
    state = (f"runs eagerly: {unit.eager_reason}" if unit.eager_reason
             else f"{len(unit.paths)} path(s){frozen}{unit.idle_state()}")
    nodes = {}  # id(Event) -> node number: paths share the Event objects of their prefix
    paths = tuple(_path_report(unit, name, n, path, nodes) for n, path in enumerate(unit.paths))
    return UnitReport(shown_location(name), state, unit.compiles, unit.eager_launches,
                      unit.tracing_mode(), paths, tuple(map(_shown_record, unit.journal)))


def _shown_record(record):
    """A journal record whose locations (its unit's name, its line) read as IPython shows
    them: ``print(record)`` of a report's record says ``Cell In[3], line 5`` too."""
    fields = {f: shown_location(getattr(record, f)) for f in ("unit", "where")
              if f in record._fields}
    return record._replace(**fields)


def _path_report(unit, name, n, path, nodes):
    shared, parent = 0, None  # the earlier path it shares most events with
    for m, other in enumerate(unit.paths[:n]):
        k = path.shared_prefix(other)
        if k > shared:
            shared, parent = k, m + 1
    made = {}  # value id -> (what made it, where): a fetch names its value's op
    events = tuple(_event_report(ev, nodes.setdefault(id(ev), len(nodes)), made)
                   for ev in path.events)
    # (A segment computing more outputs serves other requests too, kept under their keys
    # (Path.segment): each segment is reported once, with the outputs it computes.)
    entries = {id(entry): entry for entry in path.segments.values()}.values()
    segments = tuple(_segment_report(entry, path) for entry in entries)
    return PathReport(shown_location(name), n + 1, events, path.recorder.mark(), parent,
                      shared, segments, path.eager_reason)


def _segment_report(entry, path):
    start, stop, seg = entry.start, entry.stop, entry.segment
    lines = tuple((ev.mark, shown_location(ev.where)) for ev in path.events
                  if ev.kind != "fetch" and start < ev.mark <= stop)
    return SegmentReport(start, stop, tuple(map(_op_name, seg.jaxpr.eqns)),
                         len(seg.inputs), len(seg.outputs), compiling.state(entry), seg.jaxpr, lines)


def _op_name(eqn):
    """An equation's primitive, or the function a ``jit`` equation calls (jnp.tanh's)."""
    name = str(eqn.primitive)
    return str(eqn.params.get("name", name)) if name in ("jit", "pjit") else name


def _value(spec, made):
    """An input or output spec as a ValueReport (a placeholder's aval from what made it)."""
    t = type(spec)
    if t is PlaceholderIn:
        known = made.get(spec.id)
        return ValueReport("value", known.aval if known else "?", "", spec.id)
    if t is FeedIn:
        python_type = getattr(spec.type, "__name__", "")
        return ValueReport("feed", _aval_text(spec.aval), python_type, spec.id)
    if t in (StaticIn, StaticOut):
        return ValueReport("static", "", repr(spec.value)[:60])
    if t is PlaceholderOut:
        return ValueReport("value", _aval_text(spec.aval), "", spec.id)
    return ValueReport("computed", _aval_text(spec.aval))


class Made(NamedTuple):
    """Where a value of a path came from: ``how`` ("made by sum", "fed into mul") and where."""
    how: str
    aval: str
    where: str


def _specs(ev, made):
    """(inputs, outputs) of an event as ValueReports, by its kind."""
    t = type(ev)
    if t is FetchEvent:
        return (_value(PlaceholderIn(ev.id), made),), ()
    if t is BeginEvent:
        return tuple(ValueReport("value", _aval_text(a), "", i)
                     for i, a in zip(ev.ids, ev.avals)), ()
    if t is ForwardEndEvent:
        return (), tuple(_value(PlaceholderIn(i), made) for i in ev.ids)
    has_args = t in (OpEvent, BreakEvent, EnterEvent)
    ins = tuple(_value(spec, made) for spec in ev.args) if has_args else ()
    outs = tuple(_value(spec, made) for spec in ev.outs) if t in (OpEvent, GradEndEvent) else ()
    return ins, outs


def _key_text(key):
    """An event's guard key as a name: a callee's, a conversion's ("float"), a transform's
    of user code ("grad of loss": its key is (kind, the body's code, options...))."""
    if key is None or isinstance(key, str):
        return key or ""
    if isinstance(key, tuple) and len(key) > 1 and isinstance(key[0], str):
        body = key[1]
        if type(body) is int:  # ("vjp-apply", begin event, the begin's key): name the body
            return key_name(key)
        body = body.co_qualname if isinstance(body, types.CodeType) else key_name(body)
        return f"{key[0]} of {body}"
    return key_name(key)


def _event_report(ev, node, made):
    where = shown_location(ev.where)
    name = _key_text(ev.key)
    ins, outs = _specs(ev, made)
    what = name or "the unit"
    for v in outs:
        made.setdefault(v.id, Made(f"made by {what}", v.aval, where))
    for v in ins:
        if v.kind == "feed":
            made.setdefault(v.id, Made(f"fed into {what}", v.aval, where))
    known = made.get(ev.id) if type(ev) is FetchEvent else None
    source = f"{known.how} at {known.where}" if known else ""
    value = repr(ev.value) if type(ev) is FetchEvent and ev.value is not None else ""
    return EventReport(node, ev.kind, name, ins, outs, where, source, value)


# **** HTML ****

MAX_HTML_ROWS = 300  # events shown per column (a notebook slows down on larger tables)
_COLORS = {"fetch": "#fff3c4", "eager": "#ffd6d6", "enter": "#eeeeee", "feed": "#dcecff"}
_STYLE = ("border-collapse:collapse;font-family:monospace;font-size:12px;"
          "text-align:left;vertical-align:top")


def event_html(ev):
    """One event as a table cell's content: op, shapes/dtypes, source line."""
    summary = html.escape(ev.summary())
    return f"{summary}<br><small>{html.escape(ev.where)}</small>"


def event_color(ev):
    return _COLORS.get(ev.kind) or (_COLORS["feed"] if ev.feeds() else "")


def _cell(ev, span, leaves):
    style = f"border:1px solid #ccc;padding:2px 4px;background:{event_color(ev) or 'white'}"
    if leaves:  # the first event of a path past what it shares with another
        style += ";border-top:3px solid #c00"
    return f'<td colspan="{span}" style="{style}">{event_html(ev)}</td>'


def _leaves(paths, me, k):
    """Is ``me``'s event k where it leaves another path (one sharing its event k-1 that
    goes on differently, or ends there)?"""
    if k == 0:
        return False
    before, here = me.events[k - 1].node, me.events[k].node
    return any(len(p.events) >= k and p.events[k - 1].node == before
               and (len(p.events) == k or p.events[k].node != here) for p in paths)


def _event_rows(paths):
    """Rows of events, one column per path; an event paths share spans their columns."""
    rows, longest = [], max((len(p.events) for p in paths), default=0)
    for k in range(min(longest, MAX_HTML_ROWS)):
        cells, i = [], 0
        while i < len(paths):
            ev = paths[i].events[k] if k < len(paths[i].events) else None
            j = i + 1
            while (ev is not None and j < len(paths) and k < len(paths[j].events)
                   and paths[j].events[k].node == ev.node):
                j += 1
            cells.append(_cell(ev, j - i, _leaves(paths, paths[i], k)) if ev is not None
                         else "<td></td>")
            i = j
        rows.append(f"<tr><th>{k}</th>{''.join(cells)}</tr>")
    if longest > MAX_HTML_ROWS:
        rows.append(f'<tr><td colspan="{len(paths) + 1}">... {longest - MAX_HTML_ROWS} more '
                    "events: print the report for all of them</td></tr>")
    return rows


def journal_html(records, title="journal"):
    """Records (divergences red, compiles blue, fallbacks yellow) as a list."""
    if not records:
        return ""
    colors = {journal.Diverged: "#c00", journal.Compiled: "#0550ae", journal.Fallback: "#9a6700"}
    items = "".join(f'<li style="color:{colors.get(type(r), "black")}">'
                    f"{html.escape(shown_location(str(r)))}</li>" for r in records)
    return f"<div><b>{html.escape(title)}</b><ul>{items}</ul></div>"


def _segment_html(paths):
    items = [f"<li>path {p.number}: {html.escape(str(s))} <small>"
             f"{html.escape(' '.join(s.ops))}</small></li>" for p in paths for s in p.segments]
    reasons = [f"<li>path {p.number} runs eagerly: {html.escape(p.eager_reason)}</li>"
               for p in paths if p.eager_reason]
    return f"<ul>{''.join(items + reasons)}</ul>" if items or reasons else ""


def _html_unit_table(name, title, paths):
    """A unit's paths as columns of events, in the order of their trie (shared prefixes
    side by side), then their segments."""
    paths = sorted(paths, key=lambda p: [ev.node for ev in p.events])
    heads = "".join(f"<th>{html.escape(_column_title(p))}</th>" for p in paths)
    return (f"<div><b>{html.escape(title)}</b><table style=\"{_STYLE}\">"
            f"<tr><th></th>{heads}</tr>{''.join(_event_rows(paths))}</table>"
            f"{_segment_html(paths)}</div>")


def _column_title(p):
    head = f"path {p.number}: {len(p.events)} events, {p.equations} equations"
    return head + (f"; leaves path {p.parent} after {p.shared} events" if p.parent else "")
