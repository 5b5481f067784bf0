"""Ops whose body's Python eager JAX runs again at a call: ``jax.vmap`` of Python code (it
traces its function at every call) and lax control flow given functions (``cond``, ``scan``,
``fori_loop``...: traced again unless JAX's tracing cache holds the same function objects).

Recorded once and skipped, such a body read the Python and NumPy state of the traced
iteration (``jax.vmap(lambda r: r * cfg["s"])`` with ``cfg`` changed since, a NumPy draw
inside).  So inside an iteration the call is traced by JAX (``trace_abstractly``), which
runs the body's Python exactly when eager JAX would, and the jaxpr it gives is the op: its
structure (``jaxpr_key``) is the guard key, its constants and literals (a NumPy draw, a
closed-over array, a number read from state) are inputs fed like arrays Python hands the
graph.  A body that computes the same thing again is skipped as any op is; one that
changed leaves the path there.
"""
from __future__ import annotations

import functools
import types
from typing import NamedTuple

import jax
import numpy as np
from jax.tree_util import tree_flatten, tree_unflatten

from ..counters import counts
from ..jaxpr_builder import (AD_ONLY_PARAMS, REMAT, TRACE_TO_JAXPR_NOUNITS, ArrayImpl, ClosedJaxpr, Id,
                             Jaxpr, Literal, PartialVal, Var, as_fun, split_known, trace_abstractly)
from .guards import callee_key, function_key, unsettled
from .trace_rules import cells, grad_spec, jax_caches_body, made_by_transform, unwrap, vmapped_by
from .values import aval_of, is_array, shape_struct


class TracedBody(NamedTuple):
    """The guard key of a traced body: what JAX traced it to (``jaxpr_key``: constants
    left out) and the structure of its result; ``op_name`` names it in reports."""
    op_name: str
    jaxpr: tuple
    out_tree: object


def jaxpr_key(jaxpr):
    """A hashable key equal for two jaxprs that compute the same thing from their inputs and
    constants: each equation's primitive, inputs (by position; literals by value), output
    types and parameters (``_param_key``), in order.  (The jaxpr's text would do, but JAX's
    printer costs ~0.1 ms an equation: more than tracing the body.)"""
    where = {}
    for v in (*jaxpr.constvars, *jaxpr.invars):
        where[v] = len(where)
    out = [tuple(v.aval for v in jaxpr.constvars), tuple(v.aval for v in jaxpr.invars)]
    for eqn in jaxpr.eqns:
        ins = tuple(_var_key(v, where) for v in eqn.invars)
        for v in eqn.outvars:
            where[v] = len(where)
        out.append((eqn.primitive, ins, tuple(v.aval for v in eqn.outvars),
                    tuple((k, _param_key(x)) for k, x in sorted(eqn.params.items())
                          if k not in AD_ONLY_PARAMS.get(eqn.primitive.name, ()))))
    out.append(tuple(_var_key(v, where) for v in jaxpr.outvars))
    return tuple(out)


def _var_key(v, where):
    if isinstance(v, Literal):
        return ("literal", v.aval, _value_key(v.val))
    return where[v]


def _param_key(x):
    """An equation parameter as a key: jaxprs by structure; a function as a static is
    guarded (``guards.function_key``: the recorded callback, called instead, does what this
    one would), through the closure JAX makes afresh around it at each trace (a callback's
    ``_flat_callback``: its code and what it holds).  (Keyed by name, an inline callback
    over new state matched the recorded one.)  Differentiation-only parameters, thunks JAX
    makes at every trace, are left out (``AD_ONLY_PARAMS``, as segment keys do)."""
    if isinstance(x, Jaxpr):
        return jaxpr_key(x)
    if isinstance(x, ClosedJaxpr):
        return (jaxpr_key(x.jaxpr), tuple(map(_value_key, x.consts)))
    if type(x) in (tuple, list):
        return tuple(map(_param_key, x))
    if type(x) is types.FunctionType:
        if x.__closure__ and (x.__module__ or "").startswith("jax."):
            return ("JAX's closure", x.__code__, tuple(map(_param_key, cells(x).values())))
        return function_key(x)
    if type(x) is functools.partial:
        return ("partial", _param_key(x.func), _param_key(x.args),
                _param_key(tuple(sorted(x.keywords.items()))))
    if callable(x) and not isinstance(x, type):
        return Id(x)
    try:
        hash(x)
    except TypeError:
        return ("repr", repr(x))
    return x


