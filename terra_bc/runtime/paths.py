"""Paths: a unit's TraceGraph is its recorded paths, which share the events and recording of
their common prefixes.  A ``Path`` holds one path's events, its recording (the jaxpr
builder's ``Recorder``) and the segments compiled from it."""
from __future__ import annotations

from .. import jaxpr_builder
from .context import TRACE, current


class SegmentEntry:
    """A segment of a path (equations [start, stop)), its executable once it has one
    (``compiling.run``), and how many of its equations were recorded abstractly (``cold``:
    JAX has not run them eagerly)."""
    __slots__ = ("segment", "exe", "cold", "start", "stop")

    def __init__(self, segment, cold, start, stop, exe=None):
        self.segment, self.cold, self.exe = segment, cold, exe
        self.start, self.stop = start, stop

    def __repr__(self):
        return f"SegmentEntry({self.segment!r}, {'compiled' if self.exe else 'not compiled'})"


class ValueDependent(Exception):
    """JAX read the concrete value of a recorded input while running an op (a shape, an
    index): the recorded equations would bake that value in, so the op is not recorded."""


def _fetched_inside_op(tracer, kind, value):
    """The Recorder's report that a recorded value was read (``bool(x)``, ``np.asarray``)."""
    it = current()
    if it is not None and it.opaque_depth and it.mode == TRACE:
        raise ValueDependent(f"an op read a recorded value ({kind})")


class Path:
    """One recorded path of a unit: its events, the recording, and segment plans.

    A path made by leaving another one at event k shares that path's first k events (the
    same objects) and its recording up to there (``Recorder.fork``: same equations, same
    value ids), so an iteration can move between paths at any branch point without
    recomputing anything.  A recorded path never changes once kept: a new way through the
    unit is a new Path.  The C fast path reads ``events``."""

    __slots__ = ("recorder", "events", "segments", "plans", "eager_reason", "escaping")

    def __init__(self, recorder=None, events=(), escaping=()):
        self.recorder = recorder if recorder is not None else jaxpr_builder.Recorder(_fetched_inside_op)
        self.events = list(events)
        self.segments = {}      # (start, stop, outputs, effects skipped) -> SegmentEntry
        self.plans = {}         # (start, stop) -> (ids produced there, ids read after stop)
        self.eager_reason = None  # why tracing it found the unit cannot be co-executed
        # Value ids that outlived a traced iteration of this path: launches keep them.  Per
        # path: ids past a fork point name different values on each path.
        self.escaping = set(escaping)

    def fork(self, pos):
        """A new path sharing this one's first ``pos`` events and their recording."""
        last = self.events[pos - 1] if pos else None
        nvals = last.nvals if last else 0
        recorder = self.recorder.fork(last.mark if last else 0, nvals)
        return Path(recorder, self.events[:pos], (i for i in self.escaping if i < nvals))

    def plan(self, start, stop):
        """What equations [start, stop) produce and what the rest of the path reads."""
        plan = self.plans.get((start, stop))
        if plan is None:
            plan = self.plans[(start, stop)] = (self.recorder.wiring(start, stop)[1],
                                                self.recorder.wiring(stop)[0])
        return plan

    def segment(self, start, stop, outputs, skip=frozenset(), required=None):
        """The ``SegmentEntry`` computing ``outputs`` from equations [start, stop), without
        the effects of the equations ``skip`` (they happened already in this iteration).  A
        segment of the same equations computing more outputs serves too: the traced
        iteration launched it when the rest of the path was not recorded yet, keeping
        every value Python held; its extra outputs cost less than compiling again.  So does
        a compiled one computing the ``required`` outputs (the others are optional: see
        launching.run)."""
        key = (start, stop, outputs, skip)
        entry = self.segments.get(key)
        if entry is None:
            entry = self._wider(start, stop, outputs, skip)
        if (entry is None or entry.exe is None) and required is not None:
            partial = self._wider(start, stop, required, skip, compiled=True)
            if partial is not None:
                return partial  # (not kept under `key`: it does not compute all of them)
        if entry is None:
            entry = SegmentEntry(self.recorder.segment(outputs, start, stop, skip),
                                 self.recorder.not_computed(start, stop), start, stop)
        self.segments[key] = entry
        return entry

    def _wider(self, start, stop, outputs, skip, compiled=False):
        want = set(outputs)
        best = None  # (one with an executable first; only those if ``compiled``)
        for (a, b, outs, skipped), entry in self.segments.items():
            if a == start and b == stop and skipped == skip and want.issubset(outs):
                if entry.exe is not None:
                    return entry
                best = best or entry
        return None if compiled else best

    def others_sharing(self, paths, pos):
        """The paths among ``paths`` other than this one that share its first ``pos``
        events (the same objects): where an iteration on this path may move at ``pos``."""
        last = self.events[pos - 1] if pos else None
        return (p for p in paths if p is not self
                and (pos == 0 or len(p.events) >= pos and p.events[pos - 1] is last))

    def shared_prefix(self, other):
        """How many first events this path shares with ``other`` (the same objects)."""
        k, n = 0, min(len(self.events), len(other.events))
        while k < n and self.events[k] is other.events[k]:
            k += 1
        return k
