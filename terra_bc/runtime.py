"""Stage 3 of the pipeline: units, iterations, tracing mode and co-execution mode.

A *unit* is a function decorated with ``@terra_bc.function``; each call is an *iteration*.
Python runs every iteration's code itself.  What differs is what a DL op does:

* tracing mode (first call, and after a divergence): the op runs eagerly under the jaxpr
  builder (``graph.Recorder``) and is appended to the unit's TraceGraph as an *event*;
* co-execution mode: the op is checked against the next recorded event (the *guard*: same
  callee, same input values or avals, same static arguments) and returns *placeholders*
  without running JAX.  The recorded equations run as compiled *segments*, launched when
  Python fetches a value and at the end of the iteration; JAX dispatch is asynchronous, so
  they run while Python goes on.
* after a failed guard (*divergence*) the live placeholders get their values from the graph
  prefix, the rest of the iteration runs eagerly, and the next call traces the new path.

A DL op reaches the runtime from a rewritten call site (``_hook.c`` routes calls of JAX
functions here inside an iteration) or from a placeholder's operator or method.  The
TraceGraph here holds one path; issue 4 merges several.
"""
from __future__ import annotations

import collections
import functools
import operator
import os
import sys
import threading
import inspect
import math
import types
import weakref
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_leaves, tree_unflatten

from . import _hook, graph

counts = Counter()
STAT_KEYS = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
             "compiles", "segments_launched", "fetches", "feeds", "ops_skipped", "ops_traced",
             "ops_eager", "paths_recorded")
JAX_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax,))
TRACE, COEXEC, EAGER = "tracing", "co-execution", "eager"
_tls = threading.local()
_all_units = weakref.WeakSet()  # for explain()


def _env_int(name, default):
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"terra_bc: {name}={value!r} is not an integer") from None


# terra_bc.config(...) changes these; each has an environment variable (docs/control-flow.md).
settings = {
    "max_paths": _env_int("TERRA_BC_MAX_PATHS", 16),     # recorded paths (variants) per unit
    "max_compiles": _env_int("TERRA_BC_MAX_COMPILES", 32),  # segments compiled per unit
    "warmup": _env_int("TERRA_BC_WARMUP", 0),            # first calls of a unit run plainly
    "inner_turns": _env_int("TERRA_BC_INNER_TURNS", 16),  # see on_loop
    "dynamic_numbers": os.environ.get("TERRA_BC_DYNAMIC_NUMBERS", "1") != "0",
}
_MISS = object()
_ArrayImpl = type(jnp.zeros(()))
_LIVE_REFS = 3  # sys.getrefcount(p) of a placeholder only self.live holds, inside _alive


class Divergence(Exception):
    """A guard failed: this iteration leaves the recorded path here."""


class ValueDependent(Exception):
    """JAX read the concrete value of a recorded input while running an op (a shape, an
    index): the recorded equations would bake that value in, so the op is not recorded."""


def _fetched_inside_op(tracer, kind, value):
    it = getattr(_tls, "it", None)
    if it is not None and it.depth and it.mode == TRACE:
        raise ValueDependent(f"an op read a recorded value ({kind})")


# ------------------------------------------------------------------ events and the TraceGraph

class Event:
    """One step of an iteration as Python saw it.

    kind "op": ``key`` identifies the callee, ``tree``/``args`` the inputs (("ph", id),
    ("feed", id, aval) or ("static", value) per leaf), ``out_tree``/``outs`` the outputs.
    kind "fetch": ``key`` is the conversion, ``args`` = (id,).  ``mark`` is the number of
    recorded equations once the event happened; ``where`` the user's source line.  Paths of
    a unit share the Event objects of their common prefix (see ``Iteration._next``).
    """
    __slots__ = ("kind", "key", "tree", "args", "out_tree", "outs", "mark", "nvals", "where",
                 "flat", "single", "fast")

    def __init__(self, kind, key, tree, args, out_tree, outs, mark, nvals, where, flat=None):
        self.kind, self.key, self.tree, self.args = kind, key, tree, args
        self.out_tree, self.outs, self.mark, self.where = out_tree, outs, mark, where
        self.nvals = nvals  # values recorded once the event happened: the fork point's ids
        # For co-execution's fast path: (number of positional args, keyword names in call
        # order) when every argument is one leaf; one placeholder out.
        self.flat = flat
        self.single = (out_tree is not None and out_tree.num_leaves == 1 and
                       out_tree.num_nodes == 1 and bool(outs) and outs[0][0] == "ph")
        self.fast = _fast_spec(self)

    def __repr__(self):
        return f"Event({self.kind}, {_name(self.key)}, mark={self.mark}, at {self.where})"


_FAST_KINDS = {"ph": 0, "static": 1, "feed": 2}


def _fast_spec(ev):
    """What the C fast path (_fastop.c) checks for a plain op event, or None: (callee, number
    of positional args, per-arg (kind code, *spec) for the positional then the keyword
    arguments in call order, output id, output aval, keyword names or None)."""
    if ev.kind != "op" or ev.flat is None or not ev.single \
            or any(spec[0] not in _FAST_KINDS or spec[0] == "feed" and len(spec) != 4
                   for spec in ev.args):
        return None
    nargs, names = ev.flat
    # ev.args follows JAX's flattening of (args, kwargs): keywords in sorted name order.
    by_name = dict(zip(sorted(names), ev.args[nargs:]))
    specs = tuple((_FAST_KINDS[spec[0]],) + tuple(spec[1:])
                  for spec in ev.args[:nargs] + tuple(by_name[k] for k in names))
    return (ev.key, nargs, specs, ev.outs[0][1], ev.outs[0][2], names or None)


def _flat_call(args, kwargs, leaves):
    """(number of positional args, keyword names) if each argument is one leaf, else None."""
    if len(leaves) != len(args) + len(kwargs) or not all(map(operator.is_, leaves, args)):
        return None
    names = tuple(kwargs)
    if not all(map(operator.is_, leaves[len(args):], [kwargs[k] for k in sorted(names)])):
        return None
    return len(args), names


class TraceGraph:
    """One recorded path of a unit: its events, the recording, and segment plans.

    A unit keeps several paths (``Unit.paths``); a path made by leaving another one at event
    k shares that path's first k events (the same objects) and its recording up to there
    (``Recorder.fork``: same equations, same value ids), so an iteration can move between
    paths at any branch point without recomputing anything."""

    __slots__ = ("recorder", "events", "segments", "plans", "unsafe")

    def __init__(self, recorder=None, events=()):
        self.recorder = recorder if recorder is not None else graph.Recorder(_fetched_inside_op)
        self.events = list(events)
        self.segments = {}      # (start, stop, outputs) -> (Segment, executable)
        self.plans = {}         # (start, stop) -> (ids produced there, ids read after stop)
        self.unsafe = None      # why this unit cannot be co-executed, if it cannot

    def fork(self, pos):
        """A new path sharing this one's first ``pos`` events and their recording."""
        last = self.events[pos - 1] if pos else None
        recorder = self.recorder.fork(last.mark if last else 0, last.nvals if last else 0)
        return TraceGraph(recorder, self.events[:pos])

    def plan(self, start, stop):
        """What equations [start, stop) produce and what the rest of the path reads (a
        recorded path never changes: new paths are new TraceGraphs)."""
        plan = self.plans.get((start, stop))
        if plan is None:
            plan = self.plans[(start, stop)] = (self.recorder.wiring(start, stop)[1],
                                                self.recorder.wiring(stop)[0])
        return plan

    def segment(self, start, stop, outputs):
        key = (start, stop, outputs)
        entry = self.segments.get(key)
        if entry is None:
            seg = self.recorder.segment(outputs, start, stop)
            before = graph.compile_count()
            entry = self.segments[key] = (seg, graph.compile_segment(seg))
            counts["compiles"] += graph.compile_count() - before
        return entry


# ------------------------------------------------------------------ placeholders

class _StandIn(jax.core.Trace):
    """The trace a placeholder claims: JAX asks a tracer it does not own to ``full_lower``."""


_STAND_IN = _StandIn()


