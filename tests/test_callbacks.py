"""Callbacks and prints inside units: each `jax.debug.callback`, `jax.debug.print`,
`jax.pure_callback` and `jax.experimental.io_callback` runs exactly as often, with the same
values and in the same order among themselves, as under eager JAX, whether the iteration is
traced (abstractly or eagerly valued), co-executed, or diverges; inside `jax.grad`,
`value_and_grad`, `jax.vjp` and a `jax.jit`-ed function too.  As under `jax.jit`, a callback
of a co-executed iteration runs when its segment runs, so only its place among Python's own
side effects may differ (docs/coexecution.md)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

import terra_bc

from conftest import on_and_off

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)

STEPS = 8


def run_both(program, *args):
    """(eager log, terra_bc log): each a list the program's callbacks appended to."""
    plain, hooked = on_and_off(program, *args)
    jax.effects_barrier()
    return plain, hooked


def values(log):
    return [(tag, np.round(np.asarray(v, np.float64), 4).tolist()) for tag, v in log]


def plain_and_grad_callbacks(steps):
    """An objective counted with a debug callback, as optax's L-BFGS notebook counts its
    evaluations: once per plain call, once per value_and_grad call."""
    log = []

    def objective(w, tag):
        jax.debug.callback(lambda v: log.append((tag, v)), jnp.sum(w))
        return jnp.sum((w - 1.0) ** 2)

    w = jnp.arange(3.0)
    for _ in range(steps):
        objective(w, "plain")
        loss, g = jax.value_and_grad(objective)(w, "grad")
        gw = jax.grad(objective)(w, "grad only")
        w = w - 0.1 * g + 0.0 * gw
    return log, w


