"""Co-execution mode: Python's DL ops are checked against the recorded paths and skipped.

An op's common case (a plain op event) is checked and skipped in C before it gets here
(``_fastop.c``); this is the general path.  When no recorded path goes on the way Python
goes, ``next_event`` raises ``Divergence`` and the method that met it is run again after
``Iteration.diverge`` (``retried``), now tracing.
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.tree_util import tree_flatten, tree_unflatten

from ..counters import counts
from . import guards, launching
from .events import FetchEvent, PlaceholderIn, PlaceholderOut
from .placeholders import Placeholder, concrete
from .settings import EARLY_LAUNCH_GAP_SECONDS, NUMPY_COPY_MAX_BYTES, settings
from .values import NUMBER_TYPES, with_arrays


class Divergence(Exception):
    """A guard failed: this iteration leaves its recorded path here.  ``args``: what Python
    did there (kind, guard key, argument leaves), for the journal's record."""


def retried(method):
    """``method`` of an iteration, run once more after leaving the recorded paths where a
    guard in it failed (it then runs in tracing or eager mode, where nothing diverges)."""
    @functools.wraps(method)
    def run(it, *args, **kwargs):
        __tracebackhide__ = True  # (pytest and IPython leave this frame out of tracebacks)
        try:
            return method(it, *args, **kwargs)
        except Divergence as failed:
            it.diverge(failed.args)
            return method(it, *args, **kwargs)
    return run


def next_event(it, kind, key, check=None, leaves=()):
    """The event Python has reached.  It is the next event of this path if that matches,
    else the next event of another recorded path with the same events so far (a case seen
    before: the iteration moves to that path, nothing is recomputed).  Divergence if no
    recorded path goes on this way (carrying what Python did: ``leaves``, its arguments)."""
    pos, cur = it.pos, it.path
    ev = guards.continues(cur, pos, kind, key, check)  # the common case: this path goes on
    if ev is not None:
        return ev
    for path in paths_here(it):
        ev = guards.continues(path, pos, kind, key, check) if path is not cur else None
        if ev is not None:
            it.path = path
            return ev
    raise Divergence(kind, key, leaves)


def paths_here(it):
    """This path, then the unit's other paths sharing its first ``it.pos`` events."""
    yield it.path
    yield from it.path.others_sharing(it.unit.paths, it.pos)


def bind(it, feeds, outs=None):
    """Values Python hands to the graph this iteration: (id, value) pairs.  A NumPy value
    stays a NumPy value (a small array, copied: Python may write into it before the
    launch): the launch that reads it transfers it, as ``jax.jit`` transfers a NumPy
    argument (~2 us in C++, where ``jax.device_put`` costs ~35 us in Python).  Not a value
    Python gets back as a placeholder (``outs``, the event's output specs; None: every feed,
    as the unit's arguments and a gradient's inputs are): that one becomes the device array
    a traced iteration's feed made of it (``Recorder.input``).  Where an op is the identity
    on its input (``jnp.asarray(numpy_array, jnp.float32)`` of a float64 array is, once
    fed) the value Python gets is the feed itself, and it was the float64 NumPy array
    behind a float32 placeholder."""
    env = it.env
    for id, x in feeds:
        if type(x) is Placeholder:
            x = concrete(x)
        elif isinstance(x, (np.ndarray, np.generic)):
            if outs is None or _handed_back(id, outs) or x.nbytes > NUMPY_COPY_MAX_BYTES:
                x = jax.device_put(x)  # (the transfer the segment's launch would make)
            elif type(x) is np.ndarray:
                x = x.copy()
        elif type(x) in NUMBER_TYPES and outs is not None and _handed_back(id, outs):
            # (``jnp.asarray(k)`` of a fed Python number is the identity on it: Python gets
            # the feed itself, which must be the weakly typed array the traced iteration's
            # feed made, Recorder.input; a launch turns a fed number into one itself)
            x = jax.device_put(x)
        env[id] = x
    counts["feeds"] += len(feeds)


