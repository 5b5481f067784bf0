"""Which callees are DL ops, and what JAX's own wrappers hold: the one table of "which code
is traced" (as TorchDynamo keeps ``trace_rules.py``).

A DL op is a function of JAX's sources (``jax.numpy``, ``lax``, ``jax.nn``, transforms ...)
or a callable object JAX defines (a jitted function).  A rewritten call site asks
``is_dl_op`` once per kind of callee (``_hook.c`` caches the answer per site); inside an
iteration such calls go to the runtime, everything else is plain Python.
"""
from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from ..scope import is_library

JAX_DIRS = (os.path.dirname(jax.__file__) + os.sep,)
# JAX functions that read only dtypes, shapes and types (what a placeholder carries as it
# is): they run as Python, not as events to guard and skip.  (jax.eval_shape stays an op:
# it runs the function it is given under JAX's tracing, which caches it as jit does; as an
# op it is skipped with its shapes checked.)
METADATA_FUNCTIONS = frozenset({"result_type", "promote_types", "can_cast", "issubdtype",
                                "isdtype", "isrealobj", "iscomplexobj", "typeof"})
# JAX functions that are Python-level utilities, not ops: tree_map(f, ...) must run f as
# the iteration's own code (its ops are events), block_until_ready fetches.  (device_get is
# routed: JAX's own returns a tracer, and so a placeholder, as it is: dispatch.device_get.)
NOT_OPS_FILES = (os.sep + "tree_util.py", os.sep + "tree.py")
# JAX's configuration (jax.config.update, the State objects behind jax.enable_x64(...),
# jax.default_device(...)): not ops; a change the program makes while an iteration is open
# is watched where JAX makes it (tools.before_change).
CONFIG_FILE, CONFIG_MODULE = os.sep + os.path.join("_src", "config.py"), "jax._src.config"
NOT_OPS_NAMES = frozenset({"block_until_ready"}) | METADATA_FUNCTIONS
# JAX's tracing plumbing, which libraries call to trace a body themselves (flax's nn.scan:
# debug_info, flatten_fun_nokwargs, wrap_init): it wraps functions and names arguments, and
# never computes on an array.  As ops, the fresh objects debug_info returns were static
# outputs compared by identity, and every turn left its path there.
PLUMBING_FILES = (os.sep + "api_util.py", os.sep + "linear_util.py")
# Pytree utilities that call a function they are given (jax.tree.map(jnp.sum, grads)):
# routed, so that such a function, when it is a DL op, is called as an op of the iteration
# (JAX's own code, which calls it, is not rewritten).  See dispatch.on_site.
CALLS_GIVEN_FUNCTION = frozenset({"tree_map", "map", "tree_map_with_path", "map_with_path",
                                  "tree_reduce", "reduce"})
SPMD_FILES = (os.sep + "shard_map.py", os.sep + "pmap.py")  # their wrappers trace bodies
GRAD_FUNCTIONS = ("grad_f", "grad_f_aux")  # what jax.grad returns
VALUE_AND_GRAD_FUNCTION = "value_and_grad_f"
API_WRAPPER = "reraise_with_filtered_traceback"  # traceback_util's wrapper of JAX's API
# JAX wrappers that only add context around what they wrap (file, function name): the
# traceback filter of api_boundary, and a name-stack scope (jax.named_call).
TRANSPARENT_WRAPPERS = frozenset({("traceback_util.py", API_WRAPPER),
                                  ("source_info_util.py", "wrapper")})


def is_jax_code(code):
    """Is ``code`` JAX's own (its implementation: never the program's, never rewritten)?"""
    return code.co_filename.startswith(JAX_DIRS)


def is_dl_op(callee):
    """Does a call of ``callee`` compute on arrays with JAX (and so belong to the graph)?"""
    try:
        return _is_dl_op(callee)
    except Exception:  # an object whose attribute lookup raises: not one of JAX's
        return False


