"""Launching segments: which recorded equations run when, and with what values.

An iteration launches the equations it has passed (``Iteration.seg_start`` up to a mark)
when Python needs a value (a fetch, a graph break, JAX code we do not see) and at its end.
A launch computes only what later work needs: values the rest of the path reads, values
Python still holds (``alive``) and values that outlived past iterations.  JAX dispatch is
asynchronous, so the segment runs while Python goes on; ``it.env`` maps value ids to the
arrays launched segments return (and to the values Python fed).
"""
from __future__ import annotations

import sys

import jax

from ..counters import counts
from .settings import settings
from .values import NUMBER_TYPES, device_number

_LIVE_REFS = 3  # sys.getrefcount(p) of a placeholder only it.live holds, inside alive()


def alive(it):
    """The placeholders of ``it`` that Python still holds."""
    # it.live holds each placeholder once; any other reference means Python kept it.
    return [p for p in it.live if sys.getrefcount(p) > _LIVE_REFS]


def launch(it, stop, need, alive_now=None):
    """Run the recorded equations [it.seg_start, stop) that later work needs, and make sure
    the values ``need`` names are computed.  ``alive_now``: alive(it), if known."""
    if stop > it.seg_start:
        produced, reads_after = it.path.plan(it.seg_start, stop)
        kept = {p._id for p in (alive(it) if alive_now is None else alive_now)}
        outputs = tuple(sorted(produced & (reads_after | kept | set(need) | it.unit.escaping)))
        if outputs:
            run(it, it.seg_start, stop, outputs)
        it.seg_start = stop
    missing = [i for i in need if i not in it.env]
    if missing:
        run(it, 0, it.seg_start, tuple(sorted(missing)))


def run(it, start, stop, outputs):
    """Launch the segment [start, stop) -> outputs of the iteration's path."""
    unit = it.unit
    seg, exe = it.path.segment(start, stop, outputs, unit.note_compile)
    if unit.compiles > settings["max_compiles"] and not unit.eager_reason:
        # Variants keep needing new executables (lengths, shapes): compiling costs more
        # than it saves; the unit runs eagerly from its next call.
        unit.eager_reason = f"compiled {unit.compiles} segments (max_compiles)"
    env = it.env
    missing = () if all(map(env.__contains__, seg.inputs)) else \
        tuple(sorted(i for i in seg.inputs if i not in env))
    if missing:
        # Computed before `start` but not kept: the path this iteration has moved to reads
        # a value the one it started on did not.  Recompute it from the feeds.
        if start == 0:
            raise RuntimeError(f"terra_bc: no value for graph inputs {missing}")
        run(it, 0, start, missing)
    if it.recording is None:  # (while recording, JAX would record making the array)
        x64 = jax.config.jax_enable_x64
        values = exe(*[device_number(v, x64) if type(v) in NUMBER_TYPES else v
                       for v in map(env.__getitem__, seg.inputs)])
    else:
        values = exe(*map(env.__getitem__, seg.inputs))
    env.update(zip(seg.outputs, values))
    counts["segments_launched"] += 1


def value(it, id, stop):
    """The computed value of ``id``, produced by the recorded equations before ``stop``."""
    if id not in it.env:
        run(it, 0, stop, (id,))
    return it.env[id]


def settle(it, alive_now=None):
    """Every live placeholder takes its concrete value and leaves the iteration."""
    for p in alive(it) if alive_now is None else alive_now:
        if p._val is None:
            p._val = p._rec.val if p._rec is not None else it.env[p._id]
        p._rec = None
