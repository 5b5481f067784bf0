"""Tracing mode: DL ops are recorded by the jaxpr builder and become events of a new path.

Python sees real values: the builder records ops abstractly and a value Python reads is
computed then, by the equations recorded so far run as a segment (``launching.
compute_recorded``; eager-valued recording where the unit reads values too often).  Each op's inputs are recorded as specs (``events``): this
iteration's placeholders, values fed from Python, and static values baked in; its outputs
become placeholders wrapping the recording's tracers.  An op JAX refuses to record (a
data-dependent shape) is a graph break: it runs eagerly every iteration.
"""
from __future__ import annotations

from contextlib import nullcontext

import time

import jax
import numpy as np
from jax.tree_util import tree_flatten, tree_unflatten

from ..counters import counts
from ..jaxpr_builder import RecTracer, set_current_trace
from . import guards, launching
from .context import plain_trace
from .events import (BreakEvent, ComputedIn, EnterEvent, FeedIn, FetchEvent, OpEvent,
                     PlaceholderIn, PlaceholderOut, StaticIn, StaticOut, key_name)
from .placeholders import OPERATORS, Placeholder, concrete, eager
from .settings import EARLY_LAUNCH_GAP_SECONDS, settings
from .trace_rules import (custom_rules_of_the_program, dispatched_as_is, takes_elements,
                          traces_its_body)
from .values import aval_of, is_array, is_number, user_line, with_arrays


def append(it, event_type, kind, key, where=None, **fields):
    """Append an event to the path being recorded (mark and value count: now)."""
    rec = it.path.recorder
    it.path.events.append(event_type(kind, key, rec.mark(), rec.num_values,
                                     where or user_line(), **fields))
    if event_type is OpEvent:
        it.last_op_at = time.perf_counter()


def note_fetched(path, value):
    """Keep what Python got from the fetch just traced, where it is a number or a bool."""
    ev = path.events[-1]
    if type(ev) is FetchEvent and type(value) in (bool, int, float):
        ev.value = value


def launch_before(it):
    """The fetch just appended to the path follows an op with no op between, after Python
    worked for ``EARLY_LAUNCH_GAP_SECONDS`` or more (host work, logging): that op's event
    launches the fetch's segment in co-execution (so it takes the general path: the C fast
    path launches nothing).  Not where the read comes right after the op: there is nothing
    to overlap, and at the read Python may have dropped what the segment can then reuse
    (the old parameters of ``params = [...]``: launching.donatable)."""
    path = it.path
    fetch = path.events[-1]
    prev = path.events[-2] if len(path.events) > 1 else None
    if type(prev) is OpEvent and prev.mark == fetch.mark and settings["early_launch"] \
            and time.perf_counter() - it.last_op_at >= EARLY_LAUNCH_GAP_SECONDS:
        prev.launch, prev.fast = True, None


def feed(it, x):
    """A value entering the graph from Python becomes a graph input (its tracer)."""
    counts["feeds"] += 1
    if type(x) is Placeholder:
        x = concrete(x)
    elif isinstance(x, RecTracer):  # made outside any event: fed like a concrete array
        x = x.val
    t = it.path.recorder.input(x)
    it.tracers[t.id] = t
    it.env[t.id] = t.val  # (what a segment launched while tracing reads for it)
    return t


def wrap(it, t):
    """A new placeholder of ``it`` for recorded tracer ``t``."""
    it.tracers[t.id] = t
    return it.new_placeholder(t.id, t.aval, t)


def tracer(it, id):
    """The recording tracer of value ``id``.  After a divergence a value of the co-executed
    prefix gets one from its computed value (``Recorder.adopt``)."""
    t = it.tracers.get(id)
    if t is None:
        rec = it.path.recorder
        if id not in it.env and rec.abstract:  # computed when read, with what follows
            t = it.tracers[id] = rec.adopt_abstract(id)
        else:
            t = it.tracers[id] = rec.adopt(id, launching.value(it, id, it.fork_stop))
    return t


def enter(it, shape, leaves, args, kwargs):
    """The unit's arguments: each array is fed and handed to the unit as a placeholder."""
    if not leaves:
        append(it, EnterEvent, "enter", None, shape=shape, args=(), config=it.config)
        return args, kwargs
    specs, values = [], []
    for x in leaves:
        t = feed(it, x)
        specs.append(FeedIn(t.id, t.aval, type(x)))
        values.append(wrap(it, t))
    append(it, EnterEvent, "enter", None, shape=shape, args=tuple(specs), config=it.config)
    return with_arrays(args, kwargs, values)


