"""Launching segments: which recorded equations run when, and with what values.

An iteration launches the equations it has passed (``Iteration.seg_start`` up to a mark)
when Python needs a value (a fetch, a graph break, JAX code we do not see) and at its end.
A launch computes only what later work needs: values the rest of the path reads, values
Python still holds (``alive``) and values that outlived past iterations.  JAX dispatch is
asynchronous, so the segment runs while Python goes on; ``it.env`` maps value ids to the
arrays launched segments return (and to the values Python fed).
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from contextlib import nullcontext

import jax

from .. import jaxpr_builder
from ..jaxpr_builder import Recorder, set_current_trace
from ..counters import counts
from . import compiling, journal, pacing, timeline
from .context import EAGER, TRACE
from .events import BeginEvent
from .settings import DONATE_MIN_BYTES, LAZY_LAUNCHES, settings
from .values import MISS, NUMBER_TYPES, ArrayImpl, device_number

_LIVE_REFS = 3  # sys.getrefcount(p) of a placeholder only it.live holds, inside alive()
DONATE_MIN_BUFFER = 1 << 16  # smaller inputs are not checked (each check costs ~1 us)
NONE = frozenset()  # (no input donated, no effect happened)
_launch_numbers = itertools.count(1)  # (values.device_number: seen again in another launch?)


def alive(it):
    """The placeholders of ``it`` that Python still holds."""
    # it.live holds each placeholder once; any other reference means Python kept it.
    return [p for p in it.live if sys.getrefcount(p) > _LIVE_REFS]


def held(it):
    """Ids of values recorded abstractly (tracing) that later work may read: those of live
    placeholders and of tracers Python holds itself (a gradient's residuals, a value a
    library kept).  What the rest of the path reads is not recorded yet; only these can be."""
    ids = {p._id for p in alive(it)}
    tracers = it.tracers
    wrapped = {p._id for p in it.live if p._rec is not None}
    for t in it.path.recorder.unvalued():
        # References: the list, `t`, getrefcount's argument; it.tracers, and the
        # placeholder wrapping it (tracing.wrap) for an op's output.  A tracer JAX handed
        # Python itself (`jax_array[placeholder]`) that an op then used is in it.tracers
        # with no placeholder: counting one for it missed Python's own reference, and the
        # value, never computed, could not be read after the iteration.
        known = 3 + (tracers.get(t.id) is t) + (t.id in wrapped)
        if sys.getrefcount(t) > known:
            ids.add(t.id)
    return ids


def launch(it, stop, need, alive_now=None, final=False):
    """Run the recorded equations [it.seg_start, stop) that later work needs, and make sure
    the values ``need`` names are computed.  ``alive_now``: alive(it), if known; ``final``:
    the iteration's last launch (no other path can be taken after it)."""
    if stop > it.seg_start:
        if it.mode == TRACE:  # the path goes on being recorded: no plan is final yet
            rec = it.path.recorder
            produced = rec.wiring(it.seg_start, stop)[1]
            kept = held(it)
            outputs = tuple(sorted(produced & ((kept - rec.quiet_values()) | set(need)
                                               | it.path.escaping)))
            required, later = None, traced_later(it, kept, need)
        else:
            produced, reads_after = it.path.plan(it.seg_start, stop)
            kept = {p._id for p in (alive(it) if alive_now is None else alive_now)}
            kept -= it.path.recorder.quiet_values()  # (see Recorder.quiet_values)
            required = produced & (reads_after | set(need) | it.path.escaping)
            later = required | kept
            outputs = tuple(sorted(produced & later))
        if outputs or pending_effects(it, it.seg_start, stop):
            run(it, it.seg_start, stop, outputs, required, later, final)
        it.seg_start = stop
    missing = [i for i in need if i not in it.env]
    if missing:
        run(it, 0, it.seg_start, tuple(sorted(missing)))


def _launched(it, entry, args, dead, effects):
    """``entry`` run on ``args`` (``compiling.run``); an error then is the program's own,
    and the iteration launches nothing more.  A callback's Python that runs while the
    segment does is the program's own too, run as eager JAX runs it: its array operators
    are not ops of this iteration (``opaque_depth``)."""
    it.opaque_depth += 1
    try:
        return compiling.run(it, entry, args, dead)
    except Exception as error:
        stop_launching(it, effects, error)
        raise
    finally:
        it.opaque_depth -= 1


