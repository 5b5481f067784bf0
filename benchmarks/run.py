"""Run the example programs eagerly, under jax.jit and under terra_bc.

Two lists: the ten programs after the Terra paper (``PROGRAMS``) and the programs written
with a third-party library the way its own tutorials write them (``LIBRARY_PROGRAMS``,
``examples/lib_*.py``: optax, Flax NNX, Flax linen, Equinox, Haiku, a DQN on
gymnasium's CartPole with optax, and a CleanRL-style DQN after CleanRL's ``dqn_jax.py``
whose ``for`` loop's first turns act at random without calling JAX, with a linen TrainState
and an update every second step), whose ``jit`` mode is the library's own jit wrapper
(``jax.jit``, ``nnx.jit``, ``eqx.filter_jit``) and which have no ``jit_split`` variant.

Each (program, mode) runs in its own process, so compile caches, memory and
the frame hook of one run never leak into another:

* ``eager``    ``python examples/X.py --steps N``
* ``jit``      ``python examples/X.py --steps N --jit`` (step function wrapped
               in ``jax.jit`` the way a user would try it; for a library program, in
               the library's jit, as its tutorial does)
* ``jit_split`` ``python examples/X.py --steps N --jit-split``, only for the six
               programs whose naive jit raises or differs: the same computation
               restructured by hand so jax.jit can run it (the upper bound)
* ``terra_bc`` ``python -m terra_bc --stats examples/X.py --steps N``

From each run we take the ``timing:`` and ``checksum:`` lines the examples
print, the ``terra_bc stats:`` line on stderr, the exception a failed run
died with, and the child's peak RSS (``os.wait4``'s rusage, per child).
Results go to ``benchmarks/results.json``, the section of
``docs/benchmarks.md`` between the ``programs`` markers, and
``docs/benchmarks.png``. The programs run now replace their own entries in
``results.json``; the other programs' entries are kept (each entry records the run
that made it), so ``--programs a,b`` does not drop the rest of the tables
(``--replace`` starts from nothing).

Usage: ``python -m benchmarks [--quick] [--programs a,b] [--repeats K] [--steps N] [--replace]``
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ["dropblock", "bert_qa", "music_transformer", "sdpoint", "bert_cls",
            "gpt2", "dcgan", "resnet", "faster_rcnn", "yolov3"]
MODES = ("eager", "jit", "jit_split", "terra_bc")
# Programs with a hand-restructured --jit-split variant (their naive --jit fails).
SPLIT_PROGRAMS = {"dropblock", "bert_qa", "sdpoint", "resnet", "faster_rcnn", "yolov3"}
# Programs written with a library as its own tutorials write them; --jit is the
# library's jit of the step (named here for the tables), there is no --jit-split.
LIBRARY_JIT = {"lib_optax_mlp": "jax.jit", "lib_nnx_cnn": "nnx.jit",
               "lib_linen_cnn": "jax.jit", "lib_equinox_mlp": "eqx.filter_jit",
               "lib_haiku_mlp": "jax.jit", "lib_dqn_cartpole": "jax.jit",
               "lib_dqn_cleanrl": "jax.jit", "lib_dpsgd_mlp": "jax.jit",
               "lib_linen_rnn": "jax.jit", "lib_linen_transformer": "jax.jit",
               "lib_equinox_cnn": "eqx.filter_jit"}
LIBRARY_PROGRAMS = list(LIBRARY_JIT)
ALL_PROGRAMS = PROGRAMS + LIBRARY_PROGRAMS
RTOL = 1e-4  # compiled paths may reassociate float sums; see docs/examples.md
FASTER = 1.1  # speed-up over eager that counts as "faster" (smaller is noise)
BEGIN, END = "<!-- programs:begin -->", "<!-- programs:end -->"
# Variables that would let a child reuse compilations from an earlier child and
# so hide the first-iteration cost we want to measure.
CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


# ------------------------------------------------------------------ running
def command(program, mode, steps, seed=0, python=sys.executable):
    script = str(ROOT / "examples" / f"{program}.py")
    args = ["--steps", str(steps), "--seed", str(seed)]
    if mode == "eager":
        return [python, script, *args]
    if mode == "jit":
        return [python, script, *args, "--jit"]
    if mode == "jit_split":
        return [python, script, *args, "--jit-split"]
    if mode == "terra_bc":
        return [python, "-m", "terra_bc", "--stats", script, *args]
    raise ValueError(mode)


def run_process(cmd, env=None, timeout=600):
    """Run cmd; return its output, exit code, wall time and peak RSS (MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            # wait4 rather than getrusage(RUSAGE_CHILDREN): the latter is the
            # maximum over *all* children so far, not this one's peak.
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    maxrss_mib = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr,
            "wall_s": wall, "peak_mib": maxrss_mib}


