"""Early launch: the segment a fetch needs is launched at the last op before it, so XLA runs
it while the Python between them does (docs/whole-run.md, runtime/coexecution.py).

A gradient step of a 256-512-10 MLP on a 512-row batch, then host work (a NumPy sort of
``--host`` numbers, as a data pipeline or logging does) and only then ``float(loss)``.
Without early launch the segment is launched at the fetch, after the host work: a step
costs host + device time.  With it, the two overlap.  Run under ``python -m terra_bc``;
the setting is switched between blocks of steps in one process (the same executables,
interleaved blocks: load on the machine hits both alike), and the medians are printed.

    python -m terra_bc benchmarks/early_launch.py [--steps 400] [--block 20] [--host 60000]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import terra_bc


def loss_fn(p, x, y):
    h = jnp.tanh(x @ p[0])
    return jnp.mean((h @ p[1] - y) ** 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--host", type=int, default=60000, help="numbers sorted on the host")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p = [jnp.asarray(rng.standard_normal((256, 512)) * 0.05, jnp.float32),
         jnp.asarray(rng.standard_normal((512, 10)) * 0.05, jnp.float32)]
    times = {True: [], False: []}
    host_times = []
    for step in range(args.steps):
        on = (step // args.block) % 2 == 0
        terra_bc.config(early_launch=on)
        t0 = time.perf_counter()
        x = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
        y = jnp.asarray(rng.standard_normal((512, 10)), jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        p = [a - 0.01 * b for a, b in zip(p, g)]
        h0 = time.perf_counter()
        np.sort(rng.standard_normal(args.host))  # host work before the loss is read
        host_times.append(time.perf_counter() - h0)
        float(loss)
        if step >= 2 * args.block:  # (the first blocks include the trace and compiles)
            times[on].append(time.perf_counter() - t0)
    terra_bc.config(early_launch=True)
    result = {"early_launch_ms": 1000 * float(np.median(times[True])),
              "at_fetch_ms": 1000 * float(np.median(times[False])),
              "host_ms": 1000 * float(np.median(host_times)),
              "early_launches": terra_bc.stats()["early_launches"],
              "steps_each": len(times[True])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