def traced_later(it, kept, need):
    """What a launch of a traced iteration must not donate: the values later work may read
    (``kept``: what Python holds, ``held``; ``need``; values read after the iteration);
    None where it donates nothing.  What the rest of the path reads is not recorded yet, but
    it can only read what Python holds: a fed array it passes again is one it holds (the
    reference count in ``donatable`` sees it), a value of the recording one whose placeholder
    or tracer it holds.  Except where terra_bc reads recorded values itself later: inside a
    differentiated function's Python (the gradient is recorded from its forward at its end),
    a ``jax.vjp`` / ``jvp`` / ``vmap`` forward applied or batched later, inside an opaque op;
    and on a unit's second or later path, whose iteration may still move to another path
    (recomputing a value from the feeds).  The first turn of ``params = update(params,
    grads)`` then reuses the old parameters' buffers as every later turn does."""
    if (not settings["donate"] or it.grad_depth or it.opaque_depth or it.batching
            or any(p is not it.path for p in it.unit.paths)
            or any(type(ev) is BeginEvent and ev.kind != "grad-begin" for ev in it.path.events)):
        return None
    return kept | set(need) | it.path.escaping


def pending_effects(it, start, stop):
    """Do equations [start, stop) have effects (callbacks, prints) that have not happened
    in this iteration yet?  Their segment runs even if Python needs none of its values."""
    done = it.effects_ran
    return any(k not in done for k in it.path.recorder.effects_in(start, stop))


def run(it, start, stop, outputs, required=None, later=None, final=False):
    """Launch the segment [start, stop) -> outputs of the iteration's path.  Each effect
    (a callback, a print) happens once per iteration: those that happened already (as they
    were recorded, or in an earlier launch) are left out of the segment.

    ``required``: the outputs later work reads for sure; the others only Python still held
    when asked.  A compiled segment of this range that computes the required ones serves
    rather than a compile: a value it leaves out is computed only if Python reads it
    (``LateValue``; that launch donates nothing).  Which values Python holds varies with the
    cyclic garbage collector (a library's gradients, held in reference cycles).

    ``later``: in co-execution, the ids of values read after ``stop``; inputs that are not,
    and that nothing else holds, are given to the segment to reuse (``donatable``;
    ``final``: the iteration's last launch)."""
    unit = it.unit
    effects = it.path.recorder.effects_in(start, stop)
    skip = _happened(it, effects)
    entry = it.path.segment(start, stop, outputs, skip, required)
    seg = entry.segment
    if later is not None and list(outputs) != seg.outputs and not set(outputs).issubset(seg.outputs):
        # (a segment made for other outputs serves: see LateValue)
        later = None
    if unit.compiles > settings["max_compiles"]:
        unit.compiled_too_often()
    env = it.env
    missing = () if all(map(env.__contains__, seg.inputs)) else \
        tuple(sorted(i for i in seg.inputs if i not in env and not _known(it, i)))
    if missing:
        # Computed before `start` but not kept: the path this iteration has moved to reads
        # a value the one it started on did not.  Recompute it from the feeds.
        if start == 0:
            raise RuntimeError(f"terra_bc: no value for graph inputs {missing}")
        run(it, 0, start, missing)
    t0 = time.perf_counter() if timeline.on else 0.0
    # (While recording, the segment runs under the trace the recording runs eager work on.)
    with nullcontext() if it.recording is None else set_current_trace(it.recording.parent_trace()):
        args = list(map(env.__getitem__, seg.inputs))
        sizes = seg.sizes or input_bytes(seg)
        if sizes[3]:  # (a fed Python number is a weakly typed scalar input)
            x64, launch_number = jax.config.jax_enable_x64, next(_launch_numbers)
            for k in sizes[3]:
                if type(args[k]) in NUMBER_TYPES:
                    args[k] = device_number(args[k], x64, launch_number)
        dead = NONE
        if later is not None and sizes[2] >= DONATE_MIN_BYTES:
            dead = donatable(it, seg, args, later, final)
        for k in dead:  # (nothing reads them again: let go of them as the segment runs)
            del env[seg.inputs[k]]
        values = _launched(it, entry, args, dead, effects)
        del args
    if pacing.needed():
        pacing.launched(values)
    env.update(zip(seg.outputs, values))
    it.effects_ran.update(effects)
    counts["segments_launched"] += 1
    if t0:  # (dispatch; the device runs it asynchronously: a watcher sees it finish)
        name = journal.segment_name(it, entry)
        timeline.add(name, "launch", t0, it.mode)
        timeline.running(name, t0, values)


