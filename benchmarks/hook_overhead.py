"""Cost of the frame hook on call-heavy pure-Python code, side by side in one process.

Modes, interleaved round by round so machine noise hits them alike:
  off        the hook never installed (plain CPython)
  bare_hook  a do-nothing PEP 523 hook (tests/support/other_hook.c): the floor any
             eval-frame hook pays, since CPython stops inlining Python calls under one
  installed  the hook installed, rewriting nothing (every code object left alone)
  rewritten  the hook installed and the workload's call sites rewritten (Site dispatch)
  disabled   after terra_bc.disable(): the hook uninstalled again
Reports the median time of each mode and its ratio to `off`.

    python benchmarks/hook_overhead.py [--rounds 15] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import terra_bc
from terra_bc import _hook, frames


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class Vec:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def add(self, other):
        return Vec(self.x + other.x, self.y + other.y)

    def norm1(self):
        return abs(self.x) + abs(self.y)


def methods(n):
    acc = Vec(0, 0)
    step = Vec(1, -1)
    total = 0
    for _ in range(n):
        acc = acc.add(step)
        total += acc.norm1()
    return total


def builtins_loop(n):
    data = list(range(10))
    total = 0
    for i in range(n):
        total += len(data) + min(i, 7) + abs(-i) + max(data)
    return total


WORKLOADS = {"fib(24)": (fib, 24), "methods(50k)": (methods, 50_000), "builtins(50k)": (builtins_loop, 50_000)}


def leave_everything_alone(code):
    return None


def timed(fn, arg):
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def run_mode(mode, fn, arg):
    if mode == "off" or mode == "disabled":
        return timed(fn, arg)
    if mode == "bare_hook":
        _bare_hook.install()
        try:
            return timed(fn, arg)
        finally:
            _bare_hook.uninstall()
    callback = leave_everything_alone if mode == "installed" else frames.transform
    _hook.set_callback(callback)
    terra_bc.enable()
    try:
        return timed(fn, arg)
    finally:
        terra_bc.disable()
        _hook.set_callback(frames.transform)


def measure(rounds):
    # "installed" must see the workload before "rewritten" does: decisions are cached per
    # code object, so give each mode its own copies of the workload functions.
    results = {}
    for name, (fn, arg) in WORKLOADS.items():
        copies = {mode: _fresh_copy(fn) for mode in MODES if mode != "bare_hook" or _bare_hook}
        times = {mode: [] for mode in copies}
        for _ in range(rounds):
            for mode, f in copies.items():
                times[mode].append(run_mode(mode, f, arg))
        med = {mode: statistics.median(ts) for mode, ts in times.items()}
        results[name] = {mode: {"median_s": med[mode], "ratio_to_off": med[mode] / med["off"]}
                         for mode in med}
    return results


MODES = ("off", "bare_hook", "installed", "rewritten", "disabled")


def _load_bare_hook():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from support.build import build_other_hook
    try:
        return build_other_hook(tempfile.mkdtemp())
    except Exception as e:  # no compiler or headers: report without that column
        print(f"bare_hook column skipped: {e}", file=sys.stderr)
        return None


def _fresh_copy(fn):
    """A module-like copy of this file's workloads, so each mode has its own code objects."""
    namespace = {"__name__": f"bench_copy_{len(_copies)}"}
    with open(__file__) as f:
        exec(compile(f.read(), __file__, "exec"), namespace)
    _copies.append(namespace)
    return namespace[fn.__name__]


_copies = []
_bare_hook = None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json")
    args = p.parse_args()
    global _bare_hook
    _bare_hook = _load_bare_hook()
    results = measure(args.rounds)
    meta = {"python": sys.version.split()[0], "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "rounds": args.rounds}
    print(f"CPython {meta['python']} ({meta['machine']}), median of {args.rounds} rounds")
    modes = [m for m in MODES if m in next(iter(results.values()))]
    print(f"{'workload':15s} " + " ".join(f"{m:>16s}" for m in modes))
    for name, r in results.items():
        cells = [f"{r[m]['median_s'] * 1e3:7.2f}ms x{r[m]['ratio_to_off']:.2f}" for m in modes]
        print(f"{name:15s} " + " ".join(f"{c:>16s}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