def _value_key(v):
    """A constant or literal by value where it is small and on the host, else by identity."""
    if isinstance(v, (bool, int, float, complex)):
        return (type(v), v)
    if isinstance(v, (np.ndarray, np.generic)) and np.size(v) <= 64:
        return (np.dtype(v.dtype).str, np.shape(v), np.asarray(v).tobytes())
    return Id(v)


def op(it, fn, args, kwargs):
    """``fn(*args, **kwargs)`` (``trace_rules.retraced_body``) as an op of iteration ``it``:
    traced by JAX now, then recorded or matched as the op its jaxpr makes."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    leaves, tree = tree_flatten((args, kwargs))
    plan = _vmap_plan(fn, args)
    found = plan and _plain_call(it, plan, args, kwargs)
    if found:
        plain = _traced(it, *found[:2])
        if plain is not None:
            return _from_plain(it, fn, plan, plain, found[2], tree, leaves)
    call, inputs = _with_inputs(it, fn, tree, leaves)
    if jax_caches_body(fn):
        # lax control flow: JAX traces a function again only where its tracing cache, keyed
        # on the function objects and the avals, misses; so a call with the same objects
        # gets the trace made before, its Python not run (as eager JAX).
        closed = it.remember(("lax body", Id(fn), tree, tuple(map(_leaf_key, leaves))),
                             lambda: _traced(it, call, inputs))
    else:
        closed = _traced(it, call, inputs)
    if closed is None:
        # JAX could not trace it abstractly where eager could (the body converts a value
        # it made to a Python number): run as it was given, its Python once more.
        counts["bodies_untraced"] += 1
        return it.op(fn, args, kwargs, callee_key(fn))
    closed, out_tree = closed
    jaxpr, consts = _lifted(closed)
    key = TracedBody(_name(fn), jaxpr_key(jaxpr), out_tree)
    return it.op(_Replay(jaxpr, len(consts), out_tree), tuple(consts) + tuple(inputs), {}, key)


def _lifted(closed):
    """(jaxpr, constants) of a closed jaxpr whose literals (its equations' scalar
    constants: ``x * cfg["s"]``, a NumPy scalar drawn in the body) are constants too, so
    that they are fed, not compared: a body that draws a number at every call is one op.
    So are those of a ``cond``'s branches (``lax.cond``/``switch`` of lambdas over a
    learning rate that changes every call: ``_branch_literals_lifted``)."""
    jaxpr, values, lifted = closed.jaxpr, [], []

    def outer(value, aval):
        values.append(_device_literal(value))
        lifted.append(Var(aval))
        return lifted[-1]
    eqns = [_branch_literals_lifted(eqn, outer) if eqn.primitive.name == "cond"
            else _checkpoint_literals_lifted(eqn, outer) if eqn.primitive is REMAT
            else eqn for eqn in jaxpr.eqns]
    eqns, outvars = _without_literals(eqns, jaxpr.outvars, lambda v: outer(v.val, v.aval))
    if not lifted:
        return jaxpr, list(closed.consts)
    jaxpr = jaxpr.replace(constvars=lifted + list(jaxpr.constvars), eqns=eqns, outvars=outvars)
    return jaxpr, values + list(closed.consts)


def _branch_literals_lifted(eqn, outer):
    """``cond`` equation ``eqn`` with the literals of its branches' own equations taken out
    as operands: every branch gets every branch's lifted values as leading inputs (a
    ``cond``'s branches take the same inputs) and uses its own; ``outer(value, aval)``
    gives the outer variable each value is fed through.  Nested control flow inside a
    branch keeps its literals (compared by value)."""
    branches = eqn.params["branches"]
    pieces = [_literals_taken(branch.jaxpr) for branch in branches]
    if not any(vals for vals, *_ in pieces):
        return eqn
    new_branches = []
    for k, (branch, (_, own, eqns, outvars)) in enumerate(zip(branches, pieces)):
        leading = []
        for j, (_, new_vars, _, _) in enumerate(pieces):
            leading += own if j == k else [Var(v.aval) for v in new_vars]
        jaxpr = branch.jaxpr.replace(invars=leading + list(branch.jaxpr.invars), eqns=eqns,
                                     outvars=outvars,
                                     debug_info=_with_leading_args(branch.jaxpr.debug_info, len(leading)))
        new_branches.append(ClosedJaxpr(jaxpr, branch.consts))
    fed = [outer(val, var.aval) for vals, new_vars, _, _ in pieces for val, var in zip(vals, new_vars)]
    return eqn.replace(invars=[eqn.invars[0]] + fed + list(eqn.invars[1:]),
                       params=dict(eqn.params, branches=tuple(new_branches)))


def _checkpoint_literals_lifted(eqn, outer):
    """``checkpoint`` (``jax.remat``) equation ``eqn`` with the literals of its body's own
    equations taken out as leading operands (``outer(value, aval)``: the outer variable each
    is fed through).  flax's ``nn.remat`` folds a number that changes at every call into
    its RNG inside the body: compared, each call was a new path."""
    body = eqn.params["jaxpr"]
    vals, new_vars, eqns, outvars = _literals_taken(body)
    if not vals:
        return eqn
    body = body.replace(invars=new_vars + list(body.invars), eqns=eqns, outvars=outvars,
                        debug_info=_with_leading_args(body.debug_info, len(new_vars)))
    fed = [outer(val, var.aval) for val, var in zip(vals, new_vars)]
    return eqn.replace(invars=fed + list(eqn.invars), params=dict(eqn.params, jaxpr=body))


def _literals_taken(jaxpr):
    """(the values of ``jaxpr``'s own literals, a new variable for each, its equations and
    outputs reading those variables instead): what a nested body's literals become when
    they are fed as leading operands."""
    vals, new_vars = [], []

    def take(v):
        vals.append(v.val)
        new_vars.append(Var(v.aval))
        return new_vars[-1]
    eqns, outvars = _without_literals(jaxpr.eqns, jaxpr.outvars, take)
    return vals, new_vars, eqns, outvars


def _without_literals(eqns, outvars, take):
    """``eqns`` and ``outvars`` with each literal among their inputs and outputs replaced by
    ``take(literal)`` (a variable that is fed its value)."""
    def swap(v):
        return take(v) if isinstance(v, Literal) else v
    return [e.replace(invars=[swap(v) for v in e.invars]) for e in eqns], [swap(v) for v in outvars]


def _with_leading_args(debug_info, n):
    """JAX's debug info of a jaxpr given ``n`` more leading inputs (it names each input)."""
    names = getattr(debug_info, "arg_names", None)
    if names is None or not hasattr(debug_info, "_replace"):
        return debug_info
    return debug_info._replace(arg_names=("lifted",) * n + tuple(names))