def _is_dl_op(callee):
    if type(callee) is functools.partial:  # (flax's partial(jnp.einsum, precision=...))
        return _is_dl_op(callee.func)
    fn = getattr(callee, "__func__", callee)
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):  # (a class's __code__ may be a descriptor)
        if not code.co_filename.startswith(JAX_DIRS):
            return False
        if (code.co_filename.rsplit(os.sep, 1)[-1], code.co_name) in TRANSPARENT_WRAPPERS:
            # JAX's wrappers that only add context wrap library functions too (flax's
            # Module.apply, haiku's module methods): what they wrap decides, so a library's
            # function runs as Python, op by op.
            # (What runs is the wrapper's closure: __wrapped__ may name the user's function
            # even where JAX's own code runs, as for what jax.value_and_grad returns.)
            free = cells(fn)
            inner = free.get("fun", free.get("func"))
            return inner is None or _is_dl_op(inner)
        if code.co_filename.endswith(NOT_OPS_FILES):
            return _calls_given_function(code)
        return code.co_name not in NOT_OPS_NAMES and not code.co_filename.endswith(
            (CONFIG_FILE,) + PLUMBING_FILES)
    module = getattr(type(callee), "__module__", "") or ""
    return module.startswith(("jax", "jaxlib")) and module != CONFIG_MODULE and callable(callee)


def custom_rules_of_the_program(callee):
    """Is ``callee`` a ``jax.custom_vjp`` / ``custom_jvp`` function whose differentiation rules
    are the program's own code?  Eager JAX runs those rules' Python at every gradient (their
    effects too); recorded as an op, they ran once, when the op was recorded.  (JAX's own,
    ``jax.nn.relu``'s, and a library's are taken as JAX takes them: traced.)"""
    if type(callee).__name__ not in ("custom_vjp", "custom_jvp") \
            or not type(callee).__module__.startswith("jax."):
        return False
    for name in ("fwd", "bwd", "jvp"):
        code = getattr(unwrap(getattr(callee, name, None)), "__code__", None)
        filename = getattr(code, "co_filename", None)
        if filename is not None and not filename.startswith(JAX_DIRS) and not is_library(filename):
            return True
    return False


def calls_given_function(callee):
    """Is ``callee`` a pytree utility that calls the function it is given first?"""
    code = getattr(callee, "__code__", None)
    return isinstance(code, types.CodeType) and _calls_given_function(code)


def _calls_given_function(code):
    return (code.co_name in CALLS_GIVEN_FUNCTION and code.co_filename.startswith(JAX_DIRS)
            and code.co_filename.endswith(NOT_OPS_FILES))


def is_jitted(callee):
    """A function ``jax.jit`` (or ``jax.pmap``) made: JAX traces its Python, once per
    signature."""
    return type(callee).__name__ in ("PjitFunction", "PmapFunction")


def traces_its_body(callee):
    """Opaque DL ops whose Python body JAX itself only traces (jit, vmap, lax control flow,
    eval_shape, shard_map, pmap): the Python they run is JAX's business, not code of the
    iteration.  (Eager JAX runs a shard_map body op by op at every call; terra_bc stages it
    once per path, as jax.jit of the caller would: docs/distributed.md.)"""
    if is_jitted(callee):
        return True
    code = getattr(unwrap(getattr(callee, "__func__", callee)), "__code__", None)
    return code is not None and ("control_flow" in code.co_filename
                                 or code.co_name in ("vmap_f", "eval_shape")
                                 or code.co_filename.endswith(SPMD_FILES))


def retraced_body(callee, leaves):
    """Is ``callee(*leaves)`` an op whose body's Python eager JAX runs again at a call
    (``runtime/bodies.py``)?  ``jax.vmap`` traces its function at every call; lax control
    flow (cond, scan, while/fori loops, switch, map) traces the functions it is given unless
    JAX's tracing cache holds them (the same function objects).  Recorded once and skipped,
    such a body read Python or NumPy state as of the traced iteration.  Bodies that are
    JAX's own functions (``jax.vmap(jnp.dot)``) compute from their arguments alone."""
    if type(callee) is not types.FunctionType:  # (what vmap and lax return or are)
        return False
    inner = made_by_transform(callee)
    if inner is not None:
        fun = cells(inner).get("fun")
        return not _jax_function(fun) or retraced_body(fun, leaves)
    code = code_of(callee)
    return code is not None and code.co_filename.startswith(JAX_DIRS) \
        and "control_flow" in code.co_filename and any(
        callable(x) and not isinstance(x, type) and not _jax_function(x) for x in leaves)


# lax control flow that traces the function it is given at every call, cache or no cache
# (measured on jax 0.10.2 and 0.12: lax.map wraps it in a new function for scan;
# associative_scan calls it directly); the others trace a function object once.
UNCACHED_CONTROL_FLOW = frozenset({"map", "associative_scan"})


def jax_caches_body(callee):
    """Does JAX's tracing cache serve ``callee``'s body again when it is given the same
    function objects (lax.scan, cond, while/fori loops, switch)?"""
    code = code_of(callee)
    return code is not None and "control_flow" in code.co_filename \
        and code.co_name not in UNCACHED_CONTROL_FLOW


