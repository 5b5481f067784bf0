"""The jaxpr builder: records DL ops as jaxpr equations (tracing mode).

``Recorder`` makes a custom JAX trace current for the dynamic extent of a ``with`` block.
Every primitive bound while it is current is appended to a flat list of equations.  By
default it also runs *for real* under the previous (parent) trace, so Python sees real
values.  With ``Recorder.compute_values(compute)`` it is recorded abstractly instead (its
output avals from JAX's shape rule): a value is computed only when it is read, by the
caller's ``compute`` (the runtime launches the equations recorded so far as a segment).  Transforms
(``grad``, ``vjp``, ``jvp``, ``vmap``) run their own traces on top of ours and lower to
primitives that reach us; higher-order primitives (``pjit``, ``cond``, ``while``, ``scan``,
``custom_jvp_call``, ``custom_vjp_call``) are recorded as one equation carrying their
sub-jaxpr.  ``Recorder.segment`` cuts a dead-code-eliminated ``ClosedJaxpr`` out of the
recording and ``compile_segment`` turns it into a cached ``jax.jit`` executable that replays
the recorded computation on new input values.

Rules this module keeps (see docs/DESIGN "Facts already checked"):
* ``RecTracer.to_concrete_value`` returns None: JAX would otherwise bake recording-time values
  into the graph (integer_pow, fixed-trip fori_loop, ...).  Values reach Python only through
  the explicit conversions (``bool``, ``float``, ``np.asarray``, ...), each reported to
  ``on_fetch``.
* Eager work runs with the parent trace current: JAX transforms bind on it while we are
  current, and primitive impls re-bind internally.
* Compiled segments are cached on a structural key (primitives, params, wiring, avals,
  constants), never on ``str(jaxpr)``.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import gc
import itertools
import operator
import sys
import threading
import time
import types
import weakref

import numpy as np

import jax
from jax.core import Trace, Tracer
try:  # the names jax.extend.core re-exports, from where it takes them: importing
    # jax.extend imports all of it, Pallas included (~16 ms a plain JAX program never pays)
    from jax._src import core as _jax_core
    from jax._src.core import (DebugInfo, Jaxpr, Literal, Var, jaxpr_as_fun, new_jaxpr_eqn,
                               set_current_trace, take_current_trace)
    ClosedJaxpr = getattr(_jax_core, "ClosedJaxpr", Jaxpr)  # (one class from jax 0.12 on)
    _jax_core.get_opaque_trace_state  # noqa: B018  (patched below: must be there)
except (ImportError, AttributeError):  # pragma: no cover
    import jax.extend.core as _jax_core
    from jax.extend.core import (ClosedJaxpr, DebugInfo, Jaxpr, Literal, Var, jaxpr_as_fun,
                                 new_jaxpr_eqn, set_current_trace, take_current_trace)

from .counters import counts

__all__ = ["Recorder", "RecTracer", "Segment", "compile_segment", "cached_executable",
           "jit_segment", "keep_executable", "run_donating", "evaluate_segment", "compile_count",
           "clear_compile_cache"]

_no_effects = frozenset()
try:  # the concrete jax.Array class; .aval is its type.  (Not by making an array: that would
    # start XLA's backend at import, and jax.distributed.initialize must come first.)
    from jax._src.array import ArrayImpl
except ImportError:
    ArrayImpl = type(jax.numpy.zeros(()))


# ----------------------------------------------------------------------------- compat

# JAX's current trace is switched in Python, by two calls (jax._src.core.TracingContext
# .set_trace), and ``take_current_trace`` sets None until its block ends.  An interrupt
# comes as a call returns: landing there it leaves the thread without a trace, or with one
# whose block is gone, and every later op fails or goes to that trace.  So the current
# trace is read without being taken, and where an interrupt passed (context.put_back_trace)
# the trace the program runs under is set again.
try:
    from jax._src.core import trace_ctx as _trace_ctx
    from jax._src.core import unsafe_get_current_trace as current_trace
except ImportError:  # pragma: no cover  (a JAX without them: read by taking it)
    _trace_ctx = None

    def current_trace():
        with take_current_trace() as trace:
            return trace


try:  # JAX's trace kinds, compared by class (a copy of a name would miss a subclass)
    from jax._src.core import EvalTrace as _EVAL_TRACE
    from jax._src.interpreters.partial_eval import DynamicJaxprTrace as _JAXPR_TRACE
except ImportError:  # pragma: no cover
    _EVAL_TRACE = _JAXPR_TRACE = ()


def is_eager_trace(trace):
    """Is ``trace`` JAX's eager one (ops evaluated as they are bound)?"""
    return isinstance(trace, _EVAL_TRACE)


def tracing_to_jaxpr():
    """Is JAX tracing to a jaxpr under the current trace: is it a ``DynamicJaxprTrace``
    (a jit's, a body's), or a transform's (JVP, linearize, batching) whose parents reach
    one (``jax.jacrev`` of a function, traced as a body)?"""
    return _enclosing_trace(lambda trace: isinstance(trace, _JAXPR_TRACE))


def _enclosing_trace(test):
    """Does ``test`` hold for the current trace or one of the traces it is nested in?"""
    trace = current_trace()
    for _ in range(64):  # (a bound: a chain of parents never loops, but stay safe)
        if trace is None:
            return False
        if test(trace):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


_CACHED_TRACES = frozenset({"jit", "closure_convert"})  # JAX caches them per function and avals


def tracing_for_jit():
    """Is JAX tracing a function under a cache keyed on it (a ``jit``'s, a
    ``closure_convert``'s: this trace, or one it is nested in, a loop body inside a jitted
    function)?  Python run there runs again only where that cache misses, never at every
    call (``jax.experimental.ode.odeint`` closure-converts the program's function, then
    jits the integration with it a static argument)."""
    return _enclosing_trace(lambda trace: isinstance(trace, _JAXPR_TRACE) and getattr(getattr(
        getattr(trace, "frame", None), "debug_info", None), "traced_for", None) in _CACHED_TRACES)


def set_trace(trace):
    """Make ``trace`` JAX's current trace in this thread (no block to leave: a repair)."""
    if _trace_ctx is not None:
        _trace_ctx.set_trace(trace)
    else:  # pragma: no cover
        set_current_trace(trace).__enter__()


def _abstract_eval_effects(prim, avals, params):
    # Effects of a first-order primitive.  Only consulted when a segment is built, so the
    # per-op recording cost does not pay for shape rules.
    try:
        return prim.abstract_eval(*avals, **params)[1]
    except Exception:  # a rule that wants more context than avals: assume pure
        return _no_effects


# First-order primitives with effects: host callbacks and prints.  (The others JAX has act
# on references inside staged code, never at an eager call site.)
_EFFECTFUL = frozenset({"debug_callback", "debug_print", "io_callback"})


def _effects_now(prim, params):
    """Does an equation about to be recorded have effects?  Cheap enough for every op:
    a higher-order primitive's jaxprs carry theirs; first-order ones are named."""
    if prim.name in _EFFECTFUL:
        return True
    return any(_inner(j).effects for j in _subjaxprs(params))


def _subjaxprs(params):
    # jax.extend.core.jaxprs_in_params only yields Jaxpr (0.12) / ClosedJaxpr (0.10) found
    # directly or in tuples; that is where JAX's own higher-order primitives keep them.
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, (Jaxpr, ClosedJaxpr)):
                yield x


def _inner(j):
    # jax 0.10: ClosedJaxpr wraps a Jaxpr; jax 0.12: ClosedJaxpr *is* Jaxpr (.jaxpr is self).
    return j.jaxpr if isinstance(j, ClosedJaxpr) else j


def _closed(constvars, invars, outvars, eqns, effects, consts):
    # The legacy two-argument ClosedJaxpr(jaxpr, consts) works on both versions.
    dbg = DebugInfo("terra_bc segment", "<recorded>", None, None)
    return ClosedJaxpr(Jaxpr(constvars, invars, outvars, eqns, effects, dbg), list(consts))


# ----------------------------------------------------------------------------- tracer

class _Const:
    """A value that reached a primitive without being a RecTracer of this recording."""
    __slots__ = ("val", "aval")

    def __init__(self, val, aval=None):
        self.val = val
        self.aval = aval

    def get_aval(self):
        if self.aval is None:
            self.aval = jax.typeof(self.val)
        return self.aval

    def __repr__(self):
        return f"_Const({self.val!r})"


_LAZY = object()  # the value of a tracer recorded abstractly, not computed yet


