"""terra_bc.jaxpr_builder: record eager JAX as jaxpr equations, replay compiled segments on new inputs.

Each case: run eagerly on inputs A (reference); run under a Recorder with the inputs
registered -> the eager values equal the reference; cut the segment for the outputs,
compile it, run on inputs B -> equals plain eager JAX on B.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import check_jaxpr

from terra_bc.jaxpr_builder import Recorder, RecTracer, compile_segment, compile_count

TOL = dict(rtol=1e-5, atol=1e-5)   # float32; same ops, possibly fused differently by XLA


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def assert_close(got, want, **tol):
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if jnp.issubdtype(jnp.asarray(w).dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **(tol or TOL))


def record(fn, *args, on_fetch=None):
    """Run fn under a Recorder with every leaf of args registered as an input."""
    with Recorder(on_fetch=on_fetch) as rec:
        targs = jax.tree_util.tree_map(rec.input, args)
        out = fn(*targs)
    return rec, targs, out


def replay(rec, targs, out, new_args):
    """Compile the segment for out's leaves and run it on new_args (same tree as targs)."""
    seg = rec.segment(leaves(out))
    check_jaxpr(seg.jaxpr.jaxpr)
    by_id = {t.id: v for t, v in zip(leaves(targs), leaves(new_args))}
    assert set(seg.inputs) <= set(by_id), "segment reads a value that is not a graph input"
    got = compile_segment(seg)(*[by_id[i] for i in seg.inputs])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out), got)


def check(fn, args_a, args_b, **tol):
    ref_a = fn(*args_a)
    rec, targs, out = record(fn, *args_a)
    for t in leaves(out):
        assert isinstance(t, RecTracer)
    assert_close([rec.concrete(t) for t in leaves(out)], ref_a, **tol)
    assert_close(replay(rec, targs, out, args_b), fn(*args_b), **tol)
    return rec


def rnd(seed, *shape):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


# ----------------------------------------------------------------------------- plain ops

def test_elementwise_matmul_reduction_indexing_reshape():
    def f(x, w, i):
        h = jnp.maximum(x @ w, 0.0) * 2 - 1
        s = h.sum(axis=0) / h.shape[0]
        r = h.T.reshape(-1)[::2]
        return s, r, h[i], jnp.exp(h).mean(), x[1:, :2].max()

    check(f, (rnd(0, 4, 3), rnd(1, 3, 5), 2), (rnd(2, 4, 3), rnd(3, 3, 5), 1))


def test_operators_and_properties_on_tracers():
    with Recorder() as rec:
        x = rec.input(jnp.arange(6.0).reshape(2, 3))
        assert x.shape == (2, 3) and x.ndim == 2 and x.dtype == jnp.float32
        assert len(x) == 2 and x.size == 6
        y = (x + 1) @ x.T - x[0].sum()
        z = [row for row in x]
    assert isinstance(y, RecTracer) and len(z) == 2
    np.testing.assert_allclose(rec.concrete(y), (np.arange(6.).reshape(2, 3) + 1)
                               @ np.arange(6.).reshape(2, 3).T - 3)


# ----------------------------------------------------------------------------- transforms

def mlp_params(seed):
    return [(rnd(seed, 3, 8), rnd(seed + 1, 8)), (rnd(seed + 2, 8, 2), rnd(seed + 3, 2))]


def mlp_loss(params, x, y):
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    return jnp.mean((h @ w + b - y) ** 2)


def test_value_and_grad_mlp():
    def step(params, x, y):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        return loss, grads

    check(step, (mlp_params(0), rnd(10, 5, 3), rnd(11, 5, 2)),
          (mlp_params(20), rnd(30, 5, 3), rnd(31, 5, 2)), rtol=1e-4, atol=1e-5)


def test_vjp_and_jvp():
    def f(x):
        return jnp.sin(x) * x ** 2

    def g(x, v):
        y, pullback = jax.vjp(f, x)
        (ct,) = pullback(v)
        p, t = jax.jvp(f, (x,), (v,))
        return y, ct, p, t

    check(g, (rnd(0, 4), rnd(1, 4)), (rnd(2, 4), rnd(3, 4)))


def test_vmap():
    def g(a, b):
        return jax.vmap(lambda u, v: jnp.dot(u, v) * jnp.tanh(u).sum())(a, b)

    check(g, (rnd(0, 5, 3), rnd(1, 5, 3)), (rnd(2, 5, 3), rnd(3, 5, 3)))


def test_user_jit_function_is_one_equation():
    @jax.jit
    def h(x, y):
        return jnp.sin(x) @ y + 1

    rec = check(h, (rnd(0, 2, 3), rnd(1, 3, 2)), (rnd(2, 2, 3), rnd(3, 3, 2)))
    assert rec.mark() == 1


