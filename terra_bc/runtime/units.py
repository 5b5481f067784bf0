"""Units: a function (or a loop) whose calls (turns) are iterations sharing one TraceGraph.

``Unit.begin`` opens an iteration in this thread (tracing if the unit has no path yet, else
co-executing from the path the last iteration took); ``Unit.end`` closes it and decides what
the unit does next: keep the new path, make no more paths (frozen), or run eagerly.
"""
from __future__ import annotations

import collections
import functools
import itertools
import sys
import threading
import time
import warnings
import weakref

from .. import _hook, frames
from ..counters import counts
from . import compiling, context, journal, launching, timeline
from .context import COEXEC, TRACE
from .iteration import Iteration
from .paths import Path
from .settings import (IDLE_AFTER, IDLE_SPANS, RETRACE_WINDOW, REVERT_FIRST, REVERT_MIN_RUNS,
                       settings)
from .values import PACKAGE_DIR, eager_value

all_units = weakref.WeakSet()  # for explain() and reset()
_serials = itertools.count()   # units in the order they were made (explain() lists them so)
_ended = [0, REVERT_FIRST]     # iterations ended in this process; the count of the next check


class Unit:
    """A function whose calls are iterations sharing one TraceGraph (its ``paths``)."""

    def __init__(self, fn, name=None, plain=None):
        self.fn = fn
        self.plain = plain or fn  # what runs while a tool watches: fn's original code
        self.name = name or getattr(fn, "__qualname__", "unit")
        self.serial = next(_serials)
        all_units.add(self)
        self.paths = []         # recorded paths (sharing prefixes): the unit's TraceGraph
        self.last_path = None   # the path the last iteration took: the next one starts on it
        self.frozen = None      # why no more paths are made (past a branch point: eager)
        self.dynamic = set()    # (line, op, leaf index): numbers fed, not baked (they changed)
        self.static = set()     # ... and those JAX needs static (feeding them failed)
        self.nested_calls = 0   # routed calls made while an opaque op ran (see tracing.op)
        self.recent = collections.deque(maxlen=RETRACE_WINDOW)  # did each recent call trace?
        self.calls = 0          # calls so far, for settings["warmup"]
        self.empty_calls = 0    # iterations in a row after which no path had an equation
        self.idle_left = 0      # calls still to run plainly (see note_emptiness)
        self.idle_span = IDLE_SPANS[0]  # ... the next time it idles
        self.compiles = 0       # segments compiled for it (settings["max_compiles"])
        self.eager_launches = 0  # segment launches run eagerly, not compiled (compiling.py)
        self.memo = {}          # what recent iterations remembered (Iteration.remember)
        self.memo_left = {}     # key -> iterations its entry may still go unasked (keep_memo)
        self.code = None        # a function unit's code (discovery), else None
        self.mark = None        # a loop unit's LoopMark / LoopHead (discovery), else None
        self.abstract_tracing = True  # off once a traced iteration read values too often
        self.reused = set()     # paths an iteration co-executed to their end
        self.eager_reason = None  # why the unit cannot be co-executed: it runs eagerly
        self.journal = collections.deque(maxlen=journal.JOURNAL_SIZE)  # divergences, compiles...
        self.fallbacks_noted = set()  # eager reasons journaled (each once: journal.fallback)
        self.busy = threading.Lock()  # held while an iteration of it is open (any thread)
        self.holder = None      # the thread holding busy
        self.taker = None       # the thread that last tried to take it (see untake)
        self.copies = {}        # thread id -> that thread's copy (see claim)
        self.origin = None      # the unit this one is a thread's copy of
        self.reset_pending = False  # terra_bc.reset() came while an iteration was open

    def compiled_too_often(self):
        """launching.run: its compiles passed max_compiles (variants keep needing new
        executables: compiling costs more than it saves).  It runs eagerly from its next
        call, and the user hears of it once."""
        if not self.eager_reason:
            self.eager_reason = f"compiled {self.compiles} segments (max_compiles)"
            _warn(f"terra_bc: unit {self.name} runs eagerly from now on: {self.eager_reason}; "
                  f"raise terra_bc.config(max_compiles=...) or terra_bc.reset() it")

    def __repr__(self):
        return f"<Unit {self.name}: {len(self.paths)} path(s)>"

    def runs_plainly(self, plain_calls=0):
        """Count a call; does it run plainly (not as an iteration)?  The first ``warmup``
        (+ ``plain_calls``) calls do, and those of an idle unit (``note_emptiness``)."""
        self.calls += 1
        if self.calls <= settings["warmup"] + plain_calls:
            return True
        if self.idle_left:
            self.idle_left -= 1
            counts["calls_idle"] += 1
            return True
        return False

    def note_emptiness(self):
        """After an iteration: a unit none of whose paths records an equation (each DL op
        of its iterations runs eagerly: a step the program jits itself, ops JAX would not
        record) gains nothing from co-execution and still pays for matching each op.  After
        IDLE_AFTER such iterations in a row its calls run plainly for ``idle_span`` calls,
        then one is an iteration again: a new path may record (a loop whose updates begin
        once its replay buffer fills).  Each such iteration that finds it still empty
        doubles the span (up to IDLE_SPANS[1])."""
        if not self.paths:
            return
        if any(p.recorder.mark() for p in self.paths):
            self.empty_calls, self.idle_span = 0, IDLE_SPANS[0]
            return
        self.empty_calls += 1
        if self.empty_calls >= IDLE_AFTER:
            self.idle_left = self.idle_span
            self.idle_span = min(2 * self.idle_span, IDLE_SPANS[1])
            self.empty_calls = IDLE_AFTER - 1  # (one more empty iteration idles it again)

    def idle_state(self):
        """How the unit idles, if it does (explain())."""
        if not self.idle_left:
            return ""
        return (f"; idle: no path records an equation (each DL op runs eagerly), "
                f"{self.idle_left} more call(s) run plainly")

    def traces_abstractly(self, leaving=None, stop=0):
        """Record the next trace abstractly?  That compiles the path it records as it goes,
        which pays where paths come back: the first trace, and new paths of a unit at
        least half of whose paths came back.  Not in a unit that has read values too often
        while tracing, nor in one whose paths mostly never came back (shapes that change
        every call: a growing cache): its traces record eagerly-valued, and a path's
        segments run eagerly until compiling them pays (compiling.py).  Except a trace
        leaving path ``leaving`` at equation ``stop`` (a divergence) where recording
        eagerly-valued would compile that path's operations one by one
        (``compiling.eager_trace_costs_more``)."""
        if not (settings["abstract_tracing"] and self.abstract_tracing):
            return False
        n = len(self.paths)
        return (n < 2 or 2 * len(self.reused) >= n
                or leaving is not None and compiling.eager_trace_costs_more(leaving, stop))

    def tracing_mode(self):
        """How the next trace records, and why (for explain())."""
        if not settings["abstract_tracing"]:
            return "eager-valued (setting)"
        if not self.abstract_tracing:
            return "eager-valued (a traced call read values too often: LAZY_LAUNCHES)"
        if not self.traces_abstractly():
            return (f"eager-valued ({len(self.reused)} of its {len(self.paths)} paths "
                    "were co-executed again)")
        return "abstract"

    def note_compile(self):
        self.compiles += 1

    def __call__(self, *args, **kwargs):
        __tracebackhide__ = True  # (pytest and IPython leave this frame out of tracebacks)
        if context.current() is not None or not context.plain_trace():
            # Inside another unit: part of its iteration.  While JAX traces the unit
            # (jax.jit, make_jaxpr, grad of it): the plain function, as JAX would see it.
            return self.fn(*args, **kwargs)
        if _hook.watched():  # a debugger, profiler or coverage tool: the user's own code (tools.py)
            return self.plain(*args, **kwargs)
        why = context.eager_only()
        if why:  # (jax_disable_jit, jax_debug_nans: JAX runs each op as the program reaches it)
            counts["eager_fallbacks"] += 1
            journal.fallback(self, why)
            return self.fn(*args, **kwargs)
        if self.eager_reason or self.runs_plainly():
            if self.eager_reason:
                counts["eager_fallbacks"] += 1
                journal.fallback(self, self.eager_reason)
            return self.fn(*args, **kwargs)
        it, (args, kwargs) = self.begin(args, kwargs)
        ok = False
        try:
            result = self.fn(*args, **kwargs)
            ok = True
        finally:
            try:
                it.unit.end(it, ok)
            except BaseException:
                if not it.ended:  # (an interrupt came as end began, before it did anything)
                    it.unit.end(it, ok)
                raise
        return eager_value(result)

    def discard(self, it):
        """Forget ``it``, an iteration that called no JAX (a loop's first turn, opened before
        the loop was known to call any): not counted, no path kept."""
        _leave(it)
        counts["iterations_traced"] -= 1

    def add_path(self, path):
        if self.frozen or len(self.paths) >= settings["max_paths"]:
            if not self.frozen:
                self.frozen = f"made {len(self.paths)} paths (max_paths)"
                _warn(f"terra_bc: unit {self.name} {self.frozen}: it makes no more paths, "
                      "and runs eagerly where Python leaves them; raise "
                      "terra_bc.config(max_paths=...) or terra_bc.reset() it")
            return
        self.paths.append(path)
        counts["paths_recorded"] += 1

    def claim(self):
        """The unit this thread's next iteration runs as, held (``busy``) until it ends.

        One thread at a time runs iterations of a unit: its paths, memo and counters are
        changed without locks.  A thread that finds it busy in another thread gets a copy of
        its own (same function or loop, paths of its own, compiled segments shared through
        the structural cache) and keeps using it: eight threads running one training loop
        each co-execute, with at most one copy per thread."""
        me = threading.get_ident()
        own = self.copies.get(me)
        if own is None:
            if self.holder == me:
                # Held by this thread, with no iteration open in it (none is, where a unit is
                # claimed): an interrupt came before the last one released it.  Still ours.
                return self
            self.taker = me  # (see untake)
            if self.busy.acquire(blocking=False):
                self.holder = me
                return self
            own = self.copies[me] = Unit(self.fn, f"{self.name} [thread {len(self.copies) + 1}]",
                                         self.plain)
            own.code, own.mark, own.origin = self.code, self.mark, self
        return own.claim()  # (a copy is only ever claimed by its own thread: free)

    def release(self):
        """The claim ends (once: only the thread holding it releases it)."""
        if self.holder == threading.get_ident():
            self.holder = None
            self.busy.release()

    def untake(self):
        """``claim`` was cut short (an interrupt can come between taking the lock and
        noting the holder): this thread gives back the lock it may have taken."""
        if self.holder is None and self.taker == threading.get_ident() and self.busy.locked():
            self.busy.release()

    def begin(self, args, kwargs):
        """Open an iteration in this thread; returns it and the arguments to run it with.
        The iteration's unit is this one or this thread's copy of it (``claim``)."""
        try:
            unit = self.claim()
        except BaseException:
            for unit in (self, self.copies.get(threading.get_ident())):
                if unit is not None:
                    unit.untake()
            raise
        try:
            return unit._begin(args, kwargs)
        except BaseException:
            unit.release()
            raise

    def _begin(self, args, kwargs):
        last = self.last_path
        mode = COEXEC if last is not None else TRACE
        it = Iteration(self, mode, last if last is not None else Path())
        if timeline.on:
            it.started = time.perf_counter()
        counts["iterations_coexecuted" if mode == COEXEC else "iterations_traced"] += 1
        try:
            context.open_iteration(it)
            if mode == TRACE:
                it.start_recording()
            return it, it.enter(args, kwargs)
        except BaseException:  # (a feed JAX refuses): leave this thread as it was found
            _leave(it)
            raise

    def end(self, it, ok, abandon=False):
        """Close ``it``; ``abandon``: the unit is not the repeating level after all (a loop
        inside it is): what it recorded runs eagerly and no path is kept.  Once: a caller
        that saw an interrupt come as it began (``it.ended`` not set yet) calls it again."""
        if it.ended:
            return
        try:
            self._end(it, ok, abandon)
        finally:
            if self.eager_reason and self.origin is not None and not self.origin.eager_reason:
                self.origin.eager_reason = self.eager_reason  # (what callers check)
            # The claim ends, after finishing (that launches and keeps paths).  Inline, with
            # no call before the lock's own release: an interrupt can come as any call
            # begins, and release() cut short there left the unit held.  (The iteration's
            # thread holds it: claim.)
            if self.holder is not None:
                self.holder = None
                self.busy.release()
            if self.reset_pending:  # (terra_bc.reset() while it ran)
                self.reset()

    def _end(self, it, ok, abandon):
        try:
            it.ended = True  # (from here on, what an interrupt cuts short is made good below)
            context.close_iteration(it)  # (routing everywhere from now on: see there)
            self.keep_memo(it.memo, it.memo_lasting)
            it.finish(ok, abandon)
        except Exception as error:
            self._failed_at_end(it, ok, error)
        except BaseException as error:
            # An interrupt (the KeyboardInterrupt a signal handler raised) cut the end short,
            # anywhere in it: the program's own, raised once what Python holds has its value,
            # computed op by op (it was raised unseen, and values were lost, before).
            context.close_iteration(it)
            it.abort(error)
            it.let_go()
            raise
        if it.started and timeline.on:
            timeline.add(f"iteration of {self.name}", "iteration", it.started, it.mode)
        # Tracing costs more than eager: a unit that keeps making new paths makes no more;
        # where Python leaves its recorded paths, the rest of the iteration runs eagerly.
        self.recent.append(it.mode == TRACE)
        self.note_emptiness()
        _check_library_code()
        if len(self.recent) == RETRACE_WINDOW and all(self.recent):
            self.frozen = self.frozen or (f"traced new paths in {sum(self.recent)} of its last "
                                          f"{RETRACE_WINDOW} calls (its path or shapes change)")

    def keep_memo(self, asked, lasting):
        """What an iteration remembered (``asked``), and what earlier ones did that may go
        unasked for more iterations (``lasting``: key -> how many; see Iteration.remember)."""
        left = dict(lasting)
        for key, turns in self.memo_left.items():
            if turns > 0 and key not in asked:
                asked[key], left[key] = self.memo[key], turns - 1
        self.memo, self.memo_left = asked, left

    def _failed_at_end(self, it, ok, error):
        """Ending ``it`` failed.  The program's own error a launch met (``it.failed``: a
        callback that raised; ``launching.stop_launching`` has handled the iteration) is
        raised as eager JAX raises it, unless the iteration is already ending with the
        program's own exception.  Anything else is terra_bc's failure: the unit runs eagerly
        from now on, and the values Python holds are computed op by op as eager JAX would
        compute them (an error then is the program's)."""
        if error is not it.failed:
            reason = f"ending an iteration failed ({type(error).__name__}: {error})"
            self.eager_reason = self.eager_reason or reason
            counts["eager_fallbacks"] += 1
            journal.fallback(self, reason)
            try:
                launching.recover(it)
                it.let_go()
                return
            except Exception as program_error:
                error = program_error
        it.let_go()
        if ok:
            if self.mark is not None:  # a loop's: its loop raises it (discovery.on_loop)
                context.thread.program_error = error
            raise error

    def reset(self):
        """Forget what the unit learned from its calls: its next call traces afresh.  A unit
        with an iteration open (``terra_bc.reset()`` in a loop's body, where the loop is a
        unit; another thread's) forgets when that iteration ends (``end``): the iteration
        goes on on its path, as the program's Python goes on."""
        if self.busy.locked():  # (in this thread or another)
            self.reset_pending = True
            return
        self.reset_pending = False
        for copy in list(self.copies.values()):
            copy.reset()
        self.paths, self.last_path, self.frozen = [], None, None
        self.dynamic, self.static, self.reused, self.memo, self.memo_left = set(), set(), set(), {}, {}
        self.recent.clear()
        self.compiles = self.eager_launches = self.nested_calls = 0
        self.empty_calls, self.idle_left, self.idle_span = 0, 0, IDLE_SPANS[0]
        self.abstract_tracing = True
        self.eager_reason = None
        self.journal.clear()
        self.fallbacks_noted.clear()
        if self.mark is not None and self.mark.state < 0:
            self.mark.state = 0  # (a loop run as plain Python since: undecided again)