class Placeholder(jax.core.Tracer):
    """What Python holds for a DL value inside (and after) an iteration.

    While recording it wraps a tracer of the jaxpr builder; in co-execution it names a value
    of the TraceGraph that may not be computed yet; once its iteration is over it holds the
    concrete ``jax.Array`` and behaves as one (its operations then run eagerly).  It is a JAX
    ``Tracer`` so that JAX accepts it anywhere (``isinstance(x, jax.Array)``, ``jit``,
    indexing a ``jax.Array`` with it): JAX lowers a tracer it does not own with
    ``full_lower``, which gives the value (or, while recording, the recorded tracer).
    """
    __slots__ = ("_it", "_id", "_rec", "_val")
    __array_priority__ = 100  # NumPy defers `ndarray * placeholder` to us

    def __init__(self, it, id, aval, rec=None, val=None):
        self._trace, self.aval = _STAND_IN, aval  # Tracer.__init__ would record line info
        self._it, self._id, self._rec, self._val = it, id, rec, val

    def full_lower(self):
        if self._val is not None:
            return self._val
        it = self._it
        if it is not getattr(_tls, "it", None):
            return _concrete(self)
        return it.lower(self)

    def to_concrete_value(self):
        return None  # never let JAX bake a value in (DESIGN.md)

    shape = property(lambda self: self.aval.shape)
    dtype = property(lambda self: self.aval.dtype)
    ndim = property(lambda self: len(self.aval.shape))
    size = property(lambda self: int(np.prod(self.aval.shape, dtype=np.int64)))

    def __len__(self):
        if not self.aval.shape:
            raise TypeError("len() of unsized object")
        return self.aval.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    __hash__ = None

    def __jax_array__(self):
        # JAX's binary operators (array_methods._operator_*) convert the other operand
        # through __jax_array__ first: handing back something they do not accept makes them
        # return NotImplemented, so `jax_array @ placeholder` reaches our __rmatmul__ and is
        # an op of the iteration.
        if sys._getframe(1).f_code.co_name.startswith("_operator_"):
            return _DEFER
        return self.full_lower()

    def __array__(self, dtype=None, copy=None):
        return self._fetch("array", lambda v: np.asarray(v, dtype=dtype))

    def __bool__(self):
        return self._fetch("bool", lambda v: bool(v))

    def __int__(self):
        return self._fetch("int", lambda v: int(v))

    def __float__(self):
        return self._fetch("float", lambda v: float(v))

    def __complex__(self):
        return self._fetch("complex", lambda v: complex(v))

    def __index__(self):
        return self._fetch("index", lambda v: operator.index(v))

    def item(self, *args):
        return self._fetch("item", lambda v: v.item(*args))

    def tolist(self):
        return self._fetch("tolist", lambda v: v.tolist())

    def __format__(self, spec):
        return self._fetch("format", lambda v: format(v, spec))

    def __repr__(self):
        return self._fetch("repr", repr)

    def __str__(self):
        return self._fetch("str", str)

    def __reduce__(self):
        return (jnp.asarray, (np.asarray(self),))

    def block_until_ready(self):
        return self._fetch("ready", lambda v: v.block_until_ready())

    def _fetch(self, kind, convert):
        it = self._it
        if self._val is not None or it is None or it is not getattr(_tls, "it", None):
            return convert(_concrete(self))
        return it.fetch(self, kind, convert)

    def __getattr__(self, name):
        # Array methods (x.sum(), x.reshape(...), x.T, ...) become ops of the iteration.
        attr = getattr(jax.Array, name, None)
        if attr is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if isinstance(attr, property) or not callable(attr):
            return _call(_ATTRS[name], (self,), {})
        method = _METHODS[name]
        return lambda *args, **kwargs: _call(method, (self,) + args, kwargs)

    @property
    def at(self):
        return _At(self)


class _At:
    """``x.at[i].set(v)`` and friends on a placeholder."""
    __slots__ = ("x",)

    def __init__(self, x):
        self.x = x

    def __getitem__(self, index):
        return _AtIndex(self.x, index)


class _AtIndex:
    __slots__ = ("x", "index")

    def __init__(self, x, index):
        self.x, self.index = x, index

    def __getattr__(self, method):
        return lambda *args, **kwargs: _call(_AT_METHODS[method], (self.x, self.index) + args, kwargs)


class _Lazy(dict):
    """name -> a stable function applying that array attribute/method (a stable guard key)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, name):
        fn = self[name] = self.make(name)
        _STABLE.add(fn)
        return fn


_DEFER = object()
_STABLE = set()  # terra_bc's own callees that close over constants: their own guard keys
_ATTRS = _Lazy(lambda name: _named(lambda x: getattr(x, name), f"attr.{name}"))
_METHODS = _Lazy(lambda name: _named(lambda x, *a, **k: getattr(x, name)(*a, **k), f"method.{name}"))
_AT_METHODS = _Lazy(lambda name: _named(
    lambda x, index, *a, **k: getattr(x.at[index], name)(*a, **k), f"at.{name}"))


def _named(fn, name):
    fn.__qualname__ = fn.__name__ = name
    return fn


def _operator(name, fn):
    """Placeholder.__<name>__: the C fast path in co-execution (_hook.OpMethod), else an op
    of the iteration (or an eager op once the iteration is over)."""
    def general(self, *args):
        return _call(fn, (self,) + args, {})
    general.__name__ = name
    return _hook.OpMethod(fn, general)


_BINARY = ["add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
           "xor", "lshift", "rshift", "lt", "le", "gt", "ge", "eq", "ne", "divmod"]
for _op in _BINARY:
    _fn = getattr(operator, _op, None) or getattr(operator, _op + "_", None) or divmod
    setattr(Placeholder, f"__{_op}__", _operator(f"__{_op}__", _fn))
    if _op not in ("lt", "le", "gt", "ge", "eq", "ne"):
        _rfn = _named((lambda f: lambda a, b: f(b, a))(_fn), f"r{_op}")
        setattr(Placeholder, f"__r{_op}__", _operator(f"__r{_op}__", _rfn))
for _op in ["neg", "pos", "abs", "invert"]:
    setattr(Placeholder, f"__{_op}__", _operator(f"__{_op}__", getattr(operator, _op)))
OPERATORS = {getattr(Placeholder, name).fn for name in dir(Placeholder)
             if type(getattr(Placeholder, name)) is _hook.OpMethod}
_STABLE |= OPERATORS
Placeholder.__getitem__ = _operator("__getitem__", operator.getitem)
# jax.core.Tracer defines the array methods and properties itself; as a Tracer subclass a
# placeholder must override them, or x.sum() / x.T would run JAX on it without an event.
for _name in ("T", "mT", "real", "imag"):
    setattr(Placeholder, _name, property((lambda f: lambda self: _call(f, (self,), {}))(_ATTRS[_name])))
for _name in ("all", "any", "argmax", "argmin", "argpartition", "argsort", "astype", "byteswap",
              "choose", "clip", "compress", "conj", "conjugate", "copy", "cumprod", "cumsum",
              "diagonal", "dot", "flatten", "max", "mean", "min", "nonzero", "prod", "ptp",
              "ravel", "repeat", "reshape", "round", "searchsorted", "sort", "squeeze", "std",
              "sum", "swapaxes", "take", "trace", "transpose", "var", "view"):
    setattr(Placeholder, _name, (lambda f: lambda self, *a, **k: _call(f, (self,) + a, k))(_METHODS[_name]))
Placeholder.__round__ = _operator("__round__", round)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _concrete(x):
    """The concrete value behind a placeholder whose iteration has given it one."""
    if x._val is not None:
        return x._val
    if x._rec is not None:
        return x._rec.val
    raise RuntimeError("terra_bc placeholder used outside its iteration before it was computed")


def _call(fn, args, kwargs):
    it = getattr(_tls, "it", None)
    if it is None:  # outside any iteration: a plain eager op on concrete values
        counts["ops_eager"] += 1
        return _eager(fn, args, kwargs)
    return it.op(fn, args, kwargs)


def _eager(fn, args, kwargs):
    leaves, tree = tree_flatten((args, kwargs))
    a, k = tree_unflatten(tree, [_concrete(x) if type(x) is Placeholder else x for x in leaves])
    return fn(*a, **k)


# ------------------------------------------------------------------ classification

# JAX functions that are Python-level utilities, not ops: tree_map(f, ...) must run f as
# the iteration's own code (its ops are events), block_until_ready/device_get fetch.
NOT_OPS_FILES = (os.sep + "tree_util.py", os.sep + "tree.py")
NOT_OPS_NAMES = {"block_until_ready", "device_get"}


def is_dl_op(callee):
    """Does a call of ``callee`` compute on arrays with JAX (and so belong to the graph)?"""
    try:
        return _is_dl_op(callee)
    except Exception:  # an object whose attribute lookup raises: not one of JAX's
        return False


def _is_dl_op(callee):
    fn = getattr(callee, "__func__", callee)
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):  # (a class's __code__ may be a descriptor)
        return (code.co_filename.startswith(JAX_DIRS) and not code.co_filename.endswith(NOT_OPS_FILES)
                and code.co_name not in NOT_OPS_NAMES)
    module = getattr(type(callee), "__module__", "") or ""
    return module.startswith(("jax", "jaxlib")) and callable(callee)


def _callee_key(callee):
    """A guard key: identity, except for closures JAX makes afresh (grad(f) each iteration)."""
    if isinstance(callee, types.FunctionType) and callee.__closure__ and callee not in _STABLE:
        return (callee.__code__, tuple(_cell_key(c) for c in callee.__closure__))
    if isinstance(callee, types.MethodType):
        return (_callee_key(callee.__func__), _Id(callee.__self__))
    return callee  # compared with `is` first (see _same)


def _body_key(fun):
    """The key of a function whose body runs as code of the iteration (grad, vjp): its code.
    Its closure (a fresh lambda over this step's batch) needs no guard: every op of the body
    is checked as it runs."""
    return getattr(_unwrap(fun), "__code__", fun)


def _cell_key(cell):
    try:
        v = cell.cell_contents
    except ValueError:
        return None
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, tuple) and all(isinstance(e, (int, str, bool, type(None))) for e in v):
        return v
    if isinstance(v, types.FunctionType):
        return _callee_key(v)
    if type(v) is Placeholder and v._val is None:
        return ("value", v._id)  # a closure over this iteration's value: its place in the graph
    return _Id(v)


class _Id:
    """Compares by identity (and keeps the object alive while the key is)."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Id and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __repr__(self):
        return _name(self.obj)


def _name(key):
    obj = getattr(key, "obj", key)
    if isinstance(key, tuple) and key and isinstance(key[0], types.CodeType):
        return key[0].co_qualname
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)[:40]


