"""``python -m tests.fuzz --programs N --seed S [--jobs J] [--size K] [--shrink] [--out DIR]``

Generates N programs (seeds S .. S+N-1), runs each eagerly and under terra_bc (loop and
function units as ``python -m terra_bc``; the step as ``@terra_bc.function``), and prints
the counts: programs, mismatches, crashes, ties, invalid programs, eager fallbacks and the
co-executed share.  Programs run in worker processes (``--worker``), a batch each, so a
hang (``--timeout`` per program) or a dying interpreter is recorded as a crash of that
program and the batch goes on in a fresh worker.  With ``--shrink`` each failure is reduced
to a small reproducer written to ``--out`` (then copy it to tests/fuzz/regressions/).
With ``--exact`` terra_bc's segments run op by op and every value must equal eager's to
the bit (harness.py).  ``--resume`` with ``--log`` goes on with a run stopped early: seeds
whose verdicts the log holds are counted, not run again.  Workers share JAX's persistent
compilation cache for the run (``--compile-cache``).  Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from . import harness
from .generator import generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILURES = ("mismatch", "crash")


# **** worker: programs in this process ****

def worker(seeds: list[int], size: int, modes: tuple, exact: bool = False) -> None:
    import gc
    for n, seed in enumerate(seeds):
        print("BEGIN", seed, flush=True)
        v = harness.check(generate(seed, size, exact).source(), modes, exact=exact)
        v["seed"] = seed
        print("RESULT", json.dumps(v), flush=True)
        if n % 20 == 19:
            gc.collect()


# **** parent: batches of programs in workers ****

def _reader(stream, q):
    for line in stream:
        q.put(line)
    q.put(None)


# Programs per worker process: each program leaves compiled executables in JAX's and
# terra_bc's caches (about 100 MB per program on CPU), so a worker is replaced after these.
PER_WORKER = 20


def worker_env(compile_cache: str | None) -> dict:
    """The workers' environment.  With ``compile_cache`` (a folder) every worker shares
    JAX's persistent compilation cache there: eager JAX compiles each primitive for each new
    shape, and the same primitive at the same shape recurs across programs, so a fresh
    worker loads what an earlier one compiled (measured: eager's share of a program's time
    halves once the cache is warm).  The same HLO gives the same executable, so no value
    changes."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=compile_cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def run_batch(seeds: list[int], size: int = 1, timeout: float = 300.0, modes=harness.MODES,
              on_result=None, compile_cache: str | None = None, exact: bool = False) -> list[dict]:
    """Verdicts for ``seeds``, run in worker processes (a fresh one after PER_WORKER
    programs, a crash or a hang)."""
    results, todo = [], list(seeds)
    while todo:
        cmd = [sys.executable, "-m", "tests.fuzz", "--worker", "--size", str(size),
               "--modes", ",".join(modes), "--seeds", ",".join(map(str, todo[:PER_WORKER]))] + \
            (["--exact"] if exact else [])
        err = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=worker_env(compile_cache))
        done_before = len(results)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        current, since = None, time.monotonic()
        while True:
            try:
                line = q.get(timeout=max(1.0, timeout - (time.monotonic() - since)))
            except queue.Empty:
                line = "TIMEOUT"
            if line is None or line == "TIMEOUT":
                proc.kill()
                proc.wait()
                err.seek(0)
                tail = err.read()[-2000:]
                if current is None:
                    if todo and len(results) == done_before:
                        raise RuntimeError(f"fuzz worker failed (rc {proc.returncode}): {tail}")
                    break
                why = f"timeout after {timeout:.0f} s" if line == "TIMEOUT" else \
                    f"worker died (rc {proc.returncode}): {tail[-600:]}"
                v = dict(seed=current, status="crash", mode="?", detail=why, seconds=timeout,
                         fallbacks={}, coexecuted={}, traced={})
                results.append(v)
                todo.remove(current)
                if on_result:
                    on_result(v)
                break
            if line.startswith("BEGIN"):
                current, since = int(line.split()[1]), time.monotonic()
            elif line.startswith("RESULT"):
                v = json.loads(line[len("RESULT"):])
                results.append(v)
                todo.remove(v["seed"])
                current = None
                if on_result:
                    on_result(v)
        proc.wait()
    return results


