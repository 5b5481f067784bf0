"""Programs on simulated CPU devices, run eagerly and under terra_bc in one process; what
each returns (values and shardings) and what it saw inside its loop are compared.

Run by tests/test_distributed.py in a subprocess that sets
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX starts:

    python tests/support/sharded_programs.py CASE [CASE...]

prints one JSON line per case: ``{"case", "same_values", "same_shardings", "stats", ...}``.
"""
import json
import sys

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import terra_bc

STEPS = 12


def mesh_1d():
    return Mesh(np.array(jax.devices()), ("data",))


def mesh_2d():
    return Mesh(np.array(jax.devices()).reshape(1, -1), ("data", "model"))


def init_mlp(rng, sizes, sharding):
    return [(jax.device_put((rng.standard_normal((a, b)) * 0.3).astype(np.float32), sharding),
             jax.device_put(np.zeros(b, np.float32), sharding)) for a, b in zip(sizes, sizes[1:])]


def mlp_loss(params, x, y):
    h = x
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    w, b = params[-1]
    return jnp.mean((h @ w + b - y) ** 2)


def data_parallel(steps=STEPS):
    """A data-parallel MLP: the batch sharded over "data", parameters replicated; a loss
    fetched every step and the batch's sharding read inside the loop."""
    mesh = mesh_1d()
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    params = init_mlp(rng, [8, 16, 16, 2], rep)
    seen, losses = [], []
    for _ in range(steps):
        x = jax.device_put(rng.standard_normal((8, 8)).astype(np.float32), batch)
        y = jax.device_put(rng.standard_normal((8, 2)).astype(np.float32), batch)
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        losses.append(float(loss))
    seen.append(params[0][0].sharding)
    return {"params": params, "loss": loss, "losses": losses}, seen


def tensor_parallel(steps=STEPS):
    """A tensor-parallel layer on a 2-D ("data", "model") mesh: the first weight's columns
    and the second's rows sharded over "model", the hidden activation constrained to be
    sharded the same way (``with_sharding_constraint``)."""
    mesh = mesh_2d()
    col = NamedSharding(mesh, P(None, "model"))
    row = NamedSharding(mesh, P("model", None))
    act = NamedSharding(mesh, P("data", "model"))
    rng = np.random.default_rng(1)
    w1 = jax.device_put((rng.standard_normal((8, 16)) * 0.3).astype(np.float32), col)
    w2 = jax.device_put((rng.standard_normal((16, 4)) * 0.3).astype(np.float32), row)
    x = jax.device_put(rng.standard_normal((4, 8)).astype(np.float32),
                       NamedSharding(mesh, P("data", None)))

    def loss_fn(w1, w2, x):
        h = jax.lax.with_sharding_constraint(jnp.tanh(x @ w1), act)
        return jnp.sum((h @ w2) ** 2)

    for _ in range(steps):
        loss, (g1, g2) = jax.value_and_grad(loss_fn, argnums=(0, 1))(w1, w2, x)
        w1, w2 = w1 - 0.01 * g1, w2 - 0.01 * g2
    return {"w1": w1, "w2": w2, "loss": loss, "g1": g1}, [w1.sharding, g2.sharding]


def shard_map_psum(steps=STEPS):
    """``shard_map`` with a ``psum`` inside the step: per-shard sums of squares reduced over
    "data", used to normalise a sharded vector."""
    from jax import shard_map
    mesh = mesh_1d()
    sharded = NamedSharding(mesh, P("data"))

    def global_norm(v):
        return jnp.sqrt(jax.lax.psum(jnp.sum(v * v), "data"))
    norm = shard_map(global_norm, mesh=mesh, in_specs=P("data"), out_specs=P())
    v = jax.device_put(np.linspace(-1.0, 1.0, 16).astype(np.float32), sharded)
    norms = []
    for k in range(steps):
        n = norm(v)
        v = v / n + 0.01 * jnp.sin(v * (k + 1))
        norms.append(float(n))
    return {"v": v, "n": n, "norms": norms}, [v.sharding]


def pmap_psum(steps=STEPS):
    """``jax.pmap`` with a ``psum`` over its axis inside the step."""
    f = jax.pmap(lambda x: jax.lax.psum(x * x, "i") + x, axis_name="i")
    x = jnp.arange(8.0).reshape(jax.device_count(), -1) / 8
    sums = []
    for _ in range(steps):
        x = f(x) * 0.5
        sums.append(float(jnp.sum(x)))
    return {"x": x, "sums": sums}, [x.sharding]


def device_get(steps=STEPS):
    """``jax.device_get`` of sharded values inside the loop (a fetch of every shard)."""
    mesh = mesh_1d()
    sharded = NamedSharding(mesh, P("data"))
    w = jax.device_put(np.arange(8, dtype=np.float32) / 8, sharded)
    got = []
    for _ in range(steps):
        w = jnp.cos(w) * 0.5 + w * 0.5
        host = jax.device_get(w)
        got.append(host.tolist())
    return {"w": w, "got": got}, [w.sharding]


