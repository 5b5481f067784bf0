"""Soak (issue 14, item 5): a long run of a multi-path loop unit and of a library training
loop under terra_bc, checked for flat memory, bounded caches and eager's numbers.

Two programs, each one ``for`` loop written as a user writes it (a loop unit under
``terra_bc.enable(loops=True)``, as ``python -m terra_bc`` runs it):

  multipath  least-squares SGD on a 16x16 matrix with a fresh NumPy batch (32x16) every
             step and three paths: every 5th step (a branch on the step number) a plain
             gradient step; else, when ``float(max|x|)`` (fetched) exceeds 3.3, a clipped
             gradient step; else a step with weight decay.  A Python float that changes
             every step (fed: automatic dynamism) and a learning rate halved every 25,000
             steps; ``float(loss)`` fetched every step.
  optax      an MLP 16-64-64-4 on Gaussian blobs, a fresh NumPy batch of 32 every step,
             ``jax.value_and_grad`` and ``optax.chain(clip_by_global_norm(1.0),
             adam(1e-3))``, ``float(loss)`` every 10 steps.

Every ``--every`` steps (a checkpoint, inside the loop as a training loop logs) the run
records, after ``gc.collect()``: the resident set size (``/proc/self/statm``), the number of
objects the collector tracks (``len(gc.get_objects())``), the memory blocks Python has
allocated (``sys.getallocatedblocks()``: untracked objects too, ints, floats, strings), the
size of each of terra_bc's caches and per-unit tables (``cache_sizes``), and the program's
values (loss, parameter sums, branch counts).  Slopes are least-squares fits over the
checkpoints after warm-up (the first ``--warmup`` steps), per 10,000 iterations.

Each run is a process of its own; the reference is the same program run eagerly (plain JAX,
terra_bc not imported).  Checkpoint values are compared: branch and step counts exactly,
floats within ``RTOL``/``ATOL``.  Two references (``--reference``):

  full  eager runs the whole program (multipath's default).  Meaningful over 100,000 steps
        because both runs see the same data and take the same branches (the fetched branch
        value is the max of a NumPy input: exact in float32) and SGD on a strongly convex
        loss contracts the distance between two trajectories: float32 rounding does not
        compound, and a checkpoint off by more than rounding means the last few hundred
        steps computed something else.
  N     eager recomputes N checkpoint intervals, evenly spaced, the first and the last
        among them, each from the state the terra_bc run saved at the checkpoint before
        (parameters, optimizer state, the NumPy generator's state; optax's default, N=4).
        Adam on a non-convex loss does not contract, so after 100,000 steps two runs
        differing in the last bit at step 1 need not agree to 1e-4, and eager JAX runs
        this step ~10x slower than terra_bc (value_and_grad traces every step): restarted
        from equal state, the comparison is as tight late in the run as early.

    python benchmarks/soak.py --iterations 100000 [--program multipath|optax] [--every N]
                              [--warmup N] [--reference full|N] [--json out.json]
"""
import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

RTOL, ATOL = 1e-4, 1e-6
REFERENCE = {"multipath": "full", "optax": "4"}  # see --reference
PAGE = os.sysconf("SC_PAGE_SIZE")


# **** the programs ****