def summary(results: list[dict]) -> dict:
    runs = [(mode, v) for v in results for mode in v.get("coexecuted", {})]
    count = lambda s: sum(v["status"] == s for v in results)  # noqa: E731
    return {
        "programs": len(results),
        "mismatches": count("mismatch"),
        "crashes": count("crash"),
        "ties": count("tie"),
        "rounding": count("rounding"),
        "invalid": count("invalid"),
        "runs": len(runs),
        "runs_with_eager_fallbacks": sum(v["fallbacks"].get(m, 0) > 0 for m, v in runs),
        "eager_fallbacks": sum(v["fallbacks"].get(m, 0) for m, v in runs),
        "runs_coexecuted": sum(v["coexecuted"][m] > 0 for m, v in runs),
        "coexecuted_share": round(sum(v["coexecuted"][m] > 0 for m, v in runs) / max(1, len(runs)), 4),
        "seconds": round(sum(v.get("seconds", 0) for v in results), 1),
    }


def read_log(path: str) -> list[dict]:
    """The verdicts a ``--log`` file holds, in order; a line cut short by a killed run (or
    an empty one) is skipped."""
    verdicts = []
    with open(path) as f:
        for line in f:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict) and "seed" in v:
                verdicts.append(v)
    return verdicts


def logged_verdicts(path: str, seeds) -> dict:
    """The verdicts a ``--log`` file already holds for ``seeds`` (the last one of a seed
    logged twice).  A line cut short by a killed run is skipped: that seed runs again."""
    wanted = set(seeds)
    return {v["seed"]: v for v in read_log(path) if v["seed"] in wanted}


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def fuzz(start: int, programs: int, jobs: int = 1, size: int = 1, timeout: float = 300.0,
         modes=harness.MODES, verbose: bool = True, log=None,
         compile_cache: str | None = None, exact: bool = False, done=None) -> list[dict]:
    """Verdicts of seeds start .. start+programs-1; each is also written to ``log`` (an open
    text file, one JSON line a verdict) as it arrives, so a long run stopped early keeps
    what it found.  ``done``: verdicts already found (seed -> verdict, ``--resume``); those
    seeds are not run again and their verdicts are part of the result."""
    done = done or {}
    seeds = [s for s in range(start, start + programs) if s not in done]
    batches = [seeds[i::jobs] for i in range(jobs)]
    results: list[dict] = list(done.values())
    lock = threading.Lock()

    def report(v):
        with lock:
            results.append(v)
            if log is not None:
                log.write(json.dumps(v) + "\n")
                log.flush()
            if verbose and (v["status"] != "ok" or len(results) % 50 == 0):
                line = f"[{len(results)}/{programs}] seed {v['seed']}: {v['status']}"
                if v["status"] != "ok":
                    line += f" ({v.get('mode')}) {v.get('detail')}"
                print(line, flush=True)

    threads = [threading.Thread(target=run_batch, args=(b, size, timeout, modes, report, compile_cache, exact))
               for b in batches if b]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda v: v["seed"])


# **** shrinking a failure (in a worker process) ****

def still_fails_like(verdict: dict, size: int, exact: bool = False):
    mode, status = verdict["mode"], verdict["status"]
    kind = verdict["detail"].split(":")[0] if status == "crash" else None

    def still_fails(source: str) -> bool:
        v = harness.check(source, (mode,), exact=exact)
        return v["status"] == status and (kind is None or (v["detail"] or "").split(":")[0] == kind)
    return still_fails