# ----------------------------------------------------------------------------- control flow

def test_scan():
    def g(xs, c0):
        def body(c, x):
            c = jnp.tanh(c * x + 1)
            return c, c * 2
        return lax.scan(body, c0, xs)

    check(g, (rnd(0, 6, 3), rnd(1, 3)), (rnd(2, 6, 3), rnd(3, 3)))


def test_cond_with_traced_predicate():
    def g(p, x):
        return lax.cond(p > 0, lambda v: v * 2, lambda v: -v, x)

    check(g, (1.0, rnd(0, 3)), (-1.0, rnd(1, 3)))


def test_while_loop_with_traced_bound():
    def g(n, x):
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 1.5), (0, x))

    check(g, (3, rnd(0, 2)), (5, rnd(1, 2)))


def test_fori_loop_with_traced_bound_is_not_frozen():
    def g(n, x):
        return lax.fori_loop(0, n, lambda i, c: c + i * c, x)

    rec = check(g, (3, rnd(0, 2)), (6, rnd(1, 2)))
    seg = rec.segment([])   # nothing needed: empty segment is fine
    assert not seg.inputs
    names = {e[0].name for e in rec._trace.eqns}
    assert "while" in names and "scan" not in names


# ----------------------------------------------------------------------------- custom rules

@jax.custom_jvp
def clip_grad_square(x):
    return x * x


@clip_grad_square.defjvp
def _clip_grad_square_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x * x, jnp.clip(2 * x, -1.0, 1.0) * t


@jax.custom_vjp
def scaled_sin(x, s):
    return jnp.sin(x) * s


def _scaled_sin_fwd(x, s):
    return scaled_sin(x, s), (x, s)


def _scaled_sin_bwd(res, g):
    x, s = res
    return (10.0 * g * s, (g * jnp.sin(x)).sum() * jnp.ones_like(s))


scaled_sin.defvjp(_scaled_sin_fwd, _scaled_sin_bwd)


def test_library_custom_jvp_functions():
    def g(x):
        return jax.nn.relu(x), jax.nn.softplus(x), jax.grad(lambda v: jax.nn.softplus(v).sum())(x)

    check(g, (rnd(0, 5),), (rnd(1, 5),))


def test_custom_jvp_call_is_recorded_as_one_equation():
    def g(x):
        return clip_grad_square(x), jax.grad(lambda v: clip_grad_square(v).sum())(x)

    rec = check(g, (rnd(0, 5),), (rnd(1, 5) * 3,))
    assert any(e[0].name.startswith("custom_jvp_call") for e in rec._trace.eqns)


def test_custom_vjp_forward_and_backward():
    def g(x, s):
        y = scaled_sin(x, s)
        gx, gs = jax.grad(lambda a, b: scaled_sin(a, b).sum(), argnums=(0, 1))(x, s)
        return y, gx, gs

    rec = check(g, (rnd(0, 4), rnd(1, 4)), (rnd(2, 4), rnd(3, 4)))
    assert any(e[0].name.startswith("custom_vjp_call") for e in rec._trace.eqns)


def test_shard_map_is_one_equation():
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:1]), ("i",))

    def g(x, w):
        f = jax.shard_map(lambda a, b: jnp.sin(a) @ b, mesh=mesh,
                          in_specs=(P("i"), P()), out_specs=P("i"))
        return f(x, w) * 2

    rec = check(g, (rnd(0, 4, 3), rnd(1, 3, 2)), (rnd(2, 4, 3), rnd(3, 3, 2)))
    assert rec._trace.eqns[0][0].name == "shard_map"


# ----------------------------------------------------------------------------- feeds

def test_random_with_key_input_gives_new_draws():
    def g(key, x):
        k1, k2 = jax.random.split(key)
        return x + jax.random.normal(k1, x.shape), jax.random.uniform(k2, (3,))

    check(g, (jax.random.PRNGKey(0), rnd(0, 3)), (jax.random.PRNGKey(7), rnd(1, 3)))
    check(g, (jax.random.key(0), rnd(0, 3)), (jax.random.key(7), rnd(1, 3)))


def test_numpy_mask_fed_inside_grad():
    # jax.jit would freeze the NumPy mask drawn at trace time; the recorder makes it an input.
    masks = [np.random.RandomState(s).rand(6) > 0.5 for s in (0, 1)]
    ws = [rnd(0, 6), rnd(1, 6)]
    assert (masks[0] != masks[1]).any()
    with Recorder() as rec:
        w = rec.input(ws[0])
        fed = []

        def loss(w):
            m = rec.input(masks[0].astype(np.float32))
            fed.append(m)
            return jnp.sum((w * m) ** 2)

        gw = jax.grad(loss)(w)
    np.testing.assert_allclose(rec.concrete(gw), 2 * ws[0] * masks[0])
    seg = rec.segment([gw])
    by_id = {w.id: ws[1], fed[0].id: masks[1].astype(np.float32)}
    (got,) = compile_segment(seg)(*[by_id[i] for i in seg.inputs])
    np.testing.assert_allclose(got, 2 * ws[1] * masks[1], **TOL)


