"""KeyboardInterrupt at random points: while a loop unit traces, co-executes, launches,
compiles and fetches (docs/reliability.md, "Faults mid-iteration").

A timer interrupts the program after a delay drawn from a fixed seed; its handler raises
``KeyboardInterrupt`` (from ``signal.setitimer``'s SIGALRM, or ``_thread.interrupt_main()``
called by a timer thread).  The program catches it and goes on: one caught inside a step
retries that step, one caught outside the loop (it came at the loop's head, where terra_bc
ends a turn and begins the next) runs the loop again from the last step it committed.  A
step commits in one store with no call in it, so wherever the interrupt lands the program's
result is defined: the eager run's, with no interrupt.  Each run must give exactly that,
catch every interrupt that fired (none lost, none extra), and leave no iteration open and no
unit held.  Which delays land where depends on the machine's speed; what is asserted holds
for every one of them."""
import _thread
import ast
import functools
import gc
import inspect
import itertools
import random
import signal
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import pytest

import jax.numpy as jnp

import terra_bc
from terra_bc import jaxpr_builder
from terra_bc.runtime import units

from conftest import left_open

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)

STEPS = 12
TRIALS = 60        # runs of the program under terra_bc, each with up to DELAYS interrupts
DELAYS = 4
COLD_EVERY = 5     # every 5th run starts afresh: it traces and compiles again


class Interrupter:
    """Raises KeyboardInterrupt in the main thread after each of ``delays`` (seconds), one
    at a time: the next is armed when the program has caught the last.  Notes where each
    landed (the innermost frame of terra_bc's on the stack, else "program")."""

    def __init__(self, delays, how):
        self.delays, self.how = list(delays), how
        self.armed = self.handling = False
        self.fired = self.caught = 0
        self.landed, self.raised, self.got = [], [], []
        self.stacks = []  # where each landed, in full (what a lost one's report shows)
        self.timer = None

    def handler(self, signum, frame):
        if self.handling:  # (the next signal came while this handler ran: raised here, it
            self._again()  # would go where the last one landed, which may swallow it)
            return
        self.handling = True
        try:
            if self.armed and _swallowed_there(frame):
                self._again()
            elif self.armed:
                self.armed = False
                self.fired += 1
                self.landed.append(_where(frame))
                self.stacks.append("".join(traceback.format_stack(frame, limit=25)))
                self.raised.append(KeyboardInterrupt())
                raise self.raised[-1]
        finally:
            self.handling = False

    def catch(self, error):
        self.caught += 1
        self.got.append(error)

    def lost(self):
        """Where the interrupts the program did not catch had landed."""
        return [f"{w}, in:\n{stack}" for w, e, stack in zip(self.landed, self.raised, self.stacks)
                if not any(e is g for g in self.got)]

    def arm(self):
        if self.delays:
            self.armed = True
            delay = self.delays.pop()
            if self.how == "itimer":
                signal.setitimer(signal.ITIMER_REAL, delay)
            else:
                self.timer = threading.Timer(delay, _thread.interrupt_main)
                self.timer.start()

    def _again(self):
        """Interrupt a moment later (see _swallowed_there)."""
        if self.how == "itimer":
            signal.setitimer(signal.ITIMER_REAL, 1e-4)
        else:
            self.timer = threading.Timer(1e-4, _thread.interrupt_main)
            self.timer.start()

    def disarm(self):
        self.armed = False
        if self.how == "itimer":
            signal.setitimer(signal.ITIMER_REAL, 0)
        elif self.timer is not None:
            self.timer.cancel()
            self.timer.join()

    def __enter__(self):
        sig = signal.SIGALRM if self.how == "itimer" else signal.SIGINT
        self.previous = (sig, signal.signal(sig, self.handler))
        return self

    def __exit__(self, *exc):
        self.disarm()
        signal.signal(*self.previous)


MLIR_WALK_CALLBACKS = ("_strip_kernel", "_update_bc_attribute")  # (jax/_src/cache_key.py)