class RecTracer(Tracer):
    """A recorded value: ``id`` (stable within its Recorder), ``aval``, concrete ``val``.

    Behaves like a jax.Array.  Conversions to Python/NumPy values return the real value
    and are reported to the Recorder's ``on_fetch``.  After its Recorder's block has
    exited it behaves as its concrete value (a plain constant to anything that uses it).
    A tracer recorded abstractly (``Recorder.compute_values``) gets its value on first read.
    """
    __slots__ = ("_v", "id", "const")

    def __init__(self, trace, val, id, aval, const=False):
        self._trace = trace
        self.aval = aval
        self._v = val
        self.id = id
        self.const = const  # computed from constants alone (abstract recording computes it)

    @property
    def val(self):
        v = self._v
        if v is _LAZY:
            v = self._v = self._trace.value_of(self)
        return v

    # Never advertise the value: JAX would specialise the graph on it (see module doc).
    def to_concrete_value(self):
        return None

    # JAX lowers tracers through full_lower before eager evaluation (EvalTrace, jit's
    # top-level path).  Once the Recorder's block has exited, this tracer lowers to its
    # concrete value, so a tracer that escaped its block behaves as a plain jax.Array
    # instead of raising UnexpectedTracerError.
    def full_lower(self):
        return self if self._trace.active else self.val

    # -- fetches: each returns the real value and tells the Recorder.
    def _fetch(self, kind, convert, *args):
        out = convert(self.val, *args)
        trace = self._trace
        if trace.active and trace.on_fetch is not None:
            trace.on_fetch(self, kind, out)
        return out

    def __bool__(self):
        return self._fetch("bool", bool)

    def __int__(self):
        return self._fetch("int", int)

    def __float__(self):
        return self._fetch("float", float)

    def __complex__(self):
        return self._fetch("complex", complex)

    def __index__(self):
        return self._fetch("index", operator.index)

    def __array__(self, dtype=None, copy=None):
        return self._fetch("array", _to_numpy, dtype)

    def item(self, *args):
        return self._fetch("item", _item, *args)

    def tolist(self):
        return self._fetch("tolist", _tolist)

    def tobytes(self, order="C"):
        return self._fetch("tobytes", _tobytes, order)

    def __format__(self, spec):
        return self._fetch("format", _format, spec)

    def __repr__(self):
        return self._fetch("repr", repr)

    def __str__(self):
        return self._fetch("str", str)

    # __hash__ stays None (inherited): unhashable, exactly like jax.Array.

    # -- not value reads: synchronisation and placement come from the eager value.  Where
    # the process has one device, a value recorded abstractly will be computed there: its
    # placement is known without computing it (libraries ask: Flax NNX's Variables).
    def block_until_ready(self):
        jax.block_until_ready(self.val)
        return self

    @property
    def sharding(self):
        device = self._only_device()
        return self.val.sharding if device is None else jax.sharding.SingleDeviceSharding(device)

    def devices(self):
        device = self._only_device()
        return self.val.devices() if device is None else {device}

    def _only_device(self):
        """The device a value not computed yet will be on, where there is only one."""
        return jax.devices()[0] if self._v is _LAZY and jax.device_count() == 1 else None


def _to_numpy(v, dtype):
    return np.asarray(v, dtype=dtype)


def _item(v, *args):
    return v.item(*args)


def _tolist(v):
    return v.tolist()


def _tobytes(v, order):
    return v.tobytes(order)


def _format(v, spec):
    return format(v, spec)


# ----------------------------------------------------------------------------- placement

class PlacementRefused(Exception):
    """``jax.device_put`` to a device or a sharding, in a process with several devices, is
    not recorded: inside a jitted segment JAX 0.10 lowers it to nothing (the value keeps
    the placement the segment's propagation gives it), where eagerly it moves the value.
    The runtime runs the op eagerly instead (a graph break; no wait: the transfer is
    asynchronous) and feeds its result, placed as eager JAX places it."""


@functools.cache
def several_devices():
    """Does this process compute on more than one device (simulated, real, or across
    processes)?  (Asked once JAX runs: asking starts its backend.)"""
    return jax.device_count() > 1


def _places(params):
    """Does a ``device_put`` equation move its operands to a device or sharding?"""
    return several_devices() and any(isinstance(d, (jax.Device, jax.sharding.Sharding))
                                      for d in params.get("devices", ()))


# ----------------------------------------------------------------------------- trace

def _lowered(x):
    """``x``, or the tracer a stand-in tracer of a later stage (a placeholder) lowers to."""
    if type(x) is not RecTracer and isinstance(x, Tracer) and hasattr(x, "full_lower"):
        return x.full_lower()
    return x


