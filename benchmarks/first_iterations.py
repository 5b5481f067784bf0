"""The first iterations and the whole run: eager JAX vs jax.jit vs terra_bc, each in its own
fresh process (what a user starting a program feels).

Programs (small, so eager time is per-op dispatch and compiling, as in real small models):

  mlp        a jit-compatible MLP training step (32-128-128-1, batch 64, value_and_grad + SGD)
             with nothing read by Python: jax.jit is a valid baseline.
  mlp_fetch  the harder variant: a NumPy-drawn mask after each hidden layer, ``float(loss)``
             read in the middle of the step and a Python-adapted learning rate fed back
             (jax.jit would freeze the mask and cannot branch on the loss: not a baseline).
  paths, adaptive_lr, dynamic_shapes, greedy_decode
             benchmarks/control.py's programs (see there) run whole from a cold process: a
             path drawn among 3 each step; fetch + Python-adapted lr + clipping; boxes with
             data-dependent counts and NumPy NMS; decoding with a growing KV-cache list (one
             step: one prompt).
  tree, greedy_decode_long, dynamic_shapes_hard
             control.py's harder variants: a TreeRNN over 6 random trees; 40 distinct
             prompts decoded by a bigger model; 1,024 anchors and a threshold drawn by Python
             each step.
  tables     control.py's diffusion-like step indexing arrays made before it (its noise
             schedule by NumPy timesteps, embedding tables by values of the step).

Modes, each a fresh process (``--child``):

  eager              plain Python + JAX
  jit                jax.jit(step) (mlp only)
  jit_warm           jax.jit(step) with JAX's persistent compilation cache warmed by a run
  terra_bc           @terra_bc.function(step), abstract tracing (the default)
  terra_bc_eager     the same with eager-valued tracing (TERRA_BC_ABSTRACT_TRACING=0)
  terra_bc_warm      terra_bc with TERRA_BC_CACHE_DIR warmed by a run

Reported, medians over ``--repeats`` processes per mode: each of the first iterations
(synchronised with block_until_ready, ms), the whole run (the process's wall time, from
``python`` starting to its exit: imports, first steps, all steps), the steady step (median of
the last half) and peak RSS.  Values are checked against eager's (rtol 1e-4).

    python benchmarks/first_iterations.py [--steps 30] [--repeats 3] [--markdown docs/whole-run.md]
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.run import child_env  # noqa: E402  (one environment for every timed child)
PROGRAMS = {"mlp": ("eager", "jit", "jit_warm", "terra_bc", "terra_bc_eager", "terra_bc_warm"),
            "mlp_fetch": ("eager", "terra_bc", "terra_bc_eager", "terra_bc_warm")}
# benchmarks/control.py's programs, whole: each benchmark step is one step of the program
CONTROL = ("paths", "adaptive_lr", "dynamic_shapes", "greedy_decode", "tree",
           "greedy_decode_long", "dynamic_shapes_hard", "tables")
PROGRAMS.update({p: ("eager", "terra_bc", "terra_bc_eager") for p in CONTROL})
SHOWN = 6      # first iterations in the table
RTOL = 1e-4
BEGIN, END = "<!-- first-iterations:begin -->", "<!-- first-iterations:end -->"


# ----------------------------------------------------------------------------- child

def child_control(program, mode, steps):
    import numpy as np
    import jax
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import control
    wrap = (lambda f: f)
    if mode.startswith("terra_bc"):
        import terra_bc
        wrap = terra_bc.function
    run, values, _, log = getattr(control, "make_" + program)(wrap)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        run(i)
        jax.block_until_ready(jax.tree_util.tree_leaves(values()))
        times.append((time.perf_counter() - t0) * 1e3)
    leaves = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(values()) if v is not None]
    out = {"times_ms": times, "checksum": float(sum(np.sum(v) for v in leaves)),
           "log": _plain(log[-200:]),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if mode.startswith("terra_bc"):
        out["stats"] = _stats()
    print("RESULT " + json.dumps(out))


def _plain(x):
    """A side-effect log as JSON values (numbers as floats), compared with a tolerance."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    try:
        return float(x)
    except (TypeError, ValueError):
        return repr(x)


def _same_log(a, b):
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_log(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= RTOL * max(1.0, abs(b))
    return a == b


def _stats():
    import terra_bc
    return {k: v for k, v in terra_bc.stats().items()
            if k in ("iterations_traced", "iterations_coexecuted", "compiles",
                     "compiles_background", "segments_eager", "trace_launches",
                     "compile_seconds", "compile_wait_seconds", "divergences", "eager_fallbacks")}


def child(program, mode, steps):
    if program in CONTROL:
        return child_control(program, mode, steps)
    import numpy as np
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    masks = np.random.default_rng(1)
    sizes = (32, 128, 128, 1)
    params = [(jnp.asarray(rng.normal(size=(a, b)) * 0.1, jnp.float32), jnp.zeros(b, jnp.float32))
              for a, b in zip(sizes[:-1], sizes[1:])]
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 1)), jnp.float32)

    def loss_fn(ps, x, y):
        h = x
        for w, b in ps[:-1]:
            h = jnp.tanh(h @ w + b)
            if program == "mlp_fetch":
                h = h * jnp.asarray(masks.random(h.shape) > 0.1, jnp.float32)
        w, b = ps[-1]
        return jnp.mean((h @ w + b - y) ** 2)

    def mlp(ps, x, y):
        loss, g = jax.value_and_grad(loss_fn)(ps, x, y)
        return [(w - 0.05 * gw, b - 0.05 * gb) for (w, b), (gw, gb) in zip(ps, g)], loss

    lr = [0.05]

    def mlp_fetch(ps, x, y):
        loss, g = jax.value_and_grad(loss_fn)(ps, x, y)
        value = float(loss)
        lr[0] *= 0.5 if value > 2.0 else 1.01
        return [(w - lr[0] * gw, b - lr[0] * gb) for (w, b), (gw, gb) in zip(ps, g)], value

    step = mlp if program == "mlp" else mlp_fetch
    if mode.startswith("jit"):
        step = jax.jit(step)
    elif mode.startswith("terra_bc"):
        import terra_bc
        step = terra_bc.function(step)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, loss = step(params, x, y)
        jax.block_until_ready((params, loss))
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"times_ms": times, "loss": float(loss),
           "checksum": float(sum(float(jnp.sum(w)) for w, _ in params)),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if mode.startswith("terra_bc"):
        out["stats"] = _stats()
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------- parent

