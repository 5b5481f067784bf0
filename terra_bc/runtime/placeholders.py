"""Placeholders: what Python holds for a DL value inside (and after) an iteration.

``install_methods`` gives ``Placeholder`` its operators and array methods; each one is an op
of the open iteration (``call``), or an eager op on concrete values once the iteration is
over.  The callables recorded for them are terra_bc's own and stable (``STABLE``), so the
guard of an operator compares them by identity.
"""
from __future__ import annotations

import operator
import sys
import threading
import types
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_unflatten

from .. import _hook, jaxpr_builder
from ..jaxpr_builder import (ArrayImpl, Recorder, RecTracer, evaluate_segment, set_current_trace,
                             several_devices)
from ..counters import counts
from .context import EAGER, current, leaving
from .trace_rules import is_jax_code


class _StandIn(jax.core.Trace):
    """The trace a placeholder claims: JAX asks a tracer it does not own to ``full_lower``."""


STAND_IN = _StandIn()
DEFER = object()  # see Placeholder.__jax_array__
_ARRAY_REVERSES = "__reversed__" in vars(ArrayImpl)  # (see Placeholder.__reversed__)
STABLE = set()    # terra_bc's own callees that close over constants: their own guard keys


class Placeholder(jax.core.Tracer):
    """A DL value of an iteration: value ``_id`` of its recorded path.

    While recording it wraps a tracer of the jaxpr builder (``_rec``); in co-execution it
    names a value of the path that may not be computed yet; once its iteration is over it
    holds the concrete ``jax.Array`` (``_val``) and behaves as one (its operations then run
    eagerly).  It is a JAX ``Tracer`` so that JAX accepts it anywhere (``isinstance(x,
    jax.Array)``, ``jit``, indexing a ``jax.Array`` with it): JAX lowers a tracer it does not
    own with ``full_lower``, which gives the value (or, while recording, the recorded tracer).
    The C fast path makes placeholders too and reads these slots by name.
    """
    __slots__ = ("_it", "_id", "_rec", "_val")
    __array_priority__ = 100  # NumPy defers `ndarray * placeholder` to us

    def __init__(self, it, id, aval, rec=None, val=None):
        self._trace, self.aval = STAND_IN, aval  # Tracer.__init__ would record line info
        self._it, self._id, self._rec, self._val = it, id, rec, val

    def full_lower(self):
        if self._val is not None:
            return self._val
        it = self._it
        if it is not current():
            return concrete(self)
        try:
            return it.lower(self)
        except BaseException as error:
            leaving(error)  # (an interrupt may have cut the launch short)
            raise

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
        if not self.aval.shape:  # (raised by iter() itself, as a jax.Array raises it)
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __reversed__(self):
        # (jax.core.Tracer's indexes a 0-d value: an IndexError.  A jax.Array of a JAX that
        # defines no __reversed__ (0.10) goes through len(); a later one's raises as iter)
        if not self.aval.shape:
            raise TypeError("iteration over a 0-d array" if _ARRAY_REVERSES else
                            "len() of unsized object")
        return (self[i] for i in reversed(range(len(self))))

    __hash__ = None

    def __jax_array__(self):
        # JAX's binary operators (array_methods._operator_*) convert the other operand
        # through __jax_array__ first: handing back something they do not accept makes them
        # return NotImplemented, so `jax_array @ placeholder` reaches our __rmatmul__ and is
        # an op of the iteration.
        if sys._getframe(1).f_code.co_name.startswith("_operator_"):
            return DEFER
        return _lowered(self)  # (jnp.asarray(p) inside a body JAX traces: see _lowered)

    # Conversions: each is a fetch of the iteration (see Iteration.fetch).
    def __array__(self, dtype=None, copy=None):
        # (np.array(x) asks for a copy and takes what comes back as one: a writable array,
        # as a jax.Array gives; np.asarray(x) takes the device buffer's read-only view)
        return self._fetch("array", lambda v: np.array(v, dtype=dtype) if copy else
                           np.asarray(v, dtype=dtype))

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

    # Placement (see _placement).
    sharding = property(lambda self: self._placement("sharding"))
    committed = property(lambda self: self._placement("committed"))
    is_fully_replicated = property(lambda self: self._placement("is_fully_replicated"))
    is_fully_addressable = property(lambda self: self._placement("is_fully_addressable"))
    addressable_shards = property(lambda self: self._placement("addressable_shards"))
    device = property(lambda self: self._placement("device"))
    weak_type = property(lambda self: self.aval.weak_type)  # (part of the guarded aval)

    def devices(self):
        if several_devices():
            return self._fetch("sharding", lambda v: v.devices())
        return call(METHODS["devices"], (self,), {})

    def _placement(self, name):
        """With several devices, placement is known once the segment computing the value is
        launched (a jax.Array has its sharding before its data): a fetch that launches it
        without waiting for it.  (As an op, the traced iteration's answer would be baked
        in.)  With one device it never changes: an op, answered without computing."""
        if several_devices():
            return self._fetch("sharding", lambda v: getattr(v, name))
        return call(ATTRS[name], (self,), {})

    def _fetch(self, kind, convert):
        it = self._it
        if self._val is not None or it is None or it is not current():
            return convert(concrete(self))
        _hook.watch_check()  # (a debugger printing a value: the iteration may run eagerly now)
        if self._val is not None:
            return convert(self._val)
        try:
            return it.fetch(self, kind, convert)
        except BaseException as error:
            leaving(error)  # (an interrupt may have cut the launch short)
            raise

    def __getattr__(self, name):
        # Array methods not installed below (x.argwhere(), x.at is separate) are ops too.
        attr = getattr(jax.Array, name, None)
        if attr is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if isinstance(attr, property) or not callable(attr):
            if self._val is not None:  # (as _property_of)
                return getattr(self._val, name)
            return call(ATTRS[name], (self,), {})
        method = METHODS[name]
        return _hook.Unseen(lambda *args, **kwargs: call(method, (self,) + args, kwargs))

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
        return _hook.Unseen(
            lambda *args, **kwargs: call(AT_METHODS[method], (self.x, self.index) + args, kwargs))


