"""Co-execution engine benchmark: eager JAX vs jax.jit vs ``@terra_bc.function``.

All modes run side by side in one process, interleaved repeat by repeat so machine noise hits
them alike; times are medians over repeats, measured in steady state after warm-up.

(a) mlp      a jit-compatible MLP training step (2 hidden layers of 128, batch 64,
             value_and_grad + SGD): eager vs jax.jit(step) vs terra_bc.function(step).
             Steps/s and the ratios terra_bc/jit (aim >= 0.8) and terra_bc/eager (aim >= 5).
(b) dropout  the same step with a NumPy-drawn dropout mask inside the differentiated function
             and float(loss) logged every step: eager vs terra_bc (aim >= 5x eager).  jax.jit
             runs it too, but only to show that its result differs from eager (the mask is
             frozen at trace time): it is not a valid baseline, so it is not timed.
(c) warmup   iterations until terra_bc's per-step time is within 10% of its steady state
             (aim <= 3), and the first-iteration time (tracing + compile) of terra_bc vs
             jax.jit on the same step (aim <= 2x).  Each mode gets layer widths no other part
             of this run used, so neither reuses compilations; three cold runs per mode,
             per-iteration medians over them.
(d) memory   RSS (/proc/self/statm) every 1000 iterations over 10,000 iterations of a tiny
             step under terra_bc, and its growth.
(e) overhead Python-side cost per skipped site: a unit of K=200 cheap jnp ops on tiny arrays
             with no fetch; (time per co-executed iteration - time of the same computation as
             one jax.jit call) / K.  And the cost of a 1-op unit per segment launched, of
             eager runs of a new segment before compiling it pays, and of 30 ops with a
             NumPy scalar operand (the general path) against a Python float's.
(f) small    (a) at widths 4-8-8-2, batch 2: computing costs next to nothing, so the step
             time is Python and dispatch (what a GPU shows of terra_bc's per-step Python).
(g) aux      (a) as a classifier: value_and_grad(..., has_aux=True) returns the logits, which
             the step reads again for an accuracy (softmax cross-entropy: custom_jvp rules).

Every terra_bc run is checked against eager (values, rtol 1e-4) and reports terra_bc.stats(),
so a "fast" number from an engine that silently ran eagerly (or wrongly) is visible as such.
If terra_bc's engine is missing or raises, the error goes in the table instead of a number.

    python benchmarks/coexec.py [--steps 200] [--repeats 5] [--json out.json] [--only a,b]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import terra_bc
    TERRA_IMPORT_ERROR = None
except Exception as e:  # the benchmark must still run the baselines
    terra_bc = None
    TERRA_IMPORT_ERROR = f"{type(e).__name__}: {e}"

RTOL = 1e-4   # values are compared to eager; compiled code may reassociate float sums
LR = 0.05


# ------------------------------------------------------------------ helpers

def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def sync(tree):
    """Wait for every array in tree (np.asarray works on eager, jit and terra_bc values)."""
    for leaf in leaves(tree):
        np.asarray(leaf)


def err(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def terra_function(fn):
    if terra_bc is None:
        raise RuntimeError(f"import terra_bc failed: {TERRA_IMPORT_ERROR}")
    return terra_bc.function(fn)


def terra_stats():
    try:
        return dict(terra_bc.stats())
    except Exception as e:
        return {"error": err(e)}


def emit(res, text, json_path):
    """Print a benchmark's report; write its results as JSON when asked.  Returns res."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


def terra_reset():
    try:
        terra_bc.reset_stats()
    except Exception:
        pass


def stat_delta(before, after):
    keys = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
            "compiles", "segments_launched", "fetches", "feeds", "ops_skipped")
    if "error" in before or "error" in after:
        return {"error": after.get("error") or before.get("error")}
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if k in after}


def max_rel_diff(a, b):
    worst = 0.0
    for x, y in zip(leaves(a), leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y) / (np.abs(y) + 1e-6))))
    return worst


def rss_mib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def init_params(seed, sizes):
    r = np.random.default_rng(seed)
    return [(jnp.asarray((r.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)),
             jnp.zeros((n,), jnp.float32)) for m, n in zip(sizes[:-1], sizes[1:])]


