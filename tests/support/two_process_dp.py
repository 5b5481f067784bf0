"""One of two processes of a data-parallel training loop on JAX's distributed runtime (CPU,
gloo collectives over loopback), for tests/test_distributed.py:

    python [-m terra_bc] two_process_dp.py PORT PROCESS_ID MODE

MODE: "same" (both processes take the same path), "fetch" (process 0 alone fetches a value
between two collectives from step 6 on: its segments are cut where process 1's are not),
"diverge" (process 0 alone runs extra ops at step 6: a new path in one process).  Prints
one line ``RESULT {json}`` (losses, final parameters, terra_bc's counters if it runs)."""
import json
import sys

import numpy as np

import jax
import jax.numpy as jnp

PORT, PID, MODE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=2,
                           process_id=PID, initialization_timeout=60)

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("data",))
rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def loss_fn(params, x, y):
    h = x
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    w, b = params[-1]
    return jnp.mean((h @ w + b - y) ** 2)


def train(steps=12):
    rng = np.random.default_rng(0)
    sizes = [8, 16, 2]
    params = [(jax.device_put((rng.standard_normal((a, b)) * 0.3).astype(np.float32), rep),
               jax.device_put(np.zeros(b, np.float32), rep)) for a, b in zip(sizes, sizes[1:])]
    losses = []
    for step in range(steps):
        xg = rng.standard_normal((8, 8)).astype(np.float32)
        yg = rng.standard_normal((8, 2)).astype(np.float32)
        mine = slice(4 * PID, 4 * PID + 4)  # this process's half of the global batch
        x = jax.make_array_from_process_local_data(batch, xg[mine], (8, 8))
        y = jax.make_array_from_process_local_data(batch, yg[mine], (8, 2))
        scale = jnp.mean(x * x)  # an all-reduce over the processes
        if MODE == "fetch" and PID == 0 and step >= 6:
            print("scale", float(scale))  # a fetch between two collectives, process 0 only
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        grads = jax.tree.map(lambda g: g * (1.0 + 0.0 * scale), grads)
        if MODE == "diverge" and PID == 0 and step == 6:
            grads = jax.tree.map(lambda g: g * 1.0, grads)  # a new path, process 0 only
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        losses.append(float(loss))
    return losses, params


losses, params = train()
out = {"pid": PID, "losses": losses,
       "params": [np.asarray(jax.device_get(p)).ravel().tolist() for p in jax.tree.leaves(params)]}
if "terra_bc" in sys.modules:
    import terra_bc
    stats = terra_bc.stats()
    out["stats"] = {k: stats[k] for k in ("iterations_coexecuted", "eager_fallbacks",
                                          "divergences", "segments_launched")}
print("RESULT", json.dumps(out), flush=True)
jax.distributed.shutdown()