def named(fn, name):
    fn.__qualname__ = fn.__name__ = name
    return fn


class _Stable(dict):
    """name -> a stable function applying that array attribute/method (a stable guard key)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, name):
        fn = self[name] = self.make(name)
        STABLE.add(fn)
        return fn


ATTRS = _Stable(lambda name: named(lambda x: getattr(x, name), f"attr.{name}"))
METHODS = _Stable(lambda name: named(lambda x, *a, **k: getattr(x, name)(*a, **k), f"method.{name}"))
AT_METHODS = _Stable(lambda name: named(
    lambda x, index, *a, **k: getattr(x.at[index], name)(*a, **k), f"at.{name}"))


# ------------------------------------------------------------------ operators and methods

BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
          "xor", "lshift", "rshift", "lt", "le", "gt", "ge", "eq", "ne", "divmod")
COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})  # no reflected form
UNARY = ("neg", "pos", "abs", "invert")
PROPERTIES = ("T", "mT", "real", "imag")
# jax.core.Tracer defines the array methods and properties itself; as a Tracer subclass a
# placeholder must override them, or x.sum() / x.T would run JAX on it without an event.
METHOD_NAMES = (
    "all", "any", "argmax", "argmin", "argpartition", "argsort", "astype", "byteswap",
    "choose", "clip", "compress", "conj", "conjugate", "copy", "cumprod", "cumsum", "diagonal",
    "dot", "flatten", "max", "mean", "min", "nonzero", "prod", "ptp", "ravel", "repeat",
    "reshape", "round", "searchsorted", "sort", "squeeze", "std", "sum", "swapaxes", "take",
    "trace", "transpose", "var", "view")


def _operator_method(name, fn):
    """Placeholder.__<name>__: the C fast path in co-execution (_hook.OpMethod), else an op
    of the iteration (or an eager op once the iteration is over).  On a placeholder that has
    its value (a past iteration's: a loop's carried state) the operator is the value's own,
    as on the array a loop's first turn had there: ``0.9 * ema`` is then the same work (run
    as it is recorded, or handing an operand of this iteration its reflected operator) in
    the first turn as in every later one, and their paths do not part there."""
    def general(self, *args):
        if self._val is not None:
            return fn(self._val, *args)
        return call(fn, (self,) + args, {})
    general.__name__ = name
    return _hook.OpMethod(fn, _hook.Unseen(general))


def _reflected(fn, name):
    return named(lambda a, b: fn(b, a), name)


def _property_of(fn):
    # (x.T of a past iteration's value is the value's own, as an operator is)
    return property(_hook.Unseen(
        lambda self: fn(self._val) if self._val is not None else call(fn, (self,), {})))


def _method_of(fn, name):
    method = lambda self, *args, **kwargs: call(fn, (self,) + args, kwargs)  # noqa: E731
    # (JAX's own name for it: pytest's assertion messages name the method, `where _sum = ...`)
    method.__name__ = method.__qualname__ = getattr(getattr(jax.Array, name, None), "__name__", name)
    return _hook.Unseen(method)


def hide_from_tools(cls):
    """``cls``'s own methods and property getters run out of the sight of a debugger,
    profiler or coverage tool (``_hook.Unseen``): a placeholder that outlived its
    iteration runs terra_bc's Python where an array would run JAX's (runtime/tools.py)."""
    for name, attr in list(vars(cls).items()):
        if isinstance(attr, property) and attr.fset is None:
            setattr(cls, name, property(_hook.Unseen(attr.fget), doc=attr.__doc__))
        elif isinstance(attr, types.FunctionType) and name != "__init__":
            setattr(cls, name, _hook.Unseen(attr))


ARITHMETIC = {}  # "__mul__" -> the callable a placeholder's (and an array's) x * y records


def install_methods(cls):
    """Give ``cls`` (Placeholder) its operators, array properties and methods.  Returns the
    callables its arithmetic operators record whose Python-number operands are fed, not
    baked in (they change often and are never needed static; an index given to
    ``__getitem__`` or the digits given to ``__round__`` are).  Not ``x ** n``'s exponent:
    JAX makes ``x ** 2`` a multiplication (``integer_pow``) where the exponent is a Python
    int, and a fed one a general power, ``exp(n * log(x))``, whose derivative adds a
    ``select`` for ``x == 0`` (a layer norm's variance: 33 of them in a BERT step).  A
    baked exponent that changes is fed from then on (automatic dynamism)."""
    arithmetic = {}
    for name in BINARY:
        fn = getattr(operator, name, None) or getattr(operator, name + "_", None) or divmod
        arithmetic[f"__{name}__"] = fn
        if name not in COMPARISONS:
            arithmetic[f"__r{name}__"] = _reflected(fn, f"r{name}")
    for name in UNARY:
        arithmetic[f"__{name}__"] = getattr(operator, name)
    ops = dict(arithmetic, __getitem__=operator.getitem, __round__=round)
    for name, fn in ops.items():
        setattr(cls, name, _operator_method(name, fn))
    for name in PROPERTIES:
        setattr(cls, name, _property_of(ATTRS[name]))
    for name in METHOD_NAMES:
        setattr(cls, name, _method_of(METHODS[name], name))
    ARITHMETIC.update(arithmetic)
    STABLE.update(arithmetic.values())
    return frozenset(fn for name, fn in arithmetic.items() if name != "__pow__")


OPERATORS = install_methods(Placeholder)  # (see Iteration tracing: operands fed)

# What a jax.Array says of its buffer.  jax.core.Tracer defines these to refuse (a tracer has
# no buffer), so a placeholder answers them itself, from its value: a fetch (launched, and
# waited for only where the answer reads the data).  Without them, code the rewriter does
# not see (`operator.methodcaller("is_deleted")`, a library's check) met JAX's
# ConcretizationTypeError where eager JAX answers.
BUFFER_METHODS = ("is_deleted", "delete", "is_ready", "copy_to_host_async",
                  "on_device_size_in_bytes", "unsafe_buffer_pointer", "addressable_data",
                  "tobytes", "clone", "platform")  # (block_until_ready: its own, above)
BUFFER_PROPERTIES = ("global_shards", "traceback", "format")


def _buffer_method(name):
    def method(self, *args, **kwargs):
        return self._fetch(name, lambda v: getattr(v, name)(*args, **kwargs))
    return named(method, name)


def _buffer_property(name):
    return property(lambda self: self._fetch(name, lambda v: getattr(v, name)))


for _name in BUFFER_METHODS:
    setattr(Placeholder, _name, _buffer_method(_name))
for _name in BUFFER_PROPERTIES:
    setattr(Placeholder, _name, _buffer_property(_name))


def route_array_operators(cls):
    """A concrete array's arithmetic operators (``cls``: jax.Array's implementation) inside
    an iteration are ops of it, as a placeholder's are: ``0.9 * mu`` is then one event
    whether ``mu`` is the array a loop's first turn starts from or a past iteration's
    placeholder (which hands its operators to its value), recorded and skipped like any
    op.  Not where JAX's own code calls it on constants (its indexing computes ``i < 0``
    on an index it was given): there it is part of that JAX call, which runs as a whole
    (work on constants), and a placeholder handed back into JAX's code made the unit run
    eagerly.  With a placeholder operand (``jax.tree.map(operator.sub, arrays,
    placeholders)``: JAX's code calls it) it is an op, as before.  Left to JAX, such an
    operator ran eagerly at every turn, its result fed to the graph (an optimizer's
    moments: a sixth of an optax step).  Outside an iteration, inside
    an op JAX runs (``opaque_depth``: JAX's own code on arrays) or in an iteration run
    eagerly, the operator is JAX's, unchanged."""
    for name, fn in ARITHMETIC.items():
        own = getattr(cls, name, None)
        if own is None or getattr(own, "_terra_bc_routed", False):
            continue
        setattr(cls, name, _routed(fn, own))
    own = getattr(cls, "__getitem__", None)
    if own is not None and not getattr(own, "_terra_bc_routed", False):
        setattr(cls, "__getitem__", _routed_getitem(own))


def _routed(fn, own):
    def operator_method(self, *args):
        it = current()
        if it is None or it.opaque_depth or it.mode == EAGER or (
                is_jax_code(sys._getframe(1).f_code) and not _any_placeholder(args)):
            return own(self, *args)
        return it.op(fn, (self,) + args, {})
    operator_method.__name__ = operator_method.__qualname__ = own.__name__
    operator_method._terra_bc_routed = True
    return _hook.Unseen(operator_method)


def _routed_getitem(own):
    """``table[i]`` on a concrete array, where the index holds a placeholder (an embedding
    row looked up by this iteration's token): an op of the iteration, as ``placeholder[i]``
    is.  Left to JAX, its indexing read the placeholder's value, so the unit ran eagerly.
    An index of plain Python values and arrays stays JAX's own: work on constants
    (``X[:, None]``, ``betas[i]`` with a changing ``i``: fed to what uses it, not guarded)."""
    def getitem(self, index):
        it = current()
        if it is None or it.opaque_depth or it.mode == EAGER or not _holds_placeholder(index):
            return own(self, index)
        return it.op(operator.getitem, (self, index), {})
    getitem.__name__ = getitem.__qualname__ = "__getitem__"
    getitem._terra_bc_routed = True
    return _hook.Unseen(getitem)


def _any_placeholder(args):
    return any(isinstance(a, Placeholder) for a in args)


def _holds_placeholder(index):
    return isinstance(index, Placeholder) or (type(index) in (tuple, list) and _any_placeholder(index))


for _cls in (Placeholder, _At, _AtIndex):
    hide_from_tools(_cls)


# ------------------------------------------------------------------ values and eager ops

def concrete(x):
    """The concrete value behind a placeholder whose iteration has given it one, or of a
    placeholder of an iteration open in another thread (``foreign``)."""
    if x._val is not None:
        return x._val
    rec = x._rec
    if type(rec) is RecTracer or rec is None:  # (else a LateValue: the iteration ended)
        holder = x._it.unit.holder if x._it is not None else None
        if holder is not None and holder != threading.get_ident():
            return foreign(x)
    if rec is not None:
        return rec.val
    raise RuntimeError("terra_bc placeholder used outside its iteration before it was computed")


def foreign(x):
    """The value of a placeholder of an iteration another thread has open (handed over
    through a queue, a global): computed here op by op from that iteration's recording and
    the values fed to it so far, as a ``LateValue`` is.  That iteration is left as it is:
    its thread alone launches, settles and moves it; this one only reads what it recorded
    (its equations up to that value are final)."""
    it = x._it
    if x._rec is not None:
        value = Recorder.known_value(x._rec)
        if value is not None:
            return value
    value = it.env.get(x._id)
    if value is not None:
        return value
    seg = it.path.recorder.segment([x._id], 0, None, pure=True)  # (effects: its thread's)
    args = [it.env[i] for i in seg.inputs]
    mine = current()  # (this thread's own recording, if it traces, must not see this work)
    with nullcontext() if mine is None or mine.recording is None else \
            set_current_trace(mine.recording.parent_trace()):
        return evaluate_segment(seg, args)[0]


def call(fn, args, kwargs):
    """A placeholder's operator or method: an op of the open iteration, else eager."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    it = current()
    if it is None:  # outside any iteration: a plain eager op on concrete values
        counts["ops_eager"] += 1
        return eager(fn, args, kwargs)
    _hook.watch_check()  # (a tool watching: the iteration may run its rest eagerly, tools.py)
    if it.opaque_depth:
        # Inside an op JAX runs itself (a vmap of user code closing over a placeholder):
        # ``fn`` is given what JAX lowers a placeholder to, not the placeholder, whose
        # method ``fn`` calls (``x.at[i].add``, ``x + y``) would come back here without end.
        leaves, tree = tree_flatten((args, kwargs))
        a, k = tree_unflatten(tree, [_lowered(x) if type(x) is Placeholder else x for x in leaves])
        return fn(*a, **k)
    try:
        return it.op(fn, args, kwargs)
    except BaseException as error:
        leaving(error)  # (an interrupt may have cut a step of the iteration short)
        raise


def _lowered(ph):
    """A placeholder given to a method inside an op JAX runs itself.  While JAX traces a
    body (a lax loop's, for the iteration: runtime/bodies.py), the placeholder enters that
    trace as JAX's own functions take it (``jnp.sum(p)``): a constant of the body, which
    becomes an input of the body's op, through an identity JAX differentiates and batches
    (``optimization_barrier``).  Lowered to its value instead, the body used a value the
    iteration could not reproduce (optax's L-BFGS indexes its memory inside its linesearch's
    while_loop, and the unit ran eagerly).  The same under a transform inside such a trace
    (``jax.jacrev(lambda w: x @ w)`` over a global ``x``: JAX's JVP trace over the body's).
    Elsewhere: its value, as JAX lowers it."""
    if jaxpr_builder.tracing_to_jaxpr():
        return jax.lax.optimization_barrier(ph)
    return ph.full_lower()


# Arguments that can hold no placeholder: an op given only these runs as it is.
_HOLD_NOTHING = frozenset({ArrayImpl, np.ndarray, int, float, bool, complex, str, type(None)})


def eager(fn, args, kwargs):
    """``fn`` run by JAX on the concrete values of any placeholders among its arguments."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    # Most eager ops are given arrays and numbers only: flattening them to look for
    # placeholders cost ~2 us, a third of a small op's own dispatch.
    for x in args:
        if type(x) not in _HOLD_NOTHING:
            break
    else:
        if not kwargs or _HOLD_NOTHING.issuperset(map(type, kwargs.values())):
            return fn(*args, **kwargs)
    leaves, tree = tree_flatten((args, kwargs))
    a, k = tree_unflatten(tree, [concrete(x) if type(x) is Placeholder else x for x in leaves])
    return fn(*a, **k)
