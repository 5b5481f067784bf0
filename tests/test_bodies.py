"""Bodies eager JAX traces at every call (runtime/bodies.py): `jax.vmap` of Python code, and
lax control flow given a function JAX has not traced yet.  Their Python (NumPy draws, Python
state it reads, prints) runs exactly when eager JAX runs it, and their results are eager's;
bodies that compute the same thing again are still skipped in co-execution."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc

from conftest import on_and_off

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)

STEPS = 8


def numpy_draw_in_vmap(steps):
    rs = np.random.RandomState(0)
    x, out = jnp.ones((3, 4)), []
    for _ in range(steps):
        y = jax.vmap(lambda r: r * jnp.asarray(rs.uniform(size=4), jnp.float32))(x)
        x = x + 0.1
        out.append(float(y.sum()))
    return out


def test_numpy_draw_inside_vmap_is_fresh_each_call_and_fed():
    want, got = on_and_off(numpy_draw_in_vmap, STEPS)
    assert len(set(want)) == STEPS  # (a stale draw would repeat)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["vmaps_recorded"] == STEPS and stats["bodies_traced"] == 0
    # the draw is fed like an array Python hands an op: no new path per draw
    assert stats["divergences"] == 0 and stats["iterations_coexecuted"] >= STEPS - 2, stats


def state_in_fresh_control_flow(steps):
    cfg, x, out = {"s": 1.0}, jnp.ones(4), []
    for _ in range(steps):
        a = jax.lax.fori_loop(0, 3, lambda j, c: c * cfg["s"], x)
        b = jax.lax.cond(x.sum() > 0, lambda v: v * cfg["s"], lambda v: v, x)
        cfg["s"] += 0.5
        out.append((float(a.sum()), float(b.sum())))
    return out


def test_control_flow_given_a_new_function_reads_state_as_eager_does():
    want, got = on_and_off(state_in_fresh_control_flow, STEPS)
    assert len(set(want)) == STEPS
    assert got == want


def numbers_in_fresh_branches(steps):
    rs = np.random.RandomState(1)
    w, lr, out = jnp.array([0.5, -1.0, 2.0]), 0.1, []
    for step in range(steps):
        k = step % 3
        y = jax.lax.switch(k, [lambda v: v * lr, lambda v: jnp.sin(v) + lr, lambda v: v * 0 + 2.5], w)
        z = jax.lax.cond(y.sum() > 0, lambda v: v - rs.uniform() * lr, lambda v: v + 1.0, y)
        g = jax.grad(lambda w: jax.lax.cond(w.sum() > 0, lambda v: (v * lr) ** 2,
                                            lambda v: v * 0.5, w).sum())(w)
        w = w - 0.1 * (z + g)
        lr *= 0.9
        out.append((float(y.sum()), float(z.sum()), float(w.sum())))
    return out


def test_numbers_in_fresh_branches_are_fed_not_compared():
    """``lax.switch``/``cond`` of lambdas over a learning rate that changes every call (a
    NumPy draw in a branch, a branch returning a constant, a cond inside ``jax.grad``): the
    numbers in the branches are fed to the op like those of a traced body's own equations,
    so the unit keeps its paths; before, each call's new number was a new path, and the
    unit ran eagerly after a few."""
    steps = 3 * STEPS
    want, got = on_and_off(numbers_in_fresh_branches, steps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["eager_fallbacks"] == 0 and stats["iterations_coexecuted"] >= steps - 6, stats
    assert stats["divergences"] <= 4, stats  # (switch's three branches, cond's two: paths, not numbers)


def state_in_cached_scan(steps):
    cfg, x, out = {"s": 2.0}, jnp.ones(4), []

    def body(c, _):  # the same function object at every call: JAX's cache holds its trace
        return c * cfg["s"], None
    for _ in range(steps):
        y, _ = jax.lax.scan(body, x, None, length=2)
        cfg["s"] += 1.0
        out.append(float(y.sum()))
    return out


def test_control_flow_given_the_same_function_uses_jax_cache_as_eager_does():
    want, got = on_and_off(state_in_cached_scan, STEPS)
    assert want == [16.0] * STEPS  # eager JAX: the first call's trace, served from its cache
    assert got == want
    stats = terra_bc.stats()  # (one trace: later calls with the same function reuse it)
    assert stats["bodies_traced"] == 1 and stats["iterations_coexecuted"] >= STEPS - 2, stats


def print_in_vmap(steps):
    seen, x = [], jnp.ones((2, 3))
    for i in range(steps):
        def f(r):
            seen.append(("traced", i))  # Python the body runs: once per call under eager
            return jnp.tanh(r) * 2.0
        x = jax.vmap(f)(x) * 0.5
    return seen, np.asarray(x)


def test_python_side_effects_in_vmap_happen_once_per_call():
    (want, x_want), (got, x_got) = on_and_off(print_in_vmap, STEPS)
    assert want == [("traced", i) for i in range(STEPS)]
    assert got == want
    np.testing.assert_allclose(x_got, x_want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["ops_skipped"] > 0, stats


def vmap_of_jax_function(steps):
    a, b = jnp.ones((5, 3)), jnp.arange(15.0).reshape(5, 3)
    for _ in range(steps):
        a = jax.vmap(jnp.dot)(a, b)[:, None] * 0.01 + a
    return np.asarray(a)


def test_vmap_of_a_jax_function_is_a_plain_op():
    want, got = on_and_off(vmap_of_jax_function, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["bodies_traced"] == 0 and stats["iterations_coexecuted"] >= STEPS - 2, stats


def grad_through_vmap_reading_state(steps):
    cfg, w, out = {"s": 1.0}, jnp.ones(3), []
    xs = jnp.arange(12.0).reshape(4, 3) / 10

    def loss(w):
        return jnp.sum(jax.vmap(lambda x, w: jnp.tanh(x @ w) * cfg["s"], in_axes=(0, None))(xs, w))
    for _ in range(steps):
        g = jax.grad(loss)(w)
        w = w - 0.1 * g
        cfg["s"] = 1.0 + 0.25 * len(out)  # (a number the body reads: fed, not a new path)
        out.append(float(jnp.sum(w)))
    return out


def test_grad_of_a_vmap_reading_state():
    want, got = on_and_off(grad_through_vmap_reading_state, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["eager_fallbacks"] == 0 and stats["iterations_coexecuted"] >= STEPS - 2, stats
    assert stats["divergences"] == 0, stats


def vmap_closing_over_this_iterations_value(steps):
    w, xs, out = jnp.ones(3), jnp.arange(12.0).reshape(4, 3) / 10, []
    for _ in range(steps):
        y = jax.vmap(lambda x: jnp.tanh(x @ w))(xs)  # w: a value of this iteration
        w = w - 0.1 * jnp.sum(y)
        out.append(float(jnp.sum(w)))
    return out


def test_vmap_closing_over_this_iterations_value():
    want, got = on_and_off(vmap_closing_over_this_iterations_value, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = terra_bc.stats()  # (w enters the traced body as an input, not as a value)
    assert stats["eager_fallbacks"] == 0 and stats["iterations_coexecuted"] >= STEPS - 2, stats


def per_example_loss_closing_over_params(steps):
    rs = np.random.RandomState(1)
    params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros(2)}
    xs, ys = jnp.asarray(rs.randn(6, 3), jnp.float32), jnp.asarray(rs.randn(6, 2), jnp.float32)

    def mlp(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    def loss(p):
        per_example = jax.vmap(lambda x, y: jnp.sum((mlp(p, x) - y) ** 2))(xs, ys)
        return jnp.mean(per_example)
    out = []
    for _ in range(steps):
        value, g = jax.value_and_grad(loss)(params)
        params = jax.tree.map(lambda a, b: a - 0.1 * b, params, g)
        out.append(float(value))
    return out, np.asarray(params["w"])


def test_grad_of_a_vmap_closing_over_the_differentiated_parameters():
    (want, w_want), (got, w_got) = on_and_off(per_example_loss_closing_over_params, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(w_got, w_want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["eager_fallbacks"] == 0 and stats["iterations_coexecuted"] >= STEPS - 2, stats


def concrete_value_read_in_vmap(steps):
    scale, x, out, runs = jnp.asarray(2.0), jnp.ones((2, 3)), [], []
    for _ in range(steps):
        def f(r):
            # eager: jnp.sum of an unmapped array inside the vmap is computed, concrete
            runs.append(1)
            k = 3 if float(jnp.sum(scale)) > 1 else 4
            return r * k
        x = jax.vmap(f)(x) * 0.5
        out.append(float(x.sum()))
    return out, len(runs)


def test_an_unmapped_value_read_inside_vmap_is_computed_once_as_eagerly():
    # (the vmapped function's Python runs as code of the iteration: the fetch computes the
    # unmapped value, once per call as eagerly; runtime/vmapping.py)
    want, got = on_and_off(concrete_value_read_in_vmap, 4)
    assert got == want and want[1] == 4
    stats = terra_bc.stats()
    assert stats["vmaps_recorded"] == 4 and stats["bodies_untraced"] == 0, stats


def per_example_gradients(steps, variant):
    """vmap of (value_and_)grad of a loss, its Python run as code of the iteration
    (runtime/vmapping.py); the loss draws NumPy noise, so a stale trace would repeat it."""
    rs = np.random.RandomState(2)
    w = jnp.ones(3) * 0.5
    xs = jnp.asarray(rs.randn(5, 3), jnp.float32)
    ys = jnp.asarray(rs.randn(5), jnp.float32)

    def loss(w, x, y, scale=1.0):
        noise = jnp.asarray(rs.uniform(-0.1, 0.1), jnp.float32)
        return (jnp.tanh(x @ w) + noise - y) ** 2 * scale
    out = []
    for _ in range(steps):
        if variant == "grad":
            g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w, xs, ys)
        elif variant == "value_and_grad_aux":
            with_aux = jax.value_and_grad(lambda w, x, y: (loss(w, x, y), x.sum()), has_aux=True)
            (v, aux), g = jax.vmap(with_aux, in_axes=(None, 0, 0))(w, xs, ys)
            g = g + 0.0 * v[:, None] + 0.0 * aux[:, None]
        elif variant == "keywords_out_axes":
            g = jax.vmap(jax.grad(loss), in_axes=(None, 0), out_axes=1)(w, xs, y=ys).T
        else:  # a dict in_axes
            g = jax.vmap(lambda d: jax.grad(loss)(w, d["x"], d["y"]), in_axes=({"x": 0, "y": 0},))(
                {"x": xs, "y": ys})
        w = w - 0.1 * jnp.mean(g, 0)
        out.append(float(jnp.sum(w)))
    return out


@pytest.mark.parametrize("variant", ["grad", "value_and_grad_aux", "keywords_out_axes",
                                     "dict_in_axes"])
def test_per_example_gradients_equal_eager(variant):
    terra_bc.reset()  # (the variants share one loop: each starts with no recorded paths)
    want, got = on_and_off(per_example_gradients, STEPS, variant)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["vmaps_recorded"] == STEPS and stats["bodies_traced"] == 0, stats
    assert stats["eager_fallbacks"] == 0 and stats["divergences"] == 0, stats
    assert stats["iterations_coexecuted"] >= STEPS - 2, stats


def body_runs(steps):
    """How often each body's Python runs: JAX's cache serves lax.scan's function again,
    lax.map and associative_scan trace theirs at every call."""
    runs, x = {"scan": 0, "map": 0, "assoc": 0}, jnp.ones(3)

    def scan_body(c, _):
        runs["scan"] += 1
        return c * 0.5, None

    def map_body(r):
        runs["map"] += 1
        return jnp.tanh(r)

    def combine(a, b):
        runs["assoc"] += 1
        return a + b
    for _ in range(steps):
        c, _ = jax.lax.scan(scan_body, x, None, length=2)
        m = jax.lax.map(map_body, jnp.stack([x, c]))
        x = jax.lax.associative_scan(combine, m[1]) * 0.1 + c
    return runs, np.asarray(x)


def test_body_python_runs_as_often_as_eager():
    (want, x_want), (got, x_got) = on_and_off(body_runs, STEPS)
    assert want["scan"] == 1 and want["map"] == STEPS and want["assoc"] > STEPS  # (eager JAX)
    assert got == want
    np.testing.assert_allclose(x_got, x_want, rtol=1e-6)
    assert terra_bc.stats()["iterations_coexecuted"] >= STEPS - 2


def callback_in_vmapped_gradient(steps):
    log, w, xs = [], jnp.ones(3), jnp.arange(6.0).reshape(2, 3)

    def loss(w, x):
        jax.debug.callback(lambda v: log.append(np.round(np.asarray(v), 3).tolist()), jnp.sum(x * w))
        return jnp.sum(jnp.tanh(x * w))
    for _ in range(steps):
        g = jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, xs)
        w = w - 0.1 * g.mean(0)
    jax.effects_barrier()
    return log, np.asarray(w)


def test_callbacks_in_a_vmapped_gradient_run_as_eager():
    (want, w_want), (got, w_got) = on_and_off(callback_in_vmapped_gradient, STEPS)
    assert len(want) == 2 * STEPS  # (eager: once per example of each call)
    assert got == want
    np.testing.assert_allclose(w_got, w_want, rtol=1e-6)
    assert terra_bc.stats()["iterations_coexecuted"] >= STEPS - 2


def callback_over_new_state_in_vmap(steps):
    logs, x = [], jnp.arange(6.0).reshape(2, 3)
    for _ in range(steps):
        mine = []  # a new list each turn: the callback must append to this turn's
        logs.append(mine)
        def f(r):
            jax.debug.callback(lambda v: mine.append(float(v)), r.sum())
            return jnp.tanh(r)
        x = jax.vmap(f)(x)
    jax.effects_barrier()
    return [len(m) for m in logs], np.asarray(x)


def test_a_callback_in_a_vmapped_function_is_this_calls_callback():
    (want, x_want), (got, x_got) = on_and_off(callback_over_new_state_in_vmap, STEPS)
    assert want == [2] * STEPS
    assert got == want
    np.testing.assert_allclose(x_got, x_want, rtol=1e-6)


@jax.tree_util.register_pytree_node_class
class _Scaler:
    """A callable pytree holding an array (as an Equinox module does)."""
    def __init__(self, w):
        self.w = w

    def tree_flatten(self):
        return (self.w,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def __call__(self, x):
        return self.w * x


def vmap_of_a_callable_pytree(steps):
    model, x, out = _Scaler(jnp.ones(2)), jnp.arange(8.0).reshape(4, 2), []
    for _ in range(steps):
        model = _Scaler(model.w * 2.0)
        out.append(float(jnp.sum(jax.vmap(model)(x))))
        g = jax.value_and_grad(lambda m: jnp.sum(jax.vmap(m)(x)))(model)[1]
        model = _Scaler(model.w - 0.01 * g.w)
        out.append(float(jnp.sum(model.w)))
    return out


def test_vmap_of_a_callable_pytree_holding_this_iterations_arrays():
    """jax.vmap(model), model a pytree holding this turn's weights: jax.vmap only makes a
    function.  Recorded as an op, the function it made in the traced turn came back at
    every later turn, holding that turn's weights (56.0 at every step)."""
    want, got = on_and_off(vmap_of_a_callable_pytree, STEPS)
    assert len(set(want[::2])) == STEPS  # (the weights change every turn)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["eager_fallbacks"] == 0, stats