def _swallowed_there(frame):
    """Would an exception raised in ``frame`` be lost, or break JAX, with or without
    terra_bc?  CPython reports one raised in a garbage collector callback or a finalizer
    as unraisable (JAX's gc callback runs at any allocation); JAX 0.12's caches turn one
    raised while comparing or hashing their keys into a ValueError; some of JAX's code
    catches everything (a bare ``except:`` that does not raise again); and JAX 0.12's trace
    context is not interrupt-safe (``take_current_trace`` sets no trace, and an exception
    raised before its ``__exit__`` has put the previous one back leaves none: every later
    op fails); one raised in a function MLIR's ``Operation.walk`` calls (JAX's compilation
    cache key strips kernels and attributes that way) does not get out of MLIR's C++.  The
    interrupt goes to the program a moment later instead."""
    code = frame.f_code
    if code.co_filename.replace("\\", "/").endswith("jax/_src/core.py") \
            and code.co_name in ("set_trace", "__enter__", "__exit__"):
        return True
    if any(f.f_code.co_name in MLIR_WALK_CALLBACKS
           and f.f_code.co_filename.replace("\\", "/").endswith("jax/_src/cache_key.py")
           for f in _jax_frames(frame)):
        return True
    if any(_swallows(f.f_code, f.f_lineno) for f in _jax_frames(frame)):
        return True
    inner = frame  # (and the frames of JAX's own around it: a property __eq__ reads)
    while inner is not None:
        if inner.f_code.co_name in ("__eq__", "__hash__"):
            return True
        inner = inner.f_back
        if inner is not None and "/jax/" not in inner.f_code.co_filename:
            break
    while frame is not None:
        if _a_callback(frame.f_code):
            return True
        if frame.f_code.co_name == "transform" and frame.f_code.co_filename.endswith(
                "frames.py") and _a_callback(frame.f_locals.get("code")):
            return True  # (terra_bc deciding about a callback's code as it begins)
        frame = frame.f_back
    return False


def _a_callback(code):
    """Is ``code`` a garbage collector callback, a finalizer or a weakref's callback
    (WeakKeyDictionary's `remove`), whose exceptions CPython reports as unraisable?"""
    return code is not None and (
        code in {getattr(cb, "__code__", None) for cb in gc.callbacks}
        or code.co_name == "__del__" or code.co_filename.endswith(("weakref.py", "_weakrefset.py")))


def _jax_frames(frame):
    """``frame`` and its callers, as long as they are JAX's."""
    while frame is not None and "/jax/" in frame.f_code.co_filename.replace("\\", "/"):
        yield frame
        frame = frame.f_back


def _swallows(code, line):
    """Is ``line`` of ``code`` inside a ``try`` whose bare ``except:`` (or ``except
    BaseException``) does not raise again?  (JAX's tree_util: "not our fault".)"""
    return any(start <= line <= end for start, end in _swallowing_tries(code))


