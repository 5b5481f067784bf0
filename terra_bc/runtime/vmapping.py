"""jax.vmap of Python code inside an iteration, its Python run as code of the iteration.

``jax.vmap(f)(xs)`` traces ``f`` at every call, so eager JAX runs ``f``'s Python at every
call, and so must we.  Traced by JAX at each call (``bodies``), every op of ``f`` costs
JAX's tracing machinery: an Equinox model's whole forward, each step.  Here ``f``'s Python
runs as code of the iteration on one example instead: each mapped argument is sliced to its
first example (an op), ``f``'s ops are events as usual (skipped in co-execution), and the
piece they recorded, between a "vmap-begin" and a "vmap-end" event, is batched by JAX as
one more op of the iteration, whose placeholders the call returns.  The one-example
equations are then kept only where something needs them (``Recorder.quiet``): the batched
op computes what the call returns, with the piece's effects batched.

One example's values are never shown to Python: a fetch, a graph break or an eager op of a
value computed from them raises JAX's own error for a batched tracer
(``Iteration.batched``), as eager JAX raises it.  A call this cannot run so (a named axis,
whose collectives need the batch; a function whose Python is not rewritten; a traced
iteration that computes values as it records) is traced by JAX as before (``bodies``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax._src.api_util import flatten_axes
from jax.tree_util import tree_flatten, tree_unflatten

from .. import frames
from ..counters import counts
from . import autodiff, launching, tracing
from .autodiff import differentiated_inputs, end_event
from .coexecution import retried
from .context import COEXEC, TRACE
from .events import ForwardEndEvent
from .guards import unsettled
from .placeholders import named
from .trace_rules import body_key, cells, code_of, grad_spec, is_dl_op, through_name_scopes, vmapped_by
from .values import is_array, shape_struct


class VmapCall(NamedTuple):
    """A ``jax.vmap`` call to run as code of the iteration: the function vmap was given and
    vmap's options as given."""
    fun: object
    in_axes: object
    out_axes: object
    axis_size: object


class Batching(NamedTuple):
    """A vmap call whose Python runs now (``Iteration.batching``): the mark and value count
    at its begin event, the ids of the one-example values, and the batch size."""
    start: int
    nvals: int
    example_ids: tuple
    size: int


class Piece(NamedTuple):
    """What a vmap call recorded: equations [start, end) from the one-example values
    ``example_ids`` (of the mapped leaves, whose axes are ``axes``) to the placeholders
    ``out_ids`` at ``out_where`` among the output's leaves (``out_tree``)."""
    start: int
    end: int
    example_ids: tuple
    axes: tuple
    out_ids: tuple
    out_where: tuple
    out_tree: object
    call: VmapCall


def plan(it, callee, args, kwargs):
    """``callee`` (what ``jax.vmap`` returned) called inside ``it`` as a ``VmapCall``, or
    None where JAX traces it (see module doc)."""
    inner = vmapped_by(callee)
    if inner is None:
        return None
    if it.mode == TRACE and not it.path.recorder.can_be_abstract():
        return None  # (each op would be computed now, on one example: a print would show it)
    free = cells(inner)
    axis_name = free.get("axis_name")  # (JAX's "no name" is a bare object(), or None)
    if not (axis_name is None or type(axis_name) is object) or free.get("spmd_axis_name") is not None \
            or free.get("sum_match") or "fun" not in free or not _runs_as_code(free["fun"]):
        return None
    return VmapCall(free["fun"], free.get("in_axes", 0), free.get("out_axes", 0), free.get("axis_size"))


def _runs_as_code(fun, depth=0):
    """Does calling ``fun`` run Python terra_bc rewrote (through jax.grad / value_and_grad
    and jax.vmap of such a function)?"""
    spec = grad_spec(fun)
    if spec is not None:
        fun = spec.fun
    inner = vmapped_by(fun)
    if inner is not None:
        return depth < 8 and _runs_as_code(cells(inner).get("fun"), depth + 1)
    if is_dl_op(fun):
        return False  # (one of JAX's functions: an op, as it is without vmap)
    code = code_of(fun)
    if code is None and not isinstance(fun, type):  # a callable object (an Equinox module)
        code = code_of(through_name_scopes(getattr(type(fun), "__call__", None)))
    return code is not None and frames.runs_rewritten(code)