def _traced(it, call, inputs):
    """(closed jaxpr, output structure) of ``call`` traced by JAX over ``inputs``' avals,
    or None where JAX could not trace it abstractly."""
    counts["bodies_traced"] += 1
    it.opaque_depth += 1  # (the body's ops are JAX's to trace, not events)
    try:
        return trace_abstractly(call, list(map(shape_struct, inputs)))
    except Exception:
        counts["bodies_traced"] -= 1
        return None
    finally:
        it.opaque_depth -= 1


# ------------------------------------------------------------------ a library's partial evaluation
#
# Flax's ``nn.scan`` with ``variable_broadcast`` (every linen ``nn.RNN``) calls JAX's partial
# evaluation on its body (``pe.trace_to_jaxpr_nounits``, every input unknown) to hoist what
# does not depend on the loop out of it: the broadcast parameters, this iteration's values.
# JAX computed those outputs on values no op recorded, and the unit ran eagerly.  Here the
# body is traced once (its Python runs once, as under JAX), JAX splits its jaxpr by what
# depends on the inputs, and the known part (outputs and residuals) is one op of the
# iteration whose inputs are the body's constants, placeholders among them.


def partial_eval(it, fun, pvals, instantiate=False):
    """``pe.trace_to_jaxpr_nounits(fun, pvals, instantiate)`` inside iteration ``it``:
    JAX's result (the unknown part's jaxpr over the residuals, each output's PartialVal, the
    residuals), its known values placeholders of the iteration."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if any(pv.is_known() for pv in pvals):  # (a known input: not what libraries pass)
        return it.op(TRACE_TO_JAXPR_NOUNITS, (fun, pvals), {"instantiate": instantiate})
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
               for a in (pv.get_aval() for pv in pvals)]
    traced = _traced(it, fun.call_wrapped, structs)
    if traced is None:  # (JAX could not trace it abstractly: as JAX runs it, once more)
        counts["bodies_untraced"] += 1
        return it.op(TRACE_TO_JAXPR_NOUNITS, (fun, pvals), {"instantiate": instantiate})
    jaxpr, consts = _lifted(traced[0])
    name = f"partial_eval({_wrapped_name(fun)})"
    structure = (jaxpr_key(jaxpr), _hashable(_tupled(instantiate)))
    # (JAX's split costs more than the trace; the parts are the same for the same structure)
    known, unknown, out_unknowns, nres = it.remember(
        ("split", name, structure), lambda: split_known(jaxpr, len(consts), instantiate))
    # (the known part's op is guarded by the whole body's structure, which it is made from)
    values = _jaxpr_op(it, known.jaxpr, known.consts, consts, name, structure) \
        if known.jaxpr.outvars else []
    known_outs, residuals = values[:len(values) - nres], values[len(values) - nres:]
    unknown_avals = iter([v.aval for v in unknown.jaxpr.outvars])
    known_outs = iter(known_outs)
    out_pvals = [PartialVal.unknown(next(unknown_avals)) if u else PartialVal.known(next(known_outs))
                 for u in out_unknowns]
    u = unknown.jaxpr  # (its residual inputs become its constants, as JAX returns it)
    rest = u.replace(constvars=list(u.constvars) + list(u.invars[:nres]), invars=list(u.invars[nres:]))
    return rest, out_pvals, list(unknown.consts) + list(residuals)


def _tupled(x):
    return tuple(x) if type(x) is list else x


def _wrapped_name(fun):
    """The name of the function a ``lu.WrappedFun`` wraps, for reports."""
    return getattr(getattr(fun, "debug_info", None), "func_name", None) or "body"


def evaluated(it, jaxpr, consts, args):
    """``jax.core.eval_jaxpr(jaxpr, consts, *args)`` inside iteration ``it`` (flax's nn.scan
    evaluates the loop-independent part of its body so): an op keyed by the jaxpr's
    structure.  As an op given the jaxpr as a static argument, a jaxpr traced afresh at every
    call was compared by identity, and every turn left its path there."""
    return _jaxpr_op(it, jaxpr, consts, args, "eval_jaxpr", jaxpr_key(jaxpr))


def _jaxpr_op(it, jaxpr, consts, args, name, structure):
    """The list of ``jaxpr``'s outputs on ``consts`` (its constant variables) and ``args``,
    computed by one op of ``it`` named ``name`` and guarded by ``structure``."""
    out_tree = jax.tree_util.tree_structure([0] * len(jaxpr.outvars))
    return it.op(_Replay(jaxpr, len(consts), out_tree), tuple(consts) + tuple(args), {},
                 TracedBody(name, structure, out_tree))


# ------------------------------------------------------------------ vmap, traced plainly
#
# Tracing ``jax.vmap(jax.grad(loss))`` anew at every call costs what eager JAX pays for it:
# JAX's batching and differentiation machinery, most of a per-example-gradient step.  Only
# the Python of ``loss`` needs to run at each call.  So the function vmap was given (below
# a jax.grad / value_and_grad) is traced plainly, over one example's avals: that runs its
# Python once, as eager JAX does, and gives its jaxpr.  The batched (and differentiated)
# computation is a function of that jaxpr alone; made once per jaxpr, it is reused while
# the Python traces to the same jaxpr again (its constants, a NumPy draw, are inputs).


class VmapPlan(NamedTuple):
    """A ``jax.vmap`` call traced plainly: the function under it (``fun``), the gradient
    JAX takes of it (``grad``: a ``trace_rules.Grad``, or None) and vmap's options."""
    fun: object
    grad: object
    in_axes: tuple          # one int or None per positional argument
    out_axes: object
    axis_size: object