# What jax.vmap, jax.jacrev / jacfwd / hessian and jax.checkpoint return: JAX traces the
# function they were given (their cell ``fun``) at every call.
TRANSFORMED_FUNCTIONS = ("vmap_f", "jacfun", "fun_remat")


def _made_by(callee, names):
    """JAX's function inside ``callee`` (through its API wrappers and a bound method) if
    its code is JAX's and named one of ``names``, else None."""
    inner = unwrap(getattr(callee, "__func__", callee))
    code = getattr(inner, "__code__", None)
    if isinstance(code, types.CodeType) and code.co_name in names \
            and code.co_filename.startswith(JAX_DIRS):
        return inner
    return None


def made_by_transform(callee):
    """JAX's function inside ``callee`` if one of TRANSFORMED_FUNCTIONS made it, or None."""
    return _made_by(callee, TRANSFORMED_FUNCTIONS)


def vmapped_by(callee):
    """JAX's ``vmap_f`` inside ``callee`` (what ``jax.vmap`` returned), or None."""
    return _made_by(callee, ("vmap_f",))


def _jax_function(fun):
    """Is ``fun`` one of JAX's own functions (through wrappers and partials)?  A callable
    object of another's class (an Equinox module, whose ``__call__`` JAX's name-scope
    wrapper wraps) is not: its Python and the arrays it holds are the program's."""
    if not isinstance(fun, (types.FunctionType, types.MethodType, functools.partial)) \
            and not (getattr(type(fun), "__module__", None) or "").startswith(("jax", "jaxlib")):
        return False
    code = body_key(fun)
    return isinstance(code, types.CodeType) and code.co_filename.startswith(JAX_DIRS) and (
        code.co_name not in ("vmap_f",) + GRAD_FUNCTIONS + (VALUE_AND_GRAD_FUNCTION,))


def dispatched_as_is(callee):
    """A function the program jitted itself (``jax.jit`` of code outside JAX's sources: the
    user's step, a library's ``nnx.jit``/``filter_jit`` inner function): it is dispatched as
    JAX dispatches it, its executable from JAX's own cache, as a graph break.  Recorded, the
    same computation would be compiled again inside each segment and each path holding it.
    A jit marked ``inline=True`` (optax's ``tree_bias_correction``) is a piece its author
    meant to be inlined into the computation that calls it: it is recorded as one op, as a
    ``jnp`` function is, and a graph break there would split every step's segment."""
    if type(callee).__name__ != "PjitFunction":
        return False
    if _inlined_by_jax(getattr(getattr(callee, "_jit_info", None), "inline", False)):
        return False
    code = code_of(getattr(callee, "__wrapped__", None))
    return code is not None and not code.co_filename.startswith(JAX_DIRS)


def _inlined_by_jax(inline):
    # jax 0.10: a bool; 0.12: jax.Inline, AUTO by default, JAX_LATE for inline=True.
    return inline is True or str(getattr(inline, "value", "")).startswith("jax_")


# Functions that make an array from Python data alone (jnp.array(1, jnp.int32), jnp.zeros
# (shape), jnp.arange(n)): given no array, they are still ops of the iteration, recorded
# and skipped, their numbers guarded (optax's safe_increment makes two per step; run
# eagerly at every step they were a sixth of an Adam step).
ARRAY_BUILDER_FILES = tuple(os.sep + os.path.join("numpy", f)
                            for f in ("array_constructors.py", "array_creation.py"))
ARRAY_BUILDER_NAMES = frozenset({"arange", "eye", "identity", "tri"})
PLAIN_DATA = frozenset({int, float, bool, complex, str, type(None)})


def builds_array_from(callee, leaves):
    """Is ``callee(*leaves)`` an array made from plain Python data (numbers, shapes,
    dtypes) by one of JAX's array constructors?"""
    if not all(type(x) in PLAIN_DATA or isinstance(x, (type, np.dtype)) for x in leaves):
        return False
    code = code_of(callee)
    if code is None or not code.co_filename.startswith(JAX_DIRS):
        return False
    return code.co_filename.endswith(ARRAY_BUILDER_FILES) or (
        code.co_name in ARRAY_BUILDER_NAMES and code.co_filename.endswith("lax_numpy.py"))


# JAX's transforms that take a function and return one, computing nothing: called inside an
# iteration they run as JAX's Python, given what the program gave them.  Given a callable
# pytree holding this iteration's arrays (an Equinox module: jax.vmap(model)), they are not
# ops: recorded as one, the function they return (holding the traced iteration's values)
# came back as a recorded static at every later iteration, with the first turn's weights.
# (jax.grad and value_and_grad are dispatch._gradient_function; jax.jit's result is an op.)
TRANSFORM_MAKERS = frozenset({jax.vmap, jax.checkpoint, jax.jacrev, jax.jacfwd, jax.hessian,
                              jax.named_call})