@functools.lru_cache(maxsize=None)
def _swallowing_tries(code):
    try:
        lines, first = inspect.getsourcelines(code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return ()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and node.body:
            for handler in node.handlers:
                catches_all = handler.type is None or (
                    isinstance(handler.type, ast.Name) and handler.type.id == "BaseException")
                if catches_all and not any(isinstance(n, ast.Raise) for n in ast.walk(handler)):
                    out.append((node.body[0].lineno + first - 1, node.body[-1].end_lineno + first - 1))
    return tuple(out)


def _where(frame):
    while frame is not None:
        name = frame.f_code.co_filename
        if "/terra_bc/" in name:
            return name.split("/terra_bc/")[-1] + ":" + frame.f_code.co_name
        frame = frame.f_back
    return "program"


def step(w, k, made=None):
    x = jnp.arange(4.0) / (4 + k)
    y = jnp.tanh(w @ x)
    if made is not None:
        made.append(y)
    loss = float(jnp.sum(y * y))
    return w - 0.1 * jnp.outer(y, x), loss


def steps_for(box, intr):
    """Steps from the committed state ``box[0]`` = (w, steps done, losses) to STEPS.  What a
    step made before an interrupt is read after it: it must have its value."""
    for _ in itertools.count():
        if box[0][1] == STEPS:
            break
        made = []
        try:
            w, loss = step(box[0][0], box[0][1], made)
            box[0] = (w, box[0][1] + 1, box[0][2] + (loss,))  # the commit: one store, no call
        except KeyboardInterrupt as e:  # (inside the step: it is tried again)
            intr.catch(e)
            assert all(np.isfinite(float(jnp.sum(v))) for v in made)
            intr.arm()


def steps_while(box, intr):
    while box[0][1] < STEPS:
        made = []
        try:
            w, loss = step(box[0][0], box[0][1], made)
            box[0] = (w, box[0][1] + 1, box[0][2] + (loss,))
        except KeyboardInterrupt as e:
            intr.catch(e)
            assert all(np.isfinite(float(jnp.sum(v))) for v in made)
            intr.arm()


def run(box, intr, loop):
    """The loop, run again from the last commit where an interrupt leaves it (one at its
    head, where terra_bc ends a turn and begins the next).  (The loop is a function of its
    own: CPython 3.13 lets an exception raised at a loop's back edge skip a ``try`` around
    the loop in the same function, with or without terra_bc.)"""
    try:
        intr.arm()
        steps_for(box, intr) if loop == "for" else steps_while(box, intr)
        intr.disarm()
        return box[0]
    except KeyboardInterrupt as e:
        intr.catch(e)
        return run(box, intr, loop)


def program(delays, loop, how):
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    with Interrupter(delays, how) as intr:
        w, done, losses = run([(w, 0, ())], intr, loop)
    return np.asarray(w), losses, intr


def nothing_left_open():
    """No iteration open in this thread (nor routing, a loop's turn, a JAX trace of its
    own: conftest.left_open), no unit held by any."""
    busy = [u for u in list(units.all_units) if u.busy.locked()]
    return not left_open() and not busy


def timed(loop, how):
    t0 = time.perf_counter()
    with terra_bc.enabled():
        program([], loop, how)
    return time.perf_counter() - t0


@pytest.mark.parametrize("loop,how", [("for", "itimer"), ("while", "itimer"),
                                      ("for", "interrupt_main")])
def test_interrupts_at_random_points_never_change_what_the_program_computes(loop, how):
    terra_bc.reset()
    jaxpr_builder.clear_compile_cache()
    want_w, want_losses, _ = program([], loop, how)
    cold = timed(loop, how)        # traces and compiles
    warm = timed(loop, how)        # co-executes
    rng = random.Random(14)
    fired, landed = 0, []
    for trial in range(TRIALS):
        span = warm
        if trial % COLD_EVERY == 0:
            terra_bc.reset()
            jaxpr_builder.clear_compile_cache()
            span = cold
        delays = [rng.uniform(0.0, span / 2) for _ in range(DELAYS)]
        with terra_bc.enabled():
            w, losses, intr = program(delays, loop, how)
        where = f"run {trial}, interrupts at {intr.landed}"
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=where)
        np.testing.assert_allclose(w, want_w, rtol=1e-5, err_msg=where)
        assert intr.caught == intr.fired, (where, intr.lost())  # each reached the program, once
        assert nothing_left_open(), where
        fired += intr.fired
        landed += intr.landed
    # The runs did what they claim: interrupts landed, many inside terra_bc's own code.
    assert fired >= TRIALS // 2
    assert sum(place != "program" for place in landed) >= fired // 4
    # Afterwards the unit co-executes, or runs eagerly saying why (explain()).
    terra_bc.reset_stats()
    with terra_bc.enabled():
        w, losses, _ = program([], loop, how)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    report = str(terra_bc.explain())
    assert terra_bc.stats()["iterations_coexecuted"] >= STEPS - 2 or "runs eagerly:" in report, report
    print(f"\n{loop}/{how}: {fired} interrupts caught;",
          sorted({p: landed.count(p) for p in landed}.items(), key=lambda kv: -kv[1])[:12],
          file=sys.stderr)


def training(steps):
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    losses = []
    for k in range(steps):
        w, loss = step(w, k)
        losses.append(loss)
    return np.asarray(w), losses


