"""jax.grad / value_and_grad / vjp / jvp of user code inside an iteration.

The differentiated function's Python runs as ordinary code of the iteration, between a
begin and an end event, so its prints, NumPy draws and branches happen every iteration and
its ops are events as usual.  While tracing, the recorded forward (the equations between the
two events) is then differentiated with JAX; in co-execution the gradients are one more
recorded op whose placeholders the end event hands back.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import tree_flatten, tree_leaves, tree_unflatten

from .. import jaxpr_builder
from ..counters import counts
from . import coexecution, launching, tracing
from .coexecution import retried
from .context import COEXEC, EAGER, TRACE, current
from .events import BeginEvent, ForwardEndEvent, GradEndEvent, PlaceholderOut
from .guards import unsettled
from .placeholders import Placeholder, named
from .trace_rules import body_key
from .values import aval_of, is_array, shape_struct


def _begin_index(it):
    """The index of the begin event just passed (co-executed) or recorded (tracing)."""
    return it.pos - 1 if it.mode == COEXEC else len(it.path.events) - 1


def _own_value(x):
    """A copy of ``x``: a value of its own in the graph (see differentiated_inputs)."""
    return jax.lax.copy_p.bind(x)


def differentiated_inputs(it, kind, key, leaves):
    """The begin event of grad/vjp/jvp: placeholders for the differentiated inputs.  Tracing
    records it; co-execution checks it (each input the same placeholder, or an array of the
    recorded aval, fed) or raises Divergence.

    A differentiated input computed in this iteration enters as a copy (an op recorded
    before the begin event, co-executed like any other): the recorded forward is then
    differentiated with respect to the copy's value only.  Differentiated with respect to
    the value itself, a use of it the function makes through a closure
    (``jax.grad(lambda p: p * x)(x)``), or the same array given for two arguments, was
    differentiated too, where JAX treats it as a constant (the fuzzer's
    tests/fuzz/regressions/case_1013_units.py)."""
    leaves = [it.op(_own_value, (x,), {}) if unsettled(x, it) else x for x in leaves]
    if it.mode == TRACE:
        phs = [x if unsettled(x, it) else tracing.wrap(it, tracing.feed(it, x)) for x in leaves]
        tracing.append(it, BeginEvent, kind, key, ids=tuple(p._id for p in phs),
                       avals=tuple(p.aval for p in phs))
        return phs

    def check(ev):
        if len(leaves) != len(ev.ids):
            return False
        for x, id, aval in zip(leaves, ev.ids, ev.avals):
            if unsettled(x, it):
                if x._id != id:
                    return False
            elif not (is_array(x) and aval_of(x) == aval):
                return False
        return True
    ev = coexecution.next_event(it, kind, key, check, leaves)
    it.pos += 1
    phs, feeds = [], []
    for x, id, aval in zip(leaves, ev.ids, ev.avals):
        if not unsettled(x, it):  # a feed: bind its value, hand the function a placeholder
            feeds.append((id, x))
            x = it.new_placeholder(id, aval)
        phs.append(x)
    coexecution.bind(it, feeds)
    return phs


@retried
def _passed_end(it, kind, key, check):
    if it.mode != COEXEC:
        return None
    ev = coexecution.next_event(it, kind, key, check)
    it.pos += 1
    return ev


def end_event(it, kind, key, check=None):
    """Co-execution: the end event of grad/vjp/jvp.  None while tracing, and after a
    divergence here, which traces (never an eager tail: the gradient needs the recording)."""
    it.grad_depth += 1
    try:
        return _passed_end(it, kind, key, check)
    finally:
        it.grad_depth -= 1


def _run_differentiated(it, fun, args, kwargs):
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    it.grad_depth += 1
    try:
        with jaxpr_builder.differentiating():  # (the trace state libraries see: a JVP's)
            return fun(*args, **kwargs)
    finally:
        it.grad_depth -= 1


# ------------------------------------------------------------------ jax.grad / value_and_grad

@retried
def grad(it, callee, spec, args, kwargs):
    """``callee`` (made by jax.grad or value_and_grad, described by ``spec``) called on
    ``args``: ``spec.fun``'s Python runs as code of this iteration, then the equations it
    recorded are differentiated."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if it.mode == EAGER:
        return it.op(callee, args, kwargs)
    args = list(args)
    if it.mode == TRACE:  # (a recorded begin event guards avals that passed these checks)
        _refused_as_jax_refuses(it, spec, [args[i] for i in spec.nums if i < len(args)])
    trees = [tree_flatten(args[i]) for i in spec.nums]
    phs = iter(differentiated_inputs(it, "grad-begin", spec.key, [x for ls, _ in trees for x in ls]))
    begin = _begin_index(it)
    diff = []
    for i, (ls, tree) in zip(spec.nums, trees):
        diff.append((tree, [next(phs) for _ in ls]))
        args[i] = tree_unflatten(tree, diff[-1][1])
    out = _run_differentiated(it, spec.fun, args, kwargs)  # its ops are events as usual
    end = end_event(it, "grad-end", spec.key)
    if end is None:  # traced (or fun left the recorded path): differentiate the recording
        return _trace_grad(it, spec, it.path.events[begin].mark, diff, out)
    counts["ops_skipped"] += 1
    value, grads = tree_unflatten(end.out_tree, coexecution.outputs(it, end.outs))
    return _grad_result(spec, value, grads, out[1] if spec.has_aux else None)


