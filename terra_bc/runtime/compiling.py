"""Compiling segments: whether a new segment is compiled, on which thread, and what runs
until it is ready.  The one place that decides it (``run``).

* A unit's first path is compiled in its traced iteration, on the calling thread: the
  iteration has no values but the ones segments compute, and one compile (what
  ``jax.jit``'s first call pays) costs less than running the equations eagerly a first time
  (eager JAX compiles each operation once).  Any other segment more of whose operations no
  eager run has compiled than is worth it is compiled at its launch too (``Choice``: the
  first compiles an eager run would cost against the compile times of the unit's paths to
  come, which operations run eagerly once serve as well).
* Any other new segment (recorded eagerly-valued: a unit whose paths or shapes keep
  changing, or the setting; JAX holds the executables of its primitives) runs its
  equations eagerly (``jaxpr_builder.evaluate_segment``) and
  is compiled only once that has paid: when the time its eager runs took reaches what the
  compile will cost Python (ski rental: rent until the rent paid equals the price), and never
  at its first launch (a path seen once is not compiled).  It is compiled on a worker thread
  while Python goes on running it eagerly, so its price is the share of the compile Python
  loses meanwhile (``BACKGROUND_SHARE``: XLA compiles without the GIL, JAX lowers with it);
  the first launch after the compile is done runs the executable.  No iteration waits for it.

``terra_bc.stats()``: ``compiles`` (executables made), ``compiles_background`` (of them on
the worker), ``compiles_skipped`` (launches run eagerly because compiling had not paid yet),
``segments_eager`` (every launch run eagerly), ``compile_seconds`` (compile time, on any
thread) and ``compile_wait_seconds`` (time Python was blocked by a compile or a first call).
"""
from __future__ import annotations

import atexit
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .. import jaxpr_builder
from ..counters import counts
from . import journal, pacing, timeline
from .settings import (BACKGROUND_SHARE, COMPILE_SECONDS_MIN, COMPILE_SECONDS_PER_EQUATION,
                       EAGER_FIRST_RUN_SECONDS, settings)


@dataclass(slots=True, eq=False)
class Job:
    """A segment compiled on the worker thread: ``fn`` (its jit function) was lowered for the
    values of the launch that asked for it (``lowered``, on the calling thread: lowering is
    Python and holds the GIL) and XLA compiles that on the worker, without the GIL."""
    segment: object
    fn: object
    lowered: object
    name: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    seconds: float = 0.0       # lowering and compiling


@dataclass(slots=True)
class SegmentCost:
    """What running a segment eagerly has cost so far (its structure's key)."""
    launches: int = 0
    eager_seconds: float = 0.0
    job: Job | None = None


_costs = {}                    # Segment.key -> SegmentCost (segments not compiled yet)
_rate = [0.0, 0]               # compile seconds and equations measured (either thread)
_first_runs = [0.0, 0]         # seconds of eager runs with cold operations, and those operations


def run(it, entry, args, donate=()):
    """Launch ``entry`` (a ``paths.SegmentEntry``) on ``args``: its executable if it has
    one, else as this module decides.  Returns the output values.  Each decision is
    journaled (a compile) or logged (an eager run) once, where it is made.  ``donate``: the
    positions of inputs nothing reads afterwards, whose buffers a compiled segment may
    reuse (``launching.donatable``).  A compiled segment that fails runs op by op instead
    (``_failed``): an error raised here is the program's own, as eager JAX raises it."""
    if settings["op_by_op"]:
        counts["segments_eager"] += 1
        return jaxpr_builder.evaluate_segment(entry.segment, args)
    exe = entry.exe
    if exe is None:
        exe = entry.exe = jaxpr_builder.cached_executable(entry.segment)
    if exe is not None:
        try:
            if donate:
                values = jaxpr_builder.run_donating(entry.segment, args, donate,
                                                    journal.segment_name(it, entry))
                if values is not None:
                    return values
            return exe(*args)
        except Exception as error:
            return _failed(it, entry, args, donate, error)
    if it.abandoning:  # (its unit is not the repeating level: this graph does not come back)
        if "compiles" in journal.logged:
            journal.say("compiles", "%s runs eagerly: its unit is not the repeating level",
                        journal.segment_name(it, entry))
        counts["segments_eager"] += 1
        return jaxpr_builder.evaluate_segment(entry.segment, args)
    if not compiles_later(it, entry):
        try:
            return _compile_now(it, entry, args, donate=donate)
        except Exception as error:
            return _failed(it, entry, args, donate, error)
    return _until_it_pays(it, entry, args)