def _grad_spec(callee):
    """(fun, argnums, has_aux, returns_value, nums, key) for jax.grad(fun) and
    value_and_grad(fun), else None; nums: argnums as a tuple, key: its events' key."""
    fn = _unwrap(callee)
    name = getattr(getattr(fn, "__code__", None), "co_name", "")
    if name in ("grad_f", "grad_f_aux"):
        fn, returns_value = _unwrap(_cells(fn).get("value_and_grad_f")), False
    elif name == "value_and_grad_f":
        returns_value = True
    else:
        return None
    cells = _cells(fn)
    if "fun" not in cells or cells.get("holomorphic") or cells.get("allow_int"):
        return None
    fun, argnums, has_aux = cells["fun"], cells["argnums"], cells["has_aux"]
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    return fun, argnums, has_aux, returns_value, nums, ("grad", _body_key(fun), nums, has_aux,
                                                        returns_value)


def _unwrap(fn):
    # jax wraps API functions in traceback_util's reraise_with_filtered_traceback(fun).
    while getattr(getattr(fn, "__code__", None), "co_name", "") == "reraise_with_filtered_traceback":
        fn = _cells(fn)["fun"]
    return fn


def _cells(fn):
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, fn.__closure__):
        try:
            out[name] = cell.cell_contents
        except ValueError:
            pass
    return out


def _traces_its_body(callee):
    """Opaque DL ops whose Python body JAX itself only traces (jit, vmap, lax control flow)."""
    if type(callee).__name__ == "PjitFunction":
        return True
    code = getattr(_unwrap(getattr(callee, "__func__", callee)), "__code__", None)
    return code is not None and ("control_flow" in code.co_filename or code.co_name == "vmap_f")


# ------------------------------------------------------------------ iterations

def _continues(g, pos, kind, key, check):
    """Path g's event at ``pos`` if it is the one Python has reached, else None."""
    if pos < len(g.events):
        ev = g.events[pos]
        if (ev.kind == kind or ev.kind == "eager" and kind == "op") and _same(ev.key, key) \
                and (check is None or check(ev)):
            return ev
    return None