def _trace_grad(it, spec, start, diff, out):
    value, aux = out if spec.has_aux else (out, None)
    if is_array(value):
        _refused_as_jax_refuses(it, spec, [tree_unflatten(tree, phs) for tree, phs in diff], aval_of(value))
    if type(value) is not Placeholder or value._it is not it or value._rec is None:
        raise TypeError("terra_bc: the differentiated function must return a scalar array")
    rec = it.path.recorder
    stop = rec.mark()
    diff_ids = [p._id for _, phs in diff for p in phs]
    primals = [tracing.tracer(it, i) for i in diff_ids]
    held = _forward_values_held(it, start, stop, value._id)
    it.opaque_depth += 1
    try:
        with rec.recording_op():
            value_t, flat = _differentiated(it, start, stop, value._id, held, diff_ids, primals)
    finally:
        it.opaque_depth -= 1
    grads, k = [], 0
    for tree, phs in diff:
        grads.append(tree_unflatten(tree, [tracing.wrap(it, g) for g in flat[k:k + len(phs)]]))
        k += len(phs)
    grads = grads[0] if isinstance(spec.argnums, int) else tuple(grads)
    value = tracing.wrap(it, value_t)
    out_leaves, out_tree = tree_flatten((value, grads))
    tracing.append(it, GradEndEvent, "grad-end", spec.key, out_tree=out_tree,
                   outs=tuple(PlaceholderOut(p._id, p.aval) for p in out_leaves))
    counts["ops_traced"] += 1
    return _grad_result(spec, value, grads, aux)


def _forward_values_held(it, start, stop, value_id):
    """Ids of the values the forward (equations [start, stop)) made that Python holds (an
    aux output, logits kept for metrics): later work reads them."""
    made = it.path.recorder.wiring(start, stop)[1]
    return sorted({p._id for p in launching.alive(it)} & made - {value_id})


def _differentiated(it, start, stop, value_id, held, diff_ids, primals):
    """(value, flat gradients) of the recorded forward [start, stop), recorded.  The values
    of ``held`` are computed by the linearized forward too and taken from there
    (``Recorder.alias``): eager JAX's value_and_grad returns its aux from that forward, and
    a segment then computes the forward once, where it computed it twice (BERT classifier:
    56 matrix products against jax.jit's 42).  A forward JAX cannot linearize with them (a
    callback behind a metric) is differentiated for its value alone, as before."""
    rec = it.path.recorder
    if held:
        since = rec.mark()
        try:
            value_t, flat, again = _vjp(it, start, stop, [value_id] + held, diff_ids, primals)
        except Exception:  # (its equations recorded so far are read by nothing: dead code)
            pass
        else:
            rec.alias([(i, t.id) for i, t in zip(held, again) if rec.owns(t)], since)
            return value_t, flat
    value_t, flat, _ = _vjp(it, start, stop, [value_id], diff_ids, primals)
    return value_t, flat


