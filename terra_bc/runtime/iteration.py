"""The iteration: one call of a unit's function, or one turn of its loop.

Python runs the iteration's code itself; what differs is what a DL op does, by ``mode``:

* tracing (``tracing.py``): the op runs eagerly under the jaxpr builder and is appended to a
  new path as an event;
* co-execution (``coexecution.py``): the op is checked against the recorded paths (the
  guard) and returns placeholders without running JAX; the recorded equations run as
  compiled segments (``launching.py``), launched when Python fetches a value and at the end;
* eager: past a branch point where the unit makes no more paths, ops run as plain JAX.

A guard that fails mid-iteration is a divergence (``diverge``): the live placeholders get
their values from the launched prefix and the rest of the iteration is traced as a new path
sharing that prefix.  ``op`` is the one place that switches on the mode for ops.
"""
from __future__ import annotations

import time

import jax

from jax.tree_util import tree_leaves

from .. import _hook
from ..counters import counts
from ..jaxpr_builder import RecTracer, tracing_for_jit
from . import bodies, coexecution, context, journal, launching, timeline, tracing
from .coexecution import retried
from .context import COEXEC, EAGER, TRACE, UNCHANGED
from .events import Event, FetchEvent
from .guards import callee_key, config_key
from .placeholders import Placeholder, concrete, eager
from .trace_rules import builds_array_from, makes_transform, retraced_body
from .values import MISS, arrays_in, is_array, user_line


def _foreign_tracer(x):
    return isinstance(x, jax.core.Tracer) and type(x) is not Placeholder and type(x) is not RecTracer