def _compile_now(it, entry, args, why=None, donate=()):
    """Compile ``entry``'s segment on this thread (its first call) and run it; ``donate``:
    as the executable reusing those inputs' buffers (a traced launch's: ``run``), where
    an output can take them."""
    # (No executable of its structure exists, checked by run: this makes one.)
    name = journal.segment_name(it, entry)
    t0 = time.perf_counter()
    values = jaxpr_builder.run_donating(entry.segment, args, donate, name) if donate else None
    if values is not None:
        # (the plain executable, compiled where a launch donates otherwise: at its first
        # call, counted then)
        entry.exe = jaxpr_builder.keep_executable(
            entry.segment, jaxpr_builder.jit_segment(entry.segment, name), lazy=True)
        reused = len({id(args[k]) for k in donate})
        _noted_now(it, entry, why, f", reusing {reused} input buffer(s)")
    else:
        entry.exe = jaxpr_builder.keep_executable(entry.segment,
                                                  jaxpr_builder.jit_segment(entry.segment, name))
        _noted_now(it, entry, why)
        t0 = time.perf_counter()  # (its first call compiles it)
        values = entry.exe(*args)
    _measured(entry.segment, time.perf_counter() - t0)
    if timeline.on:
        timeline.add(name, "compile", t0, "on the calling thread")
    return values


def _noted_now(it, entry, why, how=""):
    it.unit.note_compile()
    journal.note(it.unit, journal.Compiled, journal.path_number(it.unit, it.path), entry.start,
                 entry.stop, "now, on the calling thread" + how, why or _why_now(it, entry))


# What JAX's C++ function caches raise for a key whose computation is still marked in
# flight: an interrupt (KeyboardInterrupt from a signal) that landed inside such a call
# leaves the mark, and every later call of that executable raised RecursionError.  Not the
# program's: its segment then runs op by op, on other cache entries.
JAX_CACHE_IN_FLIGHT = "Recursively calling"


def _failed(it, entry, args, donate, error):
    """``entry``'s compiled segment failed: its compile (terra_bc's failure), or its run,
    where XLA reports the program's own error as its runtime error too (a callback that
    raised: ``JaxRuntimeError`` where eager JAX raises the callback's ``ValueError``).  Its
    equations run op by op, as eager JAX runs them.  If they run, the failure was
    terra_bc's: their values serve, and the unit runs eagerly from its next iteration (the
    reason in explain()).  If they raise, that is the program's error, raised as eager JAX
    raises it (its unit goes on co-executing: ``launching.run``)."""
    if any(getattr(args[k], "is_deleted", lambda: False)() for k in donate):
        raise error  # (it consumed inputs given to it: nothing to run again)
    if isinstance(error, RecursionError) and not str(error).startswith(JAX_CACHE_IN_FLIGHT):
        raise error  # (Python's stack is spent, as eager JAX would find it: op by op too)
    try:
        values = jaxpr_builder.evaluate_segment(entry.segment, args)
    except Exception as program_error:
        raise program_error from None  # (XLA's report of it would only hide it)
    unit = it.unit
    reason = f"a segment failed to compile or run ({type(error).__name__}: {error})"
    unit.eager_reason = unit.eager_reason or reason
    counts["eager_fallbacks"] += 1
    journal.fallback(unit, reason)
    return values