def stop_launching(it, effects, error):
    """The program's own ``error`` met in a launch (a callback that raised: eager JAX raised
    it at that op, so nothing after it ran).  The iteration launches nothing more: the
    launch's effects count as happened (those before the failing one did, and eager JAX
    ran none after it), its rest runs eagerly, and each value Python holds that no launch
    computed is computed op by op if Python reads it (``LateValue``: one that needed the
    failed op raises its error again).  The unit goes on co-executing: the error is the
    program's, not terra_bc's (``Unit._failed_at_end`` raises it as such)."""
    it.effects_ran.update(effects)
    recording, it.recording = it.recording, None
    if recording is not None:
        recording.__exit__(None, None, None)
        it.path.recorder.compute_values(None)
    it.mode, it.failed = EAGER, error
    it.seg_start = it.path.recorder.mark()
    env = it.env
    for p in alive(it):
        if p._val is None:
            if p._id in env:
                p._val, p._rec = env[p._id], None
            else:
                p._rec = LateValue(it, p._id)


def donatable(it, seg, args, later, final=False):
    """Positions of the inputs of a launch whose buffers nothing can read
    afterwards, so the segment may reuse them (the old parameters of ``params =
    update(params, grads)``): a ``jax.Array`` held by nothing but this launch (no Python
    reference, no placeholder; ``it.env``, ``args`` and, while tracing, the feed's tracer
    hold it once per position it is fed at), read by no equation after it (``later``: the
    path's plan, or ``traced_later``), on a path no other recorded path shares at this point
    (moving to one could recompute a value from it), unless this is the iteration's
    ``final`` launch; only inputs of ``DONATE_MIN_BUFFER`` bytes or more, and only where
    they hold ``DONATE_MIN_BYTES`` at least (the donating executable is one more compile,
    except a traced launch's: the segment's first).  Counted in ``buffers_donated``."""
    sizes, big, _, _ = input_bytes(seg)
    if not settings["donate"] or not final and any(it.path.others_sharing(it.unit.paths, it.pos)):
        return NONE
    env, fed, inputs = it.env, {}, seg.inputs
    for k in big:
        v = args[k]
        # (A fed Python number is passed as a device array values.device_number keeps.)
        if type(v) is ArrayImpl and env.get(inputs[k]) is v:
            if inputs[k] in later:
                fed[id(v)] = None  # (read later: at no position)
            elif fed.get(id(v), ()) is not None:
                fed.setdefault(id(v), []).append(k)
    dead, size = set(), 0
    for k, positions in ((p[0], p) for p in fed.values() if p):
        v = args[k]  # references: it.env and args once per position, v, getrefcount's
        # argument, and pacing's (the last steps' outputs it will wait for)
        paced = pacing.holds(v) if pacing.needed() else 0
        traced = len(positions) if it.mode == TRACE else 0  # (each feed's tracer: tracing.feed)
        if sys.getrefcount(v) == 2 * len(positions) + 2 + paced + traced:
            dead.update(positions)
            size += sizes[k]
    if size < DONATE_MIN_BYTES:  # (a donating executable is one more compile)
        return NONE
    counts["buffers_donated"] += sum(1 for p in fed.values() if p and p[0] in dead)
    return frozenset(dead)


def input_bytes(seg):
    """(The bytes of each input of ``seg``, from their avals: ``Array.nbytes`` costs
    microseconds; the positions of those of ``DONATE_MIN_BUFFER`` or more; their sum; the
    positions of weakly typed scalars, the only ones a fed Python number can take), kept on
    the segment."""
    found = seg.sizes
    if found is None:
        avals = seg.jaxpr.in_avals
        sizes = tuple(math.prod(a.shape) * getattr(a.dtype, "itemsize", 0) for a in avals)
        big = tuple(k for k, n in enumerate(sizes) if n >= DONATE_MIN_BUFFER)
        weak = tuple(k for k, a in enumerate(avals) if not a.shape and getattr(a, "weak_type", False))
        found = seg.sizes = (sizes, big, sum(sizes[k] for k in big), weak)
    return found


def _happened(it, effects):
    """Those of the equations ``effects`` whose effects happened in ``it`` already."""
    return frozenset(k for k in effects if k in it.effects_ran) if effects else NONE


def _known(it, id):
    """Put the value of ``id`` in ``it.env`` if this iteration computed it as it was
    recorded (an input of a segment that leaves out an effect that happened)."""
    t = it.tracers.get(id)
    value = MISS if t is None else it.path.recorder.known_value(t, MISS)
    if value is MISS:
        return False
    it.env[id] = value
    return True