class _RecordingTrace(Trace):
    """Runs each primitive under ``parent`` and appends it to ``eqns``."""

    def __init__(self, parent, on_fetch):
        super().__init__()
        self.parent = parent
        self.on_fetch = on_fetch
        self.active = False
        # eqns[k] = (primitive, params, in_atoms, out_ids); an atom is an int id or _Const.
        self.eqns = []
        self.avals = []          # avals[id]
        self.compute = None      # compute(tracers) -> their values (abstract recording)
        self.lazy = False        # record primitives abstractly (see abstract())
        self.in_op = 0           # > 0 while a recorded op runs (Recorder.recording_op)
        self.literals = {}       # id -> Python scalar: values no equation makes (stage_value)
        self.unvalued = []       # weakrefs to the tracers recorded abstractly
        self.abstract_eqns = []  # indexes of the equations recorded without computing them
        self.effect_eqns = []    # indexes of the equations with effects (callbacks, prints)
        self.ran_effects = None  # a set the indexes of effectful equations run now go to
        self.meshes = {}         # equation index -> the abstract mesh it was bound under (_append)
        self.quiet = set()       # indexes of equations kept only where needed (Recorder.quiet)
        self.quiet_values = set()  # the ids those equations make
        self.aliases = {}        # id -> (id of the same value made later, its equation): Recorder.alias

    # -- helpers
    def new(self, val, aval=None, const=False):
        if aval is None:
            aval = val.aval if type(val) is ArrayImpl else jax.typeof(val)
        i = len(self.avals)
        self.avals.append(aval)
        return RecTracer(self, val, i, aval, const)

    def new_abstract(self, aval):
        self.avals.append(aval)
        return self.unvalued_tracer(len(self.avals) - 1)

    def unvalued_tracer(self, id):
        """A tracer for recorded value ``id`` with no value yet (computed when read)."""
        t = RecTracer(self, _LAZY, id, self.avals[id])
        self.unvalued.append(weakref.ref(t))
        return t

    def value_of(self, tracer):
        if self.compute is None:
            raise RuntimeError("terra_bc: a value recorded abstractly was read after its "
                               "iteration ended without being computed")
        return self.compute([tracer])[0]

    def abstract(self):
        """Record primitives without computing them?  Only on top of eager evaluation (under
        a transform of a caller's the parent needs real values) and never where JAX checks
        every value as it is computed (debug_nans / debug_infs) or runs op by op."""
        return self.lazy and is_eager_trace(self.parent) and not (
            jax.config.jax_debug_nans or jax.config.jax_debug_infs or jax.config.jax_disable_jit)

    def unwrap_abstract(self, xs):
        """(atoms, avals, graph) of primitive inputs, computing no recorded value; ``graph``:
        does one depend on the graph's inputs?  Work on constants alone outside a recorded
        op (``0.9 * jax_array`` in the user's code) is computed as it is recorded, as eager
        JAX would: what uses it is fed its value.  Inside one (the zeros of a gradient) it
        is part of the op's recorded computation."""
        atoms, avals, graph = [], [], False
        for x in map(_lowered, xs):
            if type(x) is RecTracer and x._trace is self:
                atoms.append(x.id)
                avals.append(x.aval)
                graph = graph or not x.const
            else:
                c = _Const(x.val if type(x) is RecTracer else x)
                atoms.append(c)
                avals.append(c.get_aval())
        return tuple(atoms), avals, graph

    def unwrap(self, xs):
        vals, atoms = [], []
        for x in map(_lowered, xs):
            if type(x) is RecTracer and x._trace is self:
                vals.append(x.val)
                atoms.append(x.id)
            else:  # library constant, foreign/escaped tracer value, Python scalar
                if type(x) is RecTracer:
                    x = x.val
                vals.append(x)
                atoms.append(_Const(x))
        return vals, tuple(atoms)

    def on_constants(self, xs) -> bool:
        """Outside any op of the iteration, does a primitive on ``xs`` read no recorded
        value (``x[:, None]`` on an array from outside the unit: JAX's own operator, which
        no call site routes)?  It then runs as eager JAX runs it and gives a plain array, as
        it does in co-execution, where no recording is current: a recorded tracer there made
        the operators that follow JAX's (not ops of the iteration) in the traced iteration
        only, so its co-executed turns left the path at once (a divergence and a second
        trace for every unit computing on its constants), and leaked to the program."""
        if self.in_op:
            return False
        return not any(type(x) is RecTracer and x._trace is self and not x.const
                       for x in map(_lowered, xs))

    def run_on_parent(self, prim, vals, atoms, params):
        """``prim`` on ``vals`` (unwrapped: ``atoms`` name them) under the parent trace,
        noting the operation as one eager JAX has compiled where the parent is eager."""
        with set_current_trace(self.parent):
            out = self.parent.process_primitive(prim, vals, params)
        if is_eager_trace(self.parent):  # (it ran eagerly: JAX compiled it)
            _warm_operation(prim, params, [_aval_of(a, self.avals) for a in atoms])
        return out

    # -- Trace interface
    def process_primitive(self, prim, tracers, params, /):
        if self.on_constants(tracers):
            return self.run_on_parent(prim, *self.unwrap(tracers), params)
        if prim.name == "device_put" and _places(params):
            raise PlacementRefused("device_put to a device or sharding runs eagerly")
        const = False
        if self.lazy and self.abstract():
            atoms, avals, graph = self.unwrap_abstract(tracers)
            if graph or self.in_op:
                out = self.record_abstract(prim, atoms, avals, params)
                if out is not None:
                    return out
            const = not graph
        vals, atoms = self.unwrap(tracers)
        parent = self.parent
        effects = _effects_now(prim, params)
        if effects and not self.in_op and not any(
                type(x) is RecTracer and x._trace is self and not x.const for x in tracers):
            # A callback Python itself makes (in an opaque op's code, on constants): Python
            # makes it again every iteration, so it is not the graph's: not recorded.
            with set_current_trace(parent):
                return parent.process_primitive(prim, vals, params)
        out = self.run_on_parent(prim, vals, atoms, params)
        if effects:
            self._note_effects(True)
        if prim.multiple_results:
            outs = [self.new(v, const=const) for v in out]
            self._append((prim, params, atoms, tuple(t.id for t in outs)))
            return outs
        t = self.new(out, const=const)
        self._append((prim, params, atoms, (t.id,)))
        return t

    def _append(self, eqn):
        """Record equation ``eqn``, and the abstract mesh JAX binds it under now where that
        is not the default: JAX's linearize and transpose bind under an empty one, and
        eager ``jit`` keys its executables by it (evaluate_segment binds it there again)."""
        mesh = _mesh_now()
        if mesh is not _UNSET:
            self.meshes[len(self.eqns)] = mesh
        self.eqns.append(eqn)

    def _note_effects(self, ran):
        """The equation about to be appended has effects; ``ran``: they happened now."""
        self.effect_eqns.append(len(self.eqns))
        if ran and self.ran_effects is not None:
            self.ran_effects.add(len(self.eqns))

    def record_abstract(self, prim, atoms, avals, params):
        """Record ``prim`` from its inputs' avals alone; None where it must run now: JAX has
        no shape rule for it from avals.  An equation with effects (a callback, a print) is
        recorded too: its effect happens once, when the segment holding it runs."""
        try:
            out_avals, effects = prim.abstract_eval(*avals, **params)
        except Exception:
            return None
        if effects:  # (it happens when the segment holding it runs, as jax.jit's would)
            self._note_effects(False)
        self.abstract_eqns.append(len(self.eqns))
        if prim.multiple_results:
            outs = [self.new_abstract(a) for a in out_avals]
            self._append((prim, params, atoms, tuple(t.id for t in outs)))
            return outs
        t = self.new_abstract(out_avals)
        self._append((prim, params, atoms, (t.id,)))
        return t

    def process_custom_jvp_call(self, prim, fun, jvp, tracers, /, *, symbolic_zeros):
        return self.stage(tracers, lambda xs: prim.bind(
            *xs, subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros))

    def process_custom_vjp_call(self, prim, fun, fwd, bwd, tracers, /, *, out_trees,
                                symbolic_zeros):
        return self.stage(tracers, lambda xs: prim.bind(
            *xs, subfuns=(fun, fwd, bwd), out_trees=out_trees, symbolic_zeros=symbolic_zeros))

    def process_call(self, prim, f, tracers, params, /):  # jax 0.10 only (core.call_p)
        return self.stage(tracers, lambda xs: prim.bind(*xs, subfuns=(f,), **params))

    def process_shard_map(self, prim, fun, tracers, /, **params):
        # shard_map binds a callable and returns a FlatTree; stage the one shard_map
        # equation like the custom rules, then put our tracers back into its tree.
        trees = []

        def bind(xs):
            ft = prim.bind(*xs, subfuns=(fun,), **params)
            trees.append(ft)
            flat = []
            ft.map(flat.append)
            return flat

        outs = iter(self.stage(tracers, bind))
        return trees[0].map(lambda _: next(outs))

    def stage_value(self, val):
        if type(val) is RecTracer and val._trace is self:
            return val
        if self.in_op and _is_scalar(val) and self.abstract():
            # A Python scalar JAX lifts inside a recorded op (0.05 in `0.05 * g`): a literal
            # of the recording, where the parent would make a device array of it.
            t = self.new(val, jax.typeof(val), const=True)
            self.literals[t.id] = val
            return t
        with set_current_trace(self.parent):
            return self.parent.stage_value(val)

    def cur_qdd(self, x):  # jax 0.10 only: quasi-dynamic data of mutable refs
        if type(x) is RecTracer and x._trace is self:
            x = x.val
        with set_current_trace(self.parent):
            return self.parent.cur_qdd(x)

    # -- primitives that JAX binds with Python callables rather than jaxprs
    def stage(self, tracers, bind):
        """Stage ``bind`` into a small jaxpr (JAX's own staging rule makes the one
        custom_jvp_call / custom_vjp_call equation), run it eagerly, record its equations."""
        if self.on_constants(tracers):
            vals, _ = self.unwrap(tracers)
            with set_current_trace(self.parent):
                return list(bind(vals))
        abstract = const = False
        if self.abstract():
            atoms, avals, graph = self.unwrap_abstract(tracers)
            abstract = graph or self.in_op > 0
            const = not abstract
        if abstract:
            vals = [_spec(a) for a in avals]
        else:
            vals, atoms = self.unwrap(tracers)
        closed = jax.make_jaxpr(lambda *xs: list(bind(xs)))(*vals)
        env = {}
        for v, a in zip(_inner(closed).invars, atoms):
            env[v] = a
        consts = []
        for v, c in zip(_inner(closed).constvars, closed.consts):
            if type(c) is RecTracer and c._trace is self:  # closed over a recorded value
                env[v] = c.id
                consts.append(None if abstract else c.val)
            else:
                env[v] = _Const(c.val if type(c) is RecTracer else c)
                consts.append(env[v].val)
        for e in _inner(closed).eqns:
            if abstract:
                self.abstract_eqns.append(len(self.eqns))
            if e.effects:
                self._note_effects(not abstract)
            ins = tuple(_Const(x.val, x.aval) if isinstance(x, Literal) else env[x]
                        for x in e.invars)
            outs = []
            for o in e.outvars:
                i = len(self.avals)
                self.avals.append(o.aval)
                env[o] = i
                outs.append(i)
            self._append((e.primitive, e.params, ins, tuple(outs)))
        if abstract:
            out_vals = [_LAZY] * len(_inner(closed).outvars)
        else:
            with set_current_trace(self.parent):
                out_vals = as_fun(ClosedJaxpr(_inner(closed), consts))(*vals)
        result = []
        for o, val in zip(_inner(closed).outvars, out_vals):
            a = o.val if isinstance(o, Literal) else env[o]
            if not isinstance(a, int):
                result.append(val if val is not _LAZY else a.val if isinstance(a, _Const) else a)
            elif val is _LAZY:
                result.append(self.unvalued_tracer(a))
            else:
                result.append(RecTracer(self, val, a, self.avals[a], const))
        return result


def _spec(aval):
    """A stand-in for an input of ``aval`` to trace a function on (jax.make_jaxpr)."""
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


# ----------------------------------------------------------------------------- recorder