@retried
def call(it, made, args, kwargs, dispatch):
    """``jax.vmap(made.fun, ...)(*args, **kwargs)`` inside ``it`` (see module doc);
    ``dispatch(fn, *args, **kwargs)`` calls ``fn`` as a rewritten call site does."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    leaves, tree = tree_flatten((args, kwargs))
    if isinstance(made.in_axes, tuple) and len(made.in_axes) != len(args):
        raise ValueError("vmap in_axes must be an int, None, or a tuple of entries corresponding "
                         "to the positional arguments passed to the function, "
                         f"but got len(in_axes)={len(made.in_axes)}, len(args)={len(args)}")
    axes = flatten_axes("vmap in_axes", tree, (made.in_axes, 0), kws=True)
    if it.mode == TRACE:  # (a recorded slice guards the avals that passed these checks)
        _refused_as_jax_refuses(it, made, leaves, axes, tree)
    mapped = [k for k, axis in enumerate(axes) if axis is not None]
    examples = [it.op(one_example, (leaves[k], axes[k]), {}) for k in mapped]
    key = ("vmap", body_key(made.fun), _hashable(made.in_axes), _hashable(made.out_axes),
           made.axis_size, tree)
    phs = differentiated_inputs(it, "vmap-begin", key, examples)
    begin = autodiff._begin_index(it)
    start = it.path.events[begin]
    one = list(leaves)
    for k, ph in zip(mapped, phs):
        one[k] = ph
    one_args, one_kwargs = tree_unflatten(tree, one)
    rec = it.path.recorder
    if it.mode == TRACE and not rec.abstract:  # (one example's values: never computed)
        rec.compute_values(launching.computer(it), lazy=True)
        eager_valued = rec
    else:
        eager_valued = None
    size = made.axis_size if made.axis_size is not None else leaves[mapped[0]].shape[axes[mapped[0]]]
    it.batching.append(Batching(start.mark, start.nvals, tuple(p._id for p in phs), size))
    try:
        out = autodiff._run_differentiated(it, functools.partial(dispatch, made.fun),
                                           one_args, one_kwargs)
    finally:
        it.batching.pop()
        if eager_valued is not None and eager_valued is it.path.recorder:
            eager_valued.compute_values(launching.computer(it), lazy=False)
    out_leaves, out_tree = tree_flatten(out)
    out_where = tuple(k for k, o in enumerate(out_leaves) if unsettled(o, it))
    ids = tuple(out_leaves[k]._id for k in out_where)
    end = end_event(it, "vmap-end", key, lambda ev: ev.ids == ids)
    if end is None:
        tracing.append(it, ForwardEndEvent, "vmap-end", key, ids=ids)
        end = it.path.events[-1]
    piece = Piece(start.mark, end.mark, tuple(p._id for p in phs), tuple(axes[k] for k in mapped),
                  ids, out_where, out_tree, made)
    others = tuple(o for k, o in enumerate(out_leaves) if k not in out_where)
    if it.mode == TRACE:  # (as the slices guard the avals, the recorded piece guards these)
        _out_axes_refused_as_jax_refuses(it, piece, out_leaves, size)
    batched = named(functools.partial(_batched, it, piece), "vmap_batched")
    result = it.op(batched, (tuple(leaves[k] for k in mapped), others), {}, ("vmap-apply", begin, key))
    if it.mode == TRACE:  # (the batched op computes what the call returns)
        first = begin - 2 * len(mapped) - 1  # (the event before the slices and their copies)
        it.path.recorder.quiet(it.path.events[first].mark if first >= 0 else 0, piece.end)
    counts["vmaps_recorded"] += 1
    return result


def one_example(x, axis):
    """The first example of ``x`` along ``axis``: what the vmapped function's Python runs on."""
    return jax.lax.index_in_dim(x, 0, axis, keepdims=False)


def _batched(it, piece, mapped, others):
    """While tracing: jax.vmap of the recorded piece, as a function of the one-example
    values, applied to the mapped arguments.  ``others``: the output's leaves that are not
    placeholders of the piece (constants, vmap broadcasts them as eagerly)."""
    seg = it.path.recorder.segment(list(piece.out_ids), piece.start, piece.end)  # (effects kept)
    outputs_of = autodiff._function_of(seg, [tracing.tracer(it, i) for i in seg.inputs],
                                       piece.example_ids)

    def one(*xs):
        outs, rest = iter(outputs_of(*xs)), iter(others)
        where = set(piece.out_where)
        flat = [next(outs) if k in where else next(rest)
                for k in range(len(piece.out_where) + len(others))]
        return tree_unflatten(piece.out_tree, flat)
    call = piece.call
    return jax.vmap(one, in_axes=piece.axes, out_axes=call.out_axes,
                    axis_size=call.axis_size)(*mapped)


def _refused_as_jax_refuses(it, made, leaves, axes, tree):
    """Raise the error jax.vmap raises for these axes and arguments (sizes that differ, an
    axis out of range, a number mapped), by running its checks on a stand-in of their avals."""
    args, kwargs = tree_unflatten(tree, [shape_struct(x) if is_array(x) else x for x in leaves])

    def stand_in(*a, **k):
        return None
    with tracing.outside_recording(it):
        jax.eval_shape(jax.vmap(stand_in, in_axes=made.in_axes, axis_size=made.axis_size),
                       *args, **kwargs)


def _out_axes_refused_as_jax_refuses(it, piece, out_leaves, size):
    """Raise the error jax.vmap raises for ``out_axes`` and these outputs (an unmapped
    axis for a mapped output, a structure out_axes does not fit), run on stand-ins: the
    batched op itself must not fail while it is recorded (it would run again eagerly)."""
    rec, where = it.path.recorder, set(piece.out_where)
    mapped = [k in where and rec.depends(x._id, piece.example_ids, piece.start, piece.end)
              for k, x in enumerate(out_leaves)]
    structs = [jax.ShapeDtypeStruct((size,) + x.aval.shape, x.aval.dtype)
               for x, m in zip(out_leaves, mapped) if m]

    def stand_in(*xs):
        xs = iter(xs)
        return tree_unflatten(piece.out_tree, [
            next(xs) if m else shape_struct(x) if k in where or is_array(x)
            else x for k, (x, m) in enumerate(zip(out_leaves, mapped))])
    with tracing.outside_recording(it):
        jax.eval_shape(jax.vmap(lambda *xs: jax.tree.map(_zeros_of, stand_in(*xs)),
                                out_axes=piece.call.out_axes, axis_size=size), *structs)


def _zeros_of(x):
    """A stand-in's leaf as a value: zeros of a ShapeDtypeStruct, else the leaf itself."""
    return jax.numpy.zeros(x.shape, x.dtype) if type(x) is jax.ShapeDtypeStruct else x


def _hashable(axes):
    leaves, tree = tree_flatten(axes, is_leaf=lambda x: x is None)
    return tuple(leaves), tree