def _vmap_plan(fn, args):
    inner = vmapped_by(fn)
    if inner is None:
        return None
    free = cells(inner)
    named = free.get("axis_name")  # (JAX's "no name" is a bare object(), or None)
    if not (named is None or type(named) is object) or free.get("spmd_axis_name") is not None \
            or free.get("sum_match") or "out_axes" not in free or free.get("fun") is None:
        return None  # (a named axis: its collectives do not trace outside the vmap)
    in_axes = free.get("in_axes")
    if in_axes is None or type(in_axes) is int:
        in_axes = (in_axes,) * len(args)
    if type(in_axes) is not tuple or len(in_axes) != len(args) \
            or not all(a is None or type(a) is int for a in in_axes):
        return None
    fun, grad = free["fun"], grad_spec(free["fun"])
    if grad is not None:
        fun = grad.fun
    if vmapped_by(fun) is not None:
        return None
    return VmapPlan(fun, grad, in_axes, free["out_axes"], free.get("axis_size"))


class PlainLayout(NamedTuple):
    """Where the arrays of a plainly traced call are: ``carried`` (the arrays the vmapped
    function carries, ``_opened``), and the positions of the call's arrays among the
    leaves of ``(args, kwargs)`` (``arg_where``)."""
    carried: list
    arg_where: list