class Recorder:
    """Records the DL ops run inside ``with recorder:`` as jaxpr equations.

    on_fetch(tracer, kind, value) is called whenever Python converts a recorded value into a
    Python/NumPy value; ``value`` is the converted result that Python gets.
    """

    def __init__(self, on_fetch=None):
        self.on_fetch = on_fetch
        self._trace = None
        self._ctx = None

    def __enter__(self):
        if self._trace is not None and self._trace.active:
            raise RuntimeError("Recorder is already active")
        parent = current_trace()
        if self._trace is None:
            self._trace = _RecordingTrace(parent, self.on_fetch)
        else:  # re-entered: keep recording into the same equation list
            self._trace.parent = parent
        self._ctx = set_current_trace(self._trace)
        self._ctx.__enter__()
        self._trace.active = True
        return self

    def __exit__(self, *exc):
        ctx, trace = self._ctx, self._trace
        if trace is None or ctx is None:  # (never entered, or left already)
            return False
        trace.active = False
        trace.ran_effects = None
        if current_trace() is not trace.parent:
            ctx.__exit__(*exc)
        # (else an interrupt came in __enter__ before its trace was made current, or in a
        # first __exit__ after it put the parent back: the parent is current, as it must be
        # once this recording is left.  ``_ctx`` is let go only now: an interrupt coming
        # before leaves this to be done by the next __exit__, which the runtime calls.)
        self._ctx = None
        return False

    def _live(self):
        if self._trace is None:
            self._trace = _RecordingTrace(current_trace(), self.on_fetch)
        return self._trace

    def input(self, value) -> RecTracer:
        """Register a concrete value as a graph input; returns a tracer carrying it."""
        trace = self._live()
        if isinstance(value, Tracer):
            if type(value) is RecTracer and value._trace is trace:
                return value
            if type(value) is not RecTracer:
                raise TypeError(f"Recorder.input wants a concrete value, got {type(value)}")
            value = value.val
        if not isinstance(value, jax.Array):
            # A transfer, made outside the recording (Python scalars stay weakly typed).
            with set_current_trace(trace.parent):
                value = jax.device_put(value)
        return trace.new(value)

    def fork(self, stop, num_values) -> "Recorder":
        """A new Recorder whose recording begins as this one's first ``stop`` equations over
        its first ``num_values`` values, with the same ids: a new path of a TraceGraph shares
        its prefix with the path it left.  Values of the prefix get tracers through
        ``adopt``; values recorded afterwards get ids from ``num_values`` on."""
        trace = self._live()
        new = Recorder(self.on_fetch)
        copy = new._live()
        copy.eqns = trace.eqns[:stop]
        copy.avals = trace.avals[:num_values]
        copy.literals = {i: v for i, v in trace.literals.items() if i < num_values}
        copy.abstract_eqns = trace.abstract_eqns[:bisect.bisect_left(trace.abstract_eqns, stop)]
        copy.effect_eqns = trace.effect_eqns[:bisect.bisect_left(trace.effect_eqns, stop)]
        copy.meshes = {k: m for k, m in trace.meshes.items() if k < stop}
        copy.quiet = {k for k in trace.quiet if k < stop}
        copy.quiet_values = {i for i in trace.quiet_values if i < num_values}
        copy.aliases = {i: made for i, made in trace.aliases.items() if made[1] < stop}
        return new

    def adopt(self, id, value) -> RecTracer:
        """A tracer for value ``id`` of a forked prefix, carrying its concrete ``value``."""
        trace = self._live()
        return RecTracer(trace, value, id, trace.avals[id])

    def adopt_abstract(self, id) -> RecTracer:
        """A tracer for value ``id`` of a forked prefix not computed yet: its equations are
        this recording's too, and it is computed with them when read."""
        return self._live().unvalued_tracer(id)

    def not_computed(self, start, stop) -> int:
        """How many of equations [start, stop) were recorded abstractly: running them
        eagerly would first compile their primitives, as eager JAX's first step does."""
        marked = self._live().abstract_eqns
        return bisect.bisect_left(marked, stop) - bisect.bisect_left(marked, start)

    def quiet(self, start, stop):
        """Equations [start, stop) are kept in a segment only where a kept one needs them,
        their effects left out: a function jax.vmap batched as one recorded op (which
        has the effects, batched) was recorded there on one example."""
        trace = self._live()
        trace.quiet.update(range(start, stop))
        trace.quiet_values.update(o for _, _, _, outs in trace.eqns[start:stop] for o in outs)
        trace.effect_eqns = [k for k in trace.effect_eqns if not start <= k < stop]

    def alias(self, pairs, since):
        """Each (old, new) of ``pairs``: value ``new``, made by an equation recorded from
        ``since`` on, is value ``old`` computed again (a differentiated forward's values,
        which its linearization computes too).  A segment that holds ``new``'s equation
        reads ``new`` wherever it reads ``old`` after it, and gives it for ``old``: the
        equations that made ``old`` are then dead there, and the forward is computed once
        (XLA does not merge the two: a custom_jvp rule computes its value its own way)."""
        trace = self._live()
        made = {o: k for k in range(since, len(trace.eqns)) for o in trace.eqns[k][3]}
        for old, new in pairs:
            if new in made and old != new:
                trace.aliases[old] = (new, made[new])

    def quiet_values(self) -> set:
        """The ids of the values quiet equations make (one example's, inside a vmap): no
        launch computes them for Python, which eager JAX would have given batched tracers."""
        return self._live().quiet_values

    def depends(self, id, sources, start, stop) -> bool:
        """Is value ``id`` computed, by equations [start, stop), from any of ``sources``?"""
        reached = set(sources)
        for _, _, atoms, outs in self._live().eqns[start:stop]:
            if any(a in reached for a in atoms if isinstance(a, int)):
                reached.update(outs)
        return id in reached

    def effects_in(self, start, stop) -> list:
        """The indexes of equations [start, stop) that have effects (callbacks, prints)."""
        marked = self._live().effect_eqns
        return marked[bisect.bisect_left(marked, start):bisect.bisect_left(marked, stop)]

    def note_ran_effects(self, into):
        """Until the recording is left, the index of each equation with effects that runs
        as it is recorded (rather than later, in a segment) is added to the set ``into``."""
        self._live().ran_effects = into

    @property
    def abstract(self) -> bool:
        """Does it record abstractly now (compute_values with lazy=True)?"""
        return self._trace is not None and self._trace.lazy

    def can_be_abstract(self) -> bool:
        """Would it record abstractly if asked (compute_values with lazy=True)?"""
        trace = self._live()
        return trace.lazy or (trace.compute is not None and is_eager_trace(trace.parent) and not (
            jax.config.jax_debug_nans or jax.config.jax_debug_infs or jax.config.jax_disable_jit))

    @contextlib.contextmanager
    def recording_op(self):
        """While one op of the iteration is recorded: its work on constants is recorded
        abstractly with the rest of it (see _RecordingTrace.unwrap_abstract)."""
        trace = self._live()
        trace.in_op += 1
        try:
            yield
        finally:
            trace.in_op -= 1

    def compute_values(self, compute, lazy=True):
        """Record primitives abstractly (``lazy``): a value is computed only when it is
        read, by ``compute(tracers)`` (their values, in order).  ``compute=None``: back to
        computing every primitive as it is recorded."""
        trace = self._live()
        trace.compute, trace.lazy = compute, lazy and compute is not None

    def unvalued(self):
        """The tracers recorded abstractly that are still alive and have no value yet."""
        trace = self._live()
        out, keep = [], []
        for w in trace.unvalued:
            t = w()
            if t is not None and t._v is _LAZY:
                out.append(t)
                keep.append(w)
        trace.unvalued = keep
        return out

    @staticmethod
    def known_value(tracer, missing=None):
        """A recorded tracer's value if it has one (computed as recorded), else ``missing``."""
        return missing if tracer._v is _LAZY else tracer._v

    @staticmethod
    def give_value(tracer, value):
        """Set the value of a tracer recorded abstractly (computed by the caller)."""
        if tracer._v is _LAZY:
            tracer._v = value

    def concrete(self, tracer):
        """The eager value of a recorded tracer (records nothing, reports no fetch)."""
        return tracer.val if type(tracer) is RecTracer else tracer

    def mark(self) -> int:
        """Number of equations recorded so far: a segment boundary."""
        return 0 if self._trace is None else len(self._trace.eqns)

    def wiring(self, start=0, stop=None):
        """(ids read, ids produced) by the equations in [start, stop): for segment planning."""
        eqns = self._live().eqns[start:stop]
        reads = {a for _, _, atoms, _ in eqns for a in atoms if isinstance(a, int)}
        return reads, {o for *_, outs in eqns for o in outs}

    @property
    def num_values(self) -> int:
        return 0 if self._trace is None else len(self._trace.avals)

    def segment(self, outputs, start=0, stop=None, skip=frozenset(), pure=False) -> "Segment":
        """The equations of [start, stop) needed for ``outputs`` (tracers of this Recorder,
        or their ids) as a Segment (see module doc).  Equations with effects are kept for
        them, except those in ``skip`` (their effects happened already; an output of one
        that is needed becomes an input) and all of them when ``pure`` (a function to
        differentiate: the recorded forward keeps its effects)."""
        trace = self._live()
        out_ids = []
        for t in outputs:
            if isinstance(t, int) and 0 <= t < len(trace.avals):
                out_ids.append(t)
            elif type(t) is RecTracer and t._trace is trace:
                out_ids.append(t.id)
            else:
                raise TypeError(f"segment outputs must be tracers of this Recorder, got {t!r:.60}")
        return _build_segment(trace, out_ids, start, len(trace.eqns) if stop is None else stop,
                              skip, pure)

    def owns(self, tracer) -> bool:
        """Is ``tracer`` one of this Recorder's?"""
        return type(tracer) is RecTracer and self._trace is not None and tracer._trace is self._trace

    def owns_trace(self, trace) -> bool:
        """Is ``trace`` this Recorder's recording trace?"""
        return self._trace is not None and trace is self._trace

    def parent_trace(self):
        """The trace this Recorder runs eager work under (the one current when it was entered)."""
        return self._live().parent

    def __repr__(self):
        n = self.mark()
        state = "recording" if self._trace is not None and self._trace.active else "idle"
        return f"Recorder({state}, {n} equations)"


# ----------------------------------------------------------------------------- segments

class Segment:
    """Plain data: ``jaxpr`` (ClosedJaxpr), ``inputs`` / ``outputs`` (value ids, in order),
    ``key`` (structural cache key used by compile_segment); ``sizes``: what the runtime
    learnt of its inputs' sizes, once (launching.input_bytes); ``meshes``: None, or per
    equation the abstract mesh it was recorded under (``_UNSET``: the default)."""
    __slots__ = ("jaxpr", "inputs", "outputs", "key", "sizes", "meshes", "operations", "warmed",
                 "dispatchers")

    def __init__(self, jaxpr, inputs, outputs, key, meshes=None):
        self.jaxpr = jaxpr
        self.inputs = inputs
        self.outputs = outputs
        self.key = key
        self.sizes = None
        self.meshes = meshes
        self.operations = None  # its distinct operations (operations_of), once asked
        self.warmed = False     # run eagerly once: JAX holds an executable for each operation
        self.dispatchers = None  # per equation, how evaluate_segment runs it (_dispatchers)

    def __repr__(self):
        return (f"Segment(inputs={self.inputs}, outputs={self.outputs}, "
                f"{len(_inner(self.jaxpr).eqns)} equations)\n{self.jaxpr}")


def _effects(prim, params, avals, atoms):
    subs = list(_subjaxprs(params))
    if subs:
        return frozenset().union(*(j.effects for j in subs))
    return _abstract_eval_effects(prim, [_aval_of(a, avals) for a in atoms], params)


def _aval_of(atom, avals):
    return avals[atom] if isinstance(atom, int) else atom.get_aval()


def _in_program_order(prim, params, atoms, outs, effs, avals):
    """A callback or print of a segment, made ordered: eager JAX runs them one dispatch
    after another, in the order Python called them; in one executable XLA would be free
    to run unordered ones in any order (and two executables' concurrently).  So are those
    inside a ``jax.jit``-ed function the segment calls (its own dispatch, eagerly)."""
    new = _ordered_params(prim, params)
    if new is params:
        return prim, params, atoms, outs, effs
    return prim, new, atoms, outs, _effects(prim, new, avals, atoms)