def _vjp(it, start, stop, out_ids, diff_ids, primals):
    """(first output, its flat gradients, the other outputs) of the recorded forward
    [start, stop) computing ``out_ids``, differentiated with respect to ``diff_ids``."""
    seg = it.path.recorder.segment(out_ids, start, stop, pure=True)  # (effects stay in the forward)
    outputs_of = _function_of(seg, [tracing.tracer(it, i) for i in seg.inputs], diff_ids)

    def value_and_rest(*xs):
        outs = outputs_of(*xs)
        return outs[0], outs[1:]
    value_t, vjp, rest = jax.vjp(value_and_rest, *primals, has_aux=True)
    return value_t, vjp(jnp.ones_like(value_t)), rest


def _refused_as_jax_refuses(it, spec, diff_args, out_aval=None):
    """Raise the TypeError jax.grad / value_and_grad raises for differentiated arguments
    like ``diff_args`` and an output of ``out_aval`` (a non-scalar, integer or complex
    output; an integer input), by running JAX's own checks abstractly on a stand-in of
    those avals: the same exception and message as eager, where before the recorded
    forward was differentiated as if it were a scalar.  JAX checks the inputs before it
    runs the function, so they are checked first (``out_aval`` None)."""
    out = jax.ShapeDtypeStruct((), jnp.float32) if out_aval is None else out_aval

    def stand_in(*xs):
        value = jnp.zeros(out.shape, out.dtype)
        return (value, None) if spec.has_aux else value
    structs = jax.tree_util.tree_map(lambda x: shape_struct(x) if is_array(x) else x, diff_args)
    checked = jax.grad(stand_in, argnums=tuple(range(len(structs))), has_aux=spec.has_aux)
    with tracing.outside_recording(it):  # (JAX's checks, under the trace eager JAX runs under)
        jax.eval_shape(checked, *structs)


def _function_of(seg, inputs, diff_ids):
    """Segment ``seg`` as a function of the values ``diff_ids``: its other inputs are taken
    from ``inputs`` (one per ``seg.inputs``)."""
    fn = jaxpr_builder.as_fun(seg.jaxpr)
    where = {id: k for k, id in enumerate(seg.inputs)}

    def outputs_of(*xs):
        vals = list(inputs)
        for id, x in zip(diff_ids, xs):
            if id in where:
                vals[where[id]] = x
        return fn(*vals)
    return outputs_of


def _grad_result(spec, value, grads, aux):
    """What jax.grad / jax.value_and_grad return, with or without has_aux."""
    if spec.returns_value:
        return ((value, aux), grads) if spec.has_aux else (value, grads)
    return (grads, aux) if spec.has_aux else grads


# ------------------------------------------------------------------ jax.vjp / jax.jvp

class Forward(NamedTuple):
    """A vjp/jvp's recorded forward: equations [start, end) from ``diff_ids`` to ``out_ids``."""
    start: int
    end: int
    diff_ids: list        # the differentiated inputs' value ids
    out_ids: list         # the forward's outputs' value ids
    trees: list           # (leaves, treedef) of each primal
    out_tree: object      # the forward's output structure


def _forward_of(it, kind, fun, primals, has_aux):
    """``fun``'s Python runs as code of this iteration between "<kind>-begin" and
    "<kind>-end" events.  Returns (out, aux, plan, key of the op that differentiates the
    recorded forward); raises Divergence only at the begin event."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    key = (kind, body_key(fun), has_aux)
    trees = [tree_flatten(p) for p in primals]
    phs = differentiated_inputs(it, kind + "-begin", key, [x for ls, _ in trees for x in ls])
    begin = _begin_index(it)
    inputs = iter(phs)
    result = _run_differentiated(
        it, fun, [tree_unflatten(tree, [next(inputs) for _ in ls]) for ls, tree in trees], {})
    out, aux = result if has_aux else (result, None)
    out_leaves, out_tree = tree_flatten(out)
    if not all(unsettled(o, it) for o in out_leaves):
        raise TypeError(f"terra_bc: jax.{kind} of a function that returns non-array values")
    ids = tuple(o._id for o in out_leaves)
    end = end_event(it, kind + "-end", key, lambda ev: ev.ids == ids)
    if end is None:
        tracing.append(it, ForwardEndEvent, kind + "-end", key, ids=ids)
        end = it.path.events[-1]
    plan = Forward(it.path.events[begin].mark, end.mark, [p._id for p in phs], list(ids),
                   trees, out_tree)
    return out, aux, plan, (kind + "-apply", begin, key)


@retried
def vjp(it, fun, primals, has_aux=False):
    """``jax.vjp(fun, *primals)``: the function returned computes the cotangents of the
    recorded forward as one op of the iteration (an event like any other)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if it.mode == EAGER:
        return it.op(jax.vjp, (fun,) + tuple(primals), {"has_aux": has_aux})
    out, aux, plan, key = _forward_of(it, "vjp", fun, primals, has_aux)
    vjp_fn = functools.partial(_apply_vjp, it, key, plan)
    return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