def test_python_scalar_learning_rate_is_an_input():
    def sgd(w, g, lr):
        return w - lr * g

    check(sgd, (rnd(0, 4), rnd(1, 4), 0.1), (rnd(0, 4), rnd(1, 4), 0.5))


def test_power_with_input_exponent_is_not_integer_pow_of_recorded_value():
    def g(x, n):
        return jnp.power(x, n), x ** n

    rec = check(g, (rnd(0, 4), 2), (rnd(1, 4), 3))
    assert all(e[0].name != "integer_pow" for e in rec._trace.eqns)


# ----------------------------------------------------------------------------- fetches

def test_fetches_return_real_values_and_are_reported():
    events = []
    with Recorder(on_fetch=lambda t, kind, v: events.append((kind, v))) as rec:
        x = rec.input(jnp.array([1.0, -2.0, 3.0]))
        loss = (x * x).sum()
        assert float(loss) == 14.0
        assert bool(x[0] > 0) is True
        assert int(jnp.argmax(x)) == 2
        assert isinstance(np.asarray(x), np.ndarray) and np.asarray(x)[1] == -2.0
        assert f"{loss:.1f}" == "14.0"
        assert str(loss) == str(jnp.float32(14.0))
        assert loss.item() == 14.0 and x.tolist() == [1.0, -2.0, 3.0]
        assert [0, 1, 2, 3][jnp.argmin(x)] == 1          # __index__
        if loss > 10:                                    # Python branching on a value
            branch = "big"
        with pytest.raises(TypeError):
            hash(x)
    kinds = [k for k, _ in events]
    assert kinds[:5] == ["float", "bool", "int", "array", "array"]
    assert "format" in kinds and "str" in kinds and "item" in kinds and "tolist" in kinds
    assert "index" in kinds and branch == "big"
    assert events[0] == ("float", 14.0) and events[1] == ("bool", True)


def test_fetches_inside_transforms_and_static_arguments():
    # Comparisons and argmax have no tangent, so inside grad they are plain RecTracers and
    # Python branches on them work as in eager JAX; a shape argument is fetched (index).
    events = []

    def f(x):
        if x.sum() > 0:
            return (x * 2).sum()
        return (x * 3).sum()

    xs = jnp.ones(3)
    with Recorder(on_fetch=lambda t, kind, v: events.append(kind)) as rec:
        x = rec.input(xs)
        n = rec.input(jnp.int32(4))
        g = jax.grad(f)(x)
        z = jnp.zeros(n)
    np.testing.assert_allclose(rec.concrete(g), [2.0, 2.0, 2.0])
    assert z.shape == (4,)
    assert events[0] == "bool" and len(events) >= 2


# ----------------------------------------------------------------------------- segments

def test_segments_split_at_mark_chain_on_new_inputs():
    def part1(x, w):
        return jnp.tanh(x @ w)

    def part2(h, b):
        return (h + b).sum(axis=1)

    a = (rnd(0, 3, 4), rnd(1, 4, 2), rnd(2, 2))
    b = (rnd(3, 3, 4), rnd(4, 4, 2), rnd(5, 2))
    with Recorder() as rec:
        x, w, bias = map(rec.input, a)
        h = part1(x, w)
        m = rec.mark()
        y = part2(h, bias)
    s1 = rec.segment([h], 0, m)
    s2 = rec.segment([y], m)
    assert s2.inputs == [h.id, bias.id] or s2.inputs == [bias.id, h.id]
    assert set(s1.inputs) == {x.id, w.id}
    vals = {x.id: b[0], w.id: b[1], bias.id: b[2]}
    (vals[h.id],) = compile_segment(s1)(*[vals[i] for i in s1.inputs])
    (got,) = compile_segment(s2)(*[vals[i] for i in s2.inputs])
    np.testing.assert_allclose(got, part2(part1(b[0], b[1]), b[2]), **TOL)


def test_dead_code_is_eliminated():
    ones = jnp.ones(3)
    with Recorder() as rec:
        x = rec.input(ones)
        unused = jnp.sin(x) * 5
        y = jnp.cos(x)
    seg = rec.segment([y])
    assert len(seg.jaxpr.jaxpr.eqns) == 1 and seg.inputs == [x.id]
    # An output defined before the range (here: a graph input) passes straight through.
    seg = rec.segment([y, x], start=rec.mark())
    assert not seg.jaxpr.jaxpr.eqns and seg.inputs == [y.id, x.id]
    got_y, got_x = compile_segment(seg)(ones * 2, ones * 3)
    np.testing.assert_allclose(got_y, ones * 2)
    np.testing.assert_allclose(got_x, ones * 3)


