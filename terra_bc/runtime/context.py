"""The thread context: which iteration is open in this thread, and what opening it changed.

One place opens and closes an iteration (``open_iteration`` / ``close_iteration``).  The
open iteration itself is stored once, in C (``_hook.set_iteration``): the sites and the fast
path read it there, and Python reads it through ``current()``.  Opening one also routes this
thread's DL-op calls to the runtime and enables the frame hook, so that helpers the unit
calls get rewritten call sites too; closing it puts both back as they were.

The modes an iteration is in are here too: ``mode`` is compared by identity in C, so these
string objects are the only ones to use.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import jax

from .. import _hook, jaxpr_builder

TRACE, COEXEC, EAGER = "tracing", "co-execution", "eager"

current = _hook.current_iteration  # this thread's open iteration, or None


class _Thread(threading.local):
    def __init__(self):
        self.loop = None  # the LoopTurn open in this thread, if a loop unit's turn is
        self.opaque = 0   # > 0 while an eager DL op runs outside iterations (on_site)
        self.program_error = None  # the program's error met ending an iteration (Unit.end)


thread = _Thread()


@dataclass(slots=True, eq=False)
class LoopTurn:
    """The turn of a loop unit open in this thread."""
    mark: object              # the loop's _hook.LoopMark (for) or _hook.LoopHead (while)
    token: int                # the running loop statement: its LoopIter (for), frame (while)
    iteration: object         # the Iteration this turn runs as
    inner_turns: dict = field(default_factory=dict)  # (mark, token) -> turns of loops nested in it
    first: bool = False       # the loop's first turn (dropped if it calls no JAX)


UNCHANGED = object()  # (an Iteration's was_routing / hook_was_enabled before it opens)


def open_iteration(it):
    """Make ``it`` this thread's open iteration; route DL ops to it, hook enabled.  What
    that changed is kept on the iteration (``was_routing``, ``hook_was_enabled``).  One C
    call, as is ``close_iteration``'s: an interrupt comes as a call returns, and between
    two calls it left a state changed that was not noted (see ``_hook.open_iteration``).
    An interrupt that comes before leaves none open, and ``close_iteration`` puts back
    only what was noted."""
    _hook.open_iteration(it)
    it.program_trace = jaxpr_builder.current_trace()


def close_iteration(it):
    """This thread as it was before ``open_iteration(it)``.  Once an iteration has ended
    its placeholders may be anywhere in the program (a list, a global), and any later DL-op
    call may receive one: from then on sites route DL-op calls outside iterations too,
    where ``dispatch.on_site`` runs them on concrete values.  Set once and kept, by
    design: programs that never open a unit pay nothing."""
    _hook.close_iteration(it, UNCHANGED)
    put_back_trace(it)


def put_back_trace(it):
    """JAX's current trace is the one the program ran under when ``it`` opened.  An
    interrupt that landed in JAX's switching of traces left another, or none
    (``jaxpr_builder.current_trace``); the iteration, ending or running its rest eagerly,
    puts it right.  (A recording still current as the iteration ends is left by this.)"""
    trace = it.program_trace
    if trace is not None and jaxpr_builder.current_trace() is not trace:
        jaxpr_builder.set_trace(trace)


def cut_short(error):
    """Can ``error`` have stopped terra_bc's own code half-way through a step of an iteration
    (an op being matched, a launch, a divergence)?  An asynchronous exception can come at
    any bytecode (the ``KeyboardInterrupt`` a signal handler raises, ``SystemExit``), and
    ``MemoryError`` at any allocation.  Other errors are raised where the runtime expects
    them and leave the iteration consistent (a program's error, JAX refusing an op)."""
    return not isinstance(error, Exception) or isinstance(error, MemoryError)


def leaving(error):
    """``error`` leaves terra_bc's code for the program's (a routed call, an operator, a
    fetch of a placeholder): if it may have cut a step of the open iteration short, the
    iteration runs its rest eagerly (``Iteration.abort``).  Only at the outermost such
    call: inside an op JAX runs itself or a function being differentiated, the caller
    that routed it does this once the error reaches it."""
    it = current()
    if it is not None and not it.opaque_depth and not it.grad_depth and cut_short(error):
        it.abort(error)


def eager_only():
    """Why JAX must run each op the moment the program reaches it, or None.  Under
    ``jax_disable_jit`` eager JAX runs a jitted function's Python at every call, op by op;
    under ``jax_debug_nans`` / ``jax_debug_infs`` it checks every op's output and raises at
    the op that made a NaN.  Co-executed ops run later, fused, checked only where a segment
    ends: while one of these is on, no iteration opens (the program runs as plain JAX)."""
    for name, state in _EAGER_ONLY:
        if state.value:
            return f"{name} is on: JAX runs every op as the program reaches it"
    return None


def _eager_only_states():
    from jax._src import config as jax_config
    return tuple((f"jax_{n}", getattr(jax_config, n)) for n in ("disable_jit", "debug_nans", "debug_infs"))


_EAGER_ONLY = _eager_only_states()


def plain_trace(recording=None):
    """Is the current JAX trace the one this thread runs ops under: ``recording``'s (an
    iteration that is tracing), else the eager one?  Not so while JAX transforms user code
    (grad, jit, vmap) from a caller terra_bc does not route."""
    trace = jaxpr_builder.current_trace()
    if recording is not None:
        return recording.owns_trace(trace)
    return jaxpr_builder.is_eager_trace(trace)