def multipath(iterations, checkpoint, every, resume=None):
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    target = rng.standard_normal((16, 16)).astype(np.float32)
    w, taken, start = jnp.zeros((16, 16)), [0, 0, 0], 0
    if resume is not None:  # (a reference run from another run's checkpoint: see main)
        start, (w,), meta = resume
        w, taken, rng.bit_generator.state = jnp.asarray(w), meta["taken"], meta["rng"]
    for step in range(start, iterations):
        x_np = rng.standard_normal((32, 16)).astype(np.float32)
        y_np = x_np @ target + 0.1 * rng.standard_normal((32, 16)).astype(np.float32)
        x, y = jnp.asarray(x_np), jnp.asarray(y_np)     # NumPy inputs
        lr = 0.05 * 0.5 ** (step // 25000)
        wobble = 1e-3 * math.cos(step * 0.01)  # a Python float that changes every step
        err = x @ w - y
        g = x.T @ err / 32.0
        if step % 5 == 0:                               # path A: on the step number
            w = w - lr * g
            taken[0] += 1
        elif float(jnp.max(jnp.abs(x))) > 3.3:          # path B: on a fetched value
            w = w - lr * jnp.clip(g, -1.0, 1.0)
            taken[1] += 1
        else:                                           # path C
            w = (1.0 - lr * 1e-3) * w - lr * (g + wobble)
            taken[2] += 1
        loss = float(jnp.mean(err * err))
        if step % every == every - 1:
            checkpoint(step + 1, {"loss": loss, "w_sum": float(jnp.sum(w)),
                                  "w_abs": float(jnp.sum(jnp.abs(w))), "taken": list(taken)},
                       lambda: ([w], {"taken": taken, "rng": rng.bit_generator.state}))
    return w


SIZES = (16, 64, 64, 4)


def optax_mlp(iterations, checkpoint, every, resume=None):
    import jax
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(SIZES[-1], SIZES[0])).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), len(SIZES) - 1)
    params = [{"w": jax.random.normal(k, (n, m)) * np.sqrt(2.0 / n), "b": jnp.zeros(m)}
              for k, n, m in zip(keys, SIZES[:-1], SIZES[1:])]

    def loss_fn(params, x, y):
        *hidden, last = params
        for layer in hidden:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        logits = x @ last["w"] + last["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    loss_value, start = float("nan"), 0
    if resume is not None:  # (a reference run from another run's checkpoint: see main)
        start, leaves, meta = resume
        leaves = [jnp.asarray(a) for a in leaves]
        params, opt_state = jax.tree.unflatten(jax.tree.structure((params, opt_state)), leaves)
        loss_value, rng.bit_generator.state = meta["loss"], meta["rng"]
    for step in range(start, iterations):
        y = rng.integers(0, SIZES[-1], size=32)
        x = (centres[y] + 1.5 * rng.standard_normal((32, SIZES[0]))).astype(np.float32)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y.astype(np.int32))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if step % 10 == 0:
            loss_value = float(loss)
        if step % every == every - 1:
            checkpoint(step + 1, {"loss": loss_value,
                                  "param_sums": [float(jnp.sum(p)) for p in jax.tree.leaves(params)],
                                  "adam_count": int(opt_state[1][0].count)},
                       lambda: (jax.tree.leaves((params, opt_state)),
                                {"loss": loss_value, "rng": rng.bit_generator.state}))
    return params


PROGRAMS = {"multipath": multipath, "optax": optax_mlp}


# **** what a checkpoint measures ****

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def cache_sizes():
    """The size of every table terra_bc keeps across iterations.  Module-level ones first
    (bounded by the program's distinct structures unless a bound is named), then those of
    this file's units (summed over them; paths share their prefix's events, counted once)."""
    from terra_bc import frames, jaxpr_builder as jb, scope
    from terra_bc.runtime import compiling, discovery, pacing, placeholders, timeline, units, values
    sizes = {
        "compiled": len(jb._compiled),              # executables by segment structure
        "donating": len(jb._donating),              # executables reusing inputs' buffers
        "interned": len(jb._interned),              # structural keys of sub-jaxprs
        "jaxpr_keys": len(jb._jaxpr_keys),          # id(jaxpr) -> key (weakly held)
        "params_memo": len(jb._params_memo),        # bound 20,000 (cleared)
        "compile_costs": len(compiling._costs),     # segments not compiled yet
        "compile_queue": len(compiling._queue),
        "device_numbers": len(values._device_numbers),  # bound DEVICE_NUMBERS (cleared)
        "loop_units": len(discovery._loop_units),
        "code_units": len(discovery._code_units),
        "all_units": len(units.all_units),
        "timeline": len(timeline._ring),            # bound RING_SIZE (maxlen)
        "in_flight": len(pacing._in_flight),
        "scope_dirs": len(scope._by_dir),
        "rewritten_code": len(frames._rewritten),
        "stable_callees": len(placeholders.STABLE),
    }
    unit_keys = ("units", "paths", "events", "equations", "segments", "plans", "escaping", "memo",
                 "dynamic", "static", "reused", "journal", "fallbacks_noted", "copies")
    sizes.update(dict.fromkeys(unit_keys, 0))
    for unit in [u for u in list(units.all_units) if f"{__file__}:" in u.name]:
        sizes["units"] += 1
        events = set()
        for path in unit.paths:
            events.update(map(id, path.events))
            trace = path.recorder._trace
            sizes["equations"] += len(trace.eqns) if trace is not None else 0
            sizes["segments"] += len(path.segments)
            sizes["plans"] += len(path.plans)
            sizes["escaping"] += len(path.escaping)
        sizes["events"] += len(events)
        for key in ("paths", "memo", "dynamic", "static", "reused", "journal", "fallbacks_noted",
                    "copies"):
            sizes[key] += len(getattr(unit, key))
    return sizes


