"""Beyond one device (docs/distributed.md): speed on simulated devices, memory with donation.

(a) sharded  a data-parallel MLP (batch sharded over 2 simulated CPU devices, parameters
             replicated; value_and_grad + SGD; float(loss) every 10 steps): eager vs
             jax.jit(step) vs the same loop under terra_bc (loop units).  jax.jit runs with at
             most 2 steps in flight, as terra_bc paces its launches: with more than 32 in
             flight XLA:CPU hangs.  Steps/s, medians over repeats, checked equal to eager.
(b) memory   peak resident memory of a parameter-heavy step (8 layers of 2048x2048 float32:
             128 MiB of parameters, batch 8) over 6 steps, each mode in a fresh process on one
             device: eager, jax.jit without and with donate_argnums, terra_bc with donation
             (default) and without (TERRA_BC_DONATE=0).  Peak RSS (ru_maxrss) minus the RSS
             once the parameters exist, and the bytes of the arrays alive after each step
             (jax.live_arrays: the parameters, once nothing holds the old ones).  On a
             device whose allocator reports it (GPU: Device.memory_stats()), also the peak
             device bytes in use minus those in use once the parameters exist.

    python benchmarks/distributed.py [--only a,b] [--steps 100] [--repeats 3] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


# ------------------------------------------------------------------ (a) sharded speed

def sharded(steps, repeats):
    import collections
    import statistics

    import numpy as np

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import terra_bc

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    sizes = [128, 256, 256, 10]
    params0 = [(jax.device_put((rng.standard_normal((a, b)) * 0.05).astype(np.float32), rep),
                jax.device_put(np.zeros(b, np.float32), rep)) for a, b in zip(sizes, sizes[1:])]
    x = jax.device_put(rng.standard_normal((256, 128)).astype(np.float32), batch)
    y = jax.device_put(rng.standard_normal((256, 10)).astype(np.float32), batch)

    def loss_fn(params, x, y):
        h = x
        for w, b in params[:-1]:
            h = jax.nn.relu(h @ w + b)
        w, b = params[-1]
        return jnp.mean((h @ w + b - y) ** 2)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), loss

    jitted = jax.jit(step)

    def loop(n, fn, paced=False):
        params, logged, flight = params0, [], collections.deque()
        for k in range(n):
            params, loss = fn(params, x, y)
            if paced:
                flight.append(loss)
                if len(flight) > 2:
                    flight.popleft().block_until_ready()
            if k % 10 == 0:
                logged.append(float(loss))
        jax.block_until_ready(params)
        return logged, params

    def timed(run):
        t0 = time.perf_counter()
        out = run()
        return time.perf_counter() - t0, out

    def under_terra():
        with terra_bc.enabled():
            terra_bc.set_loops(True)
            try:
                return loop(steps, step)
            finally:
                terra_bc.set_loops(False)

    modes = {"eager": lambda: loop(steps, step), "jit": lambda: loop(steps, jitted, paced=True),
             "terra_bc": under_terra}
    for run in modes.values():  # warm-up: compiles, traces
        run()
    times = {m: [] for m in modes}
    outs = {}
    for _ in range(repeats):
        for m, run in modes.items():
            terra_bc.reset_stats()
            t, outs[m] = timed(run)
            times[m].append(t)
    stats = terra_bc.stats()
    want = jax.tree.leaves(outs["eager"])
    same = all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
               for m in ("jit", "terra_bc") for a, b in zip(jax.tree.leaves(outs[m]), want))
    shardings = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in
                    zip(jax.tree.leaves(outs["terra_bc"][1]), jax.tree.leaves(outs["eager"][1])))
    rate = {m: steps / statistics.median(ts) for m, ts in times.items()}
    return {"steps_per_s": {m: round(r, 1) for m, r in rate.items()},
            "terra_bc/jit": round(rate["terra_bc"] / rate["jit"], 2),
            "terra_bc/eager": round(rate["terra_bc"] / rate["eager"], 2),
            "same_values": same, "same_shardings": shardings,
            "stats": {k: stats[k] for k in ("iterations_coexecuted", "eager_fallbacks",
                                            "segments_launched", "buffers_donated")}}


# ------------------------------------------------------------------ (b) memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_bytes(key):
    """The first local device's allocator statistic key, or None where it keeps none (CPU)."""
    import jax
    stats = jax.local_devices()[0].memory_stats()
    return stats.get(key) if stats else None