def test_an_interrupt_as_a_recording_ends_leaves_no_trace_of_terra_bc_current(monkeypatch):
    """Not by chance: the interrupt comes in the one place that left JAX inside a finished
    recording for good (Recorder.__exit__, as it reads the current trace, after it had let
    go of its trace context), as the loop's first traced turn ends.  The loop ends there;
    afterwards JAX runs under its eager trace, and the same loop co-executes with eager's
    values."""
    want = training(STEPS)
    terra_bc.reset()
    real, fired = jaxpr_builder.current_trace, []

    def current_trace():
        caller = sys._getframe(1).f_code
        if not fired and caller is jaxpr_builder.Recorder.__exit__.__code__:
            fired.append(caller.co_name)
            raise KeyboardInterrupt
        return real()
    monkeypatch.setattr(jaxpr_builder, "current_trace", current_trace)
    with terra_bc.enabled(), pytest.raises(KeyboardInterrupt):
        training(STEPS)
    monkeypatch.setattr(jaxpr_builder, "current_trace", real)
    assert fired and nothing_left_open(), left_open()
    terra_bc.reset_stats()
    with terra_bc.enabled():
        again = training(STEPS)
    np.testing.assert_allclose(again[1], want[1], rtol=1e-5)
    np.testing.assert_allclose(again[0], want[0], rtol=1e-5)
    assert terra_bc.stats()["iterations_coexecuted"] >= STEPS - 2, terra_bc.stats()


def test_an_interrupt_that_leaves_the_loop_leaves_terra_bc_usable():
    """The interrupt is not caught inside the loop: it ends the loop (the unit's turn in
    the middle of its ops, a launch, or the turn's end), then the same loop and another one
    run without one: eager's values, co-executed."""
    want = training(STEPS)
    rng = random.Random(3)
    terra_bc.reset()
    with terra_bc.enabled():
        training(STEPS)
        t0 = time.perf_counter()
        training(STEPS)
        span = time.perf_counter() - t0
    for trial in range(20):
        intr = Interrupter([rng.uniform(0.0, span)], "itimer")
        with intr, terra_bc.enabled():
            try:
                intr.arm()
                training(STEPS)
                intr.disarm()
            except KeyboardInterrupt as e:
                intr.catch(e)
        assert intr.caught == intr.fired, intr.lost()
        assert nothing_left_open(), intr.landed
        terra_bc.reset_stats()
        with terra_bc.enabled():
            again = training(STEPS)
        np.testing.assert_allclose(again[1], want[1], rtol=1e-5)
        np.testing.assert_allclose(again[0], want[0], rtol=1e-5)
        assert terra_bc.stats()["iterations_coexecuted"] >= STEPS - 2
    with terra_bc.enabled():
        x, total = jnp.ones(3), 0.0
        for k in range(6):   # another loop: a unit of its own
            x = jnp.sin(x) + k
            total += float(x.sum())
    assert total == pytest.approx(sum(float(v) for v in _sines(6)), rel=1e-5)


def _sines(n):
    x, out = jnp.ones(3), []
    for k in range(n):
        x = jnp.sin(x) + k
        out.append(x.sum())
    return out


def test_interrupts_in_a_function_unit():
    """A ``@terra_bc.function`` step interrupted anywhere (begin, its ops, its end) and
    tried again: eager's values, every interrupt caught."""
    terra_bc.set_loops(False)
    unit_step = terra_bc.function(step)
    want = training(STEPS)

    def steps(box, intr):
        while box[0][1] < STEPS:
            try:
                w, loss = unit_step(box[0][0], box[0][1])
                box[0] = (w, box[0][1] + 1, box[0][2] + [loss])  # (one commit: no call)
            except KeyboardInterrupt as e:
                intr.catch(e)
                intr.arm()

    def run_(box, intr):
        try:
            intr.arm()
            steps(box, intr)
            intr.disarm()
        except KeyboardInterrupt as e:
            intr.catch(e)
            run_(box, intr)

    def program_(delays):
        box = [(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), 0, [])]
        with Interrupter(delays, "itimer") as intr:
            run_(box, intr)
        return np.asarray(box[0][0]), box[0][2], intr

    program_([])
    t0 = time.perf_counter()
    program_([])
    span = time.perf_counter() - t0
    rng = random.Random(5)
    fired = 0
    for trial in range(30):
        w, losses, intr = program_([rng.uniform(0.0, span / 2) for _ in range(DELAYS)])
        np.testing.assert_allclose(losses, want[1], rtol=1e-5, err_msg=str(intr.landed))
        np.testing.assert_allclose(w, want[0], rtol=1e-5, err_msg=str(intr.landed))
        assert intr.caught == intr.fired, intr.lost()
        assert nothing_left_open(), intr.landed
        fired += intr.fired
    assert fired > 0
    terra_bc.reset_stats()
    program_([])
    assert terra_bc.stats()["iterations_coexecuted"] >= STEPS - 1
