"""Units found without code changes (``python -m terra_bc``): loops and functions.

* A ``for`` or ``while`` loop whose turns call DL ops is a unit, each turn an iteration
  (``on_loop``, called by ``_hook.c`` at each turn and when the loop is left: a ``for``
  loop's watched iterator, a ``while`` loop's LoopHead and LoopExit calls).
* A function that ran a DL op outside any iteration is marked (``mark_caller``); from its
  second call each call is an iteration (``on_call``), unless it records too few ops.

Nesting picks the repeating level: a loop inside an iteration is part of it, unless it
turns more than ``inner_turns`` times per outer iteration; then the inner loop is the unit.
"""
from __future__ import annotations

import inspect

from .. import _hook, scope
from ..counters import counts
from . import context, journal
from .context import TRACE, LoopTurn, plain_trace, thread
from .settings import MIN_UNIT_OPS, settings
from .units import Unit
from .values import user_line

_loop_units = {}      # LoopMark -> Unit
_code_units = {}      # rewritten code -> its Unit (function units found without decoration)
functions_on = False


# ------------------------------------------------------------------ loop units

FIRST_TURN = 3  # on_loop's ``exiting`` when a loop's first turn begins (see _hook.c)
# In an outer loop's first turn, the turns an inner loop of unknown length (over a zip, an
# enumerate, a generator) makes before it is taken for the unit: a network's heads or
# layers zipped with their parameters turn fewer times, epoch 0's batch loop more.
FIRST_TURN_INNER_TURNS = 4


def on_loop(mark, token, exiting):
    """A watched loop begins a turn (exiting=0; FIRST_TURN: its first) or is left (1; 2: by
    an exception).  ``mark``: the ``for`` loop's LoopMark (``token``: its LoopIter) or the
    ``while`` loop's LoopHead (``token``: its frame).  Returns whether an iteration is open
    for this loop afterwards, or the program's own error met ending the last turn's
    iteration (a callback that raised, see Unit.end) or an interrupt (the KeyboardInterrupt
    a signal handler raised while this ran), which the loop raises where it turns (see
    ``_hook.c``); a failure of terra_bc's own is never the loop's exception.  After any
    error no turn of this loop is left open: C takes none to be."""
    try:
        return _on_loop(mark, token, exiting)
    except BaseException as error:
        _close_turn(mark, token)
        if isinstance(error, Exception) and error is not thread.program_error:
            raise
        thread.program_error = None
        return error


def _close_turn(mark, token):
    """After an error in on_loop: the turn of this loop still open (the error came before it
    ended), or an iteration opened for it that is not its turn yet (it came in between),
    ends as a turn that did not complete.  Best effort: the error at hand is the one that
    goes on (a second interrupt here is the program's too)."""
    try:
        turn = thread.loop
        if turn is not None and turn.mark is mark and turn.token == token:
            _end_turn(ok=False)
        it = context.current()
        if it is not None and it.unit.mark is mark and (thread.loop is None
                                                         or thread.loop.iteration is not it):
            it.unit.end(it, ok=False)
    except Exception:
        pass


def _on_loop(mark, token, exiting):
    """on_loop's work.

    A loop's first turn is an iteration too (traced, it costs about a ``jax.jit`` first
    call, where run plainly it cost an eager first step and the second turn still traced):
    one that called no JAX is forgotten (``_end_turn``)."""
    cur = thread.loop
    loop = (mark, token)  # one execution of one loop statement
    first = exiting == FIRST_TURN
    why = context.eager_only()  # (jax_disable_jit, jax_debug_nans: no turn opens either)
    if exiting and not first or _hook.watched() or why:  # (no turn opens while a tool watches: tools.py)
        if cur is not None and (cur.mark, cur.token) == loop:
            _end_turn(ok=exiting != 2)
        if why and (first or not exiting) and mark in _loop_units:  # (a turn ran eagerly)
            counts["eager_fallbacks"] += 1
            journal.fallback(_loop_units[mark], why)
        return False
    outer = context.current()
    if cur is None and outer is not None and not _loop_takes_over(outer, loop):
        return False
    if thread.opaque or not plain_trace(cur.iteration.recording if cur is not None else None):
        return False  # JAX is tracing user code (grad, jit, vmap): its loops are its own
    if cur is not None:
        if (cur.mark, cur.token) == loop:
            if not _end_turn(ok=True):
                return False
        else:  # nested in another loop's turn: part of it, unless it turns often
            outer_it = cur.iteration
            if outer_it.grad_depth or outer_it.opaque_depth:
                return False  # (inside a differentiated function or an op: part of it)
            cur.inner_turns[loop] = cur.inner_turns.get(loop, 0) + 1
            # In an outer loop's first turn, before it ever was an iteration, an inner loop
            # that turns more than a few times is the unit (epoch 0's batch loop; the outer
            # one may still be, from its 2nd turn), unless it says it is short (over a list,
            # tuple, range, dict: the heads of a network, its layers): part of the turn.
            turns = getattr(mark, "turns", -1)
            tentative = cur.first and not cur.iteration.unit.paths \
                and not 0 <= turns <= settings["inner_turns"]
            limit = (FIRST_TURN_INNER_TURNS if turns < 0 else 1) if tentative \
                else settings["inner_turns"]
            if cur.inner_turns[loop] <= limit and not _known_while(mark):
                return False
            cur.mark.state = 0 if tentative else -1  # the outer loop is not the repeating level
            _end_turn(ok=True, abandon=True)
    unit = _loop_units.get(mark)
    if unit is None:  # (setdefault: another thread may be making it too)
        unit = _loop_units.setdefault(mark, Unit(None, f"loop at {user_line()}"))
        unit.mark = mark
        mark.state = 1
    if unit.eager_reason:
        mark.state = -1
        counts["eager_fallbacks"] += 1
        journal.fallback(unit, unit.eager_reason)
        return False
    if unit.runs_plainly():
        return False
    it, _ = unit.begin((), {})
    thread.loop = LoopTurn(mark, token, it, first=first)
    return True