class Iteration:
    # The C fast path reads mode, opaque_depth, path, pos, env and live by these names.
    __slots__ = ("unit", "mode", "path", "pos", "fork_stop", "left", "auto", "loop_turns",
                 "env", "seg_start", "tracers", "live", "opaque_depth", "recording",
                 "grad_depth", "memo", "memo_lasting", "was_routing", "hook_was_enabled", "program_trace", "trace_launches",
                 "abandoning", "started", "effects_ran", "last_op_at", "failed", "config", "ended",
                 "settled_depth", "batching")

    def __init__(self, unit, mode, path):
        self.unit, self.mode, self.path = unit, mode, path
        self.pos = 0            # next event of the path (co-execution)
        self.fork_stop = 0      # equations co-executed before a divergence
        self.left = None        # the path a divergence left
        self.auto = False       # an iteration of a function unit found without decoration
        self.loop_turns = {}    # turns of loops inside it (auto function units)
        self.env = {}           # value id -> concrete value (feeds, launched segments' outputs)
        self.seg_start = 0      # first equation not launched yet
        self.tracers = {}       # value id -> recording tracer (tracing)
        self.live = []          # this iteration's placeholders (see launching.alive)
        self.opaque_depth = 0   # > 0 while inside an opaque DL op's own Python (JAX traces it)
        self.recording = None   # the Recorder entered for this iteration (tracing)
        self.grad_depth = 0     # > 0 while a differentiated function's Python runs
        self.settled_depth = 0  # > 0 while an op runs eagerly outside the recording (tracing)
        self.batching = []      # the vmap calls whose Python runs now (vmapping.Batching)
        self.memo = {}          # see remember
        self.memo_lasting = {}  # key -> iterations its entry may go unasked (remember)
        self.was_routing = self.hook_was_enabled = UNCHANGED  # the thread before it (context)
        self.program_trace = None  # JAX's trace the program ran under when it opened (context)
        self.trace_launches = 0  # segments run to compute values recorded abstractly
        self.abandoning = False  # finishing as a unit that is not the repeating level
        self.started = 0.0      # when it began (perf_counter), if a timeline was recording
        self.effects_ran = set()  # equations whose effects (callbacks) happened (launching.run)
        self.last_op_at = 0.0   # when tracing recorded its last op (tracing.launch_before), or an op
        #                         launched early (coexecution.early_launch_paid)
        self.failed = None      # the program's error a launch met (launching.stop_launching)
        self.config = config_key()  # the configuration it began under (guards.config_key)
        self.ended = False      # Unit.end has begun

    def __repr__(self):
        return f"<Iteration of {self.unit.name}: {self.mode}, event {self.pos}>"

    @retried
    def enter(self, args, kwargs):
        """The unit's arguments: arrays become placeholders (fed), the rest are Python's own.

        Only arrays reached through tuples are replaced (tuples are values); every other
        container is passed as the caller's own object, so what the unit appends to a list or
        stores in a dict stays there.  Arrays inside those are fed where an op uses them."""
        leaves = []
        shape = arrays_in((args, tuple(kwargs.items())), leaves)
        if self.mode == COEXEC:
            return coexecution.enter(self, shape, leaves, args, kwargs)
        if self.mode == EAGER:
            return args, kwargs
        return tracing.enter(self, shape, leaves, args, kwargs)

    def remember(self, key, make, idle_turns=0):
        """``make()``, made once for ``key`` while the unit's iterations ask for it: kept
        to the next iteration, and dropped after one that did not ask, or after
        ``idle_turns`` + 1 in a row that did not (``Unit.keep_memo``).  A key that may hold
        a function made afresh each step (over that step's batch) keeps none (it is not
        kept alive); one that holds plain data (``eval_shape``'s shapes) may, for a unit
        that asks every second turn (a DQN's update) or not in some turns (exploring)."""
        if idle_turns:
            self.memo_lasting[key] = idle_turns
        try:
            return self.memo[key]
        except KeyError:
            value = self.memo[key] = self.unit.memo.get(key, MISS)
            if value is MISS:
                value = self.memo[key] = make()
            return value

    def new_placeholder(self, id, aval, rec=None):
        if rec is None:
            return _hook.placeholder(self, id, aval)  # (in C: it is made for most ops)
        ph = Placeholder(self, id, aval, rec)
        self.live.append(ph)
        return ph

    # -- ops
    def op(self, fn, args, kwargs, key=None):
        """A DL op of this iteration, as its mode runs it."""
        __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
        if self.opaque_depth:  # inside an opaque op: JAX is tracing; just run it
            # (read by a recording only: Python JAX may run at every call, tracing.op)
            if self.mode == TRACE and not tracing_for_jit():
                self.unit.nested_calls += 1
            return fn(*args, **kwargs)
        mode = self.mode
        if mode == EAGER:  # past a branch point with too many variants: plain JAX
            counts["ops_eager"] += 1
            return self._eager_op(fn, args, kwargs)
        if mode == COEXEC:  # a plain op event: checked and skipped in C (_fastop.c)
            out = _hook.fast_op(self, fn, args, kwargs)
            if out is not MISS:
                return out
        leaves = tree_leaves((args, kwargs))
        if any(map(_foreign_tracer, leaves)) and context.plain_trace(self.recording):
            # A tracer no trace of this iteration made, and no JAX transform of a caller's
            # under way (that one's tracers are handled where the iteration leaves its
            # paths: diverge): one a trace that has ended leaked (a jitted function's
            # intermediate kept by an lru_cache).  Eager JAX raises UnexpectedTracerError at
            # this op; recorded, the error came at the next read, after the program's
            # Python had gone on.  Run as eager JAX runs it.
            return self._eager_op(fn, args, kwargs)
        has_array = any(map(is_array, leaves))
        # (Python JAX runs at every call.  Given no array, a body may still close over this
        # iteration's values: lax.while_loop(lambda n: n * jnp.sum(p) < 100, ..., 1.0).)
        if key is None and retraced_body(fn, leaves):
            return bodies.op(self, fn, args, kwargs)
        if (not has_array and not builds_array_from(fn, leaves)) or (has_array and makes_transform(fn)):
            # No array in, and not an array made from plain data (jnp.zeros(shape) is an
            # op: trace_rules.builds_array_from): a transform being made (jax.grad(f)), a
            # constructor of other kinds (PRNGKey(seed)) or one that traces a function of
            # no array of ours; run it as an opaque op, whose inner calls are JAX's.  An
            # array it makes enters later ops as a feed.
            self.opaque_depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.opaque_depth -= 1
        key = callee_key(fn) if key is None else key
        if mode == TRACE:
            return tracing.op(self, fn, key, args, kwargs)
        return self._matched_op(fn, key, args, kwargs)

    def _eager_op(self, fn, args, kwargs):
        """``fn`` run as eager JAX runs it: its inner calls are JAX's, not ops of ours."""
        self.opaque_depth += 1
        try:
            return eager(fn, args, kwargs)
        finally:
            self.opaque_depth -= 1

    @retried
    def _matched_op(self, fn, key, args, kwargs):
        """Co-execution's general path; after a divergence, the op as the new mode runs it."""
        __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
        if self.mode == COEXEC:
            return coexecution.op(self, fn, key, args, kwargs)
        return self.op(fn, args, kwargs, key)

    def lower(self, ph):
        """JAX code we do not see op by op (a library, ``jax_array[placeholder]``) wants this
        value.  While tracing it computes on the recorded tracer, so the result is right and
        a gradient flows through it; but co-execution could not reproduce that op, so the
        unit will run eagerly from then on.  In co-execution (a path not seen while tracing)
        it gets the value: right, except for a gradient through it, which we refuse."""
        if self.mode == TRACE:
            if self.settled_depth:
                # An op run eagerly outside the recording (a graph break: the program's own
                # jax.jit, closing over this placeholder) is JAX's business at every
                # iteration; it gets the value, here as in co-execution.  Its recorded tracer
                # would have become a constant of JAX's eager computation and escaped it
                # (UnexpectedTracerError).
                return ph._rec.val
            self.path.eager_reason = self.path.eager_reason or (
                "JAX code outside the recorded ops (a library, jax_array[placeholder]) used a value")
            return ph._rec
        if self.grad_depth:
            raise RuntimeError(
                "terra_bc: JAX code it does not record (a library function or jax_array[x]) "
                "received a value inside a differentiated or vmapped function on a path not "
                "seen while tracing; its gradient or batch cannot be computed. Run this "
                "function without terra_bc.")
        launching.launch(self, self.path.events[self.pos - 1].mark if self.pos else 0, [ph._id])
        return self.env[ph._id]

    # -- fetches
    def fetch(self, ph, kind, convert):
        """Python needs the value of ``ph`` (``kind``: the conversion): a fetch event."""
        counts["fetches"] += 1
        batching = self.batching and self.batched(ph)
        if batching:
            return batched_fetch(self, ph, batching.size, kind, convert)
        if journal.fetches or timeline.on:
            value = self._watched_fetch(ph, kind, convert)
        else:
            value = convert(self._fetched(ph, kind))
        if self.mode == TRACE:  # (what the traced path's branch decided on, for reports)
            tracing.note_fetched(self.path, value)
        return value

    def batched(self, ph):
        """The vmap call whose Python runs now (``vmapping.Batching``) from whose one
        example's values ``ph`` is computed, or None.  Eagerly it is a batched tracer."""
        rec = self.path.recorder
        if self.mode == TRACE:
            stop = rec.mark()
        else:
            stop = self.path.events[self.pos - 1].mark if self.pos else 0
        for b in reversed(self.batching):
            if ph._id in b.example_ids or (
                    ph._id >= b.nvals and rec.depends(ph._id, b.example_ids, b.start, stop)):
                return b
        return None

    def _watched_fetch(self, ph, kind, convert):
        """A fetch logged (``log="fetches"``) or timed (a timeline is recording)."""
        if journal.fetches:
            journal.say("fetches", "fetch (%s) in unit %s at %s: v%d %s (%s)", kind,
                        self.unit.name, user_line(), ph._id, journal.aval_text(ph.aval), self.mode)
        t0 = time.perf_counter()
        value = convert(self._fetched(ph, kind))  # (Python waits here for the device)
        if timeline.on:
            timeline.add(f"fetch ({kind}) v{ph._id}", "fetch", t0, self.mode)
        return value

    @retried
    def _fetched(self, ph, kind):
        if self.mode == TRACE:
            tracing.append(self, FetchEvent, "fetch", kind, id=ph._id)
            tracing.launch_before(self)
            return ph._rec.val
        if self.mode == COEXEC:
            ev = coexecution.next_event(self, "fetch", kind, None, (ph,))
            if ev.id != ph._id:
                raise coexecution.Divergence("fetch", kind, (ph,))
            coexecution.early_launch_paid(self, self.pos - 1)
            self.pos += 1
            launching.launch(self, ev.mark, [ph._id])
            return self.env[ph._id]
        return concrete(ph)

    @retried
    def effects_barrier(self):
        """``jax.effects_barrier()`` in the iteration: the callbacks and prints recorded and
        not run yet happen now, as eager JAX's had by then (a segment runs them where the
        program reads a value or ends, docs/coexecution.md): the equations holding them
        launch here, and JAX then waits for them.  A "barrier" event, so co-executed
        iterations launch at the same point."""
        if self.mode == TRACE:
            tracing.append(self, Event, "barrier", "effects_barrier")
            stop = self.path.recorder.mark()
        elif self.mode == COEXEC:
            ev = coexecution.next_event(self, "barrier", "effects_barrier")
            self.pos += 1
            stop = ev.mark
        else:
            return
        if launching.pending_effects(self, self.seg_start, stop):
            launching.launch(self, stop, ())
            if self.mode == TRACE:
                launching.give_values(self)

    # -- paths
    def diverge(self, failed=()):
        """No recorded path goes on the way Python goes: leave them here.

        The live placeholders get their values from the pending prefix, then the rest of the
        iteration is traced as a new path that shares the prefix's events and recording with
        the path it left (``Path.fork``): the unit has one more path.  A unit that has made
        too many paths (``Unit.frozen``) runs the rest of the iteration eagerly instead.
        ``failed``: what Python did where the guard failed (the journal's record)."""
        counts["divergences"] += 1
        old, pos = self.path, self.pos
        last = old.events[pos - 1] if pos else None
        stop = last.mark if last else 0
        alive = [p for p in launching.alive(self) if p._val is None]
        # JAX transforming this code from a caller terra_bc does not rewrite (a library left
        # out of scope took jax.grad of the user's function): a recording started here
        # would be JAX's inner trace's business and lost when the transform returns.
        transformed = not context.plain_trace()
        to_eager = (self.unit.frozen or transformed) and not self.grad_depth  # (a gradient needs the recording)
        # Traced abstractly, the rest of the iteration records the new path from its start:
        # the prefix not launched yet is computed with it (one segment, the one the path's
        # later iterations launch) rather than alone (a segment used once).
        abstract = not to_eager and self._records_abstractly(old, stop)
        if not abstract:
            launching.launch(self, stop, [p._id for p in alive])
        if pos == 0:  # nothing co-executed: an iteration traced (or run eagerly) from its start
            counts["iterations_coexecuted"] -= 1
        where = self._note_divergence(failed, "ran the rest eagerly" if to_eager
                                      else f"traced new path {len(self.unit.paths) + 1}"
                                      + ("" if abstract else " eagerly-valued"))
        if to_eager:
            self.mode = EAGER
            counts["eager_fallbacks"] += 1
            journal.fallback(self.unit, "JAX transforms this code from a caller terra_bc does not "
                             "rewrite (a library out of scope)" if transformed
                             else f"past a branch point: {self.unit.frozen}", where)
            launching.settle(self)
            return
        counts["iterations_traced"] += pos == 0
        new = old.fork(pos)
        for p in alive:
            value = self.env.get(p._id, MISS)
            p._rec = self.tracers[p._id] = (new.recorder.adopt(p._id, value) if value is not MISS
                                            else new.recorder.adopt_abstract(p._id))
        self.path, self.mode, self.fork_stop, self.left = new, TRACE, stop, old
        self.start_recording(abstract)

    def abort(self, error):
        """``error`` stopped terra_bc's own code in this iteration, maybe half-way through a
        step (``context.cut_short``: an interrupt, a MemoryError), and now passes to the
        program: the rest of the iteration runs eagerly.  Nothing the runtime was preparing
        is trusted: the values Python holds are computed op by op from the recording and
        the feeds (``launching.recover``, as eager JAX computes them), later ops are plain
        JAX calls, and no path is kept from it.  The unit is left as it was: its next
        iteration co-executes.  Safe to call again (a second interrupt: best effort)."""
        if self.mode == EAGER and self.recording is None:
            return
        traced, recording = self.mode == TRACE, self.recording
        self.mode, self.recording = EAGER, None
        try:
            if recording is not None:
                recording.__exit__(None, None, None)
            context.put_back_trace(self)
            launching.recover(self, traced)
        except Exception as failed:  # (its values are lost: reading one raises, see concrete)
            journal.fallback(self.unit, f"computing the values an interrupted iteration held "
                             f"failed ({type(failed).__name__}: {failed})")
        finally:
            if traced:
                self.path.recorder.compute_values(None)
        counts["eager_fallbacks"] += 1
        journal.fallback(self.unit, f"{type(error).__name__} stopped terra_bc's work in an "
                         "iteration (the rest ran eagerly)")

    def _note_divergence(self, failed, then):
        """The journal's record of a divergence here; returns the user's line."""
        unit, where = self.unit, user_line()
        journal.note(unit, journal.Diverged, journal.path_number(unit, self.path), self.pos,
                     self.path.events, journal.did(*failed) if failed else None, where, then)
        return where

    def start_recording(self, abstract=None):
        """Record this iteration's ops into its path (tracing): abstractly where the unit
        allows it (or ``abstract`` says), each value computed when read
        (launching.compute_recorded)."""
        rec = self.recording = self.path.recorder
        rec.__enter__()
        rec.note_ran_effects(self.effects_ran)
        if abstract is None:
            abstract = self._records_abstractly()
        rec.compute_values(launching.computer(self), lazy=abstract)

    def _records_abstractly(self, leaving=None, stop=0):
        """Does a trace starting now (leaving path ``leaving`` at ``stop``) record
        abstractly: as its unit says (Unit.traces_abstractly), and always inside a vmap
        (see vmapping.plan)."""
        return self.unit.traces_abstractly(leaving, stop) or bool(self.batching)

    def _path_ending_here(self):
        """Co-execution ended before this path did: the recorded path that ends here, or a
        new one (the prefix alone, no trace needed)."""
        for path in coexecution.paths_here(self):
            if len(path.events) == self.pos:
                return path
        counts["divergences"] += 1
        self._note_divergence(("end", None, ()), f"kept its first {self.pos} events as path "
                              f"{len(self.unit.paths) + 1}")
        new = self.path.fork(self.pos)
        self.unit.add_path(new)
        return new

    def finish(self, ok, abandon=False):
        """End of the iteration: launch what is left, settle placeholders, keep the path.
        ``abandon``: what is left runs eagerly (compiling.run) and no path is kept."""
        if self.recording is not None:
            self.recording.__exit__(None, None, None)
            self.recording = None
        self.abandoning = abandon
        unit = self.unit
        if self.mode == COEXEC:
            if self.pos != len(self.path.events):
                self.path = self._path_ending_here()
            alive = launching.alive(self)
            # (What Python holds is kept (launching.launch), not needed: a compiled segment
            # computing less serves, and a value it leaves out is computed when read.)
            launching.launch(self, self.path.recorder.mark(), (), alive, final=True)
            unit.last_path = self.path
            unit.reused.add(self.path)
            launching.settle(self, alive)
            self.let_go()
            return
        if self.mode == TRACE:
            alive = launching.alive(self)
            rec = self.path.recorder
            self.path.escaping |= {p._id for p in alive if p._val is None} - rec.quiet_values()
            unvalued = {t.id for t in rec.unvalued()} - rec.quiet_values()
            # Values recorded abstractly that Python still holds, effects recorded to happen
            # in a segment:
            if unvalued or launching.pending_effects(self, self.seg_start, rec.mark()):
                launching.launch(self, rec.mark(), sorted(launching.held(self) & unvalued), alive)
                launching.give_values(self)
            rec.compute_values(None)
            path = self.path
            if path.eager_reason:
                unit.eager_reason = path.eager_reason
            elif ok and not abandon:
                unit.add_path(path)
                unit.last_path = path
        launching.settle(self)
        self.let_go()

    def let_go(self):
        """After ``finish``: the values the iteration computed are its placeholders' now.
        (Each placeholder refers to its iteration: kept, these would keep every value alive,
        old parameters included, until the cycle collector runs, and no buffer could be
        donated: launching.donatable.)"""
        self.env, self.live, self.tracers = {}, [], {}


def batched_fetch(it, ph, size, kind, convert):
    """Python asks for a value that eager JAX would hold as a batched tracer (inside
    ``jax.vmap``): what ``convert`` does with one, found on a stand-in of its aval: JAX's
    own error for a conversion (``float``, ``bool``, ``np.asarray``), the tracer's text for
    printing.  One example's value is never shown."""
    if kind == "ready":  # (block_until_ready: the array itself)
        return ph
    got, aval = [], ph.aval
    with tracing.outside_recording(it):
        jax.eval_shape(jax.vmap(lambda v: got.append(convert(v))),
                       jax.ShapeDtypeStruct((size,) + aval.shape, aval.dtype))
    if kind in ("repr", "str", "format"):
        return got[0]
    raise TypeError(f"terra_bc: a value computed inside jax.vmap from its mapped arguments "
                    f"was read ({kind}); eager JAX holds a batched tracer there")
