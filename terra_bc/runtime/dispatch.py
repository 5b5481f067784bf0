"""The site dispatcher: where a rewritten call site sends a DL-op call (``_hook.c``).

Inside an iteration a co-executed plain op has been skipped in C already; what reaches
``on_site`` is the rest: ops of the general path, the autodiff transforms over user code,
and (once an iteration has ended, see ``context.close_iteration``) DL ops outside
any iteration, which run eagerly on concrete values.
"""
from __future__ import annotations

import functools
import sys
import types

import jax
from jax.tree_util import tree_leaves

from .. import frames
from ..counters import counts
from ..jaxpr_builder import EVAL_JAXPR, TRACE_TO_JAXPR_NOUNITS, ArrayImpl, Id, Jaxpr
from . import autodiff, bodies, discovery, guards, vmapping
from .context import EAGER, current, leaving, thread
from .placeholders import AT_METHODS, METHODS, Placeholder, eager
from .settings import MEMO_IDLE_TURNS
from .trace_rules import calls_given_function, code_of, grad_spec, is_api_wrapper, is_dl_op, is_jitted
from .values import is_array


try:  # what `x.at[i]` gives for a concrete x (jax 0.10.2 to 0.12)
    from jax._src.numpy.array_methods import _IndexUpdateRef as INDEX_UPDATE_REF
except ImportError:  # pragma: no cover
    INDEX_UPDATE_REF = None


def on_site(site, callee, *args, **kwargs):
    """A rewritten call site called a DL op (see ``_hook.c``)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    while type(callee) is functools.partial:  # the call it stands for: one guard key
        callee, args, kwargs = callee.func, callee.args + args, {**callee.keywords, **kwargs}
    try:
        if args and calls_given_function(callee):
            return _with_routed_function(callee, args, kwargs)
        it = current()
        if callee is jax.device_get or callee is jax.effects_barrier:
            return _not_an_op(it, callee, args, kwargs)
        if it is None:  # outside any iteration: values from past iterations are concrete
            discovery.mark_caller(sys._getframe(1).f_code)
            counts["ops_eager"] += 1
            thread.opaque += 1  # no loop unit opens inside the op
            try:
                return eager(callee, args, kwargs)
            finally:
                thread.opaque -= 1
        if callee is jax.eval_shape and args and it.opaque_depth and it.mode != EAGER:
            return _shapes_in_body(it, args, kwargs)
        if it.opaque_depth == 0 and it.mode != EAGER:
            if callee is jax.vjp and args and not kwargs.keys() - {"has_aux"}:
                return autodiff.vjp(it, _python_or_one_op(args[0]), args[1:], **kwargs)
            if callee is jax.jvp and len(args) == 3 and not kwargs.keys() - {"has_aux"}:
                return autodiff.jvp(it, _python_or_one_op(args[0]), *args[1:], **kwargs)
            if callee is jax.eval_shape and args:
                return _shapes(it, args, kwargs)
            if callee is TRACE_TO_JAXPR_NOUNITS and len(args) == 2:
                return bodies.partial_eval(it, *args, **kwargs)
            if callee is EVAL_JAXPR and len(args) >= 2 and type(args[0]) is Jaxpr \
                    and not kwargs.keys() - {"propagate_source_info"}:
                return bodies.evaluated(it, args[0], args[1], args[2:])
            if (made := vmapping.plan(it, callee, args, kwargs)) is not None:  # jax.vmap(f)
                return vmapping.call(it, made, args, kwargs, _called_as_at_a_site)
        if it.opaque_depth == 0:
            if (callee is jax.grad or callee is jax.value_and_grad) and len(args) == 1:
                return _gradient_function(it, callee, args, kwargs)
            if is_api_wrapper(callee):
                spec = it.remember(("grad spec", Id(callee)), lambda: grad_spec(callee))
                if spec is not None:
                    spec = spec._replace(fun=_python_or_one_op(spec.fun))
                    return autodiff.grad(it, callee, spec, args, kwargs)
        if isinstance(callee, types.MethodType) and not isinstance(callee.__self__, type):
            owner = callee.__self__
            if type(owner) is INDEX_UPDATE_REF:
                # x.at[i].add(v) on a concrete x: the op a placeholder's x.at[i].add(v) records,
                # x and i its inputs.  Passed as JAX's reference object, an index that is a
                # placeholder was hidden from the op (not a pytree): the op ran as opaque, and
                # JAX's own `i < 0` on the placeholder recursed without end.
                return it.op(AT_METHODS[callee.__name__], (owner.array, owner.index) + args, kwargs)
            args = (owner,) + args  # x.sum() on a concrete array: x is an input
            # (one guard key for x.sum() whether x is an array, a tracer or a placeholder)
            callee = _ARRAY_METHODS.get(callee.__func__, callee.__func__)
        return it.op(callee, args, kwargs)
    except BaseException as error:
        leaving(error)  # (an interrupt may have cut a step of the iteration short)
        raise


def _not_an_op(it, callee, args, kwargs):
    """``jax.device_get(tree)``: a fetch of each placeholder; ``jax.effects_barrier()``: the
    callbacks recorded so far run, then JAX waits for them (``Iteration.effects_barrier``)."""
    if it is None or it.opaque_depth:
        return callee(*args, **kwargs)
    if callee is jax.device_get and len(args) == 1 and not kwargs:
        return device_get(args[0])
    if callee is jax.effects_barrier and not args and not kwargs:
        it.effects_barrier()
    return callee(*args, **kwargs)


def _called_as_at_a_site(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` as a rewritten call site makes it: a DL op (a function
    jax.grad made) through ``on_site``, Python code as it is (its own sites route)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if is_dl_op(fn):
        return on_site(None, fn, *args, **kwargs)
    return fn(*args, **kwargs)


def device_get(tree):
    """``jax.device_get(tree)`` inside an iteration: each placeholder is fetched and handed to
    JAX's own device_get (a NumPy array, as eagerly), in tree order.  JAX's device_get
    returns a tracer as it is, and a placeholder is one to JAX: the program got the
    placeholder back, not the NumPy array eager JAX gives."""
    return jax.tree_util.tree_map(
        lambda x: x._fetch("device_get", jax.device_get) if isinstance(x, Placeholder)
        else jax.device_get(x), tree)


def _array_methods():
    """The functions behind jax.Array's and a tracer's methods -> the placeholder's (the
    ones it installs, and those its ``__getattr__`` makes)."""
    out = {}
    for cls in (ArrayImpl, jax.core.Tracer):
        for name in dir(cls):
            fn = getattr(cls, name, None)
            if isinstance(fn, types.FunctionType) and not name.startswith("_"):
                out[fn] = METHODS[name]
    return out


_ARRAY_METHODS = _array_methods()


def _python_or_one_op(fun):
    """A function differentiated inside an iteration runs as code of the iteration, its ops
    events.  One whose Python is not rewritten (code from ``exec`` such as an IPython
    ``%%time`` cell, an installed package out of scope) would hand JAX our placeholders
    directly: it runs as one op of the iteration instead, recorded as JAX runs it.  So does
    a jitted function (``jax.grad(jax.jit(loss))``): its Python is JAX's to trace, and
    called as it is it handed back an array of its own, not a value of the iteration."""
    if not is_jitted(fun):
        code = code_of(fun)
        if code is None or frames.runs_rewritten(code):
            return fun

    def one_op(*args, **kwargs):
        return current().op(fun, args, kwargs)
    one_op.__wrapped__ = fun  # (its guard key is fun's: trace_rules.body_key)
    return one_op


def _shapes(it, args, kwargs):
    """``jax.eval_shape(f, ...)`` of no array of the iteration: the shapes found for the same
    function over the same plain data in the last iteration serve again, as JAX's tracing
    cache serves a jitted function (``guards.traced_function_key``).  Flax linen checks every
    parameter's shape with one at every ``apply``; traced again, they were most of a small
    network's step.  One given an array is an op of the iteration (skipped, guarded)."""
    key = None
    if not any(map(is_array, tree_leaves((args, kwargs)))):
        key = guards.traced_function_key(args[0], args[1:], kwargs)
    if key is None:
        return it.op(jax.eval_shape, args, kwargs)
    return _remembered_shapes(it, key, lambda: it.op(jax.eval_shape, args, kwargs))