def run_child(program, mode, steps, cache):
    env = dict(child_env(), PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for k in ("TERRA_BC_CACHE_DIR", "TERRA_BC_ABSTRACT_TRACING"):
        env.pop(k, None)
    if mode == "terra_bc_eager":
        env["TERRA_BC_ABSTRACT_TRACING"] = "0"
    if mode == "terra_bc_warm":
        env["TERRA_BC_CACHE_DIR"] = cache
    if mode == "jit_warm":
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", program, mode, str(steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{program}/{mode} failed:\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[7:])
    result["whole_s"] = wall
    return result


def bench(program, steps, repeats, log=print):
    modes = PROGRAMS[program]
    runs = {m: [] for m in modes}
    caches = {m: tempfile.mkdtemp(prefix=f"tbc-{m}-") for m in modes if m.endswith("_warm")}
    try:
        for m, cache in caches.items():  # warm each cache once (not timed)
            run_child(program, m, steps, cache)
        for r in range(repeats):  # interleaved, so machine noise hits every mode alike
            for m in modes:
                runs[m].append(run_child(program, m, steps, caches.get(m, "")))
                log(f"  {program} {m} run {r + 1}: whole {runs[m][-1]['whole_s']:.2f} s")
    finally:
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)
    ref = runs["eager"][0]
    summary = {}
    for m, rs in runs.items():
        first = [statistics.median(r["times_ms"][i] for r in rs) for i in range(min(steps, 50))]
        tail = [statistics.median(r["times_ms"][steps // 2:]) for r in rs]
        ok = all(abs(r["checksum"] - ref["checksum"]) <= RTOL * max(1.0, abs(ref["checksum"]))
                 and _same_log(r.get("log"), ref.get("log")) for r in rs)
        summary[m] = {"first_ms": first, "steady_ms": statistics.median(tail),
                      "whole_s": statistics.median(r["whole_s"] for r in rs),
                      "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                      "matches_eager": ok, "stats": rs[-1].get("stats")}
    return summary


def machine():
    import jax
    import jaxlib
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"CPython {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
            f"backend {jax.default_backend()}")


def render(results, steps, repeats):
    lines = [BEGIN, "",
             f"Generated by `python benchmarks/first_iterations.py --steps {steps} --repeats {repeats}` "
             f"on {time.strftime('%Y-%m-%d')} ({machine()}); medians of {repeats} fresh processes per "
             "mode. Whole run: the process's wall time, `python` start to exit (imports included).", ""]
    for program, summary in results.items():
        lines += [f"**{program}**", "",
                  "| mode | " + " | ".join(f"it {i + 1} (ms)" for i in range(SHOWN)) +
                  " | steady (ms) | whole run (s) | vs eager | peak RSS (MiB) | values | stats (last run) |",
                  "|---" * (SHOWN + 7) + "|"]
        eager = summary["eager"]["whole_s"]
        for m, s in summary.items():
            firsts = " | ".join(f"{t:.1f}" for t in s["first_ms"][:SHOWN])
            st = s["stats"]
            stats = ", ".join(f"{k} {v}" for k, v in st.items()) if st else ""
            lines.append(f"| {m} | {firsts} | {s['steady_ms']:.2f} | {s['whole_s']:.2f} | "
                         f"{eager / s['whole_s']:.2f}x | {s['peak_rss_mib']:.0f} | "
                         f"{'= eager' if s['matches_eager'] else 'DIFFERS'} | {stats} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_markdown(path, text):
    doc = open(path).read() if os.path.exists(path) else ""
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(doc)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    cols = min(3, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, (program, summary) in zip(axes.flat, results.items()):
        for m, s in summary.items():
            ax.plot(range(1, len(s["first_ms"]) + 1), s["first_ms"], marker=".", label=m)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("ms (synchronised)")
        ax.set_title(f"{program}: first iterations")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--markdown", default=os.path.join(ROOT, "docs", "whole-run.md"))
    p.add_argument("--chart", default=os.path.join(ROOT, "docs", "first_iterations.png"))
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=3, metavar=("PROGRAM", "MODE", "STEPS"))
    p.add_argument("--replot", metavar="JSON", nargs="+",
                   help="run nothing: write --markdown and --chart from --json files (merged, "
                        "later files' programs replacing earlier ones')")
    a = p.parse_args(argv)
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return
    if a.replot:
        results = {}
        for path in a.replot:
            with open(path) as f:
                results.update(json.load(f))
    else:
        results = {prog: bench(prog, a.steps, a.repeats) for prog in a.programs.split(",")}
    text = render(results, a.steps, a.repeats)
    print(text)
    if a.json and not a.replot:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.markdown:
        write_markdown(a.markdown, text)
    if a.chart:
        plot(results, a.chart)


if __name__ == "__main__":
    main()