class Iteration:
    # Slots: the C fast path reads mode, depth, graph, pos, env and live at fixed offsets.
    __slots__ = ("unit", "mode", "graph", "pos", "fork_stop", "left", "auto", "loop_turns",
                 "env", "seg_start", "tracers", "live", "depth", "recording", "grad_depth",
                 "memo", "was_routing", "was_enabled")

    def __init__(self, unit, mode, graph_):
        self.unit, self.mode, self.graph = unit, mode, graph_
        self.pos = 0            # next event (co-execution)
        self.fork_stop = 0      # equations co-executed before a divergence
        self.left = None        # the path a divergence left
        self.auto = False       # an iteration of a function unit found without decoration
        self.loop_turns = {}    # turns of loops inside it (auto function units)
        self.env = {}           # value id -> concrete value (feeds, launched segments' outputs)
        self.seg_start = 0      # first equation not launched yet
        self.tracers = {}       # value id -> recording tracer (tracing)
        self.live = []          # this iteration's placeholders (see _alive)
        self.depth = 0          # > 0 while inside an opaque DL op's own Python
        self.recording = None   # the Recorder entered for this iteration (tracing)
        self.grad_depth = 0     # > 0 while a differentiated function's Python runs
        self.memo = {}          # see remember

    def enter(self, args, kwargs):
        """The unit's arguments: arrays become placeholders (fed), the rest are Python's own.

        Only arrays reached through tuples are replaced (tuples are values); every other
        container is passed as the caller's own object, so what the unit appends to a list or
        stores in a dict stays there.  Arrays inside those are fed where an op uses them."""
        leaves = []
        shape = _arrays_in((args, tuple(kwargs.items())), leaves)
        if self.mode == COEXEC:
            feeds = []

            def check(ev):
                feeds.clear()
                return shape == ev.tree and all(
                    self._matches(x, spec, feeds) for x, spec in zip(leaves, ev.args))
            try:
                ev = self._next("enter", None, check)
            except Divergence:
                self.diverge()
            else:
                self.pos += 1
                self._bind(feeds)
                return _with_arrays(args, kwargs, [self._new(spec[1], spec[2]) for spec in ev.args])
        if self.mode == EAGER or not leaves:
            if self.mode != EAGER:
                self._record("enter", None, shape, (), None, ())
            return args, kwargs
        specs, values = [], []
        for x in leaves:
            t = self._feed(x)
            specs.append(("feed", t.id, t.aval))
            values.append(self._wrap(t))
        self._record("enter", None, shape, specs, None, ())
        return _with_arrays(args, kwargs, values)

    def remember(self, key, make):
        """``make()``, made once for ``key`` while every iteration of the unit asks for it:
        kept to the next iteration, dropped after one that did not ask (so what ``key``
        holds, a function made afresh each step, is not kept alive)."""
        try:
            return self.memo[key]
        except KeyError:
            value = self.memo[key] = self.unit.memo.get(key, _MISS)
            if value is _MISS:
                value = self.memo[key] = make()
            return value

    # -- values
    def _new(self, id, aval, rec=None):
        if rec is None:
            return _hook.placeholder(self, id, aval)  # (in C: it is made for most ops)
        ph = Placeholder(self, id, aval, rec)
        self.live.append(ph)
        return ph

    def _wrap(self, t):
        self.tracers[t.id] = t
        return self._new(t.id, t.aval, t)

    def _feed(self, x):
        """Tracing: a value entering the graph from Python becomes a graph input."""
        counts["feeds"] += 1
        if type(x) is Placeholder:
            x = _concrete(x)
        elif isinstance(x, graph.RecTracer):  # made outside any event: fed like a concrete array
            x = x.val
        t = self.graph.recorder.input(x)
        self.tracers[t.id] = t
        return t

    def _bind(self, feeds):
        """Co-execution: values Python hands to the graph this iteration."""
        for id, x in feeds:
            self.env[id] = _concrete(x) if type(x) is Placeholder else x
        counts["feeds"] += len(feeds)

    def _spec(self, x, numbers):
        """Tracing: (spec, value to call with) for one input leaf; ``numbers``: feed a Python
        number (an operator's operand, or a leaf that changed between iterations)."""
        if self._own(x):
            return ("ph", x._id), x._rec
        if self.graph.recorder.owns(x) and self.graph.unsafe:
            # computed by JAX code we did not see op by op from a placeholder it lowered (a
            # library): keep it connected for this iteration's gradient; the unit will not
            # be co-executed.  Otherwise it came from concrete arrays (an operator of two
            # jax.Arrays), as co-execution computes it too: eagerly, then fed.
            self.tracers[x.id] = x
            return ("ph", x.id), x
        if _is_array(x) or numbers and _is_number(x):
            t = self._feed(x)
            return ("feed", t.id, t.aval, type(x)), t
        return ("static", x), x

    # -- ops
    def op(self, fn, args, kwargs, key=None):
        if self.depth:  # inside an opaque op: JAX is tracing; just run it
            self.unit.nested_calls += 1
            return fn(*args, **kwargs)
        if self.mode == EAGER:  # past a branch point with too many variants: plain JAX
            counts["ops_eager"] += 1
            self.depth += 1
            try:
                return _eager(fn, args, kwargs)
            finally:
                self.depth -= 1
        if self.mode == COEXEC:  # a plain op event: checked and skipped in C (_fastop.c)
            out = _hook.fast_op(self, fn, args, kwargs)
            if out is not _MISS:
                return out
        if not any(map(_is_array, tree_leaves((args, kwargs)))):
            # No array in: a constructor (jnp.zeros, PRNGKey) or a transform being made
            # (jax.grad(f)); run it.  An array it makes enters later ops as a feed.
            return fn(*args, **kwargs)
        key = _callee_key(fn) if key is None else key
        if self.mode == TRACE:
            return self._trace_op(fn, key, args, kwargs)
        try:
            return self._coexec_op(fn, key, args, kwargs)
        except Divergence:
            self.diverge()
            return self.op(fn, args, kwargs, key)

    def _trace_op(self, fn, key, args, kwargs):
        leaves, tree = tree_flatten((args, kwargs))
        where = _user_line()
        operands = fn in OPERATORS
        # After leaving a path, the ops that follow usually match it event for event: numbers
        # that differ from it there are fed in this trace already (one retrace, not one each).
        self._note_changed_numbers(self.left, key, tree, leaves)
        dynamic = {i for i in range(len(leaves)) if (where, _name(key), i) in self.unit.dynamic}
        self.depth += 1
        nested_before = self.unit.nested_calls
        try:
            try:
                specs, out = self._run_recorded(fn, tree, leaves, lambda i: operands or i in dynamic)
            except Exception:
                if not dynamic:
                    raise
                # JAX needs that number static (a shape, an axis): keep it so from now on.
                keys = {(where, _name(key), i) for i in dynamic}
                self.unit.dynamic -= keys
                self.unit.static |= keys
                specs, out = self._run_recorded(fn, tree, leaves, lambda i: operands)
        except Exception as e:
            # JAX refused to record it (a data-dependent shape: x[mask], nonzero) or our
            # unwrapping failed: run the op as plain JAX would (the user's error propagates).
            if self.grad_depth:  # a gradient cannot flow through an eager op
                self.graph.unsafe = f"{_name(key)} failed under recording ({type(e).__name__})"
                return self._settled_eager(fn, args, kwargs)
            out = self._settled_eager(fn, args, kwargs)
            # A graph break: its inputs are computed, it runs eagerly every iteration, and its
            # results enter later ops as feeds (guarded by their shapes).
            self._record("eager", key, tree, [self._break_spec(x) for x in leaves], None, (),
                         None, where)
            return out
        finally:
            self.depth -= 1
        if self.unit.nested_calls != nested_before and not _traces_its_body(fn):
            self.graph.unsafe = f"{_name(key)} runs Python code JAX differentiates or calls eagerly"
        out_leaves, out_tree = tree_flatten(out)
        outs, wrapped = [], []
        for o in out_leaves:
            if isinstance(o, graph.RecTracer):
                ph = self._wrap(o)
                outs.append(("ph", o.id, o.aval))
                wrapped.append(ph)
            elif _is_array(o):  # computed outside the recording: replaying it would freeze it
                self.graph.unsafe = self.graph.unsafe or f"{_name(key)} returned an unrecorded array"
                outs.append(("static", o))
                wrapped.append(o)
            else:
                outs.append(("static", o))
                wrapped.append(o)
        self._record("op", key, tree, specs, out_tree, outs, _flat_call(args, kwargs, leaves),
                     where)
        counts["ops_traced"] += 1
        return tree_unflatten(out_tree, wrapped)

    def _break_spec(self, x):
        if self._own(x):
            return ("ph", x._id)
        if _is_array(x) or _is_number(x):
            return ("value", _aval(x))
        return ("static", x)

    def _run_recorded(self, fn, tree, leaves, fed_number):
        specs, values = zip(*(self._spec(x, fed_number(i)) for i, x in enumerate(leaves))) \
            if leaves else ((), ())
        a, k = tree_unflatten(tree, list(values))
        return specs, fn(*a, **k)

    def _settled_eager(self, fn, args, kwargs):
        """Run ``fn`` on concrete values, outside the recording (the unit will run eagerly)."""
        counts["ops_eager"] += 1
        rec = self.recording
        with jax.extend.core.set_current_trace(rec.parent_trace()) if rec is not None else _nothing():
            return _eager(fn, args, kwargs)

    def _record(self, kind, key, tree, args, out_tree, outs, flat=None, where=None):
        rec = self.graph.recorder
        self.graph.events.append(Event(kind, key, tree, tuple(args), out_tree, tuple(outs),
                                       rec.mark(), rec.num_values, where or _user_line(), flat))

    def _next(self, kind, key, check=None):
        """Co-execution: the event Python has reached.  It is the next event of this path if
        that matches, else the next event of another recorded path with the same events so
        far (a case seen before: the iteration moves to that path, nothing is recomputed).
        Divergence if no recorded path goes on this way."""
        pos, cur = self.pos, self.graph
        ev = _continues(cur, pos, kind, key, check)  # the common case: this path goes on
        if ev is not None:
            return ev
        for g in self._paths_here():
            ev = _continues(g, pos, kind, key, check) if g is not cur else None
            if ev is not None:
                self.graph = g
                return ev
        raise Divergence

    def _paths_here(self):
        """This path, then the unit's other paths sharing its first ``pos`` events."""
        cur, pos = self.graph, self.pos
        yield cur
        last = cur.events[pos - 1] if pos else None
        for g in self.unit.paths:
            if g is not cur and (pos == 0 or len(g.events) >= pos and g.events[pos - 1] is last):
                yield g

    def _coexec_op(self, fn, key, args, kwargs):
        leaves, tree = tree_flatten((args, kwargs))
        feeds = []

        def check(ev):
            feeds.clear()
            return tree == ev.tree and len(leaves) == len(ev.args) and all(
                self._matches(x, spec, feeds) for x, spec in zip(leaves, ev.args))
        try:
            ev = self._next("op", key, check)
        except Divergence:
            self._note_changed_numbers(self.graph, key, tree, leaves)
            raise
        self.pos += 1
        if ev.kind == "eager":
            return self._graph_break(ev, fn, tree, leaves)
        self._bind(feeds)
        counts["ops_skipped"] += 1
        outs = [self._new(s[1], s[2]) if s[0] == "ph" else s[1] for s in ev.outs]
        return tree_unflatten(ev.out_tree, outs)

    def _graph_break(self, ev, fn, tree, leaves):
        """An op JAX would not record runs eagerly on its inputs' values."""
        self.launch(ev.mark, [spec[1] for spec in ev.args if spec[0] == "ph"])
        values = [self.env[x._id] if spec[0] == "ph" else _concrete(x) if type(x) is Placeholder
                  else x for x, spec in zip(leaves, ev.args)]
        a, k = tree_unflatten(tree, values)
        counts["ops_eager"] += 1
        self.depth += 1
        try:
            return fn(*a, **k)
        finally:
            self.depth -= 1

    def _note_changed_numbers(self, g, key, tree, leaves):
        """Automatic dynamism: Python numbers baked into path g's op at this position that
        now differ (a step counter, a schedule's value, a token id) are fed from now on."""
        pos = self.pos if self.mode == COEXEC else len(self.graph.events)
        if g is None or pos >= len(g.events):
            return
        ev = g.events[pos]
        if ev.kind != "op" or not _same(ev.key, key) or ev.tree != tree or len(leaves) != len(ev.args):
            return
        for i, (x, spec) in enumerate(zip(leaves, ev.args)):
            if spec[0] == "static" and type(x) in (int, float) and type(x) is type(spec[1]) \
                    and x != spec[1] and settings["dynamic_numbers"] \
                    and (ev.where, _name(key), i) not in self.unit.static:
                self.unit.dynamic.add((ev.where, _name(key), i))

    def _matches(self, x, spec, feeds):
        kind = spec[0]
        if kind == "ph":
            return self._own(x) and x._id == spec[1]
        if kind == "feed" or kind == "value":  # "value": a graph break's input, not bound
            aval = spec[2] if kind == "feed" else spec[1]
            if not (_is_array(x) or _is_number(x)) or self._own(x) or _aval(x) != aval:
                return False
            if kind == "feed":
                feeds.append((spec[1], x))
            return True
        return _same(x, spec[1])

    def _own(self, x):
        return type(x) is Placeholder and x._it is self and x._val is None

    def _differentiated_inputs(self, kind, key, leaves):
        """The begin event of grad/vjp: placeholders for the differentiated inputs.  Tracing
        records it; co-execution checks it (each input the same placeholder, or an array of
        the recorded aval, fed) or raises Divergence."""
        if self.mode == TRACE:
            phs = [x if self._own(x) else self._wrap(self._feed(x)) for x in leaves]
            self._record(kind, key, tuple(p.aval for p in phs), [p._id for p in phs], None, ())
            return phs

        def check(ev):
            if len(leaves) != len(ev.args):
                return False
            for x, id, aval in zip(leaves, ev.args, ev.tree):
                if type(x) is Placeholder and x._it is self and x._val is None:
                    if x._id != id:
                        return False
                elif not (_is_array(x) and _aval(x) == aval):
                    return False
            return True
        ev = self._next(kind, key, check)
        self.pos += 1
        phs, feeds = [], []
        for x, id, aval in zip(leaves, ev.args, ev.tree):
            if not self._own(x):  # a feed: bind its value, hand the function a placeholder
                feeds.append((id, x))
                x = self._new(id, aval)
            phs.append(x)
        self._bind(feeds)
        return phs

    def _end_event(self, kind, key, check=None):
        """Co-execution: the end event of grad/vjp, or a divergence that traces (never an
        eager tail: the gradient needs the recording).  Returns the event or None."""
        self.grad_depth += 1
        try:
            ev = self._next(kind, key, check)
            self.pos += 1
            return ev
        except Divergence:
            self.diverge()
            return None
        finally:
            self.grad_depth -= 1

    # -- jax.grad / value_and_grad over user code
    def grad(self, callee, spec, args, kwargs):
        """Run ``fun``'s Python as ordinary code of this iteration, then differentiate the
        equations it recorded: its prints, NumPy draws and branches happen every iteration."""
        if self.mode == EAGER:
            return self.op(callee, args, kwargs)
        fun, argnums, has_aux, returns_value, nums, key = spec
        args = list(args)
        trees = [tree_flatten(args[i]) for i in nums]
        try:
            phs = iter(self._differentiated_inputs("grad-begin", key,
                                                   [x for ls, _ in trees for x in ls]))
        except Divergence:
            self.diverge()
            return self.grad(callee, spec, args, kwargs)
        begin = self.pos - 1 if self.mode == COEXEC else len(self.graph.events) - 1
        diff = []
        for i, (ls, tree) in zip(nums, trees):
            diff.append((tree, [next(phs) for _ in ls]))
            args[i] = tree_unflatten(tree, diff[-1][1])
        out = self._run_differentiated(fun, args, kwargs)  # its ops are events as usual
        end = self._end_event("grad-end", key) if self.mode == COEXEC else None
        if end is None:  # traced (or fun left the recorded path): differentiate the recording
            return self._trace_vjp(key, self.graph.events[begin].mark, diff, out,
                                   isinstance(argnums, int), has_aux, returns_value)
        counts["ops_skipped"] += 1
        outs = [self._new(s[1], s[2]) if s[0] == "ph" else s[1] for s in end.outs]
        value, grads = tree_unflatten(end.out_tree, outs)
        return _grad_result(value, grads, out[1] if has_aux else None, has_aux, returns_value)

    # -- jax.vjp / jax.jvp over user code
    def _forward_of(self, kind, fun, primals, has_aux):
        """``fun``'s Python runs as code of this iteration between "<kind>-begin" and
        "<kind>-end" events.  Returns (out, aux, plan, key of the op that differentiates the
        recorded forward); raises Divergence only at the begin event."""
        key = (kind, _body_key(fun), has_aux)
        trees = [tree_flatten(p) for p in primals]
        phs = self._differentiated_inputs(kind + "-begin", key, [x for ls, _ in trees for x in ls])
        begin = self.pos - 1 if self.mode == COEXEC else len(self.graph.events) - 1
        it = iter(phs)
        result = self._run_differentiated(
            fun, [tree_unflatten(tree, [next(it) for _ in ls]) for ls, tree in trees], {})
        out, aux = result if has_aux else (result, None)
        out_leaves, out_tree = tree_flatten(out)
        if not all(self._own(o) for o in out_leaves):
            raise TypeError(f"terra_bc: jax.{kind} of a function that returns non-array values")
        ids = [o._id for o in out_leaves]
        end = self._end_event(kind + "-end", key, lambda ev: list(ev.args) == ids) \
            if self.mode == COEXEC else None
        if end is None:
            self._record(kind + "-end", key, None, ids, None, ())
            end = self.graph.events[-1]
        plan = (self.graph.events[begin].mark, end.mark, [p._id for p in phs], ids, trees, out_tree)
        return out, aux, plan, (kind + "-apply", begin, key)

    def vjp(self, fun, primals, has_aux=False):
        """``jax.vjp(fun, *primals)``: the function returned computes the cotangents of the
        recorded forward as one op of the iteration (an event like any other)."""
        if self.mode == EAGER:
            return self.op(jax.vjp, (fun,) + tuple(primals), {"has_aux": has_aux})
        try:
            out, aux, plan, key = self._forward_of("vjp", fun, primals, has_aux)
        except Divergence:
            self.diverge()
            return self.vjp(fun, primals, has_aux)
        vjp_fn = functools.partial(_apply_vjp, self, key, plan)
        return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)

    def jvp(self, fun, primals, tangents, has_aux=False):
        """``jax.jvp(fun, primals, tangents)``: the tangents of the recorded forward are one
        op of the iteration."""
        if self.mode == EAGER:
            return self.op(jax.jvp, (fun, primals, tangents), {"has_aux": has_aux})
        tangent_leaves, tangent_tree = tree_flatten(tuple(tangents))
        if tangent_tree != tree_flatten(tuple(primals))[1]:
            raise TypeError(f"terra_bc: jax.jvp tangents {tangent_tree} do not match the "
                            f"primals {tree_flatten(tuple(primals))[1]}")
        try:
            out, aux, plan, key = self._forward_of("jvp", fun, primals, has_aux)
        except Divergence:
            self.diverge()
            return self.jvp(fun, primals, tangents, has_aux)
        forward_tangents = _named(functools.partial(self._tangents, plan), "jvp_tangents")
        outs = self.op(forward_tangents, tuple(tangent_leaves), {}, key)
        tangents_out = tree_unflatten(plan[5], list(outs))
        return (out, tangents_out, aux) if has_aux else (out, tangents_out)

    def _recorded_forward(self, plan):
        """The recorded forward [start, end) of a vjp/jvp as a function of the differentiated
        inputs, and those inputs (tracers while tracing, values in an eager tail)."""
        start, end, diff_ids, out_ids, trees, out_tree = plan
        seg = self.graph.recorder.segment(out_ids, start, end)
        fn = jax.extend.core.jaxpr_as_fun(seg.jaxpr)
        # Past a frozen unit's divergence (eager mode) it runs on computed values.
        value = self._tracer if self.mode == TRACE else lambda i: self._value(i, end)
        base = [value(i) for i in seg.inputs]
        where = {id: k for k, id in enumerate(seg.inputs)}

        def forward(*xs):
            vals = list(base)
            for id, x in zip(diff_ids, xs):
                if id in where:
                    vals[where[id]] = x
            return list(fn(*vals))
        return forward, [value(i) for i in diff_ids]

    def _tangents(self, plan, *tangents):
        forward, primals = self._recorded_forward(plan)
        _, out = jax.jvp(forward, primals, list(tangents))
        return list(out)

    def _backward(self, plan, *cts):
        """While tracing: jax.vjp of the recorded forward [start, end), applied to cts."""
        trees = plan[4]
        forward, primals = self._recorded_forward(plan)
        _, pullback = jax.vjp(forward, *primals)
        flat = pullback(list(tree_leaves(cts)))
        grads, k = [], 0
        for ls, tree in trees:
            grads.append(tree_unflatten(tree, list(flat[k:k + len(ls)])))
            k += len(ls)
        return tuple(grads)

    def _run_differentiated(self, fun, args, kwargs):
        self.grad_depth += 1
        try:
            return fun(*args, **kwargs)
        finally:
            self.grad_depth -= 1

    def _trace_vjp(self, key, start, diff, out, single, has_aux, returns_value):
        value, aux = out if has_aux else (out, None)
        if type(value) is not Placeholder or value._it is not self or value._rec is None:
            raise TypeError("terra_bc: the differentiated function must return a scalar array")
        rec = self.graph.recorder
        seg = rec.segment([value._id], start, rec.mark())
        fn = jax.extend.core.jaxpr_as_fun(seg.jaxpr)
        base = [self._tracer(i) for i in seg.inputs]
        where = {id: k for k, id in enumerate(seg.inputs)}
        diff_ids = [p._id for _, phs in diff for p in phs]

        def loss_of(*xs):
            vals = list(base)
            for id, x in zip(diff_ids, xs):
                if id in where:
                    vals[where[id]] = x
            return fn(*vals)[0]

        primals = [self._tracer(i) for i in diff_ids]
        self.depth += 1
        try:
            value_t, vjp = jax.vjp(loss_of, *primals)
            flat = vjp(jnp.ones_like(value_t))
        finally:
            self.depth -= 1
        grads, k = [], 0
        for tree, phs in diff:
            grads.append(tree_unflatten(tree, [self._wrap(g) for g in flat[k:k + len(phs)]]))
            k += len(phs)
        grads = grads[0] if single else tuple(grads)
        value = self._wrap(value_t)
        out_leaves, out_tree = tree_flatten((value, grads))
        self._record("grad-end", key, None, (), out_tree,
                     [("ph", p._id, p.aval) for p in out_leaves])
        counts["ops_traced"] += 1
        return _grad_result(value, grads, aux, has_aux, returns_value)

    def lower(self, ph):
        """JAX code we do not see op by op (a library, ``jax_array[placeholder]``) wants this
        value.  While tracing it computes on the recorded tracer, so the result is right and
        a gradient flows through it; but co-execution could not reproduce that op, so the
        unit will run eagerly from then on.  In co-execution (a path not seen while tracing)
        it gets the value: right, except for a gradient through it, which we refuse."""
        if self.mode == TRACE:
            self.graph.unsafe = self.graph.unsafe or (
                "JAX code outside the recorded ops (a library, jax_array[placeholder]) used a value")
            return ph._rec
        if self.grad_depth:
            raise RuntimeError(
                "terra_bc: JAX code it does not record (a library function or jax_array[x]) "
                "received a value inside a differentiated function on a path not seen while "
                "tracing; its gradient cannot be computed. Run this function without terra_bc.")
        self.launch(self.graph.events[self.pos - 1].mark if self.pos else 0, [ph._id])
        return self.env[ph._id]

    # -- fetches
    def fetch(self, ph, kind, convert):
        counts["fetches"] += 1
        if self.mode == TRACE:
            self._record("fetch", kind, None, (ph._id,), None, ())
            return convert(ph._rec.val)
        if self.mode == COEXEC:
            try:
                ev = self._next("fetch", kind)
                if ev.args[0] != ph._id:
                    raise Divergence
            except Divergence:
                self.diverge()
                counts["fetches"] -= 1  # counted again by the retry, in tracing mode
                return self.fetch(ph, kind, convert)
            self.pos += 1
            self.launch(ev.mark, [ph._id])
            return convert(self.env[ph._id])
        return convert(_concrete(ph))

    # -- segments
    def launch(self, stop, need, alive=None):
        """Run the recorded equations [seg_start, stop) that later work needs, and make sure
        the values ``need`` names are computed.  ``alive``: self._alive(), if known."""
        if stop > self.seg_start:
            produced, reads_after = self.graph.plan(self.seg_start, stop)
            alive = {p._id for p in (self._alive() if alive is None else alive)}
            outputs = tuple(sorted(produced & (reads_after | alive | set(need) | self.unit.escaping)))
            if outputs:
                self._run(self.seg_start, stop, outputs)
            self.seg_start = stop
        missing = [i for i in need if i not in self.env]
        if missing:
            self._run(0, self.seg_start, tuple(sorted(missing)))

    def _run(self, start, stop, outputs):
        before = counts["compiles"]
        seg, exe = self.graph.segment(start, stop, outputs)
        unit = self.unit
        unit.compiles += counts["compiles"] - before
        if unit.compiles > settings["max_compiles"] and not unit.unsafe:
            # Variants keep needing new executables (lengths, shapes): compiling costs more
            # than it saves; the unit runs eagerly from its next call.
            unit.unsafe = f"compiled {unit.compiles} segments (max_compiles)"
        env = self.env
        missing = () if all(map(env.__contains__, seg.inputs)) else \
            tuple(sorted(i for i in seg.inputs if i not in env))
        if missing:
            # Computed before `start` but not kept: the path this iteration has moved to reads
            # a value the one it started on did not.  Recompute it from the feeds.
            if start == 0:
                raise RuntimeError(f"terra_bc: no value for graph inputs {missing}")
            self._run(0, start, missing)
        if self.recording is None:  # (while recording, JAX would record making the array)
            x64 = jax.config.jax_enable_x64
            values = exe(*[_device_number(v, x64) if type(v) in _NUMBER_TYPES else v
                           for v in map(env.__getitem__, seg.inputs)])
        else:
            values = exe(*map(env.__getitem__, seg.inputs))
        env.update(zip(seg.outputs, values))
        counts["segments_launched"] += 1

    def _alive(self):
        # self.live holds each placeholder once; any other reference means Python kept it.
        return [p for p in self.live if sys.getrefcount(p) > _LIVE_REFS]

    def _value(self, id, stop):
        """The computed value of ``id``, produced by the recorded equations before ``stop``."""
        if id not in self.env:
            self._run(0, stop, (id,))
        return self.env[id]

    def _tracer(self, id):
        """The recording tracer of value ``id``.  After a divergence a value of the
        co-executed prefix gets one from its computed value (``Recorder.adopt``)."""
        t = self.tracers.get(id)
        if t is None:
            t = self.tracers[id] = self.graph.recorder.adopt(id, self._value(id, self.fork_stop))
        return t

    def diverge(self):
        """No recorded path goes on the way Python goes: leave them here.

        The live placeholders get their values from the pending prefix, then the rest of the
        iteration is traced as a new path that shares the prefix's events and recording with
        the path it left (``Recorder.fork``): the unit has one more path.  A unit that has
        made too many paths (``Unit.frozen``) runs the rest of the iteration eagerly instead."""
        counts["divergences"] += 1
        old, pos = self.graph, self.pos
        last = old.events[pos - 1] if pos else None
        stop = last.mark if last else 0
        alive = [p for p in self._alive() if p._val is None]
        self.launch(stop, [p._id for p in alive])
        if pos == 0:  # nothing co-executed: an iteration traced (or run eagerly) from its start
            counts["iterations_coexecuted"] -= 1
        if self.unit.frozen and not self.grad_depth:  # (a gradient needs the recording)
            self.mode = EAGER
            counts["eager_fallbacks"] += 1
            self._settle()
            return
        counts["iterations_traced"] += pos == 0
        new = old.fork(pos)
        for p in alive:
            p._rec = self.tracers[p._id] = new.recorder.adopt(p._id, self.env[p._id])
        self.graph, self.mode, self.fork_stop, self.left = new, TRACE, stop, old
        self.recording = new.recorder
        self.recording.__enter__()

    def _path_ending_here(self):
        """Co-execution ended before this path did: the recorded path that ends here, or a
        new one (the prefix alone, no trace needed)."""
        for g in self._paths_here():
            if len(g.events) == self.pos:
                return g
        counts["divergences"] += 1
        new = self.graph.fork(self.pos)
        self.unit.add_path(new)
        return new

    def _settle(self, alive=None):
        """Every live placeholder takes its concrete value and leaves the iteration."""
        for p in self._alive() if alive is None else alive:
            if p._val is None:
                p._val = p._rec.val if p._rec is not None else self.env[p._id]
            p._rec = None

    def finish(self, ok):
        """End of the iteration: launch what is left, settle placeholders, keep the path."""
        if self.recording is not None:
            self.recording.__exit__(None, None, None)
            self.recording = None
        unit = self.unit
        if self.mode == COEXEC:
            if self.pos != len(self.graph.events):
                self.graph = self._path_ending_here()
            alive = self._alive()
            self.launch(self.graph.recorder.mark(), [p._id for p in alive if p._val is None], alive)
            unit.graph = self.graph
            self._settle(alive)
            return
        if self.mode == TRACE:
            unit.escaping |= {p._id for p in self._alive() if p._val is None}
            g = self.graph
            if g.unsafe:
                unit.unsafe = g.unsafe
            elif ok:
                unit.add_path(g)
                unit.graph = g
        self._settle()