def input_spec(it, x, fed_number, kept=False):
    """(spec, value to call with) for one input leaf; ``fed_number``: feed a Python number
    (an operator's operand, or a leaf that changed between iterations); ``kept``: a NumPy
    scalar JAX needs static (a shape computed with NumPy), baked like a Python number."""
    if kept:
        return StaticIn(x), x
    if guards.unsettled(x, it):
        return PlaceholderIn(x._id), x._rec
    if it.path.recorder.owns(x) and it.path.eager_reason:
        # computed by JAX code we did not see op by op from a placeholder it lowered (a
        # library): keep it connected for this iteration's gradient; the unit will not
        # be co-executed.  Otherwise it came from concrete arrays (an operator of two
        # jax.Arrays), as co-execution computes it too: eagerly, then fed.
        it.tracers[x.id] = x
        return PlaceholderIn(x.id), x
    if is_array(x) or fed_number and is_number(x):
        t = feed(it, x)
        return FeedIn(t.id, t.aval, type(x)), t
    return StaticIn(x), x


def _run_recorded(it, fn, tree, leaves, fed_number, kept=frozenset()):
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    specs, values = zip(*(input_spec(it, x, fed_number(i), i in kept)
                          for i, x in enumerate(leaves))) if leaves else ((), ())
    a, k = tree_unflatten(tree, list(values))
    return specs, fn(*a, **k)


def _first_argument_leaves(tree):
    """How many of the leaves of a call's flattened ``(args, kwargs)`` its first positional
    argument holds (0 where it has none)."""
    args = tree.children()[0] if tree.num_nodes > 1 else None
    return args.children()[0].num_leaves if args is not None and args.num_nodes > 1 else 0


