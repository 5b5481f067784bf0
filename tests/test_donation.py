"""Buffer donation (docs/distributed.md): a co-executed segment reuses the buffers of inputs
nothing can read afterwards (the old parameters of `params = update(params, grads)`), and
never one that Python, a placeholder or a later launch can still read: every program here
gives eager's results, and what it kept of old values is still readable."""
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)

WIDTH = 512  # (1 MiB a parameter: launching donates from DONATE_MIN_BYTES on)
X = jnp.ones((4, WIDTH))


def loss_fn(p, x):
    h = x
    for w in p:
        h = jnp.tanh(h @ w)
    return jnp.mean(h ** 2)


def init():
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.05)
            for _ in range(3)]


def sgd(steps=8):
    p, losses = init(), []
    for _ in range(steps):
        loss, g = jax.value_and_grad(loss_fn)(p, X)
        p = [a - 0.1 * b for a, b in zip(p, g)]
        losses.append(float(loss))
    return losses, p


def sgd_no_fetch(steps=8):
    p = init()
    for _ in range(steps):
        g = jax.grad(loss_fn)(p, X)
        p = [a - 0.1 * b for a, b in zip(p, g)]
    return p


def keeps_history(steps=8):
    """Every step's parameters kept in a list: none may be donated."""
    p, history = init(), []
    for _ in range(steps):
        history.append(p)
        g = jax.grad(loss_fn)(p, X)
        p = [a - 0.1 * b for a, b in zip(p, g)]
    return [float(jnp.sum(h[0])) for h in history], p


def reads_old_after_update(steps=8):
    p, deltas = init(), []
    for _ in range(steps):
        old = p
        g = jax.grad(loss_fn)(p, X)
        p = [a - 0.1 * b for a, b in zip(p, g)]
        deltas.append(float(jnp.sum(p[0] - old[0])))
    return deltas, p


def closes_over_old(steps=8):
    p, readers = init(), []
    for _ in range(steps):
        q = p
        readers.append(lambda: q[1])
        g = jax.grad(loss_fn)(p, X)
        p = [a - 0.1 * b for a, b in zip(p, g)]
    return [float(jnp.sum(f())) for f in readers], p


def fed_numbers(steps=8):
    """Python numbers fed to segments are device arrays terra_bc keeps: never donated."""
    x, out = jnp.arange(4.0), []
    for k in range(steps):
        x = jnp.tanh(x) * 2.0 + 0.5 * (k % 2)
        out.append(jnp.sum(x * 2.0))
    return [float(v) for v in out], x


@terra_bc.function
def unit_step(p):
    g = jax.grad(loss_fn)(p, X)
    return [a - 0.1 * b for a, b in zip(p, g)]


def function_unit(steps=8):
    p, kept = init(), []
    for _ in range(steps):
        kept.append(p[0])
        p = unit_step(p)
    return [float(jnp.sum(k)) for k in kept], p


def run_both(program):
    want = program()
    terra_bc.reset_stats()
    with terra_bc.enabled():
        got = program()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    return terra_bc.stats()


def run_both_compiled_at_first_launch(program):
    """``run_both`` with each segment compiled at its first launch.  A segment compiled on
    the worker is used from the launch after it is ready, and only a compiled segment
    donates: on a loaded machine (the full 3.12 suite, once) no compile had finished within
    the 8 steps.  Compiled at its first launch, donation is decided at every launch."""
    saved = terra_bc.config()["background_compile"]
    terra_bc.config(background_compile=False)
    try:
        return run_both(program)
    finally:
        terra_bc.config(background_compile=saved)


@pytest.mark.parametrize("program", [sgd, sgd_no_fetch])
def test_dead_parameters_are_donated(program):
    s = run_both_compiled_at_first_launch(program)
    shown = {k: s[k] for k in ("iterations_coexecuted", "eager_fallbacks", "buffers_donated",
                               "compiles", "compiles_background", "segments_eager")}
    assert s["iterations_coexecuted"] >= 6 and s["eager_fallbacks"] == 0, shown
    assert s["buffers_donated"] >= 3 * 5, shown  # three parameters a step, once co-executed


def sgd_slow_first_read(steps=8):
    """The traced iteration waits between the update and the read (a thread switch, a
    collection: what a loaded machine does once), later ones read at once."""
    p, losses = init(), []
    for step in range(steps):
        loss, g = jax.value_and_grad(loss_fn)(p, X)
        p = [a - 0.1 * b for a, b in zip(p, g)]
        if step == 0:
            time.sleep(0.01)
        losses.append(float(loss))
    return losses, p