class Checkpoints:
    """Called by the program at each checkpoint: measures and keeps one record.  Records are
    kept as JSON text (a str is not tracked by the collector: keeping them adds nothing to
    the object count they measure).  ``save``: a folder to write the program's state to at
    each checkpoint (``state()``: its arrays and the rest), for reference runs to start from."""

    def __init__(self, under_terra_bc, save=None):
        self.records, self.under, self.save = [], under_terra_bc, save
        self.t0 = time.perf_counter()

    def __call__(self, step, values, state):
        t = time.perf_counter() - self.t0
        gc.collect()
        record = {"step": step, "seconds": round(t, 2), "rss_mib": round(rss_mib(), 2),
                  "objects": len(gc.get_objects()), "blocks": sys.getallocatedblocks(),
                  "values": values}
        if self.under:
            import terra_bc
            record["caches"] = cache_sizes()
            stats = terra_bc.stats()
            record["stats"] = {k: stats[k] for k in STATS}
        self.records.append(json.dumps(record))
        if self.save:
            arrays, meta = state()
            np.savez(os.path.join(self.save, f"{step}.npz"), meta=json.dumps(meta),
                     **{f"a{k}": np.asarray(a) for k, a in enumerate(arrays)})
        print(json.dumps({k: record[k] for k in ("step", "seconds", "rss_mib", "objects")}),
              file=sys.stderr, flush=True)

    def results(self):
        return [json.loads(r) for r in self.records]


STATS = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
         "compiles", "paths_recorded")


def load_state(folder, step):
    """What a reference run resumes from: (step, arrays, the rest) saved at ``step``."""
    with np.load(os.path.join(folder, f"{step}.npz")) as f:
        arrays = [f[f"a{k}"] for k in range(len(f.files) - 1)]
        return step, arrays, json.loads(str(f["meta"]))


def run(program, iterations, every, under_terra_bc, save=None, resume=None):
    """Run ``program`` to step ``iterations`` in this process (from ``resume``'s step if
    given); its checkpoint records."""
    checkpoints = Checkpoints(under_terra_bc, save)
    if under_terra_bc:
        import terra_bc
        terra_bc.enable(loops=True)
        try:
            PROGRAMS[program](iterations, checkpoints, every, resume)
        finally:
            terra_bc.disable()
            terra_bc.set_loops(False)
    else:
        PROGRAMS[program](iterations, checkpoints, every, resume)
    return checkpoints.results()


# **** summaries ****

def slope_per_10k(records, key, warmup):
    """Least-squares slope of ``key`` against the step, per 10,000 steps, over the
    checkpoints after ``warmup`` steps (None with fewer than 3 of them)."""
    late = [r for r in records if r["step"] > warmup]
    if len(late) < 3:
        return None
    x = np.array([r["step"] for r in late], float)
    y = np.array([r[key] for r in late], float)
    return round(float(np.polyfit(x, y, 1)[0] * 10_000), 3)


def compare(got, want):
    """Checkpoint values of two runs, matched by step (``want`` may hold fewer): (max
    relative difference of floats, differences beyond tolerance as readable strings).  Ints
    (branch counts, step counts) must be equal."""
    worst, bad = 0.0, []
    by_step = {g["step"]: g for g in got}
    for w in want:
        g = by_step.get(w["step"])
        if g is None:
            bad.append(f"no checkpoint at step {w['step']}")
            continue
        for name, wv in w["values"].items():
            for a, b in zip(np.ravel(g["values"][name]), np.ravel(wv)):
                if isinstance(b, (int, np.integer)):
                    if a != b:
                        bad.append(f"step {w['step']} {name}: {a} != {b} (exact)")
                    continue
                diff = abs(a - b)
                worst = max(worst, diff / max(abs(b), 1e-30))
                if diff > ATOL + RTOL * abs(b):
                    bad.append(f"step {w['step']} {name}: {a!r} vs eager {b!r}")
    return float(worst), bad