def _known_while(mark):
    """A ``while`` loop that was already a unit with a recorded path (its turns ran as
    iterations before the loop around it turned again: an episode loop) stays the unit."""
    unit = _loop_units.get(mark)
    return isinstance(mark, _hook.LoopHead) and unit is not None and bool(unit.paths)


def _loop_takes_over(outer, loop):
    """Inside a function's iteration a loop is part of it, unless the function was found
    automatically and the loop turns often: then the loop is the repeating level, and the
    function's iteration ends here (the function runs plainly from now on)."""
    if not outer.auto or outer.opaque_depth or outer.grad_depth:
        return False
    outer.loop_turns[loop] = outer.loop_turns.get(loop, 0) + 1
    if outer.loop_turns[loop] <= settings["inner_turns"]:
        return False
    unit = outer.unit
    unit.eager_reason = "a loop inside it turns more often: the loop is the unit"
    unit.end(outer, ok=True, abandon=True)
    _hook.set_unit_mark(unit.code, None)
    return True


def _end_turn(ok, abandon=False):
    """End the open turn's iteration.  ``abandon``: the loop is not the repeating level (a
    loop inside it turns more often): what its turn recorded runs eagerly, not compiled.
    Returns False where the turn was a loop's first and called no JAX: the iteration is
    forgotten, and the loop is undecided again (see _hook.c: turns that call no JAX are not
    reported while no iteration is open)."""
    turn = thread.loop
    it = turn.iteration
    unit = it.unit
    if turn.first and ok and not abandon and it.mode == TRACE and not unit.paths \
            and all(ev.kind == "enter" for ev in it.path.events):
        thread.loop = None
        unit.discard(it)
        turn.mark.state = 0
        return False
    # (The turn stays this thread's until its end has begun: an interrupt that comes as it
    # begins leaves it for on_loop to end, see _close_turn; Unit.end runs once.)
    unit.end(it, ok, abandon)
    thread.loop = None
    return True


def set_loops(on):
    """Co-execute the turns of repeating ``for`` loops (units found without decoration)."""
    _hook.set_loop_handler(on_loop if on else None)


# ------------------------------------------------------------------ function units

def mark_caller(code):
    """A function ran a DL op outside any iteration: calls of it may become iterations
    (the user's functions only: a library's are part of the user's iteration)."""
    if not functions_on or code in _code_units or code.co_flags & inspect.CO_GENERATOR \
            or code.co_name == "<module>" or scope.is_library(code.co_filename):
        return
    unit = _code_units[code] = Unit(None, f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})")
    unit.code = code
    _hook.set_unit_mark(code, unit)


def on_call(unit, token, state):
    """A call of a marked function begins (state 0: return an iteration to open one, or None)
    or ends (1: returned, 2: raised).  A function called repeatedly is a unit from its
    second call; inside another iteration it is part of that one."""
    if state:
        if context.current() is token:  # (a loop inside may have taken over)
            unit = token.unit  # (this thread's copy, where another thread held it: claim)
            unit.end(token, state == 1)
            if token.mode == TRACE or unit.eager_reason:  # (a new path: is the unit worth it?)
                _drop_if_small(unit)
        return None
    if context.current() is not None or thread.opaque or unit.eager_reason or context.eager_only():
        return None
    if unit.runs_plainly(plain_calls=1) or not plain_trace():  # a unit from the 2nd call
        return None
    it, _ = unit.begin((), {})
    it.auto = True
    return it


def _drop_if_small(unit):
    small = unit.paths and all(sum(ev.kind == "op" for ev in path.events) < MIN_UNIT_OPS
                               for path in unit.paths)
    if small or unit.eager_reason:
        unit.eager_reason = unit.eager_reason or f"fewer than {MIN_UNIT_OPS} DL ops per call"
        _hook.set_unit_mark(unit.code, None)  # plain calls from now on, no handler


def set_functions(on):
    """Co-execute the calls of functions called repeatedly (units found without decoration)."""
    global functions_on
    functions_on = bool(on)
    _hook.set_call_handler(on_call if on else None)