def test_an_early_launch_that_overlaps_nothing_is_dropped_and_donation_follows():
    """The traced gap before the read asked for an early launch (tracing.launch_before),
    which launches inside ``p = [...]`` while the old parameters are still held, so it can
    donate nothing.  The first co-executed read comes at once: the op launches nothing early
    from then on, and the launches at the read donate."""
    s = run_both_compiled_at_first_launch(sgd_slow_first_read)
    shown = {k: s[k] for k in ("iterations_coexecuted", "early_launches",
                               "early_launches_dropped", "buffers_donated")}
    assert s["iterations_coexecuted"] == 7 and s["early_launches_dropped"] == 1, shown
    # (1 early launch, unless a thread switch stretched the next gap too: then it is dropped
    # at the first read that comes at once)
    assert 1 <= s["early_launches"] <= 3, shown
    # the traced step and every co-executed step that did not launch early donate their
    # three parameters
    assert s["buffers_donated"] == 3 + 3 * (7 - s["early_launches"]), shown


@pytest.mark.parametrize("program", [keeps_history, reads_old_after_update, closes_over_old,
                                     fed_numbers, function_unit])
def test_values_python_can_read_are_not_donated(program):
    s = run_both(program)  # (a donated one would raise "Array has been deleted")
    assert s["iterations_coexecuted"] >= 6, s


def test_small_buffers_are_not_donated():
    """Donating compiles the segment once more: not worth it for small buffers."""
    global X
    saved, X = X, X[:, :64]
    try:
        def small(steps=8):
            p = [w[:64, :64] for w in init()]
            for _ in range(steps):
                g = jax.grad(loss_fn)(p, X)
                p = [a - 0.1 * b for a, b in zip(p, g)]
            return p
        s = run_both(small)
    finally:
        X = saved
    assert s["buffers_donated"] == 0 and s["iterations_coexecuted"] >= 6, s


def test_donation_can_be_switched_off():
    terra_bc.config(donate=False)
    try:
        s = run_both(sgd)
    finally:
        terra_bc.config(donate=True)
    assert s["buffers_donated"] == 0 and s["iterations_coexecuted"] >= 6, s


def test_the_traced_turn_donates_too_and_the_step_compiles_once():
    """The first turn is traced: its launch at ``float(loss)`` reuses the old parameters'
    buffers as the later turns' do (the first turn set the peak: old and new parameters at
    once), and its executable is the donating one the later turns launch, so the step
    compiles once where it compiled twice (plain for the traced turn, donating after)."""
    def sgd_once(steps=8):  # (a step of its own: no executable of another test serves)
        p, losses = init(), []
        for _ in range(steps):
            loss, g = jax.value_and_grad(lambda q, x: loss_fn(q, x) * 2.0)(p, X)
            p = [a - 0.05 * b for a, b in zip(p, g)]
            losses.append(float(loss))
        return losses, p

    s = run_both(sgd_once)
    assert s["iterations_traced"] == 1 and s["iterations_coexecuted"] == 7, s
    assert s["eager_fallbacks"] == 0, s
    assert s["buffers_donated"] == 3 * 8, s
    assert s["compiles"] == 1, s


def vjp_of_arrays_only_the_vjp_holds(steps=6):
    """A ``jax.vjp`` whose primals nothing but the vjp holds, with a launch between the
    forward and its backward: the backward reads the primals, so nothing may be donated
    there (a donated one would raise "Array has been deleted")."""
    store, out = [init() for _ in range(steps)], []
    for _ in range(steps):
        y, f_vjp = jax.vjp(lambda q: loss_fn(q, X), store.pop())
        out.append(float(y))
        (g,) = f_vjp(jnp.ones(()))
        out.append(float(jnp.sum(g[0])))
    return out


def grad_of_arrays_only_the_grad_holds(steps=6):
    """The same with ``value_and_grad``: its backward is recorded at its end, before the
    read, so the launch at the read may reuse the primals' buffers."""
    store, out = [init() for _ in range(steps)], []
    for _ in range(steps):
        loss, g = jax.value_and_grad(loss_fn)(store.pop(), X)
        out.append(float(loss))
        out.append(float(jnp.sum(g[0])))
    return out


def test_a_traced_turn_donates_nothing_a_later_backward_reads():
    s = run_both(vjp_of_arrays_only_the_vjp_holds)
    assert s["iterations_coexecuted"] >= 4 and s["eager_fallbacks"] == 0, s
    s = run_both(grad_of_arrays_only_the_grad_holds)
    assert s["iterations_coexecuted"] >= 4 and s["eager_fallbacks"] == 0, s
    assert s["buffers_donated"] >= 3, s