def memory_one(mode, steps=6, layers=8, width=2048):
    """One mode's peak memory, in this (fresh) process."""
    import resource

    import numpy as np

    import jax
    import jax.numpy as jnp

    import terra_bc

    rng = np.random.default_rng(0)
    params = [jnp.asarray((rng.standard_normal((width, width)) * 0.02).astype(np.float32))
              for _ in range(layers)]
    x = jnp.asarray(rng.standard_normal((8, width)).astype(np.float32))
    jax.block_until_ready(params)

    def loss_fn(params, x):
        h = x
        for w in params:
            h = jnp.tanh(h @ w)
        return jnp.mean(h ** 2)

    def step(params, x):
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        return [p - 0.01 * g for p, g in zip(params, grads)], loss

    fn = {"eager": step, "terra_bc": step, "terra_bc_no_donation": step,
          "jit": jax.jit(step), "jit_donate": jax.jit(step, donate_argnums=0)}[mode]
    def train(box):  # (its own frame: the hook rewrites frames entered once it is on)
        params, losses = box.pop(), []  # (nothing else holds the first parameters)
        for _ in range(steps):
            params, loss = fn(params, x)
            losses.append(float(loss))
            live.append(live_mib())
        return params, losses

    def live_mib():  # what the arrays alive between two steps hold
        arrays = jax.live_arrays()
        return round(sum(a.nbytes for a in arrays if not a.is_deleted()) / 2**20, 1)

    live = []

    base = rss_mib()
    device_base = device_bytes("bytes_in_use")
    if mode.startswith("terra_bc"):
        terra_bc.enable()
        terra_bc.set_loops(True)
    box = [params]
    del params
    params, losses = train(box)
    if mode.startswith("terra_bc"):
        terra_bc.set_loops(False)
        terra_bc.disable()
    jax.block_until_ready(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"mode": mode, "peak_over_params_mib": round(peak - base, 1),
           "live_mib_after_each_step": live,
           "params_mib": layers * width * width * 4 / 2**20, "losses": losses}
    if device_base is not None:
        out["device_peak_over_params_mib"] = round(
            (device_bytes("peak_bytes_in_use") - device_base) / 2**20, 1)
    if mode.startswith("terra_bc"):
        s = terra_bc.stats()
        out["stats"] = {k: s[k] for k in ("iterations_coexecuted", "buffers_donated", "eager_fallbacks")}
    print(json.dumps(out))


def memory():
    rows = {}
    for mode in ("eager", "jit", "jit_donate", "terra_bc", "terra_bc_no_donation"):
        env = dict(os.environ, TERRA_BC_DONATE="0" if mode == "terra_bc_no_donation" else "1")
        env.pop("XLA_FLAGS", None)
        done = subprocess.run([sys.executable, HERE, "--memory-one", mode], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            rows[mode] = {"error": done.stderr[-800:]}
            continue
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    want = rows.get("eager", {}).get("losses")
    for r in rows.values():
        if want and "losses" in r:
            r["same_losses"] = bool(max(abs(a - b) for a, b in zip(r.pop("losses"), want)) < 1e-4)
    for key, ratio in (("peak_over_params_mib", "terra_bc/jit_donate"),
                       ("device_peak_over_params_mib", "device terra_bc/jit_donate")):
        jd = rows.get("jit_donate", {}).get(key)
        td = rows.get("terra_bc", {}).get(key)
        if jd and td:
            rows[ratio] = round(td / jd, 2)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--memory-one")
    ap.add_argument("--sharded-child", action="store_true")
    args = ap.parse_args()
    if args.memory_one:
        return memory_one(args.memory_one)
    if args.sharded_child:
        print(json.dumps(sharded(args.steps, args.repeats)))
        return
    results = {}
    if "a" in args.only:  # (its own process: the device count is set before JAX starts)
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_PLATFORMS="cpu")  # simulated devices, also where a GPU is present
        done = subprocess.run([sys.executable, HERE, "--sharded-child", "--steps", str(args.steps),
                               "--repeats", str(args.repeats)], env=env, capture_output=True,
                              text=True, timeout=900)
        results["sharded"] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                              else {"error": done.stderr[-800:]})
    if "b" in args.only:
        results["memory"] = memory()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