def make_batches(seed, count, batch, din, dout):
    r = np.random.default_rng(seed)
    return [(jnp.asarray(r.standard_normal((batch, din)).astype(np.float32)),
             jnp.asarray(r.standard_normal((batch, dout)).astype(np.float32)))
            for _ in range(count)]


# ------------------------------------------------------------------ the step functions
# Factories: each mode gets its own fresh function object.

def mlp_outputs(params, x):
    h = x
    for W, b in params[:-1]:
        h = jnp.tanh(h @ W + b)
    W, b = params[-1]
    return h @ W + b


def make_mlp_step(lr=LR):
    def loss_fn(params, x, y):
        return jnp.mean((mlp_outputs(params, x) - y) ** 2)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)], loss
    return step


def make_aux_step(lr=LR):
    def loss_fn(params, x, y):
        logits = mlp_outputs(params, x)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.softmax(y), -1)), logits

    def step(params, x, y):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(y, -1))
        new = [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)]
        return new, (loss, accuracy)
    return step


def make_dropout_step(rng, log, lr=LR, p=0.1):
    def loss_fn(params, x, y):
        h = x
        for W, b in params[:-1]:
            h = jnp.tanh(h @ W + b)
            h = h * (rng.random(h.shape) > p) / (1 - p)   # NumPy mask, fresh every step
        W, b = params[-1]
        return jnp.mean((h @ W + b - y) ** 2)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        if log is not None:
            log.append(float(loss))                          # a fetch every step
        return [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)], loss
    return step


def run_steps(step, params, batches, n, start=0):
    loss = None
    for i in range(start, start + n):
        x, y = batches[i % len(batches)]
        params, loss = step(params, x, y)
    return params, loss


class Mode:
    """One timed contender: a step function and its chained params."""

    def __init__(self, name, step, params):
        self.name, self.step, self.params = name, step, params
        self.times, self.error, self.done = [], None, 0

    def run(self, batches, n):
        if self.error:
            return
        try:
            t0 = time.perf_counter()
            self.params, loss = run_steps(self.step, self.params, batches, n, self.done)
            sync((self.params, loss))
            self.times.append(time.perf_counter() - t0)
            self.done += n
        except Exception as e:
            self.error = err(e)
            traceback.print_exc(file=sys.stderr)

    def steps_per_s(self, n):
        return n / statistics.median(self.times) if self.times and not self.error else None


def race(modes, batches, steps, repeats, warmup):
    for m in modes:
        m.run(batches, warmup)
        m.times.clear()
    for _ in range(repeats):
        for m in modes:
            m.run(batches, steps)
    return {m.name: (m.steps_per_s(steps) if not m.error else None) for m in modes}


def check_against_eager(make_eager, make_terra, params, batches, n=8):
    """Run n steps of both from the same start; max relative difference of params and loss."""
    want = run_steps(make_eager(), params, batches, n)
    got = run_steps(make_terra(), params, batches, n)
    return max_rel_diff(got, want)


# ------------------------------------------------------------------ (a) jit-compatible MLP

def bench_mlp(args, sizes=(32, 128, 128, 10), batch=64, make_step=make_mlp_step,
              what="value_and_grad + SGD"):
    params = init_params(0, sizes)
    batches = make_batches(1, 16, batch, sizes[0], sizes[-1])
    out = {"shape": f"MLP {sizes}, batch {batch}, {what}"}
    modes = [Mode("eager", make_step(), params),
             Mode("jit", jax.jit(make_step()), params)]
    try:
        modes.append(Mode("terra_bc", terra_function(make_step()), params))
    except Exception as e:
        out["terra_bc_error"] = err(e)
    terra_reset()
    before = terra_stats()
    sps = race(modes, batches, args.steps, args.repeats, args.warmup)
    out["stats"] = stat_delta(before, terra_stats())
    out["steps_per_s"] = sps
    out["errors"] = {m.name: m.error for m in modes if m.error}
    t, j, e = sps.get("terra_bc"), sps.get("jit"), sps.get("eager")
    out["terra_bc/jit"] = t / j if t and j else None
    out["terra_bc/eager"] = t / e if t and e else None
    out["jit/eager"] = j / e if j and e else None
    try:
        out["terra_bc_max_rel_diff_vs_eager"] = check_against_eager(
            make_step, lambda: terra_function(make_step()), params, batches)
    except Exception as e:
        out["terra_bc_check_error"] = err(e)
    return out


