"""Faults at the end of an iteration: a launch that fails (terra_bc's compile or segment, or
the program's own callback that raises) never loses values or an exception.  Terra_bc's
failure falls back to eager (the values Python holds are computed op by op, the unit runs
eagerly from then on, `eager_fallbacks` counts it); the program's error is raised as eager
JAX raises it (same type), where the loop turns, and the next code sees correct values."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import checkify

import terra_bc
from terra_bc import jaxpr_builder

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)


@pytest.fixture(autouse=True)
def fresh_units():
    """Each test's loops start undecided (a unit a failure made eager is forgotten), and
    compile afresh (an executable an earlier test cached for the same structure would let
    an injected compile failure go unseen)."""
    terra_bc.reset()
    jaxpr_builder.clear_compile_cache()
    yield
    terra_bc.reset()


def training(steps):
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    x = jnp.arange(4.0) / 4
    losses = []
    for _ in range(steps):
        y = jnp.tanh(w @ x)
        w = w - 0.1 * jnp.outer(y, x)
        losses.append(jnp.sum(y * y))
    return [float(v) for v in losses], w


@pytest.mark.parametrize("where", ["compile", "launch"])
def test_a_failed_compile_or_launch_falls_back_to_eager(monkeypatch, where):
    want = training(6)
    real_jit, real_keep = jaxpr_builder.jit_segment, jaxpr_builder.keep_executable

    def failing_jit(segment, name):
        raise RuntimeError("injected compile failure")

    calls = []

    def keep_failing(segment, fn, wait_only=False):
        exe = real_keep(segment, fn, wait_only)

        def launch(*args):  # (the executable's third launch fails, as XLA's error would)
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected launch failure")
            return exe(*args)
        return launch

    if where == "compile":
        monkeypatch.setattr(jaxpr_builder, "jit_segment", failing_jit)
    else:
        monkeypatch.setattr(jaxpr_builder, "keep_executable", keep_failing)
    with terra_bc.enabled():
        got = training(6)
    monkeypatch.setattr(jaxpr_builder, "jit_segment", real_jit)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    assert terra_bc.stats()["eager_fallbacks"] >= 1
    assert where == "compile" or len(calls) >= 3
    text = str(terra_bc.explain())
    assert "injected" in text  # the reason, in explain()'s journal


def raising_callback(steps, limit):
    seen = []

    def check(v):
        seen.append(float(v))
        if v > limit:
            raise ValueError(f"too big: {float(v):.3f}")

    x = jnp.ones(3)
    caught = None
    try:
        for _ in range(steps):
            jax.debug.callback(check, jnp.sum(x))
            x = x * 1.3
    except Exception as e:  # noqa: BLE001 (the test compares what was raised)
        caught = e
    jax.effects_barrier()
    after = float(jnp.sum(x * 2.0))  # code after the loop sees correct values
    return type(caught), seen, after


def test_a_callback_that_raises_raises_the_same_exception_type():
    want_type, want_seen, _ = raising_callback(10, 5.0)
    with terra_bc.enabled():
        got_type, got_seen, after = raising_callback(10, 5.0)
    assert want_type is ValueError
    assert got_type is want_type
    # The same values reached the callback, up to the one that raised (as under jax.jit,
    # Python has run the rest of that turn by then: `x` is one step further).
    np.testing.assert_allclose(got_seen[:len(want_seen)], want_seen, rtol=1e-5)
    assert got_seen[len(want_seen) - 1] > 5.0
    assert np.isfinite(after)
    assert terra_bc.stats()["iterations_coexecuted"] > 0


def test_a_loop_after_a_failure_runs_eagerly_and_correctly(monkeypatch):
    """The unit whose end failed runs eagerly from then on: a second run of the loop (the
    same loop statement) gives eager's values with no further compile."""
    want = training(5)
    monkeypatch.setattr(jaxpr_builder, "jit_segment",
                        lambda segment, name: (_ for _ in ()).throw(RuntimeError("injected")))
    with terra_bc.enabled():
        first = training(5)
        compiles = terra_bc.stats()["compiles"]
        second = training(5)
    for got in (first, second):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert terra_bc.stats()["compiles"] == compiles
    # terra_bc.reset() forgets the failure: the loop is a unit again.
    monkeypatch.undo()
    terra_bc.reset()
    before = terra_bc.stats()["iterations_coexecuted"]
    with terra_bc.enabled():
        third = training(5)
    np.testing.assert_allclose(third[0], want[0], rtol=1e-5)
    assert terra_bc.stats()["iterations_coexecuted"] > before


def held_by_chance(steps):
    """Python holds `y` at the fetch in one turn only (as a library's gradients are held
    by reference cycles the garbage collector has not freed yet): that turn's launch must
    not compile the segment again, and `y` is computed when Python reads it."""
    x = jnp.linspace(0.0, 1.0, 6)
    kept, losses = [], []
    for i in range(steps):
        y = jnp.tanh(x) * 3.0
        z = jnp.sum(y * y)
        if i == 2:
            kept.append(y)
        del y
        losses.append(float(z))
        x = x * 0.9 + 0.01
    return losses, [np.asarray(v) for v in kept]


def test_a_value_held_by_chance_reuses_the_compiled_segment():
    want = held_by_chance(6)
    with terra_bc.enabled():
        got = held_by_chance(6)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1][0], want[1][0], rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] == 5
    assert stats["compiles"] == 1


# ------------------------------------------------------------------ errors inside a segment

def host_double(v):
    v = np.asarray(v)
    if v.sum() > 3.0:
        raise ValueError(f"too big: {v.sum():.3f}")
    return (2 * v).astype(np.float32)


def callback_that_fails_at_some_turns(steps):
    """A `pure_callback` whose Python raises at some turns (inside a segment: XLA reports it
    as its runtime error, eager JAX raises the callback's ValueError)."""
    x, log = jnp.linspace(0.1, 0.2, 4), []
    for i in range(steps):
        try:
            y = jax.pure_callback(host_double, jax.ShapeDtypeStruct((4,), jnp.float32),
                                  x * (1 + i % 4))
            log.append(round(float(jnp.sum(y)), 5))
        except ValueError as e:  # (JAX's message holds the traceback: its last line compared)
            log.append((type(e).__name__, str(e).splitlines()[-1]))
        x = x * 1.1
    return log, np.asarray(x)


def test_a_callback_that_raises_inside_a_segment_raises_the_same_type_mid_iteration():
    want = callback_that_fails_at_some_turns(12)
    assert any("too big" in str(v) for v in want[0])
    with terra_bc.enabled():
        got = callback_that_fails_at_some_turns(12)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 8  # (the program's error is not terra_bc's)
    assert stats["eager_fallbacks"] == 0


def checked(v):
    checkify.check(jnp.all(v < 2.0), "v too big: {}", jnp.max(v))
    return v * 2


def checkified(steps):
    x, log = jnp.linspace(0.5, 1.0, 4), []
    check = checkify.checkify(checked)
    for i in range(steps):
        err, y = check(x * (1 + 0.2 * i))
        try:
            err.throw()
            log.append(round(float(jnp.sum(y)), 5))
        except Exception as e:  # noqa: BLE001 (the type is compared with eager's)
            log.append(type(e).__name__)
        x = x * 1.01
    return log, np.asarray(x)


def test_a_failed_checkify_check_raises_as_eagerly():
    want = checkified(8)
    assert "JaxRuntimeError" in want[0]
    with terra_bc.enabled():
        got = checkified(8)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