def control_flow_given_no_array(steps):
    p, out = jnp.ones(3), []
    for _ in range(steps):
        p = p * 1.5
        n = jax.lax.while_loop(lambda n: n * jnp.sum(p) < 100.0, lambda n: n + 1.0, 1.0)
        m = jax.lax.fori_loop(0, 4, lambda j, c: c + jnp.sum(p), 0.0)
        out.append((float(n), float(m)))
    return out


def test_control_flow_given_no_array_but_closing_over_this_iterations_value():
    """lax.while_loop / fori_loop given only functions and Python numbers, whose bodies
    close over this turn's array: an op of the iteration (it ran as JAX code outside the
    recording, which used the placeholder's value, and the unit ran eagerly)."""
    want, got = on_and_off(control_flow_given_no_array, STEPS)
    assert len(set(want)) == STEPS
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["eager_fallbacks"] == 0, stats


def jit_made_each_turn_closing_over_its_values(steps):
    w, out = jnp.arange(6.0).reshape(2, 3), []
    for _ in range(steps):
        w = w * 1.1
        f = jax.jit(lambda x: x @ w.T + w[0].sum() + jnp.sum(jnp.transpose(w)))
        out.append(float(f(jnp.ones(3)).sum()))
    return out


def test_a_jit_made_each_turn_closing_over_this_turns_array():
    """The program's own jax.jit runs as JAX dispatches it (a graph break); a placeholder it
    closes over gives it its value.  In the traced turn it gave the recorded tracer, which
    became a constant of JAX's eager computation: UnexpectedTracerError."""
    want, got = on_and_off(jit_made_each_turn_closing_over_its_values, STEPS)
    assert len(set(want)) == STEPS
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["eager_fallbacks"] == 0, stats


