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
"""
from __future__ import annotations

from .. import _hook
from ..counters import counts
from . import journal, launching
from .context import COEXEC, EAGER, TRACE, current

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


def run_rest_eagerly(it):
    """``it`` runs the rest of its code eagerly: the values Python holds are computed now
    (what its mode recorded or co-executed so far) and handed to their placeholders; no
    path is kept from this iteration."""
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
    journal.fallback(it.unit, WATCHED)