def _check_library_code():
    """After an iteration: when REVERT_FIRST have ended in this process, then each time
    that count doubles, library code that ran without calling a DL op runs its original
    code from then on (``frames.revert_unrouted``; few checks, each a pass over the
    rewritten library code)."""
    _ended[0] += 1
    if _ended[0] >= _ended[1]:
        _ended[1] *= 2
        if settings["revert_library_code"]:
            frames.revert_unrouted(REVERT_MIN_RUNS)


def _leave(it):
    """Close ``it`` without finishing it (nothing launched, no path kept): its recording
    stops and this thread is as it was before ``begin``."""
    if it.recording is not None:
        it.recording.__exit__(None, None, None)
        it.recording = None
    context.close_iteration(it)
    it.unit.release()


def _warn(message):
    """Warn (once per unit and limit: the state reported is set once) at the user's line
    that called into terra_bc, not at terra_bc's own."""
    level, frame = 2, sys._getframe(1)  # (stacklevel 2: the caller of _warn)
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def unit_of(fn, caller):
    """The Unit of a ``@terra_bc.function`` (or a Unit itself)."""
    unit = getattr(fn, "__terra_bc_unit__", fn)
    if not isinstance(unit, Unit):
        raise TypeError(f"{caller}() takes a @terra_bc.function (or a unit), not {type(fn).__name__}")
    return unit


def reset(fn=None):
    """``terra_bc.reset(fn)``: forget a unit's recorded paths (with None: every unit's, and
    what the process learnt of eager runs, ``compiling.forget``)."""
    for unit in [unit_of(fn, "reset")] if fn is not None else list(all_units):
        unit.reset()
    if fn is None:
        compiling.forget()


def function(fn, plain=None):
    """``@terra_bc.function``: each call of ``fn`` is an iteration of one unit.  ``plain``:
    the user's function, if ``fn`` is its rewritten copy (run while a tool watches)."""
    unit = Unit(fn, plain=plain)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        __tracebackhide__ = True  # (pytest and IPython leave this frame out of tracebacks)
        return unit(*args, **kwargs)

    call.__wrapped__ = getattr(fn, "__wrapped__", fn)  # the user's own function
    call.__terra_bc_unit__ = unit
    return call
