"""`jax.vmap` of Python code whose Python runs as code of the iteration, on one example, and
whose recorded piece is batched as one op (runtime/vmapping.py): values, Python's effects and
JAX's errors as eager JAX gives them, at every turn; no value of one example shown."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc

from conftest import on_and_off

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)

STEPS = 8


def reads_inside(steps):
    """Inside the vmapped function: a float() of a mapped value (JAX refuses it), a bool()
    of one, a boolean mask of one, a float() of an unmapped value (computed), prints."""
    x, scale, out = jnp.arange(6.0).reshape(3, 2), jnp.asarray(1.5), []
    for _ in range(steps):
        def f(r):
            for read in (lambda: float(r.sum()), lambda: bool(r[0] > 0), lambda: r[r > 1.0]):
                try:
                    read()
                    out.append("read")
                except Exception as error:  # (JAX's own error type, as eagerly)
                    out.append(type(error).__name__)
            out.append(str(r))
            return r * float(scale)
        x = jax.vmap(f)(x) * 0.5 + 0.25
        out.append(float(x.sum()))
    return out


def test_reading_a_mapped_value_inside_vmap_raises_jaxs_error_at_every_turn():
    want, got = on_and_off(reads_inside, STEPS)
    assert want[:4] == ["ConcretizationTypeError", "TracerBoolConversionError",
                        "NonConcreteBooleanIndexError",
                        "VmapTracer(aval=float32[2], batched=float32[3,2])"], want[:4]
    assert got == want
    stats = terra_bc.stats()
    assert stats["vmaps_recorded"] == STEPS and stats["eager_fallbacks"] == 0, stats
    assert stats["iterations_coexecuted"] >= STEPS - 1, stats


def shapes_and_axes(steps):
    """in_axes / out_axes other than 0, keyword arguments, a nested vmap, an unmapped axis
    with axis_size, constant and pass-through outputs, a pytree in and out."""
    rs = np.random.RandomState(3)
    a, b = jnp.asarray(rs.randn(4, 3), jnp.float32), jnp.asarray(rs.randn(3, 4), jnp.float32)
    outside, out = jnp.arange(2.0), []
    for _ in range(steps):
        pairs = jax.vmap(lambda u, v: jnp.outer(u, v), in_axes=(0, 1), out_axes=2)(a, b)
        nested = jax.vmap(jax.vmap(lambda s, t: s * t + 1.0))(a, a)
        kw = jax.vmap(lambda u, *, w: {"p": u * w, "q": (u.sum(), 2.0)})(a, w=a + 1.0)
        sized = jax.vmap(lambda c: c * 2.0, in_axes=None, axis_size=3)(outside)
        passed = jax.vmap(lambda u: (outside, u))(a)
        out.append([float(pairs.sum()), pairs.shape, float(nested.sum()), float(kw["p"].sum()),
                    float(kw["q"][0].sum()), kw["q"][1].shape, float(kw["q"][1].sum()),
                    sized.shape, float(sized.sum()), passed[0].shape, float(passed[1].sum())])
        a = a * 0.9 + 0.01
    return out


def test_axes_keywords_nesting_and_constant_outputs_equal_eager():
    want, got = on_and_off(shapes_and_axes, STEPS)
    def split(rows):  # (numbers, shapes)
        return ([[v for v in row if not isinstance(v, tuple)] for row in rows],
                [[v for v in row if isinstance(v, tuple)] for row in rows])
    np.testing.assert_allclose(split(got)[0], split(want)[0], rtol=1e-5)
    assert split(got)[1] == split(want)[1]
    stats = terra_bc.stats()
    assert stats["vmaps_recorded"] >= 6 * STEPS and stats["bodies_traced"] == 0, stats
    assert stats["eager_fallbacks"] == 0 and stats["iterations_coexecuted"] >= STEPS - 1, stats


def branch_inside(steps):
    """The vmapped function's Python takes a branch drawn by NumPy each turn, prints and
    counts its runs: the turns leave their path inside the vmapped function."""
    rs = np.random.RandomState(0)
    x, out, runs = jnp.ones((4, 3)), [], []
    for _ in range(steps):
        flip = rs.rand() > 0.5

        def f(r):
            runs.append(flip)
            return jnp.tanh(r) if flip else r * 2.0 - 1.0
        x = jax.vmap(f)(x) * 0.5 + 0.1
        out.append(float(x.sum()))
    return out, runs


def test_a_branch_inside_the_vmapped_function_leaves_the_path_there():
    want, got = on_and_off(branch_inside, 3 * STEPS)
    assert len(set(want[1])) == 2  # (both branches taken)
    assert got[1] == want[1]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["eager_fallbacks"] == 0 and stats["paths_recorded"] >= 2, stats
    assert stats["iterations_coexecuted"] >= 3 * STEPS - 3, stats


def errors(steps):
    """Mapped sizes that differ and an unmapped out_axes of a mapped output: the exception
    eager JAX raises, each turn, after the same Python ran."""
    x, y, out = jnp.ones((3, 2)), jnp.ones((4, 2)), []
    for _ in range(steps):
        for call in (lambda: jax.vmap(lambda u, v: u + v)(x, y),
                     lambda: jax.vmap(lambda u: (out.append("ran"), u * 2.0)[1], out_axes=None)(x)):
            try:
                call()
                out.append("no error")
            except ValueError as error:
                out.append(type(error).__name__)
        x = x + 1.0
        out.append(float(x.sum()))
    return out


def test_vmap_errors_are_eagers():
    want, got = on_and_off(errors, 4)
    assert want[:4] == ["ValueError", "ran", "ValueError", 12.0], want[:4]
    assert got == want


def effects_inside(steps):
    """A debug callback inside the vmapped function: called as eagerly, for each example
    (never only for the first)."""
    seen, x = [], jnp.arange(6.0).reshape(3, 2)
    for _ in range(steps):
        def f(r):
            jax.debug.callback(lambda v: seen.append(np.asarray(v).round(4).tolist()), r.sum())
            return r + 1.0
        x = jax.vmap(f)(x)
        seen.append(float(x.sum()))
    return seen


def test_a_callback_inside_vmap_is_called_for_every_example():
    want, got = on_and_off(effects_inside, 4)
    assert want[:4] == [1.0, 5.0, 9.0, 21.0], want[:4]
    assert got == want
    assert terra_bc.stats()["vmaps_recorded"] == 4


def nnx_ensemble(steps):
    """An ensemble made by nnx.vmap and called through it (NNX's own jax.vmap inside), trained
    with nnx.value_and_grad and nnx.Optimizer: the per-example Variables NNX makes inside
    outlive the call in NNX's caches."""
    from flax import nnx
    import optax

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    @nnx.split_rngs(splits=3)
    @nnx.vmap
    def make(rngs):
        return MLP(rngs)

    @nnx.vmap(in_axes=(0, None))
    def forward(m, x):
        return m(x)
    model = make(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rs, out = np.random.RandomState(0), []
    for _ in range(steps):
        x = jnp.asarray(rs.randn(8, 4), jnp.float32)
        y = jnp.sin(x.sum(1, keepdims=True))
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((forward(m, x) - y[None]) ** 2))(model)
        opt.update(model, grads)
        out.append(float(loss))
    return out


def test_an_nnx_vmap_ensemble_computes_no_example_for_python():
    want, got = on_and_off(nnx_ensemble, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    stats = terra_bc.stats()
    # (NNX keeps the one-example Variables it made: computing them for it made each path's
    # segment differ, and its second path ran eagerly until compiling paid)
    assert stats["vmaps_recorded"] >= STEPS and stats["eager_fallbacks"] == 0, stats
    assert stats["compiles"] == 1 and stats["segments_eager"] == 0, stats