# ------------------------------------------------------------------ (b) NumPy dropout mask

def bench_dropout(args):
    sizes, batch = (32, 128, 128, 10), 64
    params = init_params(2, sizes)
    batches = make_batches(3, 16, batch, sizes[0], sizes[-1])
    out = {"shape": f"MLP {sizes}, batch {batch}, NumPy dropout mask in loss_fn, "
                    f"float(loss) logged every step"}
    modes = [Mode("eager", make_dropout_step(np.random.default_rng(0), []), params)]
    try:
        modes.append(Mode("terra_bc", terra_function(
            make_dropout_step(np.random.default_rng(0), [])), params))
    except Exception as e:
        out["terra_bc_error"] = err(e)
    terra_reset()
    before = terra_stats()
    sps = race(modes, batches, args.steps, args.repeats, args.warmup)
    out["stats"] = stat_delta(before, terra_stats())
    out["steps_per_s"] = sps
    out["errors"] = {m.name: m.error for m in modes if m.error}
    t, e = sps.get("terra_bc"), sps.get("eager")
    out["terra_bc/eager"] = t / e if t and e else None

    # Correctness from identical seeds: terra_bc must equal eager (fresh mask every step,
    # same log); jax.jit draws the mask once while tracing, so it must not.
    n = 8
    want_log = []
    want = run_steps(make_dropout_step(np.random.default_rng(7), want_log), params, batches, n)
    try:
        got_log = []
        got = run_steps(terra_function(make_dropout_step(np.random.default_rng(7), got_log)),
                        params, batches, n)
        out["terra_bc_max_rel_diff_vs_eager"] = max_rel_diff(got, want)
        out["terra_bc_log_matches"] = bool(
            len(got_log) == n and np.allclose(got_log, want_log, rtol=RTOL))
    except Exception as e:
        out["terra_bc_check_error"] = err(e)
    try:
        jitted = jax.jit(make_dropout_step(np.random.default_rng(7), None))
        got = run_steps(jitted, params, batches, n)
        d = max_rel_diff(got, want)
        out["jit_max_rel_diff_vs_eager"] = d
        out["jit_result"] = ("DIFFERS from eager (mask frozen at trace time)" if d > RTOL
                             else "equals eager (unexpected)")
    except Exception as e:
        out["jit_result"] = f"raises {err(e)}"
    return out


# ------------------------------------------------------------------ (c) warm-up and first step

def per_step_times(step, params, batches, n):
    times = []
    for i in range(n):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        params, loss = step(params, x, y)
        sync((params, loss))
        times.append(time.perf_counter() - t0)
    return times


WARMUP_ROUNDS = 3