def _until_it_pays(it, entry, args):
    """Ski rental: run ``entry``'s equations eagerly until that has cost what compiling it
    costs Python, then compile it on the worker; its first launch after that uses it."""
    seg = entry.segment
    cost = _costs.get(seg.key)
    if cost is None:
        cost = _costs[seg.key] = SegmentCost()
        if "compiles" in journal.logged:
            journal.say("compiles", "%s runs eagerly until compiling pays (expected compile "
                        "%.2f s; %d operation(s) never run eagerly)", journal.segment_name(it, entry),
                        expected_compile_seconds(seg), jaxpr_builder.cold_operations(seg))
    job = cost.job
    if job is not None and job.done.is_set():
        del _costs[seg.key]
        try:
            entry.exe = _take(job, it)
            return entry.exe(*args)
        except Exception as error:
            return _failed(it, entry, args, (), error)
    if job is None:
        counts["compiles_skipped"] += 1
        price = BACKGROUND_SHARE * expected_compile_seconds(seg)
        if cost.launches and cost.eager_seconds >= price:
            cost.job = _submit(seg, args, journal.segment_name(it, entry))
            it.unit.note_compile()
            journal.note(it.unit, journal.Compiled, journal.path_number(it.unit, it.path),
                         entry.start, entry.stop, "on the worker thread",
                         f"its eager runs took {cost.eager_seconds:.3f} s, the share of its "
                         f"expected compile Python would lose ({price:.3f} s)")
    counts["segments_eager"] += 1
    it.unit.eager_launches += 1
    cold = jaxpr_builder.cold_operations(seg)
    t0 = time.perf_counter()
    try:
        values = jaxpr_builder.evaluate_segment(seg, args)
    except Exception as error:
        return _eager_failed(it, entry, args, error)
    took = time.perf_counter() - t0
    cost.eager_seconds += took
    if cold:  # (what a first compile of an operation costs here: Choice.per_operation)
        _first_runs[0] += took
        _first_runs[1] += cold
    cost.launches += 1
    return values


def _eager_failed(it, entry, args, error):
    """Running ``entry``'s equations one by one failed.  Some equations JAX records inside a
    ``jit`` cannot be bound on their own (an explicit sharding needs the mesh context its
    ``jit`` gave it): where the segment has no effects (none can have happened), it is
    compiled and run instead.  If that fails too, or effects may have run, ``error`` is the
    program's own, raised as eager JAX raises it."""
    if entry.segment.jaxpr.effects or isinstance(error, RecursionError):
        raise error
    try:
        return _compile_now(it, entry, args, f"running it eagerly failed ({type(error).__name__}: "
                            f"{str(error)[:120]})")
    except Exception:
        raise error from None


def forget():
    """Forget what this process learnt of eager runs: which operations ran eagerly and what
    their first runs cost (``terra_bc.reset()``; tests start from a fresh process's view)."""
    jaxpr_builder.forget_warm()
    _first_runs[:] = [0.0, 0]


def _why_now(it, entry):
    """Why a new segment is compiled at its launch, on the calling thread (journal)."""
    if not settings["background_compile"]:
        return "background_compile is off"
    if pacing.several_processes():
        return "one of several processes: each compiles at the same launch"
    if _first_path(it):
        return "a traced iteration needs its values: the unit's first path"
    return ("a traced iteration needs its values; " if it.recording is not None else "") + \
        str(choice(it, entry))