def _plain_call(it, plan, args, kwargs):
    """``plan.fun`` as a function of one example's arrays (after the arrays it carries),
    those inputs, and their layout; None where the call does not fit vmap's axes."""
    fun_leaves, rebuild = _opened(it, plan.fun)
    try:
        one = tuple(_one_example(a, axis) for a, axis in zip(args, plan.in_axes))
        one_kwargs = {k: _one_example(v, 0) for k, v in kwargs.items()}  # (keywords: axis 0)
    except (IndexError, TypeError):  # (vmap itself will say what is wrong)
        return None
    leaves, tree = tree_flatten((one, one_kwargs))
    fun_where = [i for i, x in enumerate(fun_leaves) if is_array(x)]
    arg_where = [i for i, x in enumerate(leaves) if type(x) is jax.ShapeDtypeStruct or is_array(x)]
    nfun = len(fun_leaves)
    call = _substituting(fun_leaves + leaves, fun_where + [nfun + i for i in arg_where], nfun,
                         tree, lambda held: plan.fun if rebuild is None else rebuild(held))
    carried = [fun_leaves[i] for i in fun_where]
    return call, carried + [leaves[i] for i in arg_where], PlainLayout(carried, arg_where)


def _substituting(every, where, nfun, tree, callee_of):
    """A function of new values for ``every[i]``, ``i`` in ``where``: ``every`` is what the
    called function holds (its first ``nfun``) then the call's leaves (``tree``);
    ``callee_of(held)`` makes the function again from what it holds."""
    def call(*arrays):
        vals = list(every)
        for i, x in zip(where, arrays):
            vals[i] = x
        a, k = tree_unflatten(tree, vals[nfun:])
        return callee_of(vals[:nfun])(*a, **k)
    return call


def _from_plain(it, fn, plan, plain, layout, tree, leaves):
    """The vmap call as the op its plainly traced function makes (see above)."""
    one_tree = plain[1]
    one_jaxpr, one_consts = _lifted(plain[0])
    batch = [leaves[i] for i in layout.arg_where]
    grad = plan.grad and (plan.grad.argnums, plan.grad.has_aux, plan.grad.returns_value)
    key = (jaxpr_key(one_jaxpr), tuple(map(aval_of, one_consts)), grad, plan.in_axes,
           _hashable(plan.out_axes), plan.axis_size, tree, one_tree, tuple(layout.arg_where),
           tuple(map(aval_of, layout.carried)), tuple(map(aval_of, batch)))
    inputs = one_consts + layout.carried + batch
    made = it.remember(("vmap of a plain trace", key),
                       lambda: _batched(it, plan, one_jaxpr, len(one_consts), layout, tree,
                                        leaves, one_tree, inputs))
    closed, out_tree = made
    replay = _Replay(closed.jaxpr, len(closed.consts), out_tree)
    return it.op(replay, tuple(closed.consts) + tuple(inputs), {},
                 TracedBody(_name(fn), key, out_tree))


def _batched(it, plan, one_jaxpr, nconsts, layout, tree, leaves, one_tree, inputs):
    """(closed jaxpr, output structure) of vmap (of the gradient) of ``one_jaxpr``, as a
    function of its constants, the carried arrays and the call's arrays."""
    ncarried = len(layout.carried)

    def batched(*flat):
        consts, carried = flat[:nconsts], flat[nconsts:nconsts + ncarried]
        vals = list(leaves)
        for i, x in zip(layout.arg_where, flat[nconsts + ncarried:]):
            vals[i] = x
        a, k = tree_unflatten(tree, vals)

        def one_example(*ea, **ek):
            el = tree_flatten((ea, ek))[0]
            outs = as_fun(ClosedJaxpr(one_jaxpr, list(consts)))(
                *carried, *[el[i] for i in layout.arg_where])
            return tree_unflatten(one_tree, outs)
        f = one_example
        if plan.grad is not None:
            make = jax.value_and_grad if plan.grad.returns_value else jax.grad
            f = make(one_example, argnums=plan.grad.argnums, has_aux=plan.grad.has_aux)
        return jax.vmap(f, in_axes=plan.in_axes, out_axes=plan.out_axes,
                        axis_size=plan.axis_size)(*a, **k)
    it.opaque_depth += 1
    try:
        return trace_abstractly(batched, list(map(shape_struct, inputs)))
    finally:
        it.opaque_depth -= 1