def makes_transform(callee):
    """Is ``callee`` one of JAX's transforms that only make a function (TRANSFORM_MAKERS)?"""
    try:
        return callee in TRANSFORM_MAKERS
    except TypeError:  # (an unhashable callable)
        return False


def takes_elements(callee):
    """Is ``callee`` ``jnp.array`` / ``jnp.asarray``, whose first argument's numbers are the
    array's elements (data, never a shape or an axis)?"""
    code = code_of(callee)
    return code is not None and code.co_name in ("array", "asarray") \
        and code.co_filename.startswith(JAX_DIRS) and code.co_filename.endswith(ARRAY_BUILDER_FILES)


def is_api_wrapper(callee):
    """Is ``callee`` a function JAX's API wrapped (what jax.grad(f) returns is one)?"""
    code = getattr(callee, "__code__", None)
    return code is not None and code.co_name == API_WRAPPER


def unwrap(fn):
    """The function inside traceback_util's wrappers of JAX's API functions."""
    while getattr(getattr(fn, "__code__", None), "co_name", "") == API_WRAPPER:
        fn = cells(fn)["fun"]
    return fn


def cells(fn):
    """A closure's free variables by name (those with a value)."""
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


def code_of(fun):
    """The code object a call of ``fun`` runs first, through JAX's API wrappers, partials
    and bound methods (None for a callable object or a builtin)."""
    fun = unwrap(fun)
    while isinstance(fun, functools.partial):
        fun = fun.func
    code = getattr(getattr(fun, "__func__", fun), "__code__", None)
    return code if isinstance(code, types.CodeType) else None


# JAX's decorator that only names a scope for the code it wraps (``jax.named_scope`` used as
# a decorator: Equinox's modules' ``__call__``): the wrapped code runs as the call.
NAME_SCOPE_FILE = os.sep + "source_info_util.py"


def through_name_scopes(fn):
    """``fn`` without the ``named_scope`` decorators around it."""
    while hasattr(fn, "__wrapped__") and getattr(
            getattr(fn, "__code__", None), "co_filename", "").endswith(NAME_SCOPE_FILE):
        fn = fn.__wrapped__
    return fn


def body_key(fun):
    """The guard key of a function whose body runs as code of the iteration (grad, vjp): its
    code.  Its closure (a fresh lambda over this step's batch), a partial's arguments or a
    callable object's attributes (a library's wrapper made afresh each step) need no guard:
    every op of the body is checked as it runs."""
    fun = unwrap(fun)
    for _ in range(16):  # (a bound: an object may claim any attribute)
        if isinstance(fun, functools.partial):
            fun = fun.func
        elif isinstance(getattr(fun, "__wrapped__", None), Callable):
            fun = fun.__wrapped__
        else:
            break
    code = code_of(fun)
    if code is None:
        code = getattr(getattr(type(fun), "__call__", None), "__code__", None)
    return code if isinstance(code, types.CodeType) else fun


class Grad(NamedTuple):
    """What a gradient function made by jax.grad / value_and_grad differentiates."""
    fun: object            # the user's function
    argnums: object        # as given (an int: one gradient, not a tuple of them)
    has_aux: bool
    returns_value: bool    # value_and_grad
    nums: tuple            # argnums as a tuple
    key: tuple             # the guard key of its begin and end events


def grad_spec(callee):
    """What ``jax.grad(fun, ...)`` / ``jax.value_and_grad(fun, ...)`` made ``callee`` from,
    as a ``Grad`` record, or None for anything else (or options we do not co-execute)."""
    fn = unwrap(callee)
    name = getattr(getattr(fn, "__code__", None), "co_name", "")
    if name in GRAD_FUNCTIONS:
        fn, returns_value = unwrap(cells(fn).get(VALUE_AND_GRAD_FUNCTION)), False
    elif name == VALUE_AND_GRAD_FUNCTION:
        returns_value = True
    else:
        return None
    free = cells(fn)
    if "fun" not in free or free.get("holomorphic") or free.get("allow_int"):
        return None
    fun, argnums, has_aux = free["fun"], free["argnums"], free["has_aux"]
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    return Grad(fun, argnums, has_aux, returns_value, nums,
                ("grad", body_key(fun), nums, has_aux, returns_value))
