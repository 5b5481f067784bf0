"""Units that record nothing idle (Unit.note_emptiness): a loop whose only DL op is the
program's own jitted step gains nothing from co-execution, so its turns run plainly, with
an iteration now and then in case a new path records.  Each case runs the same code
eagerly first and compares values and the order of Python's side effects."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc.runtime.settings import IDLE_AFTER, IDLE_SPANS

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)


def hooked(fn, *args):
    with terra_bc.enabled():
        return fn(*args)


@jax.jit
def sgd_step(w, x):
    loss, g = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
    return w - 0.1 * g, loss


def own_jit_loop(steps):
    """The step is the program's own jax.jit: each turn's one DL op runs eagerly."""
    w = jnp.full((6, 3), 0.3, jnp.float32)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        x = rng.normal(size=(5, 6)).astype(np.float32)
        w, loss = sgd_step(w, x)
        losses.append(float(loss))
    return losses, np.asarray(w)


def test_a_loop_of_the_programs_own_jitted_step_idles():
    steps = 60
    want = own_jit_loop(steps)
    got = hooked(own_jit_loop, steps)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    s = terra_bc.stats()
    iterations = s["iterations_traced"] + s["iterations_coexecuted"]
    # IDLE_AFTER empty iterations, then spans of 16, 32 plain turns, an iteration between.
    assert s["calls_idle"] == steps - iterations, s
    assert iterations <= IDLE_AFTER + 2 and s["calls_idle"] >= IDLE_SPANS[0], s
    assert s["eager_fallbacks"] == 0 and s["compiles"] == 0, s
    text = str(terra_bc.explain())
    assert "idle: no path records an equation" in text, text


def fill_then_train(steps, fill, log):
    """A replay-buffer loop: the first ``fill`` turns only collect (NumPy, and the
    program's own jitted policy); then each turn records an update too."""
    w = jnp.full((6, 3), 0.3, jnp.float32)
    rng = np.random.default_rng(1)
    buffer, losses = [], []
    for step in range(steps):
        x = rng.normal(size=(5, 6)).astype(np.float32)
        _, act = sgd_step(w, x)                      # (its own jit: runs eagerly)
        buffer.append(x)
        if len(buffer) >= fill:
            batch = jnp.asarray(np.stack(buffer[-4:]).reshape(20, 6))
            h = jnp.tanh(batch @ w)
            loss = jnp.mean(h ** 2) + 0.0 * act
            w = w - 0.05 * jnp.mean(h) * w
            losses.append(float(loss))
            log.append(("update", step))
    return losses, np.asarray(w)


def test_a_unit_that_idled_co_executes_once_its_turns_record_ops():
    steps, fill = 120, 40
    want_log, got_log = [], []
    want = fill_then_train(steps, fill, want_log)
    got = hooked(fill_then_train, steps, fill, got_log)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got_log == want_log
    s = terra_bc.stats()
    assert s["calls_idle"] > 0, s           # while the buffer filled
    # An idle span is at most 16 + 32 turns past the fill: the rest were iterations.
    assert s["iterations_coexecuted"] >= steps - fill - 3 * IDLE_SPANS[0], s
    assert s["ops_skipped"] > 0 and s["eager_fallbacks"] == 0, s
    line = fill_then_train.__code__.co_firstlineno + 6  # (its `for`)
    units = [u for u in terra_bc.explain().units if u.name.endswith(f"test_idle_units.py:{line}")]
    assert len(units) == 1 and "idle:" not in str(units[0]), terra_bc.explain()