def compiles_later(it, entry):
    """Does ``entry``'s segment run eagerly until compiling it pays (else: compile now)?

    A segment all of whose equations were recorded eagerly-valued runs eagerly (JAX
    compiled each as it was recorded), except in the traced iteration that recorded it; so
    does one all of whose operations an eager run compiled already.  The first path of a
    unit is compiled in its traced iteration (what ``jax.jit``'s first call pays, less than
    eager's first step).  Otherwise it runs eagerly where the first compiles that costs are
    worth less than compiling it (``Choice``).  Never in one of several processes: the
    choice depends on timing, and processes that chose differently would run different
    collectives (docs/distributed.md)."""
    if not settings["background_compile"] or pacing.several_processes():
        return False
    if not entry.cold:
        return it.recording is None
    if it.recording is not None and _first_path(it):
        return False
    return not jaxpr_builder.cold_operations(entry.segment) or choice(it, entry).eager


def _first_path(it):
    """Is ``it`` on its unit's only path (no other recorded)?"""
    return not any(p is not it.path for p in it.unit.paths)


def eager_trace_costs_more(path, stop):
    """Would a trace leaving ``path`` at equation ``stop`` cost more recorded eagerly-valued
    than abstractly?  Recorded eagerly-valued, its operations run eagerly as they are
    recorded, and eager JAX compiles each the first time it runs; recorded abstractly, its
    values come from its segment, compiled (or run eagerly where ``Choice`` says so).
    Where ``path``'s own operations never ran eagerly (its segments were compiled) and a
    first compile of each costs more than compiling one of its segments, the new path,
    made mostly of the same operations, is recorded abstractly whatever
    ``Unit.traces_abstractly`` says (that rule is for paths that do not come back: a path
    whose segments ran eagerly has few cold operations, and traces as it says).  The
    detector of benchmarks/control.py (c), whose box count changes each step: whole run
    9.5-9.9 s before this, 5.9-6.1 s after (30 steps, 2-core CPU)."""
    segments = [e.segment for e in path.segments.values() if e.stop > stop]
    if not segments:
        return False
    cold = jaxpr_builder.cold_operations_in(segments)
    return cold * first_run_seconds() > max(expected_compile_seconds(s) for s in segments)


def first_run_seconds():
    """What an operation's first eager run costs (its compile), as measured on this
    process's eager runs once 20 have been, a prior until then."""
    seconds, ops = _first_runs
    return seconds / ops if ops >= 20 else EAGER_FIRST_RUN_SECONDS


class Choice(NamedTuple):
    """Run a new segment eagerly, or compile it.  Eager JAX compiles each operation
    (primitive, parameters, input avals) the first time it runs, whatever path runs it:
    running the segment eagerly first costs one such compile per operation no eager run has
    compiled yet (``cold``: equations repeating an operation, a cell applied at every node
    of a tree, compile it once), at the cost measured per operation (``per_operation``).  A
    compile serves this segment alone; those first compiles serve every path using the
    operations too.  So they are weighed against the compile times the unit's paths to come
    would pay: a unit that has made ``paths`` other paths is taken to make as many more
    (``paths`` is all its history says), and ``shared`` of the cold operations are ones its
    other paths use (they come back in new paths).  Eager where
    ``cold * per_operation < compile * (1 + paths * shared)``."""
    eager: bool
    cold: int
    per_operation: float
    compile: float
    paths: int
    shared: float

    def __str__(self):
        return (f"{self.cold} operation(s) never run eagerly would compile first "
                f"(~{self.cold * self.per_operation:.2f} s), against its expected compile "
                f"({self.compile:.2f} s) and those of paths to come ({self.paths} other "
                f"path(s), {self.shared:.0%} of these operations shared with them)")


def choice(it, entry):
    """Decide ``entry``'s segment (see Choice)."""
    seg = entry.segment
    cold = jaxpr_builder.cold_operations(seg)
    others = [p for p in it.unit.paths if p is not it.path]
    shared = 0.0
    if others and cold:
        known = set()
        for p in others:
            for e in p.segments.values():
                known |= jaxpr_builder.operations_of(e.segment)
        shared = jaxpr_builder.cold_operations(seg, among=known) / cold
    per_op = first_run_seconds()
    compile_s = expected_compile_seconds(seg)
    eager = cold * per_op < compile_s * (1 + len(others) * shared)
    return Choice(eager, cold, per_op, compile_s, len(others), shared)