def _handed_back(id, outs):
    return any(type(s) is PlaceholderOut and s.id == id for s in outs)


def outputs(it, specs):
    """The values an event hands Python: new placeholders, and recorded static values."""
    return [it.new_placeholder(s.id, s.aval) if type(s) is PlaceholderOut else s.value
            for s in specs]


def enter(it, shape, leaves, args, kwargs):
    """The unit's arguments checked against the enter event: arrays become placeholders."""
    feeds = []

    def check(ev):
        feeds.clear()
        # (a path recorded under another configuration is not this one: see config_key)
        return shape == ev.shape and ev.config == it.config and all(
            guards.matches(it, x, spec, feeds) for x, spec in zip(leaves, ev.args))
    ev = next_event(it, "enter", None, check, leaves)
    it.pos += 1
    bind(it, feeds)
    return with_arrays(args, kwargs, [it.new_placeholder(s.id, s.aval) for s in ev.args])


def op(it, fn, key, args, kwargs):
    """An op the fast path did not skip: matched against the recorded event, or Divergence."""
    leaves, tree = tree_flatten((args, kwargs))
    feeds = []

    def check(ev):
        feeds.clear()
        return tree == ev.tree and len(leaves) == len(ev.args) and all(
            guards.matches(it, x, spec, feeds) for x, spec in zip(leaves, ev.args))
    try:
        ev = next_event(it, "op", key, check, leaves)
    except Divergence:
        guards.changed_numbers(it.unit, it.path, it.pos, key, tree, leaves)
        raise
    it.pos += 1
    if ev.kind == "eager":
        return graph_break(it, ev, fn, tree, leaves)
    bind(it, feeds, ev.outs)
    counts["ops_skipped"] += 1
    out = tree_unflatten(ev.out_tree, outputs(it, ev.outs))
    if ev.launch:
        launch_early(it, ev)
    return out


def launch_early(it, ev):
    """Python has passed the last op before a fetch on this path: launch the segment the
    fetch needs now, so XLA computes it while the Python before the fetch runs (the fetch
    then only waits for what is left)."""
    fetch = it.path.events[it.pos] if it.pos < len(it.path.events) else None
    if type(fetch) is FetchEvent and fetch.mark == ev.mark and settings["early_launch"]:
        launching.launch(it, ev.mark, [fetch.id])
        counts["early_launches"] += 1
        it.last_op_at = time.perf_counter()  # (Python has its placeholders from here on)


def early_launch_paid(it, op_pos):
    """At the fetch right after an op that launched early (``launch_early``): if Python
    came to it sooner than ``EARLY_LAUNCH_GAP_SECONDS``, the traced iteration's one measured
    gap was noise (a thread switch, a collection), not host work, and launching there only
    costs what a launch at the read could reuse (the old parameters still held inside
    ``params = [...]``: launching.donatable).  The op launches nothing from then on.  A
    later gap is never shorter for noise, so one short gap decides."""
    if it.last_op_at and op_pos >= 0:
        op = it.path.events[op_pos]
        if op.launch and time.perf_counter() - it.last_op_at < EARLY_LAUNCH_GAP_SECONDS:
            op.launch = False  # (it stays on the general path: one op a step, ~1 us)
            counts["early_launches_dropped"] += 1
    it.last_op_at = 0.0


def graph_break(it, ev, fn, tree, leaves):
    """An op JAX would not record runs eagerly on its inputs' values."""
    __tracebackhide__ = True  # (terra_bc's wrapper: pytest and IPython hide the frame)
    launching.launch(it, ev.mark, [spec.id for spec in ev.args if type(spec) is PlaceholderIn])
    values = [it.env[x._id] if type(spec) is PlaceholderIn else concrete(x) if type(x) is Placeholder
              else x for x, spec in zip(leaves, ev.args)]
    a, k = tree_unflatten(tree, values)
    counts["ops_eager"] += 1
    it.opaque_depth += 1
    try:
        return fn(*a, **k)
    finally:
        it.opaque_depth -= 1