def _shapes_in_body(it, args, kwargs):
    """``jax.eval_shape(f, ...)`` inside a body JAX traces for the iteration (flax checks each
    parameter's shape so inside the cell an ``nn.scan`` traces at every call): reused under
    the same key as at the iteration's own level (``_shapes``); given a tracer or anything
    but plain data, run as JAX runs it."""
    key = guards.traced_function_key(args[0], args[1:], kwargs)
    if key is None:
        return jax.eval_shape(*args, **kwargs)
    return _remembered_shapes(it, key, lambda: jax.eval_shape(*args, **kwargs))


def _remembered_shapes(it, key, make):
    """The shapes ``make()`` found for ``key`` in this unit's recent iterations, else made."""
    found = []  # (made afresh, not reused)
    shapes = it.remember(("eval_shape", key), lambda: found.append(True) or make(),
                         MEMO_IDLE_TURNS)  # (plain data: kept while the unit skips some turns)
    if not found:
        counts["shapes_reused"] += 1
    return shapes


def _with_routed_function(utility, args, kwargs):
    """``jax.tree.map(f, ...)`` and the like run as Python; a DL op ``f`` is called as if
    from a rewritten site (an op of the open iteration, or eager outside one)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    f = args[0]
    if is_dl_op(f):
        args = (functools.partial(on_site, None, f),) + args[1:]
    return utility(*args, **kwargs)


def _gradient_function(it, make, args, kwargs):
    """``jax.grad(fun, ...)`` inside an iteration.  Making the gradient function costs more
    than the step's ops; JAX's holds no state but ``fun``, so the one made for this ``fun``
    in the last iteration serves again."""
    try:
        key = (make, Id(args[0]), tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:  # an unhashable option: made afresh
        return make(*args, **kwargs)
    return it.remember(key, lambda: make(*args, **kwargs))