def state(entry):
    """How ``entry``'s segment runs now (explain())."""
    if entry.exe is not None:
        return "compiled"
    cold = f"{entry.cold} equation(s) recorded abstractly; " if entry.cold else ""
    cost = _costs.get(entry.segment.key)
    if cost is None:
        return cold + "not launched"
    job = cost.job
    return (cold + f"run eagerly {cost.launches} time(s)"
            + ("" if job is None else "; compiled, ready" if job.done.is_set() else "; compiling"))


def expected_compile_seconds(segment):
    """The compile time expected for ``segment``: its equations at the rate measured on the
    compiles so far (a prior until then)."""
    seconds, eqns = _rate
    per_eqn = seconds / eqns if eqns >= 50 else COMPILE_SECONDS_PER_EQUATION
    return max(COMPILE_SECONDS_MIN, per_eqn * len(segment.jaxpr.jaxpr.eqns))


def _measured(segment, seconds):
    _rate[0] += seconds
    _rate[1] += len(segment.jaxpr.jaxpr.eqns)


def _take(job, it):
    """The executable of a finished job (compiled again here if the worker failed)."""
    if job.error is not None:
        return jaxpr_builder.compile_segment(job.segment, name=job.name)
    _measured(job.segment, job.seconds)
    counts["compile_seconds"] += job.seconds
    # Its first call traces it again and finds the executable compiled: timed as a wait.
    return jaxpr_builder.keep_executable(job.segment, job.fn, wait_only=True)


# ------------------------------------------------------------------ the worker thread

_queue = collections.deque()
_wake = threading.Condition()
_worker = None
_running = None                # the job the worker is compiling


def _submit(segment, args, name):
    """Lower ``segment`` for ``args`` here and hand its compile to the worker.  (Lowered on
    the worker, it competed with Python for the GIL: an MLP step's segment was not compiled
    after 30 steps.)"""
    global _worker
    fn = jaxpr_builder.jit_segment(segment, name)
    t0 = time.perf_counter()
    job = Job(segment, fn, None, name)
    try:
        job.lowered = fn.lower(*args)
    except Exception as e:  # (compiled again on the calling thread, where it raises)
        job.error = e
    job.seconds = time.perf_counter() - t0
    counts["compile_wait_seconds"] += job.seconds
    counts["compiles_background"] += 1
    if job.error is not None:
        job.done.set()
        return job
    with _wake:
        _queue.append(job)
        if _worker is None:
            _worker = threading.Thread(target=_work, name="terra_bc-compile", daemon=True)
            _worker.start()
            atexit.register(_at_exit)
        _wake.notify()
    return job


def _work():
    global _running
    while True:
        with _wake:
            while not _queue:
                _wake.wait()
            job = _running = _queue.popleft()
        t0 = time.perf_counter()
        try:
            _compile(job)
        except BaseException as e:  # (the main thread compiles it again and sees the error)
            job.error = e
        job.seconds += time.perf_counter() - t0
        job.lowered = None
        if timeline.on:
            timeline.add(job.name, "compile", t0, "on the worker thread")
        with _wake:
            _running = None
        job.done.set()


def _compile(job):
    """The worker's part: XLA compiles the lowered segment (it fills JAX's caches, so the
    jit function's first call finds the executable)."""
    job.lowered.compile()


def wait_for_compiles(timeout=None):
    """Block until every compile handed to the worker is done (tests, benchmarks)."""
    while True:
        with _wake:
            job = _running or (_queue[-1] if _queue else None)
        if job is None or not job.done.wait(timeout):
            return job is None


def _at_exit():
    """Compiles nobody will use are dropped; the one under way is waited for (the process
    must not tear JAX's backend down under it)."""
    with _wake:
        for job in _queue:
            job.lowered = None
        _queue.clear()
        job = _running
    if job is not None:
        job.done.wait(120)