def side_summary(records, warmup):
    last = records[-1]
    late = [r for r in records if r["step"] > warmup]
    out = {"seconds": last["seconds"],
           "ms_per_iteration_late": None,
           "rss_mib": [late[0]["rss_mib"], last["rss_mib"]] if late else None,
           "rss_mib_per_10k": slope_per_10k(records, "rss_mib", warmup),
           "objects": [late[0]["objects"], last["objects"]] if late else None,
           "objects_per_10k": slope_per_10k(records, "objects", warmup),
           "blocks_per_10k": slope_per_10k(records, "blocks", warmup)}
    if len(late) >= 2:
        out["ms_per_iteration_late"] = round(1e3 * (last["seconds"] - late[0]["seconds"])
                                             / (last["step"] - late[0]["step"]), 3)
    if "caches" in last:
        first = late[0]["caches"] if late else records[0]["caches"]
        out["caches_after_warmup"] = first
        out["caches_grown_after_warmup"] = {k: [first[k], v] for k, v in last["caches"].items()
                                            if v > first[k]}
        out["caches_max"] = {k: max(r["caches"][k] for r in records) for k in last["caches"]}
        out["stats"] = last["stats"]
    return out


def child(args, mode, *extra):
    """One run in a fresh process (each run's memory its own); its checkpoint records."""
    cmd = [sys.executable, os.path.abspath(__file__), "--program", args.program,
           "--every", str(args.every), "--mode", mode, *extra]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout)


def reference_intervals(checkpoints, count):
    """The checkpoint intervals a reference run recomputes: ``count`` of them evenly spaced,
    the first and the last among them (index k: from checkpoint k-1, or the start, to k)."""
    return sorted({int(round(k)) for k in np.linspace(0, checkpoints - 1, count)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="multipath")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=None,
                        help="steps between checkpoints (default: iterations / 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps left out of the slopes (default: iterations / 10)")
    parser.add_argument("--reference", default=None,
                        help="'full' (eager runs the whole program) or N (eager recomputes N "
                             "checkpoint intervals from the terra_bc run's saved state); "
                             f"default {REFERENCE}")
    parser.add_argument("--json", help="also write the summary here")
    # (a child process: one run, its records as JSON on stdout)
    parser.add_argument("--mode", choices=("both", "terra_bc", "eager"), default="both")
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.every = args.every or max(1, args.iterations // 50)
    if args.mode != "both":
        resume = load_state(args.save, args.resume) if args.resume else None
        save = args.save if args.resume is None else None
        records = run(args.program, args.iterations, args.every, args.mode == "terra_bc",
                      save, resume)
        print(json.dumps(records))
        return
    warmup = args.warmup if args.warmup is not None else args.iterations // 10
    reference = args.reference or REFERENCE[args.program]
    out = {"program": args.program, "iterations": args.iterations, "every": args.every,
           "warmup": warmup, "reference": reference}
    with tempfile.TemporaryDirectory() as folder:
        save = [] if reference == "full" else ["--save", folder]
        runs = {"terra_bc": child(args, "terra_bc", "--iterations", str(args.iterations), *save)}
        if reference == "full":
            runs["eager"] = child(args, "eager", "--iterations", str(args.iterations))
        else:
            steps = [r["step"] for r in runs["terra_bc"]]
            eager = []
            for k in reference_intervals(len(steps), int(reference)):
                resume = ["--save", folder, "--resume", str(steps[k - 1])] if k else []
                eager += child(args, "eager", "--iterations", str(steps[k]), *resume)[-1:]
            runs["eager"] = eager
    out["terra_bc"] = side_summary(runs["terra_bc"], warmup)
    if reference == "full":
        out["eager"] = side_summary(runs["eager"], warmup)
    worst, bad = compare(runs["terra_bc"], runs["eager"])
    out["values"] = {"checkpoints_compared": [r["step"] for r in runs["eager"]],
                     "max_relative_difference": worst, "rtol": RTOL, "atol": ATOL,
                     "differences": bad[:20], "equal": not bad}
    import jax
    out["machine"] = {"python": platform.python_version(), "jax": jax.__version__,
                      "cpus": os.cpu_count(), "platform": platform.platform()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
