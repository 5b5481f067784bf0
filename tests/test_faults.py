"""Faults at the end of an iteration: a launch that fails (terra_bc's compile or segment, or
the program's own callback that raises) never loses values or an exception.  Terra_bc's
failure falls back to eager (the values Python holds are computed op by op, the unit runs
eagerly from then on, `eager_fallbacks` counts it); the program's error is raised as eager
JAX raises it (same type), where the loop turns, and the next code sees correct values."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc import jaxpr_builder
from terra_bc.runtime import compiling

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
    real_jit, real_run = jaxpr_builder.jit_segment, compiling.run

    def failing_jit(segment, name):
        raise RuntimeError("injected compile failure")

    calls = []

    def failing_run(it, entry, args, *rest):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected launch failure")
        return real_run(it, entry, args, *rest)

    if where == "compile":
        monkeypatch.setattr(jaxpr_builder, "jit_segment", failing_jit)
    else:
        monkeypatch.setattr(compiling, "run", failing_run)
    with terra_bc.enabled():
        got = training(6)
    monkeypatch.setattr(jaxpr_builder, "jit_segment", real_jit)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    assert terra_bc.stats()["eager_fallbacks"] >= 1
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
    # (the segment before the fetch and x * 0.9 + 0.01 after it; none again for the turn
    # that holds y)
    assert stats["compiles"] == 2