_BATCH = None  # (read as a global by a differentiated lambda below)


def jacobians_of_python_functions(steps):
    global _BATCH
    rs = np.random.RandomState(1)
    w, cfg, out = jnp.asarray(rs.normal(size=(4, 4)), jnp.float32) * 0.3, {"s": 1.0}, []
    for _ in range(steps):
        _BATCH = jnp.asarray(rs.normal(size=(3, 4)), jnp.float32)
        x = _BATCH * 2.0
        y = jax.checkpoint(lambda w, x: jnp.tanh(x @ w))(w, x)
        jr = jax.jacrev(lambda w: jnp.tanh(_BATCH @ w * cfg["s"]).sum(0))(w)
        jf = jax.jacfwd(lambda w: jnp.tanh(x @ w).sum())(w)
        h = jax.hessian(lambda v: jnp.sum(jnp.sin(v) * cfg["s"]))(w[0])
        loss, g = jax.value_and_grad(
            lambda w: jnp.sum(jax.checkpoint(lambda w: jnp.tanh(x @ w))(w) ** 2))(w)
        cfg["s"] += 0.5
        w = w - 0.01 * jf - 0.01 * g
        out.append((float(y.sum()), float(jr.sum()), float(h.sum()), float(loss)))
    return out


def test_jacobians_and_checkpoints_of_python_functions_coexecute():
    """jax.jacrev / jacfwd / hessian / checkpoint of the program's functions (one reading
    this turn's array as a global, one closing over it, one reading Python state that
    changes every turn; checkpoint inside jax.value_and_grad): JAX traces the function at
    every call, so each is a body traced as eager JAX traces it (they ran as JAX code
    outside the recording, and the unit ran eagerly)."""
    want, got = on_and_off(jacobians_of_python_functions, STEPS)
    assert len(set(w[2] for w in want)) == STEPS  # (the hessian reads cfg["s"], changed each turn)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["eager_fallbacks"] == 0, stats


