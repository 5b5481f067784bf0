"""Values crossing between Python and the graph: what is an array, its aval, Python numbers
fed as device arrays, the arrays among a unit's arguments, and what a unit hands back."""
from __future__ import annotations

import math
import operator
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .. import jaxpr_builder
from ..jaxpr_builder import ArrayImpl, RecTracer
from .placeholders import Placeholder, concrete
from .settings import DEVICE_NUMBERS, NUMPY_AVALS

MISS = object()  # "not found" where None is a value (and the C fast path's miss sentinel)
NUMBER_TYPES = frozenset({int, float})
_NOT_ARRAYS = frozenset({tuple, list, dict, int, float, complex, bool, str, type(None), slice})
LEAVES = _NOT_ARRAYS - {tuple, list, dict} | {ArrayImpl}  # nothing to convert inside
PACKAGE_DIR = os.path.dirname(jaxpr_builder.__file__)


def is_array(x):
    t = type(x)
    if t is ArrayImpl or t is Placeholder:
        return True
    if t in _NOT_ARRAYS:  # isinstance(x, jax.Array) costs microseconds for these
        return False
    return isinstance(x, RecTracer) or isinstance(
        x, (jax.Array, np.ndarray, np.generic)) and not isinstance(x, jax.core.Tracer)


def is_number(x):
    # Python numbers given to an operator (x * lr) are fed, not baked: they change often,
    # and operators never need them static.  Named functions keep them static (axis=1).
    return type(x) in (int, float, complex)


_numpy_avals = {}  # (array or scalar, shape, dtype, x64, abstract mesh) -> a NumPy value's aval


def aval_of(x):
    # jax.Arrays, placeholders and recorded tracers carry their (interned) aval: reading it is
    # ~30x cheaper than jax.typeof, which NumPy arrays and Python numbers need.  A NumPy
    # value's aval is remembered by what jax.typeof makes it of (a mask fed every step:
    # ~3 us a guard otherwise).
    aval = getattr(x, "aval", None)
    if aval is not None:
        return aval
    t = type(x)
    if t is np.ndarray or isinstance(x, np.generic):
        key = (t is np.ndarray, x.shape, x.dtype, jax.config.jax_enable_x64, jaxpr_builder.mesh_context())
        aval = _numpy_avals.get(key)
        if aval is None:
            if len(_numpy_avals) >= NUMPY_AVALS:
                _numpy_avals.clear()
            aval = _numpy_avals[key] = jax.typeof(x)
        return aval
    return jax.typeof(x)


def shape_struct(x):
    """A stand-in of array ``x`` (a ShapeDtypeStruct of its aval) to trace a function on."""
    if type(x) is jax.ShapeDtypeStruct:
        return x
    aval = aval_of(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def same(a, b):
    """Are two static values the same for a guard: identical, or equal and of one type?"""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def user_line():
    """file:line of the user's code that called into the runtime."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"


_device_numbers = {}  # (x64, type, value[, sign of a zero]) -> its device array, or the launch
                      # (a number) it was first seen in


def device_number(x, x64, launch):
    """A fed Python number that comes back (a learning rate) as the weakly typed device array
    JAX would make of it, made once: jit converts a Python number argument at every call
    (~2.5 us each).  A number seen for the first time (a step counter), or seen again only
    in the same ``launch`` (a bias correction ``1 - b1 ** t`` fed to each parameter's update:
    a new value every step, at many positions) is left to jit: making an array costs
    ~35 us, more than jit's conversions."""
    key = (x64, type(x), x, math.copysign(1.0, x)) if x == 0 else (x64, type(x), x)
    value = _device_numbers.get(key)
    if type(value) is ArrayImpl:
        return value
    if value is None or value == launch:
        made = launch
    else:  # seen in an earlier launch: it comes back, so make its array (once)
        try:
            made = jax.device_put(x)  # (a transfer: jnp.asarray would compile a conversion)
        except Exception:  # (an int too large for the default int type: jit will say so)
            return x
        if type(made) is not ArrayImpl:  # under a JAX transformation: not a constant
            return x
    if value is None and len(_device_numbers) >= DEVICE_NUMBERS:  # numbers that change: bounded
        _device_numbers.clear()
    _device_numbers[key] = made
    return x if made is launch else made


# ------------------------------------------------------------------ a unit's arguments and result

def arrays_in(x, found):
    """Append the arrays of x reached through plain tuples to found; returns x's shape in
    those terms (nested tuples, "A" for an array, None for anything else)."""
    if type(x) is not tuple:
        if is_array(x):
            found.append(x)
            return "A"
        return None
    shape = []
    for v in x:  # (leaves inline: this runs at every iteration's start)
        if type(v) is tuple:
            shape.append(arrays_in(v, found))
        elif is_array(v):
            found.append(v)
            shape.append("A")
        else:
            shape.append(None)
    return tuple(shape)


def with_arrays(args, kwargs, values):
    """(args, kwargs) with the arrays arrays_in found replaced, in order, by values."""
    values = iter(values)

    def put(x):
        if is_array(x):
            return next(values)
        return tuple(map(put, x)) if type(x) is tuple else x
    return put(args), dict(put(tuple(kwargs.items()))) if kwargs else {}


def eager_value(tree):
    """What a unit returns, with concrete arrays for its placeholders.  Lists and dicts are
    the ones the function built, filled in place (a caller may hold them); tuples are rebuilt
    when an element changed; other containers (namedtuples, registered pytrees) by JAX."""
    t = type(tree)
    if t is Placeholder:
        return concrete(tree)
    if t is list or t is tuple:
        values = [concrete(x) if type(x) is Placeholder else x if type(x) in LEAVES
                  else eager_value(x) for x in tree]
        if t is list:
            tree[:] = values
            return tree
        return tree if all(map(operator.is_, values, tree)) else tuple(values)
    if t is dict:
        for k, x in tree.items():
            tree[k] = eager_value(x)
        return tree
    if t in LEAVES:
        return tree
    return jax.tree_util.tree_map(lambda x: concrete(x) if type(x) is Placeholder else x, tree)