_JIT_LIKE = frozenset({"jit", "pjit", "closed_call", "core_call"})


def _ordered_params(prim, params):
    """``params`` with the callbacks they make ordered (the same object if none is)."""
    name = prim.name
    if name == "debug_callback":
        ordered = _ordered_effects()[0]
        return params if params["effect"] is ordered else dict(params, effect=ordered)
    if name in ("debug_print", "io_callback"):
        return dict(params, ordered=True) if params.get("ordered") is False else params
    if name in _JIT_LIKE and isinstance(params.get("jaxpr"), (Jaxpr, ClosedJaxpr)):
        jaxpr = _ordered_jaxpr(params["jaxpr"])
        return params if jaxpr is params["jaxpr"] else dict(params, jaxpr=jaxpr)
    return params


def _ordered_jaxpr(j):
    """Jaxpr ``j`` with its callbacks ordered (``j`` itself if it has none unordered)."""
    inner = _inner(j)
    if not inner.effects:
        return j
    eqns, changed = [], False
    for e in inner.eqns:
        params = _ordered_params(e.primitive, e.params) if e.effects else e.params
        if params is not e.params:
            changed = True
            e = e.replace(params=params, effects=_as_ordered(e.effects))
        eqns.append(e)
    if not changed:
        return j
    new = inner.replace(eqns=eqns, effects=_as_ordered(inner.effects))
    return new if inner is j else j.replace(jaxpr=new)


def _as_ordered(effects):
    ordered_debug, debug, io, ordered_io = _ordered_effects()
    swap = {type(debug): ordered_debug, type(io): ordered_io}
    return frozenset(swap.get(type(e), e) for e in effects)


@functools.cache
def _ordered_effects():
    """(ordered debug effect, unordered debug, unordered IO, ordered IO) as JAX records
    them (it has no public names for them)."""
    from jax.experimental import io_callback
    spec = jax.ShapeDtypeStruct((), np.float32)

    def callbacks(x):
        jax.debug.callback(lambda v: None, x, ordered=True)
        jax.debug.callback(lambda v: None, x)
        io_callback(lambda v: v, spec, x)
        io_callback(lambda v: v, spec, x, ordered=True)
    eqns = _inner(jax.make_jaxpr(callbacks)(np.float32(0))).eqns
    ordered_debug, debug = eqns[0].params["effect"], eqns[1].params["effect"]
    (io,), (ordered_io,) = eqns[2].effects, eqns[3].effects
    return ordered_debug, debug, io, ordered_io


def _build_segment(trace, out_ids, start, stop, skip=frozenset(), pure=False):
    # Building a key allocates many small tuples; in a process holding JAX's large heap,
    # the cyclic GC they trigger costs more than the work itself (~4x measured).
    was = gc.isenabled()
    gc.disable()
    try:
        return _build_segment_nogc(trace, out_ids, start, stop, skip, pure)
    finally:
        if was:
            gc.enable()


def _build_segment_nogc(trace, out_ids, start, stop, skip, pure):
    eqns, avals, literals, meshes, quiet = trace.eqns, trace.avals, trace.literals, trace.meshes, trace.quiet
    # A value made again later in the segment (Recorder.alias) is read there from then on.
    aliases = {i: made for i, made in trace.aliases.items() if start <= made[1] < stop} \
        if trace.aliases else None
    read_outs = [aliases[o][0] if o in aliases else o for o in out_ids] if aliases else out_ids
    # Dead-code elimination, backwards: keep an equation if an output is needed or it
    # has effects (a debug print or callback must still happen when replayed).
    needed = set(read_outs)
    kept, kept_meshes = [], []
    for k in range(stop - 1, start - 1, -1):
        prim, params, atoms, outs = eqns[k]
        if k in skip:  # (what it computed is read as an input)
            continue
        effs = _effects(prim, params, avals, atoms)
        if effs and not pure and k not in quiet or any(o in needed for o in outs):
            if aliases:
                atoms = tuple(_alias_read(a, k, aliases) for a in atoms)
            kept.append((prim, params, atoms, outs, effs))
            kept_meshes.append(meshes.get(k, _UNSET))
            needed.update(a for a in atoms if isinstance(a, int))
    kept.reverse()
    kept_meshes.reverse()
    if any(e[4] for e in kept):
        kept = [_in_program_order(*e, avals) if e[4] else e for e in kept]

    # Wire variables.  Value ids defined outside the kept equations become inputs, in order
    # of first read (deterministic for identical programs).
    var = {}
    inputs, invars = [], []
    consts, constvars, const_index = [], [], {}
    key_consts = []
    local = {}               # id -> small int, for the structural key

    def read(a):
        if isinstance(a, int) and a in literals:
            a = _Const(literals[a], avals[a])
        if isinstance(a, int):
            v = var.get(a)
            if v is None:
                v = var[a] = Var(avals[a])
                inputs.append(a)
                invars.append(v)
                local[a] = len(local)
            return v, local[a]
        val = a.val
        if _is_scalar(val):
            aval = a.get_aval()
            return Literal(val, aval), ("lit", type(val), _scalar_key(val), aval)
        j = const_index.get(id(val))
        if j is None:
            j = const_index[id(val)] = len(consts)
            consts.append(val)
            constvars.append(Var(a.get_aval()))
            key_consts.append(_const_key(val))
        return constvars[j], ("const", j)

    jeqns, key_eqns = [], []
    for prim, params, atoms, outs, effs in kept:
        ins, ins_key = [], []
        for a in atoms:
            v, k = read(a)
            ins.append(v)
            ins_key.append(k)
        outvars = []
        for o in outs:
            v = var[o] = Var(avals[o])
            local[o] = len(local)
            outvars.append(v)
        jeqns.append(new_jaxpr_eqn(ins, outvars, prim, params, effs))
        key_eqns.append((prim, _params_key(params, prim), tuple(ins_key),
                         tuple(avals[o] for o in outs)))
    outvars, key_outs = [], []
    for o in read_outs:
        v, k = read(o)
        outvars.append(v)
        key_outs.append(k)
    effects = frozenset().union(*(e[4] for e in kept)) if kept else _no_effects
    closed = _closed(constvars, invars, outvars, jeqns, effects, consts)
    key = (tuple(avals[i] for i in inputs), tuple(key_consts), tuple(key_eqns),
           tuple(key_outs))
    on_meshes = tuple(kept_meshes) if any(m is not _UNSET for m in kept_meshes) else None
    return Segment(closed, inputs, list(out_ids), key, on_meshes)


def _alias_read(a, k, aliases):
    """The value equation ``k`` reads for atom ``a``: the later copy of it (Recorder.alias)
    where that copy is made before ``k``."""
    if type(a) is int:
        made = aliases.get(a)
        if made is not None and made[1] < k:
            return made[0]
    return a


# ----------------------------------------------------------------------------- structural keys

_SMALL = 64  # constants up to this many elements are keyed by value, larger by identity