def compute_recorded(it, tracers):
    """The values of tracers recorded abstractly (``Recorder.compute_values``): the
    equations recorded so far run as a segment, as co-execution will launch them at this
    point of the path, and every held value it computes is handed to its tracer.  A traced
    iteration that needs values too often records eagerly from then on (``LAZY_LAUNCHES``)."""
    need = [t.id for t in tracers if t.id not in it.env]
    if need:
        rec = it.path.recorder
        launch(it, rec.mark(), need)
        counts["trace_launches"] += 1
        it.trace_launches += 1
        if it.trace_launches >= LAZY_LAUNCHES and not it.batching:  # (see vmapping.plan)
            it.unit.abstract_tracing = False
            rec.compute_values(computer(it), lazy=False)
        give_values(it)
    return [it.env[t.id] for t in tracers]


def computer(it):
    """The Recorder's callback for values of ``it``'s tracers recorded abstractly."""
    return lambda tracers: compute_recorded(it, tracers)


def give_values(it):
    """Hand computed values to the tracers recorded abstractly that are still alive."""
    env, rec = it.env, it.path.recorder
    for t in rec.unvalued():
        v = env.get(t.id, MISS)
        if v is not MISS:
            rec.give_value(t, v)


def value(it, id, stop):
    """The computed value of ``id``, produced by the recorded equations before ``stop``."""
    if id not in it.env:
        run(it, 0, stop, (id,))
    return it.env[id]


def recover(it, traced=False):
    """After a failed launch, or a step of terra_bc's own that did not finish (an interrupt
    came, see Iteration.abort): compute the values of ``it`` that Python holds op by op from
    its recording and feeds, as eager JAX would (no compile; effects that happened already
    are not repeated), and settle them.  Nothing else the iteration prepared (segments,
    what they computed, where it is on its path) is needed.  ``traced``: it was tracing, so
    the tracers recorded abstractly that Python holds itself get their values too.  An
    error here is the program's own."""
    env, rec = it.env, it.path.recorder
    held_now = [p for p in alive(it) if p._val is None]
    want = {p._id for p in held_now}
    if traced:
        want |= held(it) & {t.id for t in rec.unvalued()}
    ids = tuple(sorted(i for i in want if i not in env and not _known(it, i)))
    if ids:
        stop = rec.mark()
        seg = rec.segment(ids, 0, stop, _happened(it, rec.effects_in(0, stop)))
        env.update(zip(seg.outputs, _evaluated(seg, env)))
    for p in held_now:
        p._val, p._rec = env[p._id], None
    if traced:
        give_values(it)


def settle(it, alive_now=None):
    """Every live placeholder takes its concrete value and leaves the iteration (one no
    launch computed gets a LateValue, see run)."""
    env, quiet = it.env, it.path.recorder.quiet_values()
    for p in alive(it) if alive_now is None else alive_now:
        if p._val is None:
            if type(p._rec) is LateValue:
                continue  # (computed if read: see stop_launching)
            if p._rec is not None and not (p._id in quiet and p._id not in env and
                                           Recorder.known_value(p._rec, MISS) is MISS):
                p._val = p._rec.val
            elif p._id in env:
                p._val = env[p._id]
            else:
                p._rec = LateValue(it, p._id)
                continue
        p._rec = None


class LateValue:
    """The value of a placeholder Python still held at a launch that reused a compiled
    segment not computing it (see run), or when a launch met the program's error (see
    stop_launching): computed from the iteration's recording and feeds, op by op, if Python
    reads it (``.val``, as a recording tracer's).  Read once, the path's later launches
    compute it (it joins ``Path.escaping``)."""
    __slots__ = ("path", "id", "stop", "env", "_value")

    def __init__(self, it, id):
        self.path, self.id, self.stop = it.path, id, it.seg_start
        self.env, self._value = it.env, None

    @property
    def val(self):
        if self._value is None:
            path = self.path
            path.escaping.add(self.id)
            seg = path.recorder.segment([self.id], 0, self.stop, pure=True)  # (effects ran)
            self._value = _evaluated(seg, self.env)[0]
            self.path = self.env = None
        return self._value


def _evaluated(seg, env):
    """``seg`` run op by op (no compile) on an iteration's values ``env`` (recover, and
    LateValue): its inputs are the iteration's feeds and what its launches computed."""
    gone = [i for i in seg.inputs if i not in env]
    if gone:  # (an earlier launch of the iteration donated them: donatable)
        raise RuntimeError(
            f"terra_bc: a value of a past iteration cannot be computed: its inputs "
            f"{gone} were donated to a segment; run with TERRA_BC_DONATE=0")
    return jaxpr_builder.evaluate_segment(seg, [env[i] for i in seg.inputs])