def parse_output(stdout, stderr):
    """Pull the timing, checksum and terra_bc stats lines out of a run's output."""
    result = {"step_times": None, "checksum": None, "stats": None}
    for line in stdout.splitlines():
        if line.startswith("timing: "):
            result["step_times"] = json.loads(line[len("timing: "):])["step_times"]
        elif line.startswith("checksum: "):
            result["checksum"] = float(line[len("checksum: "):])
    for line in stderr.splitlines():
        if line.startswith("terra_bc stats: "):
            result["stats"] = json.loads(line[len("terra_bc stats: "):])
    return result


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")


def exception_summary(stderr):
    """'ExcType: first line of message' of the last exception in a traceback."""
    found = None
    for line in stderr.splitlines():
        m = _EXC_LINE.match(line)
        if m:
            found = f"{m.group(1)}: {m.group(2) or ''}".rstrip(": ").strip()
    if found is None and stderr.strip():
        found = stderr.strip().splitlines()[-1][:200]
    return found


def checksums_match(a, b, rtol=RTOL):
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def steady_state(step_times):
    """Median per-step time over the second half of the steps.

    The first iterations pay for compilation (eager JAX compiles every op the
    first time it sees a shape; terra_bc traces before it co-executes), so the
    second half is what a long training run would see.
    """
    tail = step_times[len(step_times) // 2:] or step_times
    return statistics.median(tail)


def terra_available(python=sys.executable):
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('terra_bc.__main__') is None)"
    try:
        return subprocess.run([python, "-c", probe], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def child_env():
    """The environment of a timed child: no warm JAX cache, and Python's bytecode caches as
    a user's Python keeps them (a machine-wide ``PYTHONDONTWRITEBYTECODE`` would make every
    child compile terra_bc's ~9,000 lines from source, ~60 ms per process here, a cost
    installed packages never pay: pip writes their caches at install)."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS + ("PYTHONDONTWRITEBYTECODE",)}
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def classify(run, reference):
    """ok / raised / differs for one run, judged against the eager checksum."""
    if run["returncode"] != 0 or run["checksum"] is None:
        return "raised", exception_summary(run["stderr"]) or f"exit code {run['returncode']}"
    if reference is not None and not checksums_match(run["checksum"], reference):
        return "differs", f"checksum {run['checksum']!r} vs eager {reference!r}"
    return "ok", None


def bench_program(program, steps, repeats, modes, have_terra, log=print, run_info=None):
    env = child_env()
    runs = {mode: [] for mode in modes}
    for rep in range(repeats):
        for mode in modes:  # interleaved so slow drift hits every mode alike
            if (mode == "terra_bc" and not have_terra) or (mode == "jit_split" and program not in SPLIT_PROGRAMS):
                continue
            if runs[mode] and runs[mode][0]["returncode"] != 0:
                continue  # no point repeating a crash
            proc = run_process(command(program, mode, steps), env=env)
            run = {**proc, **parse_output(proc["stdout"], proc["stderr"])}
            runs[mode].append(run)
            log(f"  {program:18s} {mode:8s} run {rep + 1}/{repeats}: rc={run['returncode']} "
                f"wall={run['wall_s']:.1f}s checksum={run['checksum']}")
    eager_runs = runs.get("eager") or []
    reference = eager_runs[0]["checksum"] if eager_runs and eager_runs[0]["returncode"] == 0 else None
    summary = {}
    for mode in modes:
        if not runs[mode]:
            why = "terra_bc not available" if mode == "terra_bc" else "no such variant"
            summary[mode] = {"outcome": "unavailable", "detail": why}
            continue
        outcome, detail = classify(runs[mode][0], None if mode == "eager" else reference)
        entry = {"outcome": outcome, "detail": detail, "checksum": runs[mode][0]["checksum"],
                 "peak_mib": max(r["peak_mib"] for r in runs[mode]),
                 "wall_s": statistics.median(r["wall_s"] for r in runs[mode]),
                 "stats": runs[mode][-1]["stats"]}
        timed = [r for r in runs[mode] if r["step_times"]]
        if timed:
            entry["step_ms"] = 1e3 * statistics.median(steady_state(r["step_times"]) for r in timed)
            entry["first_ms"] = 1e3 * statistics.median(r["step_times"][0] for r in timed)
            entry["step_times"] = [r["step_times"] for r in timed]
        summary[mode] = entry
    eager_ms = summary.get("eager", {}).get("step_ms")
    for mode in modes:
        ms = summary[mode].get("step_ms")
        if eager_ms and ms and summary[mode]["outcome"] == "ok":
            summary[mode]["speedup"] = eager_ms / ms
    summary["jit_bound"] = jit_bound(summary)
    if run_info is not None:
        summary["run"] = dict(run_info)  # which invocation made this entry (kept on merge)
    return summary


def jit_bound(summary):
    """The jax.jit upper bound: naive jit where it is correct, else the split variant."""
    for mode in ("jit", "jit_split"):
        entry = summary.get(mode, {})
        if entry.get("outcome") == "ok" and entry.get("step_ms"):
            return {"mode": mode, "step_ms": entry["step_ms"]}
    return None


# ------------------------------------------------------------------ reporting
def machine_info():
    import numpy
    try:
        import jax
        jax_version = jax.__version__
    except ImportError:
        jax_version = "not installed"
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax_version, "numpy": numpy.__version__,
            "device": default_device(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def default_device():
    """The kind of device the programs run on, asked in a child process: starting JAX's
    backend here would make this process hold device memory (on a GPU, most of it) while
    the programs run.  BENCH_DEVICE, where set, saves that child (a GPU takes seconds to
    start)."""
    if os.environ.get("BENCH_DEVICE"):
        return os.environ["BENCH_DEVICE"]
    try:
        done = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                               "print(f'{d.platform}: {d.device_kind}')"],
                              capture_output=True, text=True, timeout=120)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def _cell(entry):
    if entry.get("outcome", "unavailable") == "unavailable":
        return "n/a"
    return {"ok": "ok", "raised": "**raised**", "differs": "**silently differs**"}[entry["outcome"]]


RUN_KEYS = ("date", "platform", "device", "cpu_count", "python", "jax", "numpy", "quick", "steps", "repeats")


def run_record(meta):
    """What a program's entry keeps of the invocation that made it."""
    return {k: meta.get(k) for k in RUN_KEYS}


def _generated(run):
    return (f"Generated by `python -m benchmarks{' --quick' if run.get('quick') else ''}` on "
            f"{run.get('date')} — {run.get('platform')}, {run.get('cpu_count')} CPUs"
            f"{', device ' + run['device'] if run.get('device') else ''}; Python "
            f"{run.get('python')}, jax {run.get('jax')}, numpy {run.get('numpy')}. "
            f"{run.get('steps')} steps per run, {run.get('repeats')} run(s) per mode, each in its own process.")


def _provenance(results):
    """One 'Generated by' line, or one per invocation when rows come from several."""
    groups = {}
    for name, r in results.items():
        run = r.get("run") or {}
        groups.setdefault(tuple(run.get(k) for k in RUN_KEYS), (run, []))[1].append(name)
    if len(groups) == 1:
        (run, _), = groups.values()
        return [_generated(run)]
    return ["Rows come from several runs of the runner:", ""] + [
        f"- {', '.join(names)}: {_generated(run)}" for run, names in groups.values()]


def _notes(results):
    lines = []
    if any((r.get("run") or {}).get("quick") for r in results.values()):
        lines += ["> Quick mode: few steps, one run each; steady-state numbers are indicative only "
                  "(terra_bc may still be tracing).", ""]
    if all(r.get("terra_bc", {}).get("outcome", "unavailable") == "unavailable" for r in results.values()):
        lines += ["> terra_bc not available when this table was made: its columns are empty.", ""]
    return lines


def _modes_present(results, candidates):
    return [m for m in candidates
            if any(r.get(m, {}).get("outcome", "unavailable") != "unavailable" for r in results.values())]


def render_markdown(meta, results):
    """The programs section: the ten programs' tables, then the library programs'.

    Each entry's ``run`` says which invocation made it (entries without one take
    ``meta``'s), so a table merged from several invocations says so.
    """
    results = {n: r if r.get("run") else {**r, "run": run_record(meta)} for n, r in results.items()}
    ten = {n: r for n, r in results.items() if n not in LIBRARY_JIT}
    lib = {n: r for n, r in results.items() if n in LIBRARY_JIT}
    lines = [BEGIN]
    if ten:
        lines += _render_ten(ten)
    if lib:
        lines += ([""] if ten else []) + _render_library(lib)
    if meta.get("chart"):
        lines += ["", f"![speed-up over eager]({meta['chart']})"]
    elif meta.get("chart_note"):
        lines += ["", f"_{meta['chart_note']}_"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _render_ten(results):
    modes = _modes_present(results, MODES) or list(MODES)
    lines = ["## The ten example programs: eager vs `jax.jit` vs terra_bc", ""]
    lines += _provenance(results)
    lines += ["", "Per-step time is the median over the second half of the steps (median over runs); "
              "first iteration includes compilation; peak memory is the child's max RSS. A run is *ok* "
              f"when its checksum matches eager within a relative {RTOL:g}. Programs are described in "
              "[examples.md](examples.md).", ""]
    lines += _notes(results)
    lines += ["`jax.jit` is the step function wrapped as a user would first try it; *jit bound* is the "
              "fastest correct jit formulation: that same jit where it is correct, else the hand-split "
              "variant (`--jit-split`, marked *split*) that keeps the Python/NumPy work outside "
              "`jax.jit`. terra_bc vs jit bound = bound ms / terra_bc ms (aim: ≥ 0.8 where naive "
              "`jax.jit` is correct).", "",
              "| Program | eager ms/step | `jax.jit` ms/step | `jax.jit` result | jit bound ms/step | "
              "terra_bc ms/step | terra_bc result | terra_bc vs eager | terra_bc vs jit bound | "
              "co-executed iterations |",
              "|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        e, j, t = r.get("eager", {}), r.get("jit", {}), r.get("terra_bc", {"outcome": "unavailable"})
        bound = r.get("jit_bound")
        bound_cell = "—" if not bound else _fmt(bound["step_ms"], ".2f") + (" (split)" if bound["mode"] == "jit_split" else "")
        vs_bound = None
        if bound and t.get("outcome") == "ok" and t.get("step_ms"):
            vs_bound = bound["step_ms"] / t["step_ms"]
        coexec = (t.get("stats") or {}).get("iterations_coexecuted")
        lines.append(
            f"| {name} | {_fmt(e.get('step_ms'), '.2f')} | {_fmt(j.get('step_ms'), '.2f')} | {_cell(j)} | "
            f"{bound_cell} | {_fmt(t.get('step_ms'), '.2f')} | {_cell(t)} | "
            f"{_fmt(t.get('speedup'), '.2f')}{'×' if t.get('speedup') else ''} | "
            f"{_fmt(vs_bound, '.2f')}{'×' if vs_bound else ''} | {'—' if coexec is None else coexec} |")
    lines += _first_and_peak(results, modes)
    failures = [(n, r["jit"]) for n, r in results.items() if r.get("jit", {}).get("outcome") in ("raised", "differs")]
    failures += [(f"{n} (split)", r["jit_split"]) for n, r in results.items()
                 if r.get("jit_split", {}).get("outcome") in ("raised", "differs")]
    if failures:
        lines += ["", "What `jax.jit` did where it did not run correctly:", ""]
        for name, j in failures:
            lines.append(f"- **{name}** — {j['outcome']}: `{(j['detail'] or '')[:220]}`")
    lines += ["", "Aims (issue 5) on this run:", ""] + [f"- {a}" for a in aims(results)]
    return lines


def _first_and_peak(results, modes):
    names = " / ".join(m.replace("jit_split", "split") for m in modes)
    lines = ["", f"| Program | first iteration ms ({names}) | peak RSS MiB ({names}) |", "|---|---:|---:|"]
    for name, r in results.items():
        firsts = " / ".join(_fmt(r.get(m, {}).get("first_ms"), ".0f") for m in modes)
        peaks = " / ".join(_fmt(r.get(m, {}).get("peak_mib"), ".0f") for m in modes)
        lines.append(f"| {name} | {firsts} | {peaks} |")
    return lines


def _render_library(results):
    modes = [m for m in MODES if m != "jit_split"]
    lines = ["## Library programs: eager vs the library's jit vs terra_bc", ""]
    lines += _provenance(results)
    lines += ["", "Programs written with optax, Flax NNX, Flax linen, Equinox and Haiku the way each "
              "library's tutorials write them, plus two DQNs on gymnasium's CartPole-v1 "
              "(`examples/lib_*.py`, [libraries.md](libraries.md)): one as JAX users typically "
              "write it (`while not done:` episodes), one written after CleanRL's `dqn_jax.py` "
              "(a `for` loop whose first turns act at random without calling JAX, a linen "
              "TrainState with target parameters, an update every second step); the DQNs' steps "
              "are environment steps (host-side environment, NumPy replay buffer). "
              "*library jit* is the tutorial's own jit of the step (`--jit`: the wrapper named in "
              "the table); there is no hand-split variant. Per-step time and *ok* as above; whole "
              "run is the wall time of the process (imports, data, compilation and every step), "
              "median over runs.", ""]
    lines += _notes(results)
    lines += ["| Program | library jit | eager ms/step | jit ms/step | jit result | terra_bc ms/step | "
              "terra_bc result | terra_bc vs eager | terra_bc vs jit | whole run s (eager / jit / "
              "terra_bc) | co-executed iterations |",
              "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        e, j, t = r.get("eager", {}), r.get("jit", {}), r.get("terra_bc", {"outcome": "unavailable"})
        vs_jit = None
        if j.get("outcome") == "ok" and t.get("outcome") == "ok" and j.get("step_ms") and t.get("step_ms"):
            vs_jit = j["step_ms"] / t["step_ms"]
        walls = " / ".join(_fmt(r.get(m, {}).get("wall_s"), ".1f") for m in modes)
        coexec = (t.get("stats") or {}).get("iterations_coexecuted")
        lines.append(
            f"| {name} | `{LIBRARY_JIT.get(name, 'jax.jit')}` | {_fmt(e.get('step_ms'), '.2f')} | "
            f"{_fmt(j.get('step_ms'), '.2f')} | {_cell(j)} | {_fmt(t.get('step_ms'), '.2f')} | {_cell(t)} | "
            f"{_fmt(t.get('speedup'), '.2f')}{'×' if t.get('speedup') else ''} | "
            f"{_fmt(vs_jit, '.2f')}{'×' if vs_jit else ''} | {walls} | {'—' if coexec is None else coexec} |")
    lines += _first_and_peak(results, modes)
    failures = [(n, r[m], m) for n, r in results.items() for m in ("jit", "terra_bc")
                if r.get(m, {}).get("outcome") in ("raised", "differs")]
    if failures:
        lines += ["", "Runs that did not run correctly:", ""]
        for name, entry, mode in failures:
            lines.append(f"- **{name}** ({mode}) — {entry['outcome']}: `{(entry['detail'] or '')[:220]}`")
    return lines


def aims(results):
    terra = {n: r.get("terra_bc", {}) for n, r in results.items()}
    if all(t.get("outcome") in (None, "unavailable") for t in terra.values()):
        return ["terra_bc not available: no aim can be judged yet."]
    correct = [n for n, t in terra.items() if t.get("outcome") == "ok"]
    faster = [n for n, t in terra.items() if (t.get("speedup") or 0) >= FASTER]
    jit_ok = [n for n, r in results.items() if r.get("jit", {}).get("outcome") == "ok"]
    near = [n for n in jit_ok if terra[n].get("outcome") == "ok" and terra[n].get("step_ms")
            and results[n]["jit"]["step_ms"] / terra[n]["step_ms"] >= 0.8]
    bounded = [n for n, r in results.items() if r.get("jit_bound")]
    near_bound = [n for n in bounded if terra[n].get("outcome") == "ok" and terra[n].get("step_ms")
                  and results[n]["jit_bound"]["step_ms"] / terra[n]["step_ms"] >= 0.8]
    miss = lambda good, pool: ", ".join(sorted(set(pool) - set(good))) or "none"
    return [f"correct under terra_bc: {len(correct)}/{len(terra)} (not: {miss(correct, terra)})",
            f"faster than eager (≥ {FASTER}× counts; less is within run-to-run noise): "
            f"{len(faster)}/{len(terra)} (not: {miss(faster, terra)})",
            f"within 0.8× of `jax.jit` where `jax.jit` is correct: {len(near)}/{len(jit_ok)} "
            f"(not: {miss(near, jit_ok)})",
            f"(beyond the aim) within 0.8× of the jit bound: {len(near_bound)}/{len(bounded)} "
            f"(not: {miss(near_bound, bounded)})"]


def write_section(path, section):
    """Replace only the programs section of path, keeping every other section."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + tail
    elif text:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot(results, path):
    """Speed-up over eager per program; failed or incorrect runs get a label, not a bar."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Chart skipped: matplotlib not installed (pip install -e .[bench])."
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(11, 0.8 * len(names)), 4.5))
    width = 0.27
    series = (("jit", "#999999"), ("jit_split", "#e0a040"), ("terra_bc", "#2a7ab9"))
    for k, (mode, colour) in enumerate(series):
        for i, name in enumerate(names):
            entry = results[name].get(mode, {})
            x = i + (k - 1) * width
            if entry.get("outcome") == "ok" and entry.get("speedup"):
                ax.bar(x, entry["speedup"], width, color=colour, label=None)
            elif entry.get("outcome") in ("raised", "differs"):
                # No bar: a speed-up of a wrong or crashed run means nothing.
                ax.text(x, 0.12, "✗ " + entry["outcome"], rotation=90, ha="center", va="bottom",
                        fontsize=7, color="#444444")
    ax.bar(0, 0, 0, color="#999999", label="jax.jit as a user tries it; lib_*: the library's jit "
                                            "(✗: raised / silently differs)")
    ax.bar(0, 0, 0, color="#e0a040", label="jax.jit, hand-split step (--jit-split)")
    ax.bar(0, 0, 0, color="#2a7ab9", label="terra_bc")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("speed-up over eager (steady state)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def load_previous(path):
    """The entries of an earlier results file, each with the run that made it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    meta = data.get("meta") or {}
    previous = {}
    for name, entry in (data.get("programs") or {}).items():
        if name in ALL_PROGRAMS and isinstance(entry, dict):
            previous[name] = entry if entry.get("run") else {**entry, "run": run_record(meta)}
    return previous


def merge(previous, new):
    """previous updated with new, in ALL_PROGRAMS order."""
    both = {**previous, **new}
    return {name: both[name] for name in ALL_PROGRAMS if name in both}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 steps, 1 run per mode")
    p.add_argument("--programs", default=",".join(ALL_PROGRAMS),
                   help=f"comma-separated (default: all; the ten: {','.join(PROGRAMS)}; "
                        f"library programs: {','.join(LIBRARY_PROGRAMS)})")
    p.add_argument("--repeats", type=int, default=None, help="runs per mode (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 30, quick 5)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--chart", default=str(ROOT / "docs" / "benchmarks.png"))
    p.add_argument("--replace", action="store_true",
                   help="write only the programs run now (default: keep the other programs' "
                        "entries of the results file)")
    args = p.parse_args(argv)
    programs = [x for x in args.programs.split(",") if x]
    unknown = set(programs) - set(ALL_PROGRAMS)
    if unknown:
        p.error(f"unknown programs: {', '.join(sorted(unknown))}")
    modes = [m for m in MODES if m in args.modes.split(",")]
    steps = args.steps or (5 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 3)
    have_terra = "terra_bc" in modes and terra_available()
    if "terra_bc" in modes and not have_terra:
        print("terra_bc not available: its runs are reported as such", file=sys.stderr)

    run_info = run_record({**machine_info(), "quick": args.quick, "steps": steps, "repeats": repeats})
    results = {}
    for program in programs:
        print(f"{program}:", flush=True)
        results[program] = bench_program(program, steps, repeats, modes, have_terra,
                                         log=lambda s: print(s, flush=True), run_info=run_info)
    if not args.replace:
        results = merge(load_previous(args.json), results)

    meta = {**machine_info(), "quick": args.quick, "steps": steps, "repeats": repeats,
            "modes": modes, "rtol": RTOL, "terra_bc_available": have_terra, "ran": programs}
    note = plot(results, args.chart)
    docs_dir = Path(args.markdown).resolve().parent
    chart = Path(args.chart).resolve()
    meta["chart"] = None if note else os.path.relpath(chart, docs_dir)
    meta["chart_note"] = note
    Path(args.json).write_text(json.dumps({"meta": meta, "programs": results}, indent=1) + "\n")
    section = render_markdown(meta, results)
    write_section(args.markdown, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
