"""Tools run alongside: debuggers, profilers, coverage (docs/reliability.md).

A tool watches a thread while a trace or profile function is set in it (``sys.settrace``,
``sys.setprofile``: pdb, coverage's C tracer, ``profile``) or, on CPython 3.12+, while a
``sys.monitoring`` tool has events on (cProfile, coverage's ``sysmon`` core):
``_hook.watched()``.  terra_bc then keeps out of the tool's sight:

* a frame that begins while a tool watches runs its original code (``_hook.c``), so the
  tool sees the program it sees without terra_bc, running eagerly;
* no iteration opens while a tool watches (``discovery.on_loop``, ``Unit.__call__``; a
  function unit's call begins unmodified);
* an iteration open when a tool starts watching (``breakpoint()`` in a loop's turn) runs
  the rest of its code eagerly (``on_watched``): every value Python holds is computed
  first, so a debugger shows values and later ops are plain JAX calls.

Once no tool watches, the next iteration co-executes again.

The program changing ``jax.config`` inside an iteration is handled the same way
(``watch_config``, ``before_change``): the rest of that iteration runs eagerly.
"""
from __future__ import annotations

import contextlib
import os
import sys

import jax
import jaxlib

from .. import _hook
from ..counters import counts
from . import journal, launching
from .context import COEXEC, EAGER, TRACE, current
from .values import PACKAGE_DIR

WATCHED = "a debugger, profiler or coverage tool started watching (the rest ran eagerly)"


def on_watched(busy):
    """``_hook.c``: a tool watches this thread while its iteration routes DL-op calls.
    ``busy``: a routed call is in progress (the runtime is running an op, recording a
    gradient, mapping a function over a tree).  Returns whether the call at hand is still
    routed (out of the tool's sight)."""
    it = current()
    if it is None:
        return False
    if it.opaque_depth:  # JAX runs an op's own Python: its calls are JAX's, plain calls
        return False
    if busy or it.grad_depth:  # mid-way through the runtime's work: routed until it is done
        return True
    run_rest_eagerly(it)
    _hook.set_thread_routing(False)  # (the iteration's end puts routing back as it was)
    return False


def run_rest_eagerly(it, reason=WATCHED):
    """``it`` runs the rest of its code eagerly: the values Python holds are computed now
    (what its mode recorded or co-executed so far) and handed to their placeholders; no
    path is kept from this iteration.  ``reason``: for its unit's journal."""
    if it.mode == EAGER:
        return
    if it.recording is not None:
        it.recording.__exit__(None, None, None)
        it.recording = None
    alive = launching.alive(it)
    if it.mode == COEXEC:
        stop = it.path.events[it.pos - 1].mark if it.pos else 0
        launching.launch(it, stop, [p._id for p in alive if p._val is None], alive)
    elif it.mode == TRACE:
        rec = it.path.recorder
        unvalued = {t.id for t in rec.unvalued()}
        if unvalued:  # values recorded abstractly that Python holds
            launching.launch(it, rec.mark(), sorted(launching.held(it) & unvalued), alive)
            launching.give_values(it)
        rec.compute_values(None)
    it.mode = EAGER
    launching.settle(it, alive)
    counts["eager_fallbacks"] += 1
    journal.fallback(it.unit, reason)


# **** jax.config changed while an iteration is open ****

def watch_config():
    """Have every change of JAX's configuration made while an iteration is open pass
    through ``before_change`` first: ``jax.config.update`` (``State._set``) and its context
    managers (``jax.enable_x64(...)``, ``jax.default_device(...)``, ``jax.disable_jit()``:
    ``StateContextManager``).  Once, at import."""
    from jax._src import config as jax_config
    state, manager = jax_config.State, jax_config.StateContextManager
    if getattr(state._set, "__terra_bc__", False):
        return
    real_set, real_enter, real_exit = state._set, manager.__enter__, manager.__exit__
    unset = jax_config.config_ext.unset

    def _set(self, value):
        if current() is not None:
            before_change(self, self._parser(value) if self._parser else value)
        return real_set(self, value)

    def __enter__(self):
        if current() is not None:
            before_change(self.state, self.new_val)
        return real_enter(self)

    def __exit__(self, *exc):
        if current() is not None:
            prev = self.prev
            before_change(self.state, self.state.get_global() if prev is unset else prev)
        return real_exit(self, *exc)

    for owner, name, fn in ((state, "_set", _set), (manager, "__enter__", __enter__),
                            (manager, "__exit__", __exit__)):
        fn.__terra_bc__ = True
        setattr(owner, name, fn)


def before_change(state, value):
    """The program is about to set JAX's option ``state`` to ``value`` while an iteration of
    this thread is open.  Where that changes what ops compute or how JAX runs them (an
    option JAX keys its caches on, ``guards.config_key``: x64, the default device...; or
    one that makes JAX run each op as it comes, ``context.eager_only``), the iteration runs
    its rest eagerly: what it did so far is computed now, under the configuration it was
    recorded with, and its later ops run as plain JAX under the new one.  The next
    iteration takes a path recorded under the new configuration, or traces one (the enter
    event's guard).  Changes JAX makes itself inside terra_bc's work are not the program's."""
    it = current()
    if it is None or it.mode == EAGER or it.opaque_depth or it.grad_depth \
            or state.name not in _watched_names():
        return
    try:
        if state.value is value or state.value == value:
            return
    except Exception:  # (values JAX compares in its own way: take it as a change)
        pass
    if _made_by_terra_bc():
        return
    run_rest_eagerly(it, f"jax.config {state.name} changed inside an iteration (the rest ran eagerly)")


_names = []


def _watched_names():
    if not _names:
        from jax._src import config as jax_config
        try:
            names = set(jax_config.trace_context_names())
        except Exception:  # (an older jaxlib: the options known to change what ops compute)
            names = {"jax_enable_x64", "jax_default_device", "jax_default_matmul_precision",
                     "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion"}
        _names.append(names | {"jax_disable_jit", "jax_debug_nans", "jax_debug_infs"})
    return _names[0]


def _made_by_terra_bc():
    """Is the change being made by JAX inside terra_bc's own work (a launch, a compile)
    rather than by the program?  The first frame out of JAX and contextlib decides."""
    frame = sys._getframe(3)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_PASSED):
            return name.startswith(PACKAGE_DIR)
        frame = frame.f_back
    return False


_PASSED = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, jaxlib)) + (contextlib.__file__,)