def shrink_one(seed: int, size: int, verdict: dict, budget_s: float, exact: bool = False) -> str:
    from .shrink import shrink
    program = generate(seed, size, exact)
    small = shrink(program, still_fails_like(verdict, size, exact), budget_s,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    source = small.source()
    v = harness.check(source, (verdict["mode"],), exact=exact)
    header = (f"# Found by: python -m tests.fuzz --seed {seed} --programs 1 --size {size}"
              f"{' --exact' if exact else ''}\n"
              f"# Mode: {verdict['mode']}{' (exact)' if exact else ''}\n"
              f"# Failure when shrunk: {v['status']}: {v['detail']}\n")
    return header + source


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="first program's seed")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes at once")
    ap.add_argument("--size", type=int, default=1, help="statements per block, roughly x")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per program")
    ap.add_argument("--modes", default=",".join(harness.MODES))
    ap.add_argument("--exact", action="store_true",
                    help="terra_bc's segments run op by op; every float must equal eager's to the bit")
    ap.add_argument("--shrink", action="store_true", help="shrink each failure")
    ap.add_argument("--shrink-budget", type=float, default=600.0, help="seconds per failure")
    ap.add_argument("--out", default="fuzz-failures", help="where reproducers go")
    ap.add_argument("--json", help="write every verdict to this file")
    ap.add_argument("--log", help="append each verdict to this file as a JSON line when it arrives")
    ap.add_argument("--summarize", help="print the counts of a --log file (a run stopped early) and exit")
    ap.add_argument("--resume", action="store_true",
                    help="with --log: seeds of this run already in the log are not run again, "
                         "and the counts cover them (a long run stopped early goes on)")
    ap.add_argument("--compile-cache", default="run",
                    help="JAX persistent compilation cache the workers share: 'run' (a temporary "
                         "folder for this run, the default), a folder to keep, or 'off'")
    ap.add_argument("--show", type=int, help="print the program of this seed and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", help=argparse.SUPPRESS)
    ap.add_argument("--shrink-seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--verdict", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    modes = tuple(args.modes.split(","))
    if args.show is not None:
        print(generate(args.show, args.size, args.exact).source(), end="")
        return 0
    if args.summarize:
        print(json.dumps(summary(read_log(args.summarize)), indent=1))
        return 0
    if args.worker:
        worker([int(s) for s in args.seeds.split(",")], args.size, modes, args.exact)
        return 0
    if args.shrink_seed is not None:
        print(shrink_one(args.shrink_seed, args.size, json.loads(args.verdict), args.shrink_budget,
                         args.exact), end="")
        return 0
    t0 = time.time()
    if args.resume and not args.log:
        ap.error("--resume needs --log (the file holding the verdicts found so far)")
    done = logged_verdicts(args.log, range(args.seed, args.seed + args.programs)) \
        if args.resume and os.path.exists(args.log) else {}
    if done:
        print(f"resuming: {len(done)} of {args.programs} programs already in {args.log}", flush=True)
    log = open(args.log, "a") if args.log else None
    if log is not None and log.tell() and _last_byte(args.log) != b"\n":
        log.write("\n")  # a killed run's line cut short: the next verdict starts a line
    cache = None if args.compile_cache == "off" else \
        tempfile.mkdtemp(prefix="fuzz-jax-cache-") if args.compile_cache == "run" else args.compile_cache
    try:
        results = fuzz(args.seed, args.programs, args.jobs, args.size, args.timeout, modes, log=log,
                       compile_cache=cache, exact=args.exact, done=done)
    finally:
        if log is not None:
            log.close()
        if cache and args.compile_cache == "run":
            shutil.rmtree(cache, ignore_errors=True)
    s = summary(results)
    s["wall_seconds"] = round(time.time() - t0, 1)  # this invocation's: a resumed run's pieces add up
    s["resumed"] = len(done)
    s["command"] = "python -m tests.fuzz " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(s, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": s, "verdicts": results}, f, indent=0)
    failures = [v for v in results if v["status"] in FAILURES]
    if args.shrink and failures:
        os.makedirs(args.out, exist_ok=True)
        for v in failures:
            if v["mode"] == "?":
                continue  # a hang or a dead worker: shrink by hand
            print(f"shrinking seed {v['seed']} ({v['status']} in {v['mode']}) ...", flush=True)
            out = subprocess.run([sys.executable, "-m", "tests.fuzz", "--shrink-seed", str(v["seed"]),
                                  "--size", str(args.size), "--verdict", json.dumps(v),
                                  "--shrink-budget", str(args.shrink_budget)] +
                                 (["--exact"] if args.exact else []),
                                 cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout:
                print(f"  shrinking failed (rc {out.returncode}):\n{out.stderr[-1500:]}", flush=True)
                continue
            path = os.path.join(args.out, f"case_{v['seed']}_{v['mode']}.py")
            with open(path, "w") as f:
                f.write(out.stdout)
            print(f"  -> {path} ({len(out.stdout.splitlines())} lines)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