def test_debug_callback_runs_once_per_call_plain_and_under_grad():
    (want, w_want), (got, w_got) = run_both(plain_and_grad_callbacks, STEPS)
    assert len(want) == 3 * STEPS
    assert values(got) == values(want)
    np.testing.assert_allclose(w_got, w_want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2
    assert stats["eager_fallbacks"] == 0


def inline_lambda_over_step(steps):
    """A callback written inline is a new function each step, closing over a number that
    changes (the step) and a list that does not."""
    log = []
    x = jnp.ones(4)
    for step in range(steps):
        y = jnp.tanh(x) * 2.0
        jax.debug.callback(lambda v: log.append(("y", step, v)), jnp.sum(y))
        jax.debug.callback(lambda v: log.append(("x", v)), jnp.max(x))
        x = x + 0.25 * y
    return [(t[0], t[1:]) for t in log], x


def test_inline_callbacks_keep_their_own_step_and_order():
    (want, _), (got, _) = run_both(inline_lambda_over_step, STEPS)
    assert [(t, v[0]) for t, v in got if t == "y"] == [(t, v[0]) for t, v in want if t == "y"]
    assert values([(t, v[-1]) for t, v in got]) == values([(t, v[-1]) for t, v in want])
    assert terra_bc.stats()["iterations_coexecuted"] > 0


def test_inline_callback_over_the_same_objects_does_not_diverge():
    """Two steps' lambdas with one code closing over the same objects are one static."""
    log = []

    def loop(steps):
        x = jnp.ones(4)
        for _ in range(steps):
            jax.debug.callback(lambda v: log.append(float(v)), jnp.sum(x))
            x = x * 1.5
        return x

    loop(STEPS)
    want = list(log)
    log.clear()
    with terra_bc.enabled():
        loop(STEPS)
    jax.effects_barrier()
    np.testing.assert_allclose(log, want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["divergences"] == 0
    assert stats["iterations_coexecuted"] == STEPS - 1


def prints(steps):
    x = jnp.arange(3.0)
    for step in range(steps):
        jax.debug.print("step {s} sum {v:.3f}", s=step, v=jnp.sum(x))
        x = jnp.sin(x) + 1.0
    return x


def test_debug_print_prints_every_step_once(capsys):
    prints(STEPS)
    jax.effects_barrier()
    want = capsys.readouterr().out.splitlines()
    with terra_bc.enabled():
        prints(STEPS)
    jax.effects_barrier()
    got = capsys.readouterr().out.splitlines()
    assert len(want) == STEPS
    assert got == want
    assert terra_bc.stats()["iterations_coexecuted"] > 0


def pure_and_io(steps):
    """io_callback's result and pure_callback's are used by later ops; both are counted."""
    calls = []

    def host_scale(v):
        calls.append(("io", float(v)))
        return np.float32(v * 0.5)

    def host_square(v):
        calls.append(("pure", float(v)))
        return np.asarray(np.sin(v), np.float32)

    x = jnp.float32(1.0)
    out = []
    spec = jax.ShapeDtypeStruct((), jnp.float32)
    for _ in range(steps):
        a = io_callback(host_scale, spec, x + 1.0)
        b = jax.pure_callback(host_square, spec, a)
        x = x * 0.9 + b
        out.append(float(x))
    return calls, out


def test_io_callback_runs_once_and_its_result_is_used():
    (want, out_want), (got, out_got) = run_both(pure_and_io, STEPS)
    np.testing.assert_allclose(out_got, out_want, rtol=1e-5)
    io_want = [v for t, v in want if t == "io"]
    io_got = [v for t, v in got if t == "io"]
    assert len(io_want) == STEPS
    np.testing.assert_allclose(io_got, io_want, rtol=1e-5)
    # JAX may run a pure callback any number of times (or not at all): only its values count.
    assert {round(v, 4) for t, v in got if t == "pure"} == {round(v, 4) for t, v in want if t == "pure"}
    assert len(io_got) == STEPS
    assert terra_bc.stats()["iterations_coexecuted"] > 0


def callbacks_in_jit_and_vjp(steps):
    log = []

    @jax.jit
    def jitted(v):
        jax.debug.callback(lambda s: log.append(("jit", s)), jnp.sum(v))
        return v * 2.0

    def forward(v):
        jax.debug.callback(lambda s: log.append(("vjp", s)), jnp.mean(v))
        return jnp.sin(v)

    x = jnp.linspace(0.0, 1.0, 5)
    for _ in range(steps):
        y = jitted(x)
        out, pullback = jax.vjp(forward, y)
        (gx,) = pullback(jnp.ones_like(out))
        x = x - 0.05 * gx
    return log, x


def test_callbacks_in_a_jitted_function_and_a_vjp_run_once():
    (want, x_want), (got, x_got) = run_both(callbacks_in_jit_and_vjp, STEPS)
    assert len(want) == 2 * STEPS
    assert values(got) == values(want)
    np.testing.assert_allclose(x_got, x_want, rtol=1e-5)


def callback_without_arrays(steps):
    """No array in: Python itself makes the call every step (an opaque op)."""
    count = []
    x = jnp.ones(2)
    for _ in range(steps):
        jax.debug.callback(lambda: count.append(1))
        x = x * 2.0
    return len(count), x


def test_callback_without_array_arguments_runs_once_per_step():
    (n_want, _), (n_got, _) = run_both(callback_without_arrays, STEPS)
    assert n_want == STEPS
    assert n_got == n_want


def branching(steps):
    """Callbacks on both sides of a data-dependent branch: paths diverge and are retraced."""
    log = []
    rng = np.random.RandomState(0)
    x = jnp.zeros(3)
    for _ in range(steps):
        x = x + jnp.asarray(rng.randn(3), jnp.float32)
        jax.debug.callback(lambda v: log.append(("before", v)), jnp.sum(x))
        if float(jnp.sum(x)) > 0:
            jax.debug.callback(lambda v: log.append(("pos", v)), jnp.max(x))
        else:
            jax.debug.callback(lambda v: log.append(("neg", v)), jnp.min(x))
        x = jnp.tanh(x)
    return log


def test_callbacks_across_divergences_run_once():
    want, got = run_both(branching, 3 * STEPS)
    assert values(got) == values(want)
    assert terra_bc.stats()["divergences"] > 0


def test_callbacks_while_tracing_eagerly_valued():
    """A unit traced with every value computed as recorded (abstract tracing off): the
    callbacks run as they are recorded and are left out of that iteration's segments."""
    terra_bc.config(abstract_tracing=False)
    try:
        (want, w_want), (got, w_got) = run_both(plain_and_grad_callbacks, STEPS)
    finally:
        terra_bc.config(abstract_tracing=True)
    assert values(got) == values(want)
    np.testing.assert_allclose(w_got, w_want, rtol=1e-5)


def callbacks_then_python_after_a_barrier(steps):
    """A callback with an array, then ``jax.effects_barrier()``, then Python's own side
    effect: the callback's entry comes first, as eagerly (found by a hunt of library
    programs, 2026-12-01: the barrier came before the segment holding the callback was
    launched, so it waited for nothing)."""
    log = []
    x = jnp.ones(3)
    for step in range(steps):
        x = x * 2.0
        jax.debug.callback(lambda v: log.append(("callback", v)), x.sum())
        jax.effects_barrier()
        log.append(("python", step))
        log.append(("read", float(x.sum())))
    return log, x


def test_effects_barrier_runs_the_callbacks_recorded_so_far():
    (want, x_want), (got, x_got) = run_both(callbacks_then_python_after_a_barrier, STEPS)
    assert [tag for tag, _ in want][:3] == ["callback", "python", "read"]
    assert values(got) == values(want)
    np.testing.assert_allclose(x_got, x_want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2
    assert stats["eager_fallbacks"] == 0
