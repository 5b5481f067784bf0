"""Guards: does what Python does now match what a recorded path did?

Everything that decides a match is here: the key a callee is compared by, how one argument
is matched against its recorded spec, which path's event Python has reached, the spec the C
fast path checks for the common case (``_fastop.c`` runs that check, deciding nothing
itself), and automatic dynamism (Python numbers that changed are fed from then on).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import types

import numpy as np

from ..jaxpr_builder import Id, trace_context
from .events import (ComputedIn, FastSpec, FeedIn, PlaceholderIn, PlaceholderOut, StaticIn,
                     StaticOut, key_name)
from .placeholders import STABLE, Placeholder
from .settings import settings
from .values import NUMBER_TYPES, aval_of, is_array, is_number, same


# ------------------------------------------------------------------ callee keys

def callee_key(callee):
    """A guard key: identity, except for closures JAX makes afresh (grad(f) each iteration)."""
    if isinstance(callee, types.FunctionType) and callee.__closure__ and callee not in STABLE:
        return (callee.__code__, tuple(cell_key(c) for c in callee.__closure__))
    if isinstance(callee, types.MethodType):
        return (callee_key(callee.__func__), Id(callee.__self__))
    return callee  # compared with `is` first (see values.same)


def same_callee(recorded, key):
    """Is ``key`` (this call's callee key) the callee an event recorded?  Keys compare as
    values (``same``), and a ``jax.jit`` wrapper made afresh (``jax.jit(loss)(x)`` inside
    the loop) is the recorded one when it wraps the same function with the same options:
    JAX itself reuses its executable for it, and compared by identity every turn diverged."""
    if same(recorded, key):
        return True
    return type(key) is type(recorded) and type(key).__name__ == "PjitFunction" \
        and _jit_key(recorded) == _jit_key(key) is not None


_JIT_OPTIONS = ("static_argnums", "static_argnames", "donate_argnums", "donate_argnames",
                "keep_unused", "inline", "device", "backend", "compiler_options_kvs",
                "in_shardings_leaves", "out_shardings_leaves")


def _jit_key(fn):
    info, wrapped = getattr(fn, "_jit_info", None), getattr(fn, "__wrapped__", None)
    if info is None or wrapped is None:
        return None
    key = (callee_key(wrapped), tuple(getattr(info, name, None) for name in _JIT_OPTIONS))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def cell_key(cell):
    try:
        v = cell.cell_contents
    except ValueError:
        return None
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    # (By value: jax 0.12's shard_map wrapper rebinds a cell to an equal frozenset per call.)
    if isinstance(v, (tuple, frozenset)) and all(isinstance(e, (int, str, bool, type(None))) for e in v):
        return v
    if isinstance(v, types.FunctionType):
        return callee_key(v)
    if type(v) is Placeholder and v._val is None:
        return ("value", v._id)  # a closure over this iteration's value: its place in the graph
    return Id(v)


def function_key(f):
    """A static function's guard key: two functions made by one ``lambda``/``def`` (its code,
    globals and defaults) closing over the same things are the same static.  A callback
    written inline (``jax.debug.callback(lambda v: log.append(v), x)``) is a new function
    each step; compared by identity every step would diverge.  What a cell holds is compared
    by value only for immutable Python scalars; anything else (an array, a placeholder, a
    list) by identity, so calling the recorded function does what calling this one would."""
    cells = () if f.__closure__ is None else tuple(_held_key(c) for c in f.__closure__)
    defaults = tuple(map(_plain_key, f.__defaults__ or ()))
    kwdefaults = tuple((k, _plain_key(v)) for k, v in (f.__kwdefaults__ or {}).items())
    return (f.__code__, Id(f.__globals__), defaults, kwdefaults, cells)


def _held_key(cell):
    try:
        return _plain_key(cell.cell_contents)
    except ValueError:  # an empty cell
        return None


def _plain_key(v):
    if type(v) in (int, float, str, bool, type(None)):
        return (type(v), v)
    if type(v) is types.FunctionType:
        return function_key(v)
    return Id(v)


def traced_function_key(f, args, kwargs):
    """The key under which ``jax.eval_shape(f, *args, **kwargs)`` gives the same shapes
    again (None if there is none): ``f``'s code and defaults, what it closes over, the
    globals its code reads and what it is given, by value wherever the value is plain data
    (flax's ``Scope.param`` checks each parameter with ``eval_shape(lambda: init_fn(key,
    *init_args))``, a new lambda over a new shape tuple at every call), arrays by their
    avals, functions it holds the same way (one it reads as a global by identity).  Eager
    JAX traces ``f`` at every call, so a reused result must not depend on anything the key
    does not hold: an object that could be changed in place (an instance of a class of the
    user's) gives no key, and the call runs as JAX runs it.  Classes, modules and builtins
    are taken by identity (an attribute rebound on a module between calls is not seen)."""
    if type(f) is not types.FunctionType:
        return None
    try:
        key = (_traced_key(f, 0, set()), _traced_key(args, 0, set()), _traced_key(kwargs, 0, set()))
        hash(key)
    except (TypeError, _NotPlain):
        return None
    return key


class _NotPlain(Exception):
    """A value a traced function's shapes may depend on that no key can stand for."""


_PLAIN = (int, float, str, bool, complex, type(None), bytes, np.dtype, np.generic)
_PLAIN_EXACT = frozenset({int, float, str, bool, complex, type(None), bytes})
# Classes (of metaclass ``type``), modules and the functions a traced function reads as
# globals are keys themselves: their hash and == are identity, as Id's, without Id's
# Python-level __hash__ (a linen parameter's key holds ~24 of them; the key is made and
# hashed at every call).  (A function met elsewhere is keyed by its code and closure.)
_ITSELF = frozenset({type, types.ModuleType, types.FunctionType})
_BY_IDENTITY = (type, types.ModuleType, types.BuiltinFunctionType)


def _traced_key(v, depth, active):
    t = type(v)
    if t in _PLAIN_EXACT:  # (the common case first: a set lookup, not nine isinstance checks)
        return (t, v)
    if t is type or t is types.ModuleType:
        return v
    if t is not types.FunctionType and t is not tuple and isinstance(v, _PLAIN):
        return (t, v)
    if depth > _TRACED_KEY_DEPTH:
        raise _NotPlain
    if t is tuple or t is list:
        return (t, *[_traced_key(x, depth + 1, active) for x in v])
    if t is dict:
        return (t, *[(k, _traced_key(x, depth + 1, active)) for k, x in v.items()])
    if t is frozenset:
        return (t, frozenset(_traced_key(x, depth + 1, active) for x in v))
    if t is types.FunctionType:
        if id(v) in active:  # (a function reaching itself: its key is being made)
            return ("recursive", v.__code__)
        active.add(id(v))
        try:
            return _function_traced_key(v, depth, active)
        finally:
            active.discard(id(v))
    if is_array(v):
        return ("array", t, aval_of(v))
    if isinstance(v, _BY_IDENTITY) or _jax_callable(t):
        return Id(v)
    if t is functools.partial:
        return (t, _traced_key(v.func, depth + 1, active), _traced_key(v.args, depth + 1, active),
                _traced_key(v.keywords, depth + 1, active))
    if t is types.MethodType:
        return (t, _traced_key(v.__func__, depth + 1, active), _traced_key(v.__self__, depth + 1, active))
    if isinstance(v, tuple) and hasattr(t, "_fields"):  # (a named tuple)
        return (t, *[_traced_key(x, depth + 1, active) for x in v])
    fields = _frozen_fields(t)
    if fields is not None:
        return (t, *[_traced_key(getattr(v, f, _EMPTY_CELL), depth + 1, active) for f in fields])
    raise _NotPlain


_fields_of = {}  # class -> the fields of its frozen instances a key holds, or None


def _frozen_fields(t):
    """The configuration fields of a flax linen ``Module`` class (None for other classes).
    A linen module is its configuration: its dataclass fields (frozen once it is bound;
    attributes made in ``setup`` derive from them), so it is keyed by its class and their
    values, read at every call, not refused as an object that could change in place.  Its
    ``parent`` (the module tree, its scope) and ``name`` are where it sits, not what it
    computes; its variables are not keyed (a shape check reads none).  (``DenseGeneral``,
    behind every linen attention, checks its kernel's shape with ``eval_shape`` of a
    closure over the module: traced at every call, it was a third of a small transformer's
    step.)"""
    try:
        return _fields_of[t]
    except KeyError:
        pass
    fields = None
    if any(c.__name__ == "Module" and c.__module__ == "flax.linen.module" for c in t.__mro__):
        fields = tuple(f.name for f in dataclasses.fields(t) if f.name not in ("parent", "name"))
    _fields_of[t] = fields
    return fields


def _function_traced_key(f, depth, active):
    g = f.__globals__
    cells = tuple([_traced_key(_cell_value(c), depth + 1, active) for c in f.__closure__ or ()])
    # A function the code reads as a global is taken by identity, as itself (a rebinding is
    # seen, the globals that function reads in turn are not): keying whole modules' worth of
    # helpers cost ~300 us an eval_shape, more than tracing it again.
    reads = tuple([(name, value if type(value) in _ITSELF else _traced_key(value, depth + 1, active))
                   for name, value in [(n, g[n]) for n in _global_names(f.__code__) if n in g]])
    return (f.__code__, _traced_key(f.__defaults__, depth + 1, active),
            _traced_key(f.__kwdefaults__, depth + 1, active), cells, reads)


_global_names_of = {}  # code -> the names it and the code nested in it may read as globals


def _global_names(code):
    names = _global_names_of.get(code)
    if names is None:
        found = set(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                found.update(_global_names(c))
        names = _global_names_of[code] = tuple(sorted(found))
    return names


def _jax_callable(t):
    # jax.jit-wrapped functions (jnp's among them) and JAX's custom_jvp/vjp objects: JAX's
    # own, never changed in place.
    return (getattr(t, "__module__", None) or "").startswith(("jaxlib", "jax."))


_TRACED_KEY_DEPTH = 8


class _EMPTY_CELL:  # (an empty cell's stand-in: a class, keyed by identity)
    pass


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def same_static(x, value):
    """Is argument ``x`` the static ``value`` an op was recorded with?"""
    if type(x) is types.FunctionType and type(value) is types.FunctionType:
        return x is value or function_key(x) == function_key(value)
    return same(x, value)


# ------------------------------------------------------------------ configuration

def config_key():
    """The configuration a recording is valid under: what JAX keys its own caches on
    (``jax._src.config.trace_context``: x64, the default device, matmul precision, dtype
    promotion, meshes...).  A path recorded under another one is not reused: with
    ``jax_enable_x64`` turned on, ``jnp.sum`` of int32 values gives an int64."""
    return trace_context()


# ------------------------------------------------------------------ matching

def unsettled(x, it):
    """Is ``x`` a placeholder of iteration ``it`` that has no value of its own yet?"""
    return type(x) is Placeholder and x._it is it and x._val is None


def matches(it, x, spec, feeds):
    """Does argument ``x`` match its recorded input spec?  A feed's (id, value) is appended
    to ``feeds``, bound only once the whole event matches."""
    t = type(spec)
    if t is PlaceholderIn:
        return unsettled(x, it) and x._id == spec.id
    if t is FeedIn or t is ComputedIn:  # (a graph break's input is not bound)
        if not (is_array(x) or is_number(x)) or unsettled(x, it) or aval_of(x) != spec.aval:
            return False
        if t is FeedIn:
            feeds.append((spec.id, x))
        return True
    return same_static(x, spec.value)


def continues(path, pos, kind, key, check):
    """``path``'s event at ``pos`` if it is the one Python has reached, else None."""
    if pos < len(path.events):
        ev = path.events[pos]
        if (ev.kind == kind or ev.kind == "eager" and kind == "op") and same_callee(ev.key, key) \
                and (check is None or check(ev)):
            return ev
    return None


def changed_numbers(unit, path, pos, key, tree, leaves):
    """Automatic dynamism: Python numbers baked into ``path``'s op at ``pos`` that now differ
    (a step counter, a schedule's value, a token id) are fed from now on: their (line, op,
    leaf index) joins ``unit.dynamic``, unless JAX needed that number static before.
    (Elements of a ``jnp.asarray`` list are fed from the first trace: tracing._record_op.)"""
    if path is None or pos >= len(path.events) or not settings["dynamic_numbers"]:
        return
    ev = path.events[pos]
    if ev.kind != "op" or not same_callee(ev.key, key) or ev.tree != tree or len(leaves) != len(ev.args):
        return
    for i, (x, spec) in enumerate(zip(leaves, ev.args)):
        if type(spec) is StaticIn and type(x) in (int, float) and type(x) is type(spec.value) \
                and x != spec.value and (ev.where, key_name(key), i) not in unit.static:
            unit.dynamic.add((ev.where, key_name(key), i))


# ------------------------------------------------------------------ the C fast path's spec

_FAST_CODES = {PlaceholderIn: 0, StaticIn: 1, FeedIn: 2}


def flat_call(args, kwargs, leaves):
    """(number of positional args, keyword names, per argument in JAX's flattening order
    (the positional ones, then the keywords by sorted name) its first leaf, its number of
    leaves and, for one that is not a leaf itself, its value) where each argument is one
    leaf, None or a plain tuple of static values (``_static_leaves``); else None."""
    spans, k, n_leaves = [], 0, len(leaves)
    names = tuple(kwargs)
    for x in itertools.chain(args, [kwargs[name] for name in sorted(names)]):
        if k < n_leaves and leaves[k] is x:
            spans.append((k, 1, _LEAF))
            k += 1
            continue
        n = 0 if x is None else _static_leaves(x) if type(x) is tuple else -1
        if n < 0:
            return None
        spans.append((k, n, x))
        k += n
    return (len(args), names, tuple(spans)) if k == n_leaves else None


_LEAF = object()  # (flat_call: the argument is its own leaf)
_STATIC_TYPES = frozenset({int, float, bool, str, type(None), type(Ellipsis)})


def _static_leaves(x, depth=0):
    """The number of leaves of a plain tuple of ints, floats, bools, strings, None,
    Ellipsis, slices of ints and such tuples (an index, an axis tuple, strides), whose
    comparisons run no code of the program's (``_fastop.c``, same_statics); -1 for any
    other value."""
    n = 0
    for e in x:
        t = type(e)
        if t is tuple and depth < 4:
            k = _static_leaves(e, depth + 1)
            if k < 0:
                return -1
            n += k
        elif t is slice:
            if not all(type(b) is int or b is None for b in (e.start, e.stop, e.step)):
                return -1
            n += 1
        elif t in _STATIC_TYPES:
            n += e is not None  # (None is an empty node of JAX's pytrees, not a leaf)
        else:
            return -1
    return n


def fast_spec(key, specs, out_tree, outs, flat):
    """What the C fast path checks for an op event, or None where only the general path can
    match it (an argument that is not one leaf, several outputs, a graph break's input)."""
    if flat is None or out_tree.num_leaves != 1 or out_tree.num_nodes != 1 or not outs \
            or type(outs[0]) not in (PlaceholderOut, StaticOut):
        return None
    per_arg = []
    nargs, names, spans = flat
    for start, n, value in spans:
        if value is _LEAF:
            spec = specs[start]
            if type(spec) not in _FAST_CODES:
                return None
            per_arg.append((_FAST_CODES[type(spec)],) + tuple(spec))
        elif all(type(spec) is StaticIn for spec in specs[start:start + n]):
            # (a tuple whose numbers are fed, automatic dynamism's, takes the general path)
            per_arg.append((1, None) if value is None else (3, value))
        else:
            return None
    out = outs[0]  # (a static output: its value in the aval's place, no id: _fastop.c)
    if type(out) is PlaceholderOut and any(
            type(s) is FeedIn and s.id == out.id and (issubclass(s.type, np.generic)
                                                      or s.type in NUMBER_TYPES) for s in specs):
        return None  # (an identity op hands the fed scalar back: bind makes it an array)
    # specs follow JAX's flattening of (args, kwargs): keywords in sorted name order.
    by_name = dict(zip(sorted(names), per_arg[nargs:]))
    in_call_order = per_arg[:nargs] + [by_name[k] for k in names]
    out_id, out_aval = (out.id, out.aval) if type(out) is PlaceholderOut else (None, out.value)
    return FastSpec(key, nargs, tuple(in_call_order), out_id, out_aval, names or None)