def sharding_changes(steps=STEPS):
    """The batch's sharding changes half-way (sharded, then replicated, then sharded again):
    a guard like a change of shape; every step's result keeps eager's sharding."""
    mesh = mesh_1d()
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(2)
    w = jax.device_put((rng.standard_normal((8, 4)) * 0.3).astype(np.float32), rep)
    seen = []
    for k in range(steps):
        place = batch if (k // 4) % 2 == 0 else rep
        x = jax.device_put(rng.standard_normal((8, 8)).astype(np.float32), place)
        h = jnp.tanh(x @ w)
        w = w - 0.1 * x.T @ h / 8
        seen.append(h.sharding)
    return {"w": w, "h": h}, seen


def fed_sharding_changes(steps=STEPS, explicit=False):
    """Arrays made before the loop, sharded then replicated then sharded again, fed to it
    (no op of the loop names their sharding).  With explicit sharding the sharding is part
    of the aval, so the feed's guard fails (a new path, like a new shape); in auto mode the
    same segment runs and jax.jit compiles it for the new placement."""
    from jax.sharding import AxisType
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=((AxisType.Explicit if explicit else AxisType.Auto),))
    rng = np.random.default_rng(3)
    w = jax.device_put(np.full((8, 4), 0.1, np.float32), NamedSharding(mesh, P()))
    xs = [jax.device_put(rng.standard_normal((8, 8)).astype(np.float32),
                         NamedSharding(mesh, P("data") if (k // 4) % 2 == 0 else P()))
          for k in range(steps)]
    seen = []
    for k in range(steps):
        h = jnp.tanh(xs[k] @ w)
        w = w - 0.1 * jnp.mean(h) * jnp.ones_like(w)
        seen.append(h.sharding)
    return {"w": w, "h": h}, seen


def explicit_sharding_changes(steps=STEPS):
    return fed_sharding_changes(steps, explicit=True)


def unfetched_steps(steps=120, width=256, rows=2048):
    """A data-parallel step with no fetch: co-executed, a launch per turn goes ahead of the
    devices (XLA:CPU hangs with more than 32 multi-device computations in flight)."""
    mesh = mesh_1d()
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    w = jax.device_put(np.full((width, width), 0.01, np.float32), rep)
    x = jax.device_put(np.ones((rows, width), np.float32), batch)
    for _ in range(steps):
        g = jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
        w = w - 0.1 * g
    return w


CASES = {f.__name__: f for f in (data_parallel, tensor_parallel, shard_map_psum, pmap_psum,
                                  device_get, sharding_changes, fed_sharding_changes,
                                  explicit_sharding_changes)}


def shardings_of(tree):
    return [str(x.sharding) if isinstance(x, jax.Array) else None
            for x in jax.tree_util.tree_leaves(tree)]


def same_placement(a, b):
    """Are two shardings the same placement (``P('model')`` is ``P('model', None)``)?"""
    if a is None or b is None:
        return a is b
    ndim = max(len(getattr(x, "spec", ())) for x in (a, b))
    return a.device_set == b.device_set and a.is_equivalent_to(b, ndim)


def same_shardings(got, want):
    return len(got) == len(want) and all(map(same_placement, got, want))


def leaf_shardings(tree):
    return [x.sharding if isinstance(x, jax.Array) else None
            for x in jax.tree_util.tree_leaves(tree)]


def same_values(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5) for x, y in zip(la, lb))


def run(name):
    case = CASES[name]
    want, want_seen = case()
    terra_bc.reset_stats()
    with terra_bc.enabled():
        terra_bc.set_loops(True)
        try:
            got, got_seen = case()
        finally:
            terra_bc.set_loops(False)
    stats = terra_bc.stats()
    return {"case": name, "same_values": same_values(got, want),
            "same_shardings": same_shardings(leaf_shardings(got), leaf_shardings(want)),
            "same_seen": same_shardings(got_seen, want_seen),
            "identical_shardings": shardings_of(got) == shardings_of(want),
            "shardings": shardings_of(got), "want_shardings": shardings_of(want),
            "seen": [str(s) for s in got_seen], "want_seen": [str(s) for s in want_seen],
            "stats": {k: stats[k] for k in ("iterations_coexecuted", "iterations_traced",
                                            "eager_fallbacks", "divergences", "compiles",
                                            "segments_launched", "ops_skipped")}}


def run_unfetched():
    """``unfetched_steps`` under terra_bc against the same steps jitted, each waited for."""
    step = jax.jit(lambda w, x: w - 0.1 * jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w))
    terra_bc.reset_stats()
    with terra_bc.enabled():
        terra_bc.set_loops(True)
        try:
            got = unfetched_steps()
        finally:
            terra_bc.set_loops(False)
    stats = terra_bc.stats()
    mesh = mesh_1d()
    w = jax.device_put(np.full((256, 256), 0.01, np.float32), NamedSharding(mesh, P()))
    x = jax.device_put(np.ones((2048, 256), np.float32), NamedSharding(mesh, P("data")))
    for _ in range(120):
        w = step(w, x).block_until_ready()
    return {"case": "unfetched_steps", "same_values": same_values(got, w),
            "stats": {k: stats[k] for k in ("iterations_coexecuted", "eager_fallbacks")}}


if __name__ == "__main__":
    for name in sys.argv[1:] or CASES:
        print(json.dumps(run_unfetched() if name == "unfetched_steps" else run(name)), flush=True)