def _record_op(it, fn, key, where, tree, leaves):
    """Run ``fn`` recorded; its inputs' specs and its output.  Numbers at leaves the unit
    learnt are dynamic are fed; if JAX needs one static after all, it stays static.  NumPy
    scalars are fed like arrays, unless JAX needed them static here before.  The numbers of
    a list ``jnp.asarray`` / ``jnp.array`` makes an array of are its elements, data as an
    operator's operands are: fed from the first trace (a decoding loop's token list, the
    prompt's NumPy ints then one Python int per token, left its path at every new token)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    operands = fn in OPERATORS
    unit = it.unit
    name = key_name(key)
    dynamic = {i for i in range(len(leaves)) if (where, name, i) in unit.dynamic}
    if settings["dynamic_numbers"] and takes_elements(fn):  # (elements: fed from the start)
        dynamic |= {i for i in range(_first_argument_leaves(tree))
                    if (where, name, i) not in unit.static}
    scalars = set() if operands else {i for i, x in enumerate(leaves) if isinstance(x, np.generic)}
    kept = {i for i in scalars if (where, name, i) in unit.static}
    try:
        return _run_recorded(it, fn, tree, leaves, lambda i: operands or i in dynamic, kept)
    except Exception:
        if not dynamic and kept == scalars:
            raise
        # JAX needs that number static (a shape, an axis): keep it so from now on.
        keys = {(where, name, i) for i in dynamic | scalars}
        unit.dynamic -= keys
        unit.static |= keys
        return _run_recorded(it, fn, tree, leaves, lambda i: operands, scalars)


def op(it, fn, key, args, kwargs):
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if not plain_trace(it.recording):
        # JAX is transforming this code from outside what we see (jax.grad called by a
        # library out of scope on the user's function): its tracers must not reach the
        # recorder.  The op runs as JAX runs it; the unit will run eagerly.
        it.path.eager_reason = it.path.eager_reason or (
            "JAX transforms this code from a caller terra_bc does not rewrite "
            "(a library out of scope)")
        it.opaque_depth += 1  # (its inner calls, and an operator's reflected one, are JAX's)
        try:
            return fn(*args, **kwargs)
        finally:
            it.opaque_depth -= 1
    leaves, tree = tree_flatten((args, kwargs))
    where = user_line()
    if not it.grad_depth and dispatched_as_is(fn):  # (a gradient cannot flow through it)
        it.opaque_depth += 1  # (JAX traces its body: the Python it runs is JAX's business)
        try:
            return _graph_break(it, fn, key, where, tree, leaves, args, kwargs)
        finally:
            it.opaque_depth -= 1
    # After leaving a path, the ops that follow usually match it event for event: numbers
    # that differ from it there are fed in this trace already (one retrace, not one each).
    guards.changed_numbers(it.unit, it.left, len(it.path.events), key, tree, leaves)
    it.opaque_depth += 1
    nested_before = it.unit.nested_calls
    try:
        with it.path.recorder.recording_op():
            specs, out = _record_op(it, fn, key, where, tree, leaves)
    except Exception as e:
        # JAX refused to record it (a data-dependent shape: x[mask], nonzero) or our
        # unwrapping failed: run the op as plain JAX would (the user's error propagates).
        try:
            return _refused(it, fn, key, where, tree, leaves, args, kwargs, e)
        except Exception as again:
            if again.__context__ is e:  # (the user's error, raised again eagerly: say it once)
                again.__suppress_context__ = True
            raise
    finally:
        it.opaque_depth -= 1
    if _runs_python_again(it, fn, nested_before):
        it.path.eager_reason = f"{key_name(key)} runs Python code JAX differentiates or calls eagerly"
    out_leaves, out_tree = tree_flatten(out)
    outs, wrapped = [], []
    for o in out_leaves:
        if isinstance(o, RecTracer):
            outs.append(PlaceholderOut(o.id, o.aval))
            wrapped.append(wrap(it, o))
        else:
            if is_array(o):  # computed outside the recording: replaying it would freeze it
                it.path.eager_reason = it.path.eager_reason or f"{key_name(key)} returned an unrecorded array"
            outs.append(StaticOut(o))
            wrapped.append(o)
    flat = guards.flat_call(args, kwargs, leaves)
    outs = tuple(outs)
    append(it, OpEvent, "op", key, where, tree=tree, args=tuple(specs), out_tree=out_tree,
           outs=outs, fast=guards.fast_spec(key, tuple(specs), out_tree, outs, flat))
    counts["ops_traced"] += 1
    return tree_unflatten(out_tree, wrapped)


def _runs_python_again(it, fn, nested_before):
    """Does op ``fn`` run Python of the program's that eager JAX would run again at every
    call (rewritten code called while it was recorded, outside a body JAX traces or caches;
    custom differentiation rules of the program's), which a skipped op would not run?"""
    return (it.unit.nested_calls != nested_before and not traces_its_body(fn)) \
        or custom_rules_of_the_program(fn)


def _refused(it, fn, key, where, tree, leaves, args, kwargs, error):
    """An op the recorder refused runs eagerly: a graph break, or (inside a differentiated
    function, where a gradient cannot flow through an eager op) the unit runs eagerly."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if it.batching and any(guards.unsettled(x, it) and it.batched(x) is not None for x in leaves):
        raise error  # (eagerly a batched tracer: JAX refuses it as it refused the recording)
    if it.grad_depth:
        it.path.eager_reason = f"{key_name(key)} failed under recording ({type(error).__name__})"
        return settled_eager(it, fn, args, kwargs)
    return _graph_break(it, fn, key, where, tree, leaves, args, kwargs)


def _graph_break(it, fn, key, where, tree, leaves, args, kwargs):
    """A graph break: its inputs are computed, it runs eagerly every iteration, and its
    results enter later ops as feeds (guarded by their shapes)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    if any(isinstance(x, RecTracer) for x in leaves):  # (made outside any event: values)
        args, kwargs = tree_unflatten(tree, [x.val if isinstance(x, RecTracer) else x
                                             for x in leaves])
    out = settled_eager(it, fn, args, kwargs)
    append(it, BreakEvent, "eager", key, where, tree=tree,
           args=tuple(_break_spec(it, x) for x in leaves))
    return out


def _break_spec(it, x):
    if guards.unsettled(x, it):
        return PlaceholderIn(x._id)
    if is_array(x) or is_number(x):
        return ComputedIn(aval_of(x))
    return StaticIn(x)


def outside_recording(it):
    """The trace eager JAX runs under, made current while ``it`` records (else nothing)."""
    rec = it.recording
    return set_current_trace(rec.parent_trace()) if rec is not None else nullcontext()


def settled_eager(it, fn, args, kwargs):
    """Run ``fn`` on concrete values, outside the recording (the unit will run eagerly)."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    counts["ops_eager"] += 1
    it.settled_depth += 1  # (a placeholder it closes over gives its value: Iteration.lower)
    try:
        with outside_recording(it):
            return eager(fn, args, kwargs)
    finally:
        it.settled_depth -= 1