def bench_warmup(args):
    out = {}
    batch, din, dout = 64, 32, 10
    # Widths used by no other section (and different for each mode and round) so no mode
    # reuses a compilation made earlier in this process.  One step takes ~0.1-0.2 ms, so a
    # single cold run is noise-dominated: WARMUP_ROUNDS cold runs per mode, interleaved, and
    # each iteration's time is the median over them.
    widths = {"jit": (111, 119, 127), "terra_bc": (113, 121, 129), "eager": (117, 123, 131)}
    first, windows, runs = {}, {}, {mode: [] for mode in widths}
    for round_ in range(WARMUP_ROUNDS):
        for mode, ws in widths.items():
            if f"{mode}_error" in out:
                continue
            w = ws[round_]
            sizes = (din, w, w, dout)
            params = init_params(4, sizes)
            batches = make_batches(5, 16, batch, din, dout)
            try:
                if mode == "jit":
                    step = jax.jit(make_mlp_step())
                elif mode == "terra_bc":
                    step = terra_function(make_mlp_step())
                else:
                    step = make_mlp_step()
                runs[mode].append(per_step_times(step, params, batches, args.warmup_window))
            except Exception as e:
                out[f"{mode}_error"] = err(e)
    for mode, mode_runs in runs.items():
        if mode_runs and f"{mode}_error" not in out:
            windows[mode] = [statistics.median(ts) for ts in zip(*mode_runs)]
            first[mode] = windows[mode][0]
    out["first_iteration_s"] = first
    if "terra_bc" in first and "jit" in first:
        out["first_iteration terra_bc/jit"] = first["terra_bc"] / first["jit"]
    # terra_bc traces on iteration 1 and compiles when it first co-executes (iteration 2),
    # so the cold cost a user pays is better read over the first three iterations.
    out["first_3_iterations_s"] = {m: sum(t[:3]) for m, t in windows.items()}
    if "terra_bc" in windows and "jit" in windows:
        out["first_3_iterations terra_bc/jit"] = (sum(windows["terra_bc"][:3])
                                                  / sum(windows["jit"][:3]))
    for mode, times in windows.items():
        steady = statistics.median(times[len(times) // 2:])
        out[f"{mode}_steady_step_s"] = steady
        # Iterations run before per-step time settles within 10% of steady state: the first
        # i whose window times[i:i+3] has its median within 10% (one noisy step can't decide).
        out[f"{mode}_warmup_iterations"] = next(
            (i for i in range(len(times) - 2)
             if statistics.median(times[i:i + 3]) <= 1.1 * steady), None)
        out[f"{mode}_first_times_ms"] = [round(t * 1e3, 3) for t in times[:8]]
    # Compile time: jax.jit compiles in its first call, terra_bc's segments compile in the
    # first co-executed iteration (the 2nd); each minus that mode's steady step time.
    steady = {m: statistics.median(t[len(t) // 2:]) for m, t in windows.items()}
    if "terra_bc" in windows and "jit" in windows:
        compile_s = {"jit": windows["jit"][0] - steady["jit"],
                     "terra_bc": windows["terra_bc"][1] - steady["terra_bc"]}
        out["compile_s"] = compile_s
        out["compile terra_bc/jit"] = compile_s["terra_bc"] / compile_s["jit"]
    return out


# ------------------------------------------------------------------ (d) memory

def make_tiny_step():
    def step(x, c):
        y = jnp.tanh(x) * 0.5 + c
        return y, jnp.sum(y)
    return step


def bench_memory(args):
    out = {}
    try:
        step = terra_function(make_tiny_step())
    except Exception as e:
        return {"terra_bc_error": err(e)}
    c = jnp.ones((16,), jnp.float32)
    x = jnp.zeros((16,), jnp.float32)
    samples = []
    terra_reset()
    before = terra_stats()
    t0 = time.perf_counter()
    try:
        for i in range(1, args.mem_iters + 1):
            x, s = step(x, c)
            if i % 1000 == 0:
                sync(x)
                samples.append((i, round(rss_mib(), 2)))
    except Exception as e:
        out["terra_bc_error"] = err(e)
    out["seconds"] = time.perf_counter() - t0
    out["stats"] = stat_delta(before, terra_stats())
    out["rss_mib"] = samples
    if len(samples) >= 2:
        out["growth_mib"] = samples[-1][1] - samples[0][1]
        out["growth_per_1000_iters_kib"] = (
            (samples[-1][1] - samples[0][1]) * 1024 / ((samples[-1][0] - samples[0][0]) / 1000))
    return out


# ------------------------------------------------------------------ (e) per-site overhead

def make_many_ops_step(k):
    def step(x):
        for _ in range(k // 2):
            x = jnp.sin(x)
            x = jnp.cos(x)
        return x
    return step


def make_one_op_step():
    def step(x):
        return jnp.sin(x)
    return step


def time_chain(step, x, n, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = x
        for _ in range(n):
            y = step(y)
        sync(y)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def compiled_unit(step, x, warmup):
    """``step`` as a unit, run ``warmup`` times on ``x`` with its segment compiled at its
    first launch.  (With background compile it runs eagerly until compiling pays, and on a
    GPU that lasted past the timed iterations: (e) then timed eager runs of the segment,
    not skipped sites.)"""
    kept = terra_bc.config()["background_compile"]
    terra_bc.config(background_compile=False)
    try:
        unit = terra_function(step)
        for _ in range(warmup):
            sync(unit(x))
    finally:
        terra_bc.config(background_compile=kept)
    return unit


def bench_overhead(args):
    out = {}
    k, n = args.k, max(50, args.steps)
    x = jnp.linspace(0.0, 1.0, 8, dtype=jnp.float32)
    out["K"] = k
    jitted = jax.jit(make_many_ops_step(k))
    sync(jitted(x))
    out["jit_call_s"] = time_chain(jitted, x, n, args.repeats)
    out["eager_iter_s"] = time_chain(make_many_ops_step(k), x, max(5, n // 10), args.repeats)
    try:
        unit = compiled_unit(make_many_ops_step(k), x, args.warmup)
        terra_reset()
        before = terra_stats()
        t = time_chain(unit, x, n, args.repeats)
        st = stat_delta(before, terra_stats())
        out["terra_bc_iter_s"] = t
        out["stats"] = st
        out["python_cost_per_skipped_site_us"] = (t - out["jit_call_s"]) / k * 1e6
        out["eager_cost_per_op_us"] = out["eager_iter_s"] / k * 1e6
        out["terra_bc_max_rel_diff_vs_eager"] = max_rel_diff(unit(x), make_many_ops_step(k)(x))
    except Exception as e:
        out["terra_bc_error"] = err(e)
    # A 1-op unit: the per-iteration cost is dominated by entering the unit and launching
    # its segment(s).
    one_jit = jax.jit(make_one_op_step())
    sync(one_jit(x))
    out["jit_1op_call_s"] = time_chain(one_jit, x, n, args.repeats)
    out["eager_1op_s"] = time_chain(make_one_op_step(), x, n, args.repeats)
    try:
        unit1 = compiled_unit(make_one_op_step(), x, args.warmup)
        terra_reset()
        before = terra_stats()
        t1 = time_chain(unit1, x, n, args.repeats)
        st = stat_delta(before, terra_stats())
        iters = args.repeats * n
        launches = st.get("segments_launched", 0) / iters if iters else 0
        out["terra_bc_1op_iter_s"] = t1
        out["segments_per_iteration"] = launches
        if launches:
            out["cost_per_segment_launch_us"] = t1 / launches * 1e6
    except Exception as e:
        out["terra_bc_1op_error"] = err(e)
    try:
        out.update(eager_routed_cost(x, args.repeats))
    except Exception as e:
        out["routed_error"] = err(e)
    try:
        out.update(eager_segment_cost(k, x))
    except Exception as e:
        out["eager_segment_error"] = err(e)
    try:
        out.update(numpy_operand_cost(x, n, args))
    except Exception as e:
        out["numpy_operand_error"] = err(e)
    return out


def make_numpy_operand_step(operand, ops=30):
    def step(x):
        for _ in range(ops):
            x = x / operand
        return x
    return step


def numpy_operand_cost(x, n, args, ops=30):
    """A unit of 30 ops each dividing by a NumPy scalar (np.sqrt's float64: the general
    path, fed at every op and transferred by the launch) against the same with a Python
    float (the C fast path): per iteration, and eager's."""
    found = {"numpy_operand_ops": ops}
    for name, operand in (("numpy", np.sqrt(np.float64(1.5))), ("float", float(np.sqrt(1.5)))):
        unit = compiled_unit(make_numpy_operand_step(operand, ops), x, args.warmup)
        found[f"{name}_operand_iter_s"] = time_chain(unit, x, n, args.repeats)
    found["numpy_operand_eager_s"] = time_chain(make_numpy_operand_step(np.sqrt(np.float64(1.5)), ops),
                                                x, max(5, n // 10), args.repeats)
    return found


def eager_segment_cost(k, x, iterations=10):
    """A new unit of the K-op step as background compile leaves it at first: its segment
    runs its equations eagerly until compiling pays (compiling._until_it_pays).  Median of
    iterations 2..1+iterations, counted as eager runs, against the same Python run eagerly.
    (On a shape of its own: the K-op segment compiled above would serve it.)"""
    x = jnp.concatenate([x, x])
    unit = terra_function(make_many_ops_step(k))
    sync(unit(x))  # (the traced iteration)
    before = terra_stats()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        sync(unit(x))
        times.append(time.perf_counter() - t0)
    eager_runs = terra_stats().get("segments_eager", 0) - before.get("segments_eager", 0)
    plain = make_many_ops_step(k)
    eager_times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        sync(plain(x))
        eager_times.append(time.perf_counter() - t0)
    return {"eager_segment_iter_s": statistics.median(times), "eager_segment_runs": eager_runs,
            "eager_segment_plain_s": statistics.median(eager_times)}


def eager_routed_cost(x, repeats, calls=2000):
    """An op run eagerly through a rewritten call site outside any iteration (the way every
    DL-op call goes once a unit has run: an eager fallback, an eager tail, code between
    units): its time against the same op called plainly, interleaved."""
    from terra_bc.runtime import dispatch
    fns = {"plain": lambda: jnp.sin(x), "routed": lambda: dispatch.on_site(None, jnp.sin, x),
           "routed_kw": lambda: dispatch.on_site(None, jnp.sum, x, axis=0),
           "plain_kw": lambda: jnp.sum(x, axis=0)}
    times = {k: [] for k in fns}
    for _ in range(max(repeats, 5)):
        for k, f in fns.items():
            sync(f())
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append((time.perf_counter() - t0) / calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"eager_op_us": med["plain"], "routed_eager_op_us": med["routed"],
            "routed_extra_us": med["routed"] - med["plain"],
            "routed_kw_extra_us": med["routed_kw"] - med["plain_kw"]}


# ------------------------------------------------------------------ report

def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}{unit}" if abs(v) < 1000 else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def coexec_note(st):
    if not st or "error" in st:
        return f"stats error: {st.get('error') if st else 'none'}"
    return (f"co-executed {st.get('iterations_coexecuted', '?')}, traced "
            f"{st.get('iterations_traced', '?')}, divergences {st.get('divergences', '?')}, "
            f"compiles {st.get('compiles', '?')}, ops skipped {st.get('ops_skipped', '?')}")


def report(res):
    lines = []
    add = lines.append
    add(f"terra_bc co-execution benchmark — Python {res['python']}, jax {res['jax']}, "
        f"{res['device']}, steps={res['args']['steps']}, repeats={res['args']['repeats']}")
    if res.get("terra_bc_import_error"):
        add(f"  terra_bc import failed: {res['terra_bc_import_error']}")
    for key, title in (("a_mlp", "(a) jit-compatible step"),
                       ("f_small", "(f) the same step where computing costs next to nothing"),
                       ("g_aux", "(g) a classifier step whose gradient returns its logits (has_aux)")):
        a = res.get(key)
        if not a:
            continue
        add("")
        add(f"{title}: {a.get('shape')}")
        add(f"    {'mode':<10}{'steps/s':>12}")
        for m in ("eager", "jit", "terra_bc"):
            e = a.get("errors", {}).get(m) or (a.get("terra_bc_error") if m == "terra_bc" else None)
            add(f"    {m:<10}{fmt(a['steps_per_s'].get(m)) if not e else 'ERROR ' + e:>12}")
        add(f"    terra_bc/jit   = {fmt(a.get('terra_bc/jit'))}   (aim >= 0.8)")
        add(f"    terra_bc/eager = {fmt(a.get('terra_bc/eager'))}   (aim >= 5)")
        add(f"    jit/eager      = {fmt(a.get('jit/eager'))}")
        add(f"    terra_bc vs eager max rel diff: {fmt(a.get('terra_bc_max_rel_diff_vs_eager'))}"
            f"{'  ERROR ' + a['terra_bc_check_error'] if a.get('terra_bc_check_error') else ''}")
        add(f"    {coexec_note(a.get('stats'))}")
    b = res.get("b_dropout")
    if b:
        add("")
        add(f"(b) Python features in the step: {b.get('shape')}")
        for m in ("eager", "terra_bc"):
            e = b.get("errors", {}).get(m) or (b.get("terra_bc_error") if m == "terra_bc" else None)
            add(f"    {m:<10}{fmt(b['steps_per_s'].get(m)) if not e else 'ERROR ' + e:>12}")
        add(f"    terra_bc/eager = {fmt(b.get('terra_bc/eager'))}   (aim >= 5)")
        add(f"    terra_bc vs eager max rel diff: {fmt(b.get('terra_bc_max_rel_diff_vs_eager'))}, "
            f"log matches: {b.get('terra_bc_log_matches')}"
            f"{'  ERROR ' + b['terra_bc_check_error'] if b.get('terra_bc_check_error') else ''}")
        add(f"    jax.jit: {b.get('jit_result')} (max rel diff "
            f"{fmt(b.get('jit_max_rel_diff_vs_eager'))}); not timed: not a valid baseline")
        add(f"    {coexec_note(b.get('stats'))}")
    c = res.get("c_warmup")
    if c:
        add("")
        add(f"(c) warm-up (fresh shapes per mode, median of {WARMUP_ROUNDS} cold runs per iteration)")
        fi = c.get("first_iteration_s", {})
        add("    first iteration: " + ", ".join(f"{m} {fmt(v * 1e3, ' ms')}"
                                                for m, v in fi.items()))
        add(f"    first iteration terra_bc/jit = {fmt(c.get('first_iteration terra_bc/jit'))}"
            f"   (aim <= 2)")
        cs = c.get("compile_s", {})
        if cs:
            add(f"    compile time (jit: 1st call - steady; terra_bc: 2nd iteration - steady) "
                f"jit {fmt(cs.get('jit', 0) * 1e3)} ms, terra_bc {fmt(cs.get('terra_bc', 0) * 1e3)} ms; "
                f"terra_bc/jit = {fmt(c.get('compile terra_bc/jit'))}   (aim <= 2)")
        f3 = c.get("first_3_iterations_s", {})
        add("    first 3 iterations: " + ", ".join(f"{m} {fmt(v * 1e3, ' ms')}"
                                                   for m, v in f3.items())
            + f"; terra_bc/jit = {fmt(c.get('first_3_iterations terra_bc/jit'))}")
        add(f"    iterations before terra_bc is within 10% of steady state: "
            f"{fmt(c.get('terra_bc_warmup_iterations'))}   (aim <= 3; jit: "
            f"{fmt(c.get('jit_warmup_iterations'))})")
        for m in ("terra_bc", "jit", "eager"):
            if f"{m}_first_times_ms" in c:
                add(f"    {m + ' per-step ms:':<22}{c[f'{m}_first_times_ms']} ... steady "
                    f"{fmt(c[f'{m}_steady_step_s'] * 1e3, ' ms')}")
        for k, v in c.items():
            if k.endswith("_error"):
                add(f"    ERROR {k}: {v}")
    d = res.get("d_memory")
    if d:
        add("")
        add(f"(d) memory over {res['args']['mem_iters']} iterations of a tiny step under terra_bc")
        if d.get("terra_bc_error"):
            add(f"    ERROR {d['terra_bc_error']}")
        add(f"    RSS MiB: {d.get('rss_mib')}")
        add(f"    growth {fmt(d.get('growth_mib'), ' MiB')} "
            f"({fmt(d.get('growth_per_1000_iters_kib'), ' KiB')}/1000 iterations), "
            f"{fmt(d.get('seconds'), ' s')} total")
        add(f"    {coexec_note(d.get('stats'))}")
    e = res.get("e_overhead")
    if e:
        add("")
        add(f"(e) Python-side overhead, K={e.get('K')} cheap ops, no fetch")
        add(f"    jit call {fmt((e.get('jit_call_s') or 0) * 1e6, ' us')}, eager iteration "
            f"{fmt((e.get('eager_iter_s') or 0) * 1e6, ' us')} "
            f"({fmt(e.get('eager_cost_per_op_us'), ' us')}/op)")
        if e.get("terra_bc_error"):
            add(f"    ERROR {e['terra_bc_error']}")
        else:
            add(f"    terra_bc iteration {fmt((e.get('terra_bc_iter_s') or 0) * 1e6, ' us')} -> "
                f"{fmt(e.get('python_cost_per_skipped_site_us'), ' us')} per skipped site")
            add(f"    {coexec_note(e.get('stats'))}")
        if e.get("terra_bc_1op_error"):
            add(f"    ERROR (1-op unit) {e['terra_bc_1op_error']}")
        else:
            add(f"    1-op unit: terra_bc {fmt((e.get('terra_bc_1op_iter_s') or 0) * 1e6, ' us')}"
                f"/iteration, jit {fmt((e.get('jit_1op_call_s') or 0) * 1e6, ' us')}, eager "
                f"{fmt((e.get('eager_1op_s') or 0) * 1e6, ' us')}; "
                f"{fmt(e.get('segments_per_iteration'))} segments/iteration -> "
                f"{fmt(e.get('cost_per_segment_launch_us'), ' us')} per segment launch "
                f"(whole iteration cost / launches)")
        line_or_error(add, e, "routed", "routed_extra_us", lambda: (
            f"    eager op through a routed site: {fmt(e['routed_eager_op_us'], ' us')} against "
            f"{fmt(e['eager_op_us'], ' us')} plain: +{fmt(e['routed_extra_us'], ' us')} "
            f"(+{fmt(e['routed_kw_extra_us'], ' us')} with a keyword argument)"))
        line_or_error(add, e, "numpy_operand", "numpy_operand_iter_s", lambda: (
            f"    {e['numpy_operand_ops']} ops dividing by a NumPy scalar: terra_bc "
            f"{fmt(e['numpy_operand_iter_s'] * 1e6, ' us')} an iteration (a Python float: "
            f"{fmt(e['float_operand_iter_s'] * 1e6, ' us')}; eager "
            f"{fmt(e['numpy_operand_eager_s'] * 1e6, ' us')})"))
        line_or_error(add, e, "eager_segment", "eager_segment_iter_s", lambda: (
            f"    K-op segment run eagerly (before compiling pays; {e['eager_segment_runs']} "
            f"eager runs in 10 iterations): {fmt(e['eager_segment_iter_s'] * 1e3, ' ms')} an "
            f"iteration, the same Python eagerly {fmt(e['eager_segment_plain_s'] * 1e3, ' ms')}"))
    for k, v in res.get("section_errors", {}).items():
        add(f"ERROR in section {k}: {v}")
    return "\n".join(lines)


def line_or_error(add, res, part, done_key, line):
    """Report ``part`` of a section: its error, or ``line()`` where it ran."""
    if res.get(f"{part}_error"):
        add(f"    ERROR ({part}) {res[f'{part}_error']}")
    elif done_key in res:
        add(line())


def bench_small(args):
    """(a) at widths 4-8-8-2, batch 2: the step is its Python and dispatch alone, as on a
    device that computes it in no time (a GPU) terra_bc's per-step Python shows in full."""
    return bench_mlp(args, sizes=(4, 8, 8, 2), batch=2)


def bench_aux(args):
    """(a) as a classifier whose value_and_grad returns its logits (has_aux) for an accuracy:
    the forward's values Python holds come from the forward JAX linearizes (Recorder.alias)."""
    return bench_mlp(args, make_step=make_aux_step,
                     what="value_and_grad(has_aux=True) + accuracy from the logits + SGD")


SECTIONS = {"a": ("a_mlp", bench_mlp), "b": ("b_dropout", bench_dropout),
            "c": ("c_warmup", bench_warmup), "d": ("d_memory", bench_memory),
            "e": ("e_overhead", bench_overhead), "f": ("f_small", bench_small),
            "g": ("g_aux", bench_aux)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    p.add_argument("--warmup-window", type=int, default=30,
                   help="(c) iterations timed one by one from the first")
    p.add_argument("--mem-iters", type=int, default=10_000)
    p.add_argument("--k", type=int, default=200, help="(e) ops per unit")
    p.add_argument("--only", default="abcdefg", help="sections to run, e.g. 'ab' or 'a,c'")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    res = {"python": platform.python_version(), "jax": jax.__version__,
           "device": str(jax.devices()[0]), "cpus": os.cpu_count(), "args": vars(args),
           "terra_bc_import_error": TERRA_IMPORT_ERROR, "section_errors": {}}
    for letter in "abcdefg":
        if letter not in args.only:
            continue
        key, fn = SECTIONS[letter]
        try:
            res[key] = fn(args)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            res["section_errors"][key] = err(e)
    return emit(res, report(res), args.json)


if __name__ == "__main__":
    main()
