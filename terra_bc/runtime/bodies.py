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

import functools
import types
from typing import NamedTuple

import jax
from jax.tree_util import tree_flatten, tree_structure, tree_unflatten

from ..counters import counts
from ..jaxpr_builder import ClosedJaxpr, as_fun
from .guards import callee_key, unsettled
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
    call, inputs = _with_inputs(it, fn, tree, leaves)
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


def _with_inputs(it, fn, tree, leaves):
    """A function of the call's arrays alone, and those arrays: every other leaf (functions,
    numbers, strings) stays as given.  The function ``jax.vmap`` was given contributes the
    arrays it carries (``_opened``), so that its use of this iteration's values is traced
    over them rather than over copies of their values."""
    fun_leaves, rebuild = _opened(it, _vmapped(fn))
    every = fun_leaves + leaves
    where = [i for i, x in enumerate(every) if is_array(x)]
    nfun = len(fun_leaves)

    def call(*arrays):
        vals = list(every)
        for i, x in zip(where, arrays):
            vals[i] = x
        callee = fn if rebuild is None else _vmap_of(fn, rebuild(vals[:nfun]))
        a, k = tree_unflatten(tree, vals[nfun:])
        return callee(*a, **k)
    return call, [every[i] for i in where]


def _vmapped(fn):
    """The function ``jax.vmap`` was given, if ``fn`` is what it returned."""
    inner = unwrap(getattr(fn, "__func__", fn))
    if getattr(getattr(inner, "__code__", None), "co_name", "") != "vmap_f":
        return None
    return cells(inner).get("fun")


def _opened(it, fun):
    """(the arrays ``fun`` carries, a function of new values for them that makes ``fun``
    again) where ``fun`` carries some (else ``([], None)``): a pytree's arrays (an Equinox
    module), a ``functools.partial``'s or a closure's values of this iteration
    (``jax.vmap(lambda x: mlp(params, x))`` with ``params`` a step's parameters).  Only for
    vmap, which has no tracing cache: lax control flow keeps the function object it was
    given, whose identity JAX's cache is keyed on."""
    if fun is None:
        return [], None
    if isinstance(fun, functools.partial):
        leaves, tree = tree_flatten((fun.args, fun.keywords))
        if not any(unsettled(x, it) for x in leaves):
            return [], None
        return leaves, lambda vals: _partial(fun.func, tree_unflatten(tree, vals))
    if type(fun) is types.FunctionType:
        return _closure_opened(it, fun)
    leaves, tree = tree_flatten(fun)
    if leaves == [fun] or not any(map(is_array, leaves)):
        return [], None
    return leaves, lambda vals: tree_unflatten(tree, vals)


def _partial(func, args_and_keywords):
    args, keywords = args_and_keywords
    return functools.partial(func, *args, **keywords)


def _closure_opened(it, fun):
    """A closure's cells that hold values of this iteration, opened (see ``_opened``)."""
    held = []  # (cell index, leaves, tree)
    for i, cell in enumerate(fun.__closure__ or ()):
        try:
            leaves, tree = tree_flatten(cell.cell_contents)
        except Exception:  # an empty cell, a pytree that will not flatten
            continue
        if any(unsettled(x, it) for x in leaves):
            held.append((i, leaves, tree))
    if not held:
        return [], None

    def rebuild(vals):
        closure, k = list(fun.__closure__), 0
        for i, leaves, tree in held:
            closure[i] = types.CellType(tree_unflatten(tree, vals[k:k + len(leaves)]))
            k += len(leaves)
        made = types.FunctionType(fun.__code__, fun.__globals__, fun.__name__,
                                  fun.__defaults__, tuple(closure))
        made.__kwdefaults__ = fun.__kwdefaults__
        return made
    return [x for _, leaves, _ in held for x in leaves], rebuild


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