# ------------------------------------------------------------------ units

class Unit:
    """A function whose calls are iterations sharing one TraceGraph."""

    def __init__(self, fn, name=None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", "unit")
        _all_units.add(self)
        self.paths = []         # recorded paths (TraceGraphs sharing prefixes)
        self.graph = None       # the path the last iteration took: the next one starts on it
        self.frozen = None      # why no more paths are made (past a branch point: eager)
        self.dynamic = set()    # (line, op, leaf index): numbers fed, not baked (they changed)
        self.static = set()     # ... and those JAX needs static (feeding them failed)
        self.escaping = set()   # value ids that outlived a traced iteration
        self.unsafe = None      # set when the unit cannot be co-executed: it runs eagerly
        self.nested_calls = 0   # routed calls made while an opaque op ran (see _trace_op)
        self.recent = collections.deque(maxlen=RETRACE_WINDOW)  # did each recent call trace?
        self.calls = 0          # calls so far, for settings["warmup"]
        self.compiles = 0       # segments compiled for it (settings["max_compiles"])
        self.memo = {}          # what the last iteration remembered (Iteration.remember)

    def warming_up(self, plain_calls=0):
        """Count a call; is it one of the first ``warmup`` (+ plain_calls) run plainly?"""
        self.calls += 1
        return self.calls <= settings["warmup"] + plain_calls

    def __call__(self, *args, **kwargs):
        if getattr(_tls, "it", None) is not None or self.unsafe or self.warming_up():
            if self.unsafe and getattr(_tls, "it", None) is None:
                counts["eager_fallbacks"] += 1
            return self.fn(*args, **kwargs)  # inside another unit: part of its iteration
        it, (args, kwargs) = self.begin(args, kwargs)
        ok = False
        try:
            result = self.fn(*args, **kwargs)
            ok = True
        finally:
            self.end(it, ok)
        return _eager_value(result)

    def add_path(self, g):
        if self.frozen or len(self.paths) >= settings["max_paths"]:
            self.frozen = self.frozen or f"made {len(self.paths)} paths (max_paths)"
            return
        self.paths.append(g)
        counts["paths_recorded"] += 1

    def begin(self, args, kwargs):
        """Open an iteration in this thread; returns it and the arguments to run it with."""
        graph_ = self.graph
        mode = COEXEC if graph_ is not None else TRACE
        it = Iteration(self, mode, graph_ if graph_ is not None else TraceGraph())
        counts["iterations_coexecuted" if mode == COEXEC else "iterations_traced"] += 1
        _tls.it = it
        _hook.set_iteration(it)
        it.was_routing = _hook.set_thread_routing(True)
        it.was_enabled = _hook.thread_enabled()
        _hook.enable_thread()  # helpers the unit calls get rewritten call sites too
        try:
            if mode == TRACE:
                it.graph.recorder.__enter__()
                it.recording = it.graph.recorder
            return it, it.enter(args, kwargs)
        except BaseException:  # (a feed JAX refuses): leave this thread as it was found
            if it.recording is not None:
                it.recording.__exit__(None, None, None)
            _leave(it)
            raise

    def end(self, it, ok):
        _leave(it)
        self.memo = it.memo
        it.finish(ok)
        # Tracing costs more than eager: a unit that keeps making new paths makes no more;
        # where Python leaves its recorded paths, the rest of the iteration runs eagerly.
        self.recent.append(it.mode == TRACE)
        if len(self.recent) == RETRACE_WINDOW and all(self.recent):
            self.frozen = self.frozen or (f"traced new paths in {sum(self.recent)} of its last "
                                          f"{RETRACE_WINDOW} calls (its path or shapes change)")
        _hook.set_route_always(True)  # placeholders may have escaped: unwrap them at sites


def _leave(it):
    """The thread's state from before Unit.begin opened ``it``."""
    _hook.set_thread_routing(it.was_routing)
    if not it.was_enabled:
        _hook.disable_thread()
    _tls.it = None
    _hook.set_iteration(None)


# ------------------------------------------------------------------ loop units

RETRACE_WINDOW = 8    # a unit that traced a new path in each of its last 8 calls is frozen
_loop_units = {}      # LoopMark -> Unit


def on_loop(mark, token, exiting):
    """A watched ``for`` loop begins a turn (exiting=0) or is left (1; 2: by an exception).
    Returns whether an iteration is open for this loop afterwards (see ``_hook.c``)."""
    cur = getattr(_tls, "loop", None)
    if exiting:
        if cur is not None and cur[1] == token:
            _end_turn(ok=exiting == 1)
        return False
    outer = getattr(_tls, "it", None)
    if cur is None and outer is not None:
        # Inside a function's iteration the loop is part of it, unless the function was found
        # automatically and the loop turns often: then the loop is the repeating level.
        if not getattr(outer, "auto", False) or outer.depth or outer.grad_depth:
            return False
        outer.loop_turns[token] = outer.loop_turns.get(token, 0) + 1
        if outer.loop_turns[token] <= settings["inner_turns"]:
            return False
        unit = outer.unit
        unit.unsafe = "a loop inside it turns more often: the loop is the unit"
        unit.end(outer, ok=True)
        _hook.set_unit_mark(unit.code, None)
    if getattr(_tls, "opaque", 0) or not _plain_trace(cur):
        return False  # JAX is tracing user code (grad, jit, vmap): its loops are its own
    if cur is not None:
        if cur[1] == token:
            _end_turn(ok=True)
        else:  # nested in another loop's turn: part of it, unless it turns often
            cur[3][token] = cur[3].get(token, 0) + 1
            if cur[3][token] <= settings["inner_turns"]:
                return False
            cur[0].state = -1  # the outer loop is not the repeating level
            _end_turn(ok=True)
    unit = _loop_units.get(mark)
    if unit is None:
        unit = _loop_units[mark] = Unit(None, f"loop at {_user_line()}")
        mark.state = 1
    if unit.unsafe:
        mark.state = -1
        counts["eager_fallbacks"] += 1
        return False
    if unit.warming_up():
        return False
    it, _ = unit.begin((), {})
    _tls.loop = (mark, token, it, {})
    return True


def _plain_trace(cur):
    """Is the current JAX trace the eager one (or, inside a turn, its recorder)?"""
    with jax.extend.core.take_current_trace() as trace:
        pass
    if cur is not None and cur[2].recording is not None:
        return cur[2].recording.owns_trace(trace)
    return type(trace).__name__ == "EvalTrace"


def _end_turn(ok):
    mark, token, it, _ = _tls.loop
    _tls.loop = None
    it.unit.end(it, ok)


def _arrays_in(x, found):
    """Append the arrays of x reached through plain tuples to found; returns x's shape in
    those terms (nested tuples, "A" for an array, None for anything else)."""
    if type(x) is not tuple:
        if _is_array(x):
            found.append(x)
            return "A"
        return None
    shape = []
    for v in x:  # (leaves inline: this runs at every iteration's start)
        if type(v) is tuple:
            shape.append(_arrays_in(v, found))
        elif _is_array(v):
            found.append(v)
            shape.append("A")
        else:
            shape.append(None)
    return tuple(shape)


def _with_arrays(args, kwargs, values):
    """(args, kwargs) with the arrays _arrays_in found replaced, in order, by values."""
    values = iter(values)

    def put(x):
        if _is_array(x):
            return next(values)
        return tuple(map(put, x)) if type(x) is tuple else x
    return put(args), dict(put(tuple(kwargs.items()))) if kwargs else {}


def _apply_vjp(it, key, plan, ct):
    """The function jax.vjp returned, inside a unit: one op of the iteration."""
    if getattr(_tls, "it", None) is not it:
        raise RuntimeError("terra_bc: a function returned by jax.vjp inside a co-executed "
                           "iteration was called after that iteration ended; call it in the "
                           "same call (or loop turn), or run this code without terra_bc")
    start, end, diff_ids, out_ids, trees, out_tree = plan
    if tree_flatten(ct)[1] != out_tree:
        raise TypeError(f"terra_bc: jax.vjp cotangent structure {tree_flatten(ct)[1]} differs "
                        f"from the primal output structure {out_tree}")
    backward = _named(functools.partial(it._backward, plan), "vjp_backward")
    return it.op(backward, tuple(tree_leaves(ct)), {}, key)


def _grad_result(value, grads, aux, has_aux, returns_value):
    """What jax.grad / jax.value_and_grad return, with or without has_aux."""
    if returns_value:
        return ((value, aux), grads) if has_aux else (value, grads)
    return (grads, aux) if has_aux else grads


def _eager_value(tree):
    """What a unit returns, with concrete arrays for its placeholders.  Lists and dicts are
    the ones the function built, filled in place (a caller may hold them); tuples are rebuilt
    when an element changed; other containers (namedtuples, registered pytrees) by JAX."""
    t = type(tree)
    if t is Placeholder:
        return _concrete(tree)
    if t is list or t is tuple:
        values = [_concrete(x) if type(x) is Placeholder else x if type(x) in _LEAVES
                  else _eager_value(x) for x in tree]
        if t is list:
            tree[:] = values
            return tree
        return tree if all(map(operator.is_, values, tree)) else tuple(values)
    if t is dict:
        for k, x in tree.items():
            tree[k] = _eager_value(x)
        return tree
    if t in _LEAVES:
        return tree
    return jax.tree_util.tree_map(lambda x: _concrete(x) if type(x) is Placeholder else x, tree)


_NUMBER_TYPES = frozenset({int, float})
_device_numbers = {}  # (x64, type, value[, sign of a zero]) -> its device array, None: seen once


def _device_number(x, x64):
    """A fed Python number that comes back (a learning rate) as the weakly typed device array
    JAX would make of it, made once: jit converts a Python number argument at every call
    (~2.5 us each).  A number seen for the first time (a step counter) is left to jit:
    making an array costs more than jit's conversion."""
    key = (x64, type(x), x, math.copysign(1.0, x)) if x == 0 else (x64, type(x), x)
    value = _device_numbers.get(key, _MISS)
    if value is not _MISS and value is not None:
        return value
    made = None
    if value is None:  # seen before: it comes back, so make its array (once)
        try:
            made = jnp.asarray(x)
        except Exception:  # (an int too large for the default int type: jit will say so)
            return x
        if type(made) is not _ArrayImpl:  # under a JAX transformation: not a constant
            return x
    if len(_device_numbers) >= 4096:  # numbers that change every step: bounded
        _device_numbers.clear()
    _device_numbers[key] = made
    return x if made is None else made


def _is_number(x):
    # Python numbers given to an operator (x * lr) are fed, not baked: they change often,
    # and operators never need them static.  Named functions keep them static (axis=1).
    return type(x) in (int, float, complex)


_NOT_ARRAYS = frozenset({tuple, list, dict, int, float, complex, bool, str, type(None), slice})
_LEAVES = _NOT_ARRAYS - {tuple, list, dict} | {_ArrayImpl}  # nothing to convert inside


def _is_array(x):
    t = type(x)
    if t is _ArrayImpl or t is Placeholder:
        return True
    if t in _NOT_ARRAYS:  # isinstance(x, jax.Array) costs microseconds for these
        return False
    return isinstance(x, graph.RecTracer) or isinstance(
        x, (jax.Array, np.ndarray, np.generic)) and not isinstance(x, jax.core.Tracer)


def _aval(x):
    # jax.Arrays, placeholders and recorded tracers carry their (interned) aval: reading it is
    # ~30x cheaper than jax.typeof, which NumPy arrays and Python numbers need.
    aval = getattr(x, "aval", None)
    return aval if aval is not None else jax.typeof(x)


def _same(a, b):
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _user_line():
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(graph.__file__.rsplit(os.sep, 1)[0]):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"


# ------------------------------------------------------------------ the site handler

def on_site(site, callee, *args, **kwargs):
    """A rewritten call site called a DL op inside an iteration (see ``_hook.c``)."""
    it = getattr(_tls, "it", None)  # (a co-executed plain op was skipped in C already)
    if it is None:  # outside any iteration: values from past iterations are concrete
        if _functions_on:
            _mark_caller(sys._getframe(1).f_code)
        counts["ops_eager"] += 1
        _tls.opaque = getattr(_tls, "opaque", 0) + 1  # no loop unit opens inside the op
        try:
            return _eager(callee, args, kwargs)
        finally:
            _tls.opaque -= 1
    if callee is jax.vjp and it.depth == 0 and it.mode != EAGER and args and not kwargs.keys() - {"has_aux"}:
        return it.vjp(args[0], args[1:], **kwargs)
    if callee is jax.jvp and it.depth == 0 and it.mode != EAGER and len(args) == 3 \
            and not kwargs.keys() - {"has_aux"}:
        return it.jvp(*args, **kwargs)
    if it.depth == 0 and (callee is jax.grad or callee is jax.value_and_grad) and len(args) == 1:
        # Making the gradient function costs more than the step's ops; JAX's holds no state
        # but `fun`, so the one made for this `fun` in the last iteration serves again.
        try:
            key = (callee, _Id(args[0]), tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # an unhashable option: made afresh
            return callee(*args, **kwargs)
        return it.remember(key, lambda: callee(*args, **kwargs))
    code = getattr(callee, "__code__", None)
    if it.depth == 0 and code is not None and code.co_name == "reraise_with_filtered_traceback":
        spec = it.remember(("grad spec", _Id(callee)), lambda: _grad_spec(callee))
        if spec is not None:
            return it.grad(callee, spec, args, kwargs)
    if isinstance(callee, types.MethodType) and not isinstance(callee.__self__, type):
        args = (callee.__self__,) + args  # x.sum() on a concrete array: x is an input
        callee = callee.__func__
    return it.op(callee, args, kwargs)


_hook.set_routing(on_site, is_dl_op)
_hook.set_fast_path({"placeholder": Placeholder, "event": Event, "iteration": Iteration,
                     "graph": TraceGraph, "array": _ArrayImpl, "stand_in": _STAND_IN,
                     "coexec": COEXEC, "miss": _MISS})


def config(**changes):
    """``terra_bc.config(max_paths=16, max_compiles=32, warmup=0, inner_turns=16,
    dynamic_numbers=True, loops=None, functions=None)``: set limits (only those given);
    returns the settings now in force.  ``loops`` / ``functions`` switch the units found
    without decoration (``set_loops`` / ``set_functions``)."""
    loops = changes.pop("loops", None)
    functions = changes.pop("functions", None)
    unknown = set(changes) - set(settings)
    if unknown:
        raise TypeError(f"terra_bc.config: unknown setting(s) {sorted(unknown)}; "
                        f"known: {sorted(settings) + ['functions', 'loops']}")
    for name, value in changes.items():
        want = type(settings[name])
        if type(value) is not want or want is int and value < 0:
            raise ValueError(f"terra_bc.config: {name} must be a {'non-negative int' if want is int else 'bool'}, got {value!r}")
        if name == "max_paths" and value < 1:
            raise ValueError("terra_bc.config: max_paths must be at least 1")
    settings.update(changes)
    if loops is not None:
        set_loops(bool(loops))
    if functions is not None:
        set_functions(bool(functions))
    return dict(settings)


# ------------------------------------------------------------------ function units

_functions_on = False
_code_units = {}      # rewritten code -> its Unit (function units found without decoration)
MIN_UNIT_OPS = 4      # a function unit recording fewer DL ops costs more than it saves


def _mark_caller(code):
    """A function ran a DL op outside any iteration: calls of it may become iterations."""
    if code in _code_units or code.co_flags & inspect.CO_GENERATOR or code.co_name == "<module>":
        return
    unit = _code_units[code] = Unit(None, f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})")
    unit.code = code
    _hook.set_unit_mark(code, unit)


def on_call(unit, token, state):
    """A call of a marked function begins (state 0: return an iteration to open one, or None)
    or ends (1: returned, 2: raised).  A function called repeatedly is a unit from its
    second call; inside another iteration it is part of that one."""
    if state:
        if getattr(_tls, "it", None) is token:  # (a loop inside may have taken over)
            unit.end(token, state == 1)
            if token.mode == TRACE or unit.unsafe:  # (a new path: is the unit worth it?)
                _drop_if_small(unit)
        return None
    if getattr(_tls, "it", None) is not None or getattr(_tls, "opaque", 0) or unit.unsafe:
        return None
    if unit.warming_up(plain_calls=1) or not _plain_trace(None):  # a unit from the 2nd call
        return None
    it, _ = unit.begin((), {})
    it.auto = True
    return it


def _drop_if_small(unit):
    small = unit.paths and all(sum(ev.kind == "op" for ev in g.events) < MIN_UNIT_OPS
                               for g in unit.paths)
    if small or unit.unsafe:
        unit.unsafe = unit.unsafe or f"fewer than {MIN_UNIT_OPS} DL ops per call"
        _hook.set_unit_mark(unit.code, None)  # plain calls from now on, no handler


def set_functions(on):
    """Co-execute the calls of functions called repeatedly (units found without decoration)."""
    global _functions_on
    _functions_on = bool(on)
    _hook.set_call_handler(on_call if on else None)


def set_loops(on):
    """Co-execute the turns of repeating ``for`` loops (units found without decoration)."""
    _hook.set_loop_handler(on_loop if on else None)


def function(fn):
    """``@terra_bc.function``: each call of ``fn`` is an iteration of one unit."""
    unit = Unit(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return unit(*args, **kwargs)

    call.__wrapped__ = getattr(fn, "__wrapped__", fn)  # the user's own function
    call.__terra_bc_unit__ = unit
    return call


def stats():
    out = {k: counts[k] for k in STAT_KEYS}
    skipped, feeds = _hook.fast_counters()  # counted by the C fast path
    out["ops_skipped"] += skipped
    out["feeds"] += feeds
    return out


def explain(fn=None):
    """A text report of a unit's TraceGraph (of every unit with fn=None): its paths, where
    each leaves the others (the case Python decided there), fetches, feeds and graph breaks
    with their source lines, segments with their op counts, and compiles."""
    if fn is None:
        return "\n\n".join(explain(u) for u in list(_all_units)) or "no units yet"
    unit = getattr(fn, "__terra_bc_unit__", fn)
    if not isinstance(unit, Unit):
        raise TypeError("explain() takes a @terra_bc.function (or a unit)")
    name = getattr(unit.fn, "__qualname__", None) or unit.name
    state = (f"runs eagerly: {unit.unsafe}" if unit.unsafe else
             f"{len(unit.paths)} path(s)" + (f"; no new paths: {unit.frozen}" if unit.frozen else ""))
    lines = [f"unit {name}: {state}; {unit.compiles} compile(s)"]
    for n, g in enumerate(unit.paths):
        shared, parent = 0, None
        for m, other in enumerate(unit.paths[:n]):
            k = 0
            while k < min(len(g.events), len(other.events)) and g.events[k] is other.events[k]:
                k += 1
            if k > shared:
                shared, parent = k, m
        head = f"  path {n + 1}: {len(g.events)} events, {g.recorder.mark()} equations"
        if parent is not None:
            at = g.events[shared] if shared < len(g.events) else None
            head += (f"; shares its first {shared} events with path {parent + 1}, then " +
                     (f"{at.kind} {_name(at.key) if at.key else ''} at {at.where}" if at else "ends"))
        lines.append(head)
        for ev in g.events[shared:]:
            lines.extend(_describe(ev))
        for (start, stop, outs), (seg, _) in g.segments.items():
            lines.append(f"    segment [{start}, {stop}): {len(seg.jaxpr.eqns)} ops, "
                         f"{len(seg.inputs)} inputs, {len(outs)} outputs")
    return "\n".join(lines)


def _describe(ev):
    if ev.kind == "fetch":
        return [f"    fetch ({ev.key}) of value {ev.args[0]} at {ev.where}"]
    if ev.kind == "eager":
        return [f"    graph break: {_name(ev.key)} runs eagerly at {ev.where}"]
    feeds = sum(1 for a in ev.args if isinstance(a, tuple) and a[0] == "feed")
    if ev.kind in ("op", "enter") and feeds:
        what = _name(ev.key) if ev.key else "the unit"
        return [f"    feed of {feeds} value(s) into {what} at {ev.where}"]
    return []
