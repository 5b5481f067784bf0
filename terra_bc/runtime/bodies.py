"""Ops whose body's Python eager JAX runs again at a call: ``jax.vmap`` of Python code (it
traces its function at every call) and lax control flow given functions (``cond``, ``scan``,
``fori_loop``...: traced again unless JAX's tracing cache holds the same function objects).

Recorded once and skipped, such a body read the Python and NumPy state of the traced
iteration (``jax.vmap(lambda r: r * cfg["s"])`` with ``cfg`` changed since, a NumPy draw
inside).  So inside an iteration the call is traced by JAX (``make_jaxpr``), which runs
the body's Python exactly when eager JAX would (JAX's own caches decide), and the jaxpr it
gives is the op: its text is the guard key, its constants (a NumPy draw, a closed-over
array) are inputs fed like arrays Python hands the graph.  A body that computes the same
thing again is skipped as any op is; one that changed leaves the path there.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import jax
from jax.tree_util import tree_flatten, tree_structure, tree_unflatten

from ..counters import counts
from ..jaxpr_builder import ClosedJaxpr, as_fun
from .guards import callee_key
from .trace_rules import cells, unwrap
from .values import aval_of, is_array


class TracedBody(NamedTuple):
    """The guard key of a traced body: what JAX traced it to (the jaxpr's text, constants
    left out) and the structure of its result; ``op_name`` names it in reports."""
    op_name: str
    jaxpr: str
    out_tree: object


def op(it, fn, args, kwargs):
    """``fn(*args, **kwargs)`` (``trace_rules.retraced_body``) as an op of iteration ``it``:
    traced by JAX now, then recorded or matched as the op its jaxpr makes."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    leaves, tree = tree_flatten((args, kwargs))
    call, inputs = _with_inputs(fn, tree, leaves)
    it.opaque_depth += 1  # (the body's ops are JAX's to trace, not events)
    try:
        closed, shape = jax.make_jaxpr(call, return_shape=True)(*map(_spec, inputs))
    except Exception:
        closed = None
    finally:
        it.opaque_depth -= 1
    if closed is None:
        # JAX could not trace it abstractly where eager could (the body converts a value
        # it made to a Python number): run as it was given, its Python once more.
        counts["bodies_untraced"] += 1
        return it.op(fn, args, kwargs, callee_key(fn))
    counts["bodies_traced"] += 1
    out_tree = tree_structure(shape)
    key = TracedBody(_name(fn), str(closed.jaxpr), out_tree)
    replay = _Replay(closed.jaxpr, len(closed.consts), out_tree)
    return it.op(replay, tuple(closed.consts) + tuple(inputs), {}, key)


class _Replay:
    """The traced jaxpr as a function of its constants, then its inputs."""
    __slots__ = ("jaxpr", "nconsts", "out_tree")

    def __init__(self, jaxpr, nconsts, out_tree):
        self.jaxpr, self.nconsts, self.out_tree = jaxpr, nconsts, out_tree

    def __call__(self, *flat):
        n = self.nconsts
        outs = as_fun(ClosedJaxpr(self.jaxpr, list(flat[:n])))(*flat[n:])
        return tree_unflatten(self.out_tree, outs)


def _with_inputs(fn, tree, leaves):
    """A function of the call's arrays alone, and those arrays: every other leaf (functions,
    numbers, strings) stays as given.  A vmapped callable object that is a pytree (an
    Equinox module) gives its arrays as inputs too, so a module holding this iteration's
    parameters is traced over them rather than over copies of their values."""
    fun, fun_leaves, fun_tree = _vmapped_pytree(fn)
    every = fun_leaves + leaves
    where = [i for i, x in enumerate(every) if is_array(x)]
    nfun = len(fun_leaves)

    def call(*arrays):
        vals = list(every)
        for i, x in zip(where, arrays):
            vals[i] = x
        callee = fn if fun is None else _vmap_of(fn, tree_unflatten(fun_tree, vals[:nfun]))
        a, k = tree_unflatten(tree, vals[nfun:])
        return callee(*a, **k)
    return call, [every[i] for i in where]


def _vmapped_pytree(fn):
    """(the function jax.vmap was given, its leaves, its structure) when it is a pytree with
    arrays among its leaves; else (None, [], None)."""
    inner = unwrap(getattr(fn, "__func__", fn))
    if getattr(getattr(inner, "__code__", None), "co_name", "") != "vmap_f":
        return None, [], None
    fun = cells(inner).get("fun")
    if fun is None or isinstance(fun, types.FunctionType):
        return None, [], None
    fun_leaves, fun_tree = tree_flatten(fun)
    if not any(map(is_array, fun_leaves)):
        return None, [], None
    return fun, fun_leaves, fun_tree


def _vmap_of(fn, fun):
    """JAX's ``vmap_f`` of ``fn`` (its axes and options as given), mapping ``fun``."""
    inner = unwrap(getattr(fn, "__func__", fn))
    code = inner.__code__
    closure = tuple(types.CellType(fun) if name == "fun" else cell
                    for name, cell in zip(code.co_freevars, inner.__closure__))
    return types.FunctionType(code, inner.__globals__, inner.__name__, inner.__defaults__, closure)


def _spec(x):
    aval = aval_of(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def _name(fn):
    inner = unwrap(getattr(fn, "__func__", fn))
    if inner.__code__.co_name != "vmap_f":
        return inner.__qualname__
    fun = cells(inner).get("fun")
    return f"vmap({getattr(fun, '__qualname__', None) or type(fun).__name__})"