class Id:
    """A key that compares by identity and keeps its object alive (so the id cannot be
    reused while the key is held): constants in segment keys, objects in guard keys."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return type(other) is Id and other.obj is self.obj

    def __repr__(self):
        obj = self.obj
        return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)[:40]


_SCALARS = (bool, int, float, complex, np.generic)


def _is_scalar(x):
    return isinstance(x, _SCALARS)


def _scalar_key(x):
    if isinstance(x, float) and x != x:   # NaN != NaN would make every key distinct
        return "nan"
    if isinstance(x, np.generic):
        return (x.dtype.str, x.tobytes())
    return x


def _const_key(c):
    size = getattr(c, "size", None)
    if _is_scalar(c):
        return (type(c), _scalar_key(c))
    if isinstance(c, np.ndarray) and c.size <= _SMALL:
        return ("np", c.dtype.str, c.shape, c.tobytes())
    if isinstance(c, jax.Array) and size is not None and size <= _SMALL:
        try:
            a = np.asarray(c)
            return ("jax", a.dtype.str, a.shape, a.tobytes(), jax.typeof(c))
        except Exception:  # e.g. PRNG key arrays: fall back to identity
            pass
    return Id(c)


_jaxpr_keys = {}   # id(jaxpr) -> (weakref, interned token)
_interned = {}     # structural key -> small int


def _jaxpr_key(j):
    hit = _jaxpr_keys.get(id(j))
    if hit is not None and hit[0]() is j:
        return hit[1]
    inner = _inner(j)
    consts = getattr(j, "consts", ())
    env = {}
    for v in inner.constvars:
        env[v] = len(env)
    for v in inner.invars:
        env[v] = len(env)

    def atom(x):
        if isinstance(x, Literal):
            return ("lit", type(x.val), _lit_key(x.val), x.aval)
        return env[x]

    eqns = []
    for e in inner.eqns:
        ins = tuple(atom(x) for x in e.invars)
        for o in e.outvars:
            env[o] = len(env)
        eqns.append((e.primitive, _params_key(e.params, e.primitive), ins,
                     tuple(o.aval for o in e.outvars)))
    key = (tuple(v.aval for v in inner.constvars), tuple(_const_key(c) for c in consts),
           tuple(v.aval for v in inner.invars), tuple(eqns),
           tuple(atom(x) for x in inner.outvars))
    token = _interned.setdefault(key, len(_interned))
    try:
        ref = weakref.ref(j, lambda _, k=id(j): _jaxpr_keys.pop(k, None))
        _jaxpr_keys[id(j)] = (ref, token)
    except TypeError:
        pass
    return token


def _lit_key(v):
    if _is_scalar(v):
        return _scalar_key(v)
    return _const_key(v)


# Params that only matter when an equation is *differentiated*.  Compiled segments are only
# ever evaluated forward, and JAX makes these callables afresh on every trace, so keying on
# their identity would miss the cache on every iteration.
AD_ONLY_PARAMS = {"custom_jvp_call": {"jvp_jaxpr_fun", "jvp_jaxpr_thunk"},
            "custom_vjp_call": {"fwd_jaxpr_thunk", "bwd", "out_trees"}}


_params_memo = {}   # id(params) -> (params, key): jit reuses one params dict per function


def _params_key(p, prim=None):
    hit = _params_memo.get(id(p))
    if hit is not None and hit[0] is p:
        return hit[1]
    skip = AD_ONLY_PARAMS.get(prim.name, ()) if prim is not None else ()
    try:
        items = sorted(p.items())
    except TypeError:               # a nested dict with keys of mixed types
        items = p.items()
    key = tuple((k, _value_key(v)) for k, v in items if k not in skip)
    if len(_params_memo) > 20000:   # holds the dicts alive (so ids stay unique): bound it
        _params_memo.clear()
    _params_memo[id(p)] = (p, key)
    return key


def _value_key(v):
    t = type(v)
    kind = _kinds.get(t)
    if kind is None:
        kind = _kinds[t] = _kind(t)
    if kind == "hashable":
        try:
            hash(v)
        except TypeError:       # e.g. a frozen dataclass holding an unhashable field
            return Id(v)
        # Hashable values (ints, dtypes, shardings, named tuples, functions by identity).
        # The type is part of the key: 1 == 1.0 == True must not collide.
        return (t, v)
    if kind == "seq":
        return (t, tuple(_value_key(x) for x in v))
    if kind == "jaxpr":
        return ("jaxpr", _jaxpr_key(v))
    if kind == "dict":
        return (t, _params_key(v))
    if kind == "function":
        return _function_key(v)
    return _const_key(v)        # "array"


def _function_key(f):
    # Callables are keyed by identity, so two recordings that pass different Python
    # callbacks never share an executable.  Exception: closures JAX itself makes afresh on
    # every call around a user callable (jax.debug.callback's _flat_callback).  JAX never
    # rebinds their cells, so they are keyed by code plus the keys of what they close over
    # (the user's callable, by identity); otherwise every iteration would recompile.
    if not (f.__closure__ and f.__module__ and f.__module__.startswith("jax.")):
        return (type(f), f)
    cells = []
    for c in f.__closure__:
        try:
            cells.append(_value_key(c.cell_contents))
        except ValueError:      # empty cell
            cells.append(Id(c))
    return ("jaxfn", f.__code__, _value_key(f.__defaults__), tuple(cells))


_kinds = {}                     # type -> how _value_key keys its values (isinstance is slow)


def _kind(t):
    if t is tuple or t is list:
        return "seq"
    if t is dict:
        return "dict"
    if issubclass(t, (Jaxpr, ClosedJaxpr)):
        return "jaxpr"
    if issubclass(t, (np.ndarray, jax.Array)):
        return "array"
    if t is types.FunctionType:
        return "function"
    return "hashable"


# ----------------------------------------------------------------------------- compile

SEGMENT_NAME = "terra_bc_segment"  # an executable's name where none is given
# (Segment.key, JAX's trace context) -> executable.  Equal equations lower differently under
# another configuration (jax_threefry_partitionable: another random bits algorithm, the same
# jaxpr), and a jax.jit function kept from before the change ran its old lowering.
_compiled = {}
_cache_stats = {"compiles": 0, "hits": 0}  # since the process started (never reset)

try:
    from jax._src.config import trace_context
except ImportError:  # pragma: no cover
    def trace_context():
        """What JAX keys its own caches on (its configuration), where it does not say."""
        config = jax.config
        return (config.jax_enable_x64, config.jax_default_device, config.jax_default_matmul_precision,
                config.jax_numpy_dtype_promotion, config.jax_numpy_rank_promotion)


def _exe_key(segment: Segment):
    return segment.key, trace_context()


# ----------------------------------------------------------------------------- trace state

_opaque_trace_state = _jax_core.get_opaque_trace_state
_EvalTrace = getattr(_jax_core, "EvalTrace", None)
_OpaqueTraceState = getattr(_jax_core, "OpaqueTraceState", None)


class _Differentiation:
    """Stands for the trace eager JAX would run a function under while terra_bc records its
    differentiation (``differentiating``): one per call, as JAX makes one JVP trace a call."""
    __slots__ = ("__weakref__",)


_differentiations = threading.local()  # .stack: this thread's open _Differentiation objects


@contextlib.contextmanager
def differentiating():
    """While terra_bc runs a function whose gradient it records (jax.grad of user code), the
    trace state libraries see is a new one, as under eager JAX's JVP trace: an NNX Variable
    made outside is refused there as eagerly ("Cannot mutate ... from a different trace
    level"), one made inside is usable inside."""
    stack = getattr(_differentiations, "stack", None)
    if stack is None:
        stack = _differentiations.stack = []
    stack.append(_Differentiation())
    try:
        yield
    finally:
        stack.pop()


def _trace_state_eager_sees(convention=None):
    """``jax.extend.core.get_opaque_trace_state`` as eager JAX would answer it.

    Libraries record the trace state when they create an object and refuse to touch the
    object under another (Flax NNX: "Cannot extract graph node from different trace level").
    The recording trace is current for a whole iteration, but it only records what eager
    JAX runs: while it is current the answer is its parent's, so objects made before or
    during an iteration are usable in both; inside a differentiation terra_bc records, it
    is that differentiation's (``differentiating``).  Under a transform JAX runs on top of
    it (grad, jit) the answer is that transform's, as in eager JAX."""
    trace = current_trace()
    recording = isinstance(trace, _RecordingTrace)
    if recording or type(trace) is _EvalTrace:
        stack = getattr(_differentiations, "stack", None)
        if stack and _OpaqueTraceState is not None:
            return _OpaqueTraceState(weakref.ref(stack[-1]))
    if not recording:
        return _opaque_trace_state(convention)
    while isinstance(trace, _RecordingTrace):
        trace = trace.parent
    with set_current_trace(trace):
        return _opaque_trace_state(convention)


# Where libraries look it up: ``jax.extend.core`` (Flax, Haiku) takes it from JAX's core at
# its own import, so setting it there covers a later import; an earlier one is set too.
_jax_core.get_opaque_trace_state = _trace_state_eager_sees
if "jax.extend.core" in sys.modules:
    sys.modules["jax.extend.core"].get_opaque_trace_state = _trace_state_eager_sees


def compile_segment(segment: Segment, on_compile=None, name=SEGMENT_NAME):
    """A jitted executable for ``segment``: takes input values in ``segment.inputs`` order,
    returns the output values as a list.  Structurally identical segments share one (named
    ``name`` by the segment that made it).  A new executable counts as a compile in
    ``terra_bc.stats()`` and calls ``on_compile()``; it is compiled at its first call, on
    the calling thread."""
    fn = cached_executable(segment)
    if fn is None:
        fn = keep_executable(segment, jit_segment(segment, name))
        if on_compile is not None:
            on_compile()
    return fn


def cached_executable(segment: Segment):
    """The executable already made for a segment of ``segment``'s structure, else None.  A
    segment that is one call of a jitted function runs that call (no compile of ours)."""
    key = _exe_key(segment)
    fn = _compiled.get(key)
    if fn is not None:
        _cache_stats["hits"] += 1
        return fn
    fn = _one_jit_call(segment.jaxpr)
    if fn is not None:
        _compiled[key] = fn
    return fn


def jit_segment(segment: Segment, name=SEGMENT_NAME):
    """``segment`` as a ``jax.jit`` function named ``name`` (an identifier), not compiled
    yet (``.lower(...).compile()`` compiles it ahead of its first call, on any thread)."""
    return jax.jit(_named(as_fun(segment.jaxpr), name))


_donating = {}  # (_exe_key, layout, donated) -> executable, or None: not ours


def run_donating(segment: Segment, args, dead, name=SEGMENT_NAME):
    """Run ``segment`` on ``args`` letting it reuse the buffers of the inputs at positions
    ``dead`` (nothing reads them afterwards: ``launching.donatable``) for its outputs, as
    ``jax.jit(..., donate_argnums=...)`` does; None (nothing run) where it cannot: the
    segment is a call of the user's own jitted function, or no output can take a donated
    buffer.  An array fed at several positions (a parameter read by the loss and by its
    update) is passed once: a buffer cannot be donated and read as another argument.  Each
    new executable counts as a compile."""
    firsts, layout, reduced = {}, [], []
    for k, a in enumerate(args):
        if k in dead and id(a) in firsts:
            layout.append(firsts[id(a)])
            continue
        if k in dead:
            firsts[id(a)] = len(reduced)
        layout.append(len(reduced))
        reduced.append(a)
    key = (_exe_key(segment), tuple(layout), tuple(firsts.values()))
    fn = _donating.get(key, _donating)
    if fn is _donating:
        fn = _donating[key] = _donating_executable(segment, key[1], key[2], reduced, name)
    return None if fn is None else fn(*reduced)


def _donating_executable(segment, layout, donated, reduced, name):
    usable = _aliasable(segment, [reduced[k].aval for k in donated], donated)
    if not usable or _one_jit_call(segment.jaxpr) is not None:
        return None
    fun = as_fun(segment.jaxpr)

    def expanded(*xs):
        return fun(*[xs[j] for j in layout])
    _cache_stats["compiles"] += 1
    counts["compiles"] += 1
    return _timed_first_call(jax.jit(_named(expanded, name), donate_argnums=usable))


def _aliasable(segment, avals, positions):
    """The ``positions`` (of inputs of types ``avals``) whose buffer an output of the same
    type can reuse (JAX warns of a donation no output can take)."""
    outs = collections.Counter((a.shape, a.dtype) for a in segment.jaxpr.out_avals)
    usable = []
    for k, aval in zip(positions, avals):
        if outs[(aval.shape, aval.dtype)] > 0:
            outs[(aval.shape, aval.dtype)] -= 1
            usable.append(k)
    return tuple(usable)


def keep_executable(segment: Segment, fn, wait_only=False, lazy=False):
    """Cache ``fn`` (from ``jit_segment``) as the executable of ``segment``'s structure and
    count it as a compile; its first call is timed (``_timed_first_call``).  ``lazy``: not
    compiled yet, and maybe never (a segment compiled as its donating executable, whose
    launches that donate otherwise would compile this at their first call): counted then."""
    fn = _timed_first_call(fn, wait_only, counted=not lazy)
    _compiled[_exe_key(segment)] = fn
    if not lazy:
        _cache_stats["compiles"] += 1
        counts["compiles"] += 1
    return fn


# Operations (primitive, parameters, input avals, abstract mesh) run eagerly, by a recording
# as it recorded them or by evaluate_segment: JAX holds an eager executable for each, so
# running them again compiles nothing.  Bounded (a key may hold an object of the parameters
# alive): past WARM_LIMIT it starts afresh, and estimates count some warm operations as cold.
_warm = set()
WARM_LIMIT = 1 << 14


def operations_of(segment: Segment) -> frozenset:
    """``segment``'s distinct operations, as eager JAX keys its per-operation executables:
    equations repeating one (a cell applied at every node of a tree) compile it once."""
    ops = segment.operations
    if ops is None:
        eqns = _inner(segment.jaxpr).eqns
        meshes = segment.meshes or itertools.repeat(_UNSET)
        ops = segment.operations = frozenset(
            _operation(k[0], k[1], [v.aval for v in e.invars], m)
            for k, e, m in zip(segment.key[2], eqns, meshes))
    return ops


def _operation(prim, params_key, in_avals, mesh):
    return (prim, params_key, tuple(in_avals), None if mesh is _UNSET else mesh)


def cold_operations(segment: Segment, among=None) -> int:
    """How many of ``segment``'s distinct operations no eager run has compiled yet (and are
    in ``among``, if given): running it eagerly now compiles each of them first, as eager
    JAX's first step does."""
    if segment.warmed:
        return 0
    cold = operations_of(segment) - _warm
    return len(cold) if among is None else len(cold & among)


def cold_operations_in(segments) -> int:
    """How many distinct operations of ``segments`` no eager run has compiled yet."""
    ops = set()
    for segment in segments:
        if not segment.warmed:
            ops |= operations_of(segment)
    return len(ops - _warm)


def _warm_operation(prim, params, in_avals):
    """An operation the recording ran eagerly as it recorded it (see operations_of)."""
    _remember_warm((_operation(prim, _params_key(params, prim), in_avals, _mesh_now()),))


def _remember_warm(operations):
    if len(_warm) > WARM_LIMIT:
        _warm.clear()
    _warm.update(operations)


def forget_warm():
    """Take every operation for cold again (segments already run eagerly stay warm)."""
    _warm.clear()


def _note_warm(segment):
    """``segment``'s operations have run eagerly (evaluate_segment)."""
    _remember_warm(operations_of(segment))
    segment.warmed = True


def evaluate_segment(segment: Segment, args):
    """Run ``segment``'s equations eagerly, one JAX dispatch each (no compile of the whole).
    Bound as eager JAX binds them, outside the name stack of the source they were recorded
    at (``jax.core.eval_jaxpr`` enters it, and JAX keys the executables of eager ``jit``
    calls by it: each would be compiled again)."""
    closed = segment.jaxpr
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    meshes = segment.meshes or itertools.repeat(_UNSET)
    dispatchers = segment.dispatchers or _dispatchers(segment)
    for eqn, mesh, dispatch in zip(jaxpr.eqns, meshes, dispatchers):
        prim = eqn.primitive
        ins = [a.val if isinstance(a, Literal) else env[a] for a in eqn.invars]
        try:
            # (where JAX bound it as it was recorded: its executable)
            if dispatch is not None and _plain_context(eqn.ctx):
                out = dispatch(*ins)
            else:
                out = _bind(eqn, ins) if mesh is _UNSET else _bind_on_mesh(eqn, ins, mesh)
        except _NAN_FOUND as e:
            # (jax_debug_nans / jax_debug_infs: what JAX's API raises for it, where a
            # primitive bound from outside it reports JAX's internal error)
            raise FloatingPointError(f"invalid value ({e.ty}) encountered in {prim.name}") from None
        if prim.multiple_results:
            env.update(zip(eqn.outvars, out))
        else:
            env[eqn.outvars[0]] = out
    if not segment.warmed:
        _note_warm(segment)
    return [a.val if isinstance(a, Literal) else env[a] for a in jaxpr.outvars]


def _dispatchers(segment):
    """Per equation of ``segment``: the dispatch object of a jit equation outside any mesh
    (``_jit_dispatcher``: a few µs a call where binding it costs ~20), else None (bind)."""
    meshes = segment.meshes or itertools.repeat(_UNSET)
    found = segment.dispatchers = [
        _jit_dispatcher(eqn) if eqn.primitive.name in ("jit", "pjit") and mesh is _UNSET else None
        for eqn, mesh in zip(_inner(segment.jaxpr).eqns, meshes)]
    return found


def _bind(eqn, ins):
    """Bind ``eqn`` on ``ins``, in its own context only where that is not the default."""
    prim = eqn.primitive
    if _plain_context(eqn.ctx):
        return prim.bind(*ins, **prim.get_bind_params(eqn.params))
    with eqn.ctx.manager:
        return prim.bind(*ins, **prim.get_bind_params(eqn.params))


def _bind_on_mesh(eqn, ins, mesh):
    """``_bind`` under abstract mesh ``mesh``."""
    kept = _MESH.swap_local(mesh)
    try:
        return _bind(eqn, ins)
    finally:
        _MESH.set_local(kept)


try:  # (jax 0.10: gradients are linearized and transposed under an empty abstract mesh)
    from jax._src.config import abstract_mesh_context_manager as _MESH
    from jaxlib._jax.config import unset as _UNSET
except ImportError:  # (a JAX that keys eager jit by no such context: nothing to note)
    _MESH, _UNSET = None, object()


def mesh_context():
    """The abstract mesh context JAX gives the avals it makes now (None where JAX has none)."""
    return None if _MESH is None else _MESH.value


def _mesh_now():
    """The empty abstract mesh JAX's autodiff sets for this thread, if it is set now, else
    ``_UNSET`` (the default; a program's own mesh is left to the program's context, where
    segments run too: set alone, without its devices, eager JAX refuses explicit shardings)."""
    if _MESH is None:
        return _UNSET
    mesh = _MESH.get_local()
    return mesh if mesh is not _UNSET and getattr(mesh, "empty", False) else _UNSET


try:
    from jax._src.api_util import InternalFloatingPointError as _NAN_FOUND
except ImportError:  # pragma: no cover
    class _NAN_FOUND(Exception):
        """(A JAX without it: nothing to convert.)"""


def as_fun(closed):
    """``jaxpr_as_fun(closed)``, leaving JAX's NaN checks as they were.  jaxpr_as_fun turns
    them off for its call (``with config.debug_nans(False)``), and JAX's hook then leaves a
    thread-local "no check" behind (it sets None where it should unset the thread's own
    setting): ``jax_debug_nans`` turned on later checked nothing in a thread that had run a
    segment, where eager JAX raises FloatingPointError."""
    fun = jaxpr_as_fun(closed)
    if _POST_HOOK is None:
        return fun

    def call(*args):
        kept = _POST_HOOK.get_local()
        try:
            return fun(*args)
        finally:
            _POST_HOOK.set_local(kept)
    return call


try:
    from jax._src.api import _post_hook_state as _POST_HOOK
except ImportError:  # pragma: no cover
    _POST_HOOK = None


def trace_abstractly(fun, specs):
    """(closed jaxpr, output structure) of ``fun(*specs)`` traced by JAX over the avals of
    ``specs`` (``ShapeDtypeStruct``s): ``fun``'s Python runs once.  JAX's tracing entry
    itself, not ``jax.make_jaxpr``: that goes through ``jit``'s argument handling,
    caches, profiler annotations and debug info, ~2x the tracing of a small function
    (most of a per-example-gradient step whose loss is traced at every call)."""
    out_tree = []

    def flat(*xs):
        leaves, tree = jax.tree_util.tree_flatten(fun(*xs))
        out_tree.append(tree)
        return leaves
    if _TRACE_TO_JAXPR is None:  # pragma: no cover
        closed = jax.make_jaxpr(flat)(*specs)
        return closed, out_tree[0]
    avals = [_ShapedArray(s.shape, s.dtype, weak_type=s.weak_type) for s in specs]
    debug = _debug_info("terra_bc", flat, specs, {})
    jaxpr, _, consts = _TRACE_TO_JAXPR(_wrap_init(flat, debug_info=debug), avals)
    return ClosedJaxpr(jaxpr, consts), out_tree[0]


try:
    from jax._src.api_util import debug_info as _debug_info
    from jax._src.core import ShapedArray as _ShapedArray
    from jax._src.interpreters.partial_eval import trace_to_jaxpr_dynamic as _TRACE_TO_JAXPR
    from jax._src.linear_util import wrap_init as _wrap_init
except ImportError:  # pragma: no cover
    _TRACE_TO_JAXPR = None


try:  # JAX's partial evaluation, which libraries call themselves (flax's nn.scan)
    from jax._src.interpreters.partial_eval import PartialVal
    from jax._src.interpreters.partial_eval import convert_constvars_jaxpr as _constvars_as_inputs
    from jax._src.interpreters.partial_eval import partial_eval_jaxpr_nounits as _split_jaxpr
    from jax._src.interpreters.partial_eval import trace_to_jaxpr_nounits as TRACE_TO_JAXPR_NOUNITS
except ImportError:  # pragma: no cover
    TRACE_TO_JAXPR_NOUNITS = PartialVal = None
EVAL_JAXPR = _jax_core.eval_jaxpr  # (what jax.core.eval_jaxpr is: libraries call it)
try:
    from jax._src.ad_checkpoint import remat_p as REMAT  # (jax.checkpoint's primitive)
except ImportError:  # pragma: no cover
    REMAT = None


def split_known(jaxpr, nknown, instantiate=False):
    """JAX's partial evaluation of ``jaxpr`` with its constant variables made its first
    inputs, of which the first ``nknown`` are known: (the known part: known inputs -> known
    outputs, then residuals; the unknown part: residuals, then unknown inputs -> unknown
    outputs; which outputs are unknown; the number of residuals).  The parts are closed
    jaxprs (``.jaxpr``, ``.consts``) under every supported JAX."""
    flat = _constvars_as_inputs(jaxpr)
    unknowns = [False] * nknown + [True] * (len(flat.invars) - nknown)
    known, unknown, out_unknowns, residuals = _split_jaxpr(ClosedJaxpr(flat, []), unknowns, instantiate)
    return known, unknown, out_unknowns, len(residuals)


def _plain_context(ctx):
    """Was the equation recorded in the context eager JAX runs in now?  Entering its context
    (an abstract mesh among it) changes JAX's cache key for eager ``jit`` calls; only a
    context that differs (a compute type, metadata, another PRNG mode) is entered."""
    return (ctx.compute_type is None and ctx.xla_metadata is None
            and ctx.threefry_partitionable == jax.config.jax_threefry_partitionable
            and not getattr(getattr(ctx, "cur_abstract_mesh", None), "axis_names", ()))


def _named(fun, name):
    """``fun`` under the name JAX gives its executable, ``jit_<name>`` (logs, profiles, the
    persistent cache's file names; the runtime names a segment by its unit, path and range:
    ``journal.segment_name``).  It must not change from run to run: the persistent cache
    keys an executable by its module, name included."""
    def segment(*args):
        return fun(*args)
    segment.__name__ = segment.__qualname__ = name
    return segment


def _timed_first_call(jitted, wait_only=False, counted=True):
    """``jitted``, whose first call (where JAX traces it, and lowers and compiles it unless
    that was done ahead: ``wait_only``) blocks the calling thread: its duration is added to
    ``compile_wait_seconds`` and, where it compiled, to ``compile_seconds``; and, unless
    ``counted`` already, one to ``compiles``."""
    first = [True]

    def call(*args):
        if first[0]:
            first[0] = False
            if not counted:
                _cache_stats["compiles"] += 1
                counts["compiles"] += 1
            t0 = time.perf_counter()
            try:
                return jitted(*args)
            finally:
                took = time.perf_counter() - t0
                counts["compile_wait_seconds"] += took
                if not wait_only:
                    counts["compile_seconds"] += took
        return jitted(*args)
    return call


def _one_jit_call(closed):
    """A segment that is exactly one call of a jitted function (all its outputs, its inputs
    in order: a step the user jitted) runs that call: JAX finds the executable it compiled
    for the user's own call, where jitting the segment would compile the step again."""
    jaxpr = closed.jaxpr
    if len(jaxpr.eqns) != 1 or closed.consts:
        return None
    eqn = jaxpr.eqns[0]
    if eqn.primitive.name not in ("jit", "pjit") or list(eqn.invars) != list(jaxpr.invars) \
            or list(eqn.outvars) != list(jaxpr.outvars):
        return None

    dispatcher = _jit_dispatcher(eqn)
    if dispatcher is not None:
        return dispatcher

    def call(*args):
        return eqn.primitive.bind(*args, **eqn.params)
    return call


# Binding a jit equation on arrays runs JAX's impl rule for it, which builds JAX's C++
# dispatch object for the call anew each time: ~20 µs of Python, more than the rest of a
# launch.  The same object made once per equation dispatches in a few µs and finds the
# executables JAX keeps for the user's own calls (its global dispatch cache is keyed by the
# function JAX makes of the equation's jaxpr, and by the parameters).  Made only where JAX's
# impl rule takes exactly the parameters this reads (else: bind, as before).
_JIT_IMPL_PARAMS = ("jaxpr", "in_shardings", "out_shardings", "in_layouts", "out_layouts",
                    "donated_invars", "ctx_mesh", "name", "keep_unused", "inline",
                    "compiler_options_kvs")


def _jit_dispatcher(eqn):
    """A callable equal to binding ``eqn`` (a jit equation) on concrete arguments, returning
    its outputs' list; None where it cannot be made on this JAX."""
    params = eqn.params
    if set(params) != set(_JIT_IMPL_PARAMS) or not _jit_impl_known():
        return None
    try:
        from jax._src import pjit as jit_impl, tree_util
        from jax._src.interpreters import pxla
        fun = jit_impl._get_jaxpr_as_fun(*(params[k] for k in _JIT_IMPL_PARAMS))
        donated = tuple(k for k, d in enumerate(params["donated_invars"]) if d)
        key = pxla.JitGlobalCppCacheKeys(
            donate_argnums=donated, donate_argnames=None, device=None, backend=None,
            in_shardings_treedef=None, in_shardings_leaves=params["in_shardings"],
            out_shardings_treedef=None, out_shardings_leaves=params["out_shardings"],
            in_layouts_treedef=None, in_layouts_leaves=params["in_layouts"],
            out_layouts_treedef=None, out_layouts_leaves=params["out_layouts"])
        run_python, fastpath = jit_impl._pjit_call_impl_python, jit_impl._get_fastpath_data
        rebuild, tree_structure = jit_impl._need_to_rebuild_with_fdo, tree_util.tree_structure
        jaxpr, prim = params["jaxpr"], eqn.primitive

        def on_miss(*args, **kwargs):
            if any(isinstance(a, Tracer) for a in args):  # (under a transformation: bind)
                return prim.bind(*args, **params), None, False
            # (What JAX's own miss does: run it, and give the object what it keeps for the
            # next call.  Binding concrete values here would re-enter this cache entry.)
            out, compiled, profiler, const_args = run_python(*args, **params)
            data = fastpath(compiled, tree_structure(out), args, out, jaxpr.effects,
                            jaxpr.consts, profiler, const_args)
            return out, data, rebuild(profiler)
        return jit_impl._jax.pjit(
            params["name"], fun, on_miss, [], [], key, tree_util.dispatch_registry,
            pxla.cc_shard_arg, jit_impl._get_cpp_global_cache(key.contains_explicit_attributes))
    except Exception:  # (another JAX: bind serves)
        return None


@functools.cache
def _jit_impl_known():
    """Do JAX's impl rule for jit equations, and the pieces of it _jit_dispatcher calls, take
    the parameters it passes?  (Else a changed JAX would fail inside a launch.)"""
    import inspect
    try:
        from jax._src import pjit as jit_impl

        def names(fn):
            return tuple(inspect.signature(fn).parameters)
        return (names(jit_impl._pjit_call_impl) == ("args",) + _JIT_IMPL_PARAMS
                and names(jit_impl._pjit_call_impl_python) == ("args",) + _JIT_IMPL_PARAMS
                and names(jit_impl._get_fastpath_data) == _FASTPATH_PARAMS
                and names(jit_impl._need_to_rebuild_with_fdo) == ("pgle_profiler",))
    except Exception:
        return False


_FASTPATH_PARAMS = ("executable", "out_tree", "args_flat", "out_flat", "effects",
                    "consts_for_constvars", "pgle_profiler", "const_args")


def compile_count() -> int:
    """Number of executables compile_segment has created (cache misses) since start."""
    return _cache_stats["compiles"]


def clear_compile_cache():
    """Drop every cached executable and structural key (they keep constants alive)."""
    _compiled.clear()
    _donating.clear()
    _jaxpr_keys.clear()
    _params_memo.clear()
    _interned.clear()