@retried
def jvp(it, fun, primals, tangents, has_aux=False):
    """``jax.jvp(fun, primals, tangents)``: the tangents of the recorded forward are one op
    of the iteration."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if it.mode == EAGER:
        return it.op(jax.jvp, (fun, primals, tangents), {"has_aux": has_aux})
    tangent_leaves, tangent_tree = tree_flatten(tuple(tangents))
    if tangent_tree != tree_flatten(tuple(primals))[1]:
        raise TypeError(f"terra_bc: jax.jvp tangents {tangent_tree} do not match the "
                        f"primals {tree_flatten(tuple(primals))[1]}")
    out, aux, plan, key = _forward_of(it, "jvp", fun, primals, has_aux)
    forward_tangents = named(functools.partial(_tangents, it, plan), "jvp_tangents")
    outs = it.op(forward_tangents, tuple(tangent_leaves), {}, key)
    tangents_out = tree_unflatten(plan.out_tree, list(outs))
    return (out, tangents_out, aux) if has_aux else (out, tangents_out)


def _recorded_forward(it, plan):
    """The recorded forward [start, end) of a vjp/jvp as a function of the differentiated
    inputs, and those inputs (tracers while tracing, values in an eager tail)."""
    seg = it.path.recorder.segment(plan.out_ids, plan.start, plan.end, pure=True)
    # Past a frozen unit's divergence (eager mode) it runs on computed values.
    if it.mode == TRACE:
        value = functools.partial(tracing.tracer, it)
    else:
        value = lambda i: launching.value(it, i, plan.end)  # noqa: E731
    outputs_of = _function_of(seg, [value(i) for i in seg.inputs], plan.diff_ids)
    return (lambda *xs: list(outputs_of(*xs))), [value(i) for i in plan.diff_ids]


def _tangents(it, plan, *tangents):
    forward, primals = _recorded_forward(it, plan)
    _, out = jax.jvp(forward, primals, list(tangents))
    return list(out)


def _backward(it, plan, *cts):
    """While tracing: jax.vjp of the recorded forward [start, end), applied to cts."""
    forward, primals = _recorded_forward(it, plan)
    _, pullback = jax.vjp(forward, *primals)
    flat = pullback(list(tree_leaves(cts)))
    grads, k = [], 0
    for ls, tree in plan.trees:
        grads.append(tree_unflatten(tree, list(flat[k:k + len(ls)])))
        k += len(ls)
    return tuple(grads)


def _apply_vjp(it, key, plan, ct):
    """The function jax.vjp returned, inside a unit: one op of the iteration."""
    if current() is not it:
        raise RuntimeError("terra_bc: a function returned by jax.vjp inside a co-executed "
                           "iteration was called after that iteration ended; call it in the "
                           "same call (or loop turn), or run this code without terra_bc")
    if tree_flatten(ct)[1] != plan.out_tree:
        raise TypeError(f"terra_bc: jax.vjp cotangent structure {tree_flatten(ct)[1]} differs "
                        f"from the primal output structure {plan.out_tree}")
    backward = named(functools.partial(_backward, it, plan), "vjp_backward")
    return it.op(backward, tuple(tree_leaves(ct)), {}, key)