def asarray_of_a_closed_over_value_in_bodies(steps):
    p, out = jnp.ones(3), []
    for _ in range(steps):
        p = p * 1.5
        m = jax.lax.fori_loop(0, 4, lambda j, c: c + jnp.asarray(p, jnp.float32).sum(), 0.0)
        v = jax.vmap(lambda r: r * jnp.asarray(p))(jnp.ones((2, 3)))
        out.append((float(m), float(v.sum())))
    return out


def test_jnp_asarray_of_this_iterations_value_inside_a_body():
    """``jnp.asarray(p)`` inside a body JAX traces (flax's ``promote_dtype`` does it to every
    parameter), ``p`` this turn's array: a constant of the body, fed as the body op's input,
    as a method of ``p`` is (JAX took its value through ``__jax_array__``, and the unit ran
    eagerly)."""
    want, got = on_and_off(asarray_of_a_closed_over_value_in_bodies, STEPS)
    assert len(set(want)) == STEPS
    np.testing.assert_allclose(got, want, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["eager_fallbacks"] == 0, stats


def grads_of_jitted_functions(steps):
    f = jax.jit(lambda w, x: jnp.sum(jnp.tanh(w * x) ** 2))
    g = jax.jit(lambda w, k: (jnp.sum(w ** k), w.mean()), static_argnums=1)
    w, out = jnp.linspace(0.1, 1.0, 4), []
    for i in range(steps):
        loss, gw = jax.value_and_grad(f)(w, 1.5)
        (val, mean), gk = jax.value_and_grad(g, has_aux=True)(w, 2)
        w = w - 0.1 * jax.grad(f)(w, 0.5) - 0.01 * gk
        out.append((float(loss), float(val), float(mean), float(w.sum()), float(gw.sum())))
    return out


def test_grad_of_a_jitted_function_is_one_op_of_the_iteration():
    """``jax.grad(jax.jit(loss))``: the jitted function's Python is JAX's to trace; called as
    it is it handed back an array of its own and the traced turn raised "the differentiated
    function must return a scalar array" (found by a hunt of dynamic programs, 2026-12-01).
    It is one op of the iteration, differentiated as recorded."""
    want, got = on_and_off(grads_of_jitted_functions, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= STEPS - 2 and stats["eager_fallbacks"] == 0, stats