def test_library_constants_become_constvars():
    table = jnp.arange(12.0).reshape(3, 4)   # a raw array closed over by "library code"

    def g(x):
        return x @ table

    check(g, (rnd(0, 2, 3),), (rnd(1, 2, 3),))


def test_compile_cache_hit_for_identical_recording():
    def step(params, x, y):
        return jax.value_and_grad(mlp_loss)(params, x, y)

    def go(seed):
        rec, targs, out = record(step, mlp_params(seed), rnd(seed + 5, 5, 3), rnd(seed + 6, 5, 2))
        return compile_segment(rec.segment(leaves(out)))

    f1 = go(0)
    n = compile_count()
    f2 = go(40)
    assert compile_count() == n and f2 is f1


def test_cache_hit_with_control_flow_custom_rules_and_callbacks():
    calls = []

    def cb(v):
        return np.asarray(v) * 2

    def log(v):   # callables in params are keyed by identity: an inline lambda would miss
        calls.append(np.asarray(v))

    def prog(x, n):
        y = jax.pure_callback(cb, jax.ShapeDtypeStruct((2,), jnp.float32), x)
        y = y + scaled_sin(x, x) + clip_grad_square(x)
        y = y + lax.scan(lambda c, a: (c + a, c), 0.0, x)[0]
        y = lax.cond(n > 1, lambda v: v + 1, lambda v: v - 1, y)
        y = lax.fori_loop(0, n, lambda i, c: c * 1.1, y)
        jax.debug.callback(log, y)
        return jax.grad(lambda v: scaled_sin(v, v).sum() + clip_grad_square(v).sum())(y)

    def run(x0, n0):
        rec, targs, out = record(prog, x0, n0)
        return compile_segment(rec.segment([out]))

    f1 = run(jnp.ones(2), 3)
    n = compile_count()
    f2 = run(jnp.ones(2) * 2, 4)
    assert f2 is f1 and compile_count() == n
    del calls[:]
    (got,) = f2(jnp.full(2, 0.5, jnp.float32), jnp.int32(2))
    assert_close(got, prog(jnp.full(2, 0.5, jnp.float32), 2))
    assert len(calls) == 2       # the effect is kept by DCE and replayed (then run eagerly)
    np.testing.assert_allclose(calls[0], calls[1])


def test_different_callbacks_do_not_share_an_executable():
    def run(cb):
        ones = jnp.ones(2)
        with Recorder() as rec:
            x = rec.input(ones)
            y = jax.pure_callback(cb, jax.ShapeDtypeStruct((2,), jnp.float32), x)
        return compile_segment(rec.segment([y]))

    f1 = run(lambda v: np.asarray(v) * 2)
    f2 = run(lambda v: np.asarray(v) * 3)
    assert f1 is not f2
    np.testing.assert_allclose(f2(jnp.ones(2))[0], [3.0, 3.0])


# ----------------------------------------------------------------------------- lifetime

def test_escaped_tracer_behaves_as_its_concrete_value():
    with Recorder() as rec:
        x = rec.input(jnp.arange(3.0))
        y = x * 2
    n = rec.mark()
    z = jnp.sin(y) + y                       # no recording is active: plain eager JAX
    assert not isinstance(z, RecTracer)
    np.testing.assert_allclose(z, np.sin(np.arange(3.0) * 2) + np.arange(3.0) * 2, rtol=1e-6)
    assert float(y[1]) == 2.0 and rec.mark() == n
    ones = jnp.ones(3)
    with Recorder() as rec2:                  # in a later recording: a constant of that one
        u = rec2.input(ones)
        v = u + y
    np.testing.assert_allclose(rec2.concrete(v), [1.0, 3.0, 5.0])
    seg = rec2.segment([v])
    assert seg.inputs == [u.id] and len(seg.jaxpr.consts) == 1


def test_previous_trace_restored_after_exception():
    from jax.extend.core import take_current_trace
    with take_current_trace() as before:
        pass
    ones = jnp.ones(2)
    with pytest.raises(ZeroDivisionError):
        with Recorder() as rec:
            x = rec.input(ones)
            y = x + 1
            1 / 0
    with take_current_trace() as after:
        pass
    assert after is before
    assert not isinstance(jnp.ones(2) + 1, RecTracer)
    assert rec.mark() == 1


def test_segment_repr_shows_jaxpr():
    ones = jnp.ones(2)
    with Recorder() as rec:
        x = rec.input(ones)
        y = jnp.sin(x)
    s = repr(rec.segment([y]))
    assert "sin" in s and "inputs=[0]" in s
    assert "equations" in repr(rec)