_device_literals = {}  # (dtype, value's bytes) -> its device array
DEVICE_LITERALS = 4096  # (numbers that change at every call: bounded)


def _device_literal(value):
    """A literal's value as a device array, made once per value: most literals of a body
    (a scale, 1.0, -inf) come back at every call, and a NumPy value fed is a transfer
    (~30 us each: most of a small per-example-gradient step's feeding)."""
    value = np.asarray(value)
    key = (value.dtype.str, value.shape, value.tobytes())
    found = _device_literals.get(key)
    if found is None:
        found = jax.device_put(value)
        if type(found) is not ArrayImpl:  # (a tracing iteration's recorder made it: fed as is)
            return value
        if len(_device_literals) >= DEVICE_LITERALS:
            _device_literals.clear()
        _device_literals[key] = found
    return found


def _leaf_key(x):
    if is_array(x):
        return ("array", aval_of(x))
    if callable(x):
        return Id(x)
    return _hashable(x)


def _hashable(x):
    try:
        hash(x)
    except TypeError:
        return Id(x)
    return x


def _one_example(x, axis):
    """The pytree ``x`` as one example sees it: each array without its mapped ``axis``."""
    if axis is None:
        return x

    def one(leaf):
        if not is_array(leaf):
            return leaf
        aval = aval_of(leaf)
        shape = list(aval.shape)
        del shape[axis]
        return jax.ShapeDtypeStruct(tuple(shape), aval.dtype, weak_type=aval.weak_type)
    return jax.tree.map(one, x)


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
    numbers, strings) stays as given.  The function ``jax.vmap`` (jacrev, checkpoint...)
    was given contributes the arrays it carries (``_opened``), so that its use of this
    iteration's values is traced over them rather than over copies of their values."""
    fun_leaves, rebuild = _opened(it, _given(fn))
    every = fun_leaves + leaves
    where = [i for i, x in enumerate(every) if is_array(x)]
    call = _substituting(every, where, len(fun_leaves), tree,
                         lambda held: fn if rebuild is None else _remade(fn, rebuild(held)))
    return call, [every[i] for i in where]


def _given(fn):
    """The function ``jax.vmap`` (jacrev, jacfwd, hessian, checkpoint) was given, if ``fn``
    is what it returned."""
    inner = made_by_transform(fn)
    return None if inner is None else cells(inner).get("fun")


def _opened(it, fun):
    """(the arrays ``fun`` carries, a function of new values for them that makes ``fun``
    again) where ``fun`` carries some (else ``([], None)``): a pytree's arrays (an Equinox
    module), a ``functools.partial``'s or a closure's values of this iteration
    (``jax.vmap(lambda x: mlp(params, x))`` with ``params`` a step's parameters).  Only for
    vmap, which has no tracing cache: lax control flow keeps the function object it was
    given, whose identity JAX's cache is keyed on."""
    if fun is None:
        return [], None
    given = _given(fun)
    if given is not None:  # (hessian: jacfwd of jacrev of the user's function)
        leaves, rebuild = _opened(it, given)
        return (leaves, lambda vals: _remade(fun, rebuild(vals))) if rebuild else ([], None)
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


def _remade(fn, fun):
    """JAX's function inside ``fn`` (``vmap_f``, ``jacfun``...: its axes and options as
    given), made again around ``fun``."""
    inner = made_by_transform(fn)
    code = inner.__code__
    closure = tuple(types.CellType(fun) if name == "fun" else cell
                    for name, cell in zip(code.co_freevars, inner.__closure__))
    return types.FunctionType(code, inner.__globals__, inner.__name__, inner.__defaults__, closure)


def _name(fn):
    inner = made_by_transform(fn)
    if inner is None:
        return unwrap(fn).__qualname__
    fun = cells(inner).get("fun")
    made_by = inner.__qualname__.split(".")[0]  # (vmap, jacrev, jacfwd, checkpoint)
    return f"{made_by}({_name(fun) if made_by_transform(fun) else getattr(fun, '__qualname__', None) or type(fun).__name__})"
