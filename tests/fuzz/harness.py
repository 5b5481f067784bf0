"""Run one program eagerly and under terra_bc, and compare (in this process).

Modes:
  ``eager``     plain JAX: the reference.
  ``units``     as ``python -m terra_bc`` runs a script: the hook enabled with loop and
                function units on while the module body and ``main()`` run.
  ``function``  ``main(decorate=terra_bc.function)``: the step is a ``@terra_bc.function``
                (the hook otherwise off, as a user who only decorates gets).
  ``cli``       ``python -m terra_bc`` itself runs the program in a new process
                (cli_driver.py): a check that ``units`` is what the command line does.
                Slower (a process per program): not in the default modes.

Comparison: the returned values (the variable pool, ``lr``, ``hist``, ``cfg``) and the
ordered side-effect log must be equal — same structure, same types, same strings, ints,
bools, shapes and dtypes; floats and float arrays within RTOL/ATOL.  The tolerance is
needed because a compiled segment is not op-for-op eager JAX: XLA fuses the recorded ops
and may reorder float arithmetic (reductions, matmul accumulation, ``a*b+c`` contracted)
and choose other transcendental approximations inside a fusion, so float32 results
differ in the last bits (about 1e-7 relative per op) and the difference grows over a
program's turns.  Integer results (PRNG keys, ``argmax``, counts) must be exact.

Exact runs (``exact=True``) take that tolerance away: terra_bc runs with
``config(op_by_op=True)``, each recorded segment dispatched one equation at a time as eager
JAX dispatches them, and every float must equal eager's to the bit.  A program that
differs beyond tolerance (or ties) is run again that way in the mode that differed: if it
then equals eager to the bit, the recorded ops were eager's ops and only XLA's compilation
of the segment changed the floats — status *rounding*, counted apart; if not, it stays a
*mismatch* (the exact run's difference is reported).

A terra_bc run that raises where eager did not (or raises another exception type) is a
*crash*.  A difference whose first sign in the log is a branch taken differently while both
runs' compared values lie within tolerance of each other (on either side of the
threshold) is a *tie*: the float rounding above decided the branch, not terra_bc; so is
a logged ``argmax`` that differs where the values it chose among are within tolerance
of each other in both runs and their two picks tie within tolerance (values driven to
one value, where eager and fused arithmetic round the last bit differently).  Ties are
counted apart and reported, never hidden.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import warnings

import numpy as np

RTOL, ATOL = 1e-5, 1e-6
MODES = ("units", "function")
BRANCH_TAGS = ("if", "wc", "b")  # log entries (tag, id, value, threshold, ...)


# **** running ****

class Outcome:
    """What one run of a program gave: its values and log, or the exception it raised."""

    def __init__(self, result=None, error=None, stats=None, seconds=0.0):
        self.result, self.error, self.stats, self.seconds = result, error, stats or {}, seconds

    def __repr__(self):
        return f"Outcome(error={self.error!r}, stats={self.stats})"


def plain(x):
    """Values made comparable: arrays (jax.Array, a terra_bc Placeholder, NumPy) become
    ('array', dtype, shape, ndarray); containers keep their type."""
    import jax
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        arr = np.array(x)  # (a copy: writable, and no view of a device buffer)
        return ("array", str(arr.dtype), arr.shape, arr)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    return x


def write_source(source: str, directory: str | None = None) -> str:
    """The program as a file: terra_bc classifies code by its file (a file no installed
    distribution owns is the user's), and tracebacks show its lines."""
    fd, path = tempfile.mkstemp(prefix="fuzzprog_", suffix=".py", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(source)
    return path


def run_cli(path: str) -> Outcome:
    """The program run by ``python -m terra_bc`` in a process of its own (cli_driver.py)."""
    import pickle
    import subprocess
    import sys
    start = time.perf_counter()
    out = path + ".out"
    try:
        subprocess.run([sys.executable, "-m", "terra_bc", os.path.join(os.path.dirname(__file__), "cli_driver.py"),
                        path, out], capture_output=True, timeout=600)
        with open(out, "rb") as f:
            (result, error), stats = pickle.load(f)
    except (OSError, EOFError, subprocess.TimeoutExpired) as e:
        result, error, stats = None, ("CliFailed", repr(e)), {}
    finally:
        if os.path.exists(out):
            os.unlink(out)
    return Outcome(result, error, stats, time.perf_counter() - start)


def run(source: str, path: str, mode: str, exact: bool = False) -> Outcome:
    """Run ``source`` (written at ``path``) in ``mode``; ``exact``: terra_bc's segments run
    op by op (``config(op_by_op=True)``)."""
    import terra_bc
    if mode == "cli":
        return run_cli(path)
    if exact and mode != "eager":
        terra_bc.config(op_by_op=True)
        try:
            return run(source, path, mode)
        finally:
            terra_bc.config(op_by_op=False)
    ns = {"__name__": "fuzzprog", "__file__": path, "__builtins__": __builtins__}
    terra_bc.reset_stats()
    start = time.perf_counter()
    try:
        code = compile(source, path, "exec", dont_inherit=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "eager":
                exec(code, ns)
                result = ns["main"]()
            elif mode == "units":
                terra_bc.set_loops(True)
                terra_bc.set_functions(True)
                terra_bc.enable()
                try:
                    exec(code, ns)
                    result = ns["main"]()
                finally:
                    terra_bc.disable()
                    terra_bc.set_loops(False)
                    terra_bc.set_functions(False)
            elif mode == "function":
                exec(code, ns)
                result = ns["main"](terra_bc.function)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            result = plain(result)
    except Exception as e:  # (KeyboardInterrupt and SystemExit go through)
        return Outcome(error=(type(e).__name__, str(e)[:500]), stats=terra_bc.stats(),
                       seconds=time.perf_counter() - start)
    return Outcome(result, stats=terra_bc.stats(), seconds=time.perf_counter() - start)


# **** comparing ****

def close(w: float, g: float, tol=(RTOL, ATOL)) -> bool:
    if math.isnan(w) or math.isnan(g):
        return math.isnan(w) and math.isnan(g)
    return abs(w - g) <= tol[1] + tol[0] * abs(w)


EXACT = (0.0, 0.0)  # (rtol, atol) of an exact run: equal to the bit


def difference(want, got, where="", tol=(RTOL, ATOL)) -> str | None:
    """Where ``got`` first differs from ``want`` (depth first, in order), or None; floats
    within ``tol`` (rtol, atol) are equal."""
    if type(want) is not type(got):
        return f"{where}: type {type(want).__name__} != {type(got).__name__} ({want!r:.80} vs {got!r:.80})"
    if isinstance(want, dict):
        if list(want) != list(got):
            return f"{where}: keys {list(want)} != {list(got)}"
        for k in want:
            d = difference(want[k], got[k], f"{where}[{k!r}]", tol)
            if d:
                return d
        return None
    if isinstance(want, tuple) and len(want) == 4 and want[0] == "array":
        _, dt, shape, w = want
        _, dt2, shape2, g = got
        if (dt, shape) != (dt2, shape2):
            return f"{where}: array {dt}{shape} != {dt2}{shape2}"
        if np.issubdtype(w.dtype, np.inexact):
            ok = np.isclose(g, w, rtol=tol[0], atol=tol[1], equal_nan=True)
            if not ok.all():
                i = np.unravel_index(np.argmin(ok), ok.shape) if ok.shape else ()
                return f"{where}: array element {i}: {w[i]!r} != {g[i]!r}"
        elif not np.array_equal(w, g):
            return f"{where}: array {w.tolist()} != {g.tolist()}"
        return None
    if isinstance(want, (list, tuple)):
        for i, (w, g) in enumerate(zip(want, got)):
            d = difference(w, g, f"{where}[{i}]", tol)
            if d:
                return d
        if len(want) != len(got):
            return f"{where}: length {len(want)} != {len(got)} (next: {(want + got)[min(len(want), len(got)) if len(want) > len(got) else len(want)]!r:.120})" \
                if isinstance(want, tuple) else f"{where}: length {len(want)} != {len(got)}"
        return None
    if isinstance(want, float):
        return None if close(want, got, tol) else f"{where}: {want!r} != {got!r}"
    if want != got:
        return f"{where}: {want!r:.200} != {got!r:.200}"
    return None


def formatted_tie(w, g) -> bool:
    """('f', id, value, text): the text is the value rounded to 3 decimals, so two values
    within tolerance may print differently at a rounding boundary."""
    return (isinstance(w, tuple) and len(w) == 4 and w[0] == "f" and type(w) is type(g)
            and w[:2] == g[:2] and close(w[2], g[2]) and abs(float(w[3]) - float(g[3])) <= 0.0011)


def argmax_tie(w, g) -> bool:
    """('i', id, index, values): the two runs chose different indices among values within
    tolerance of each other, and in each run the two chosen values tie within tolerance."""
    if not (isinstance(w, tuple) and isinstance(g, tuple) and len(w) == len(g) == 4
            and w[0] == "i" and w[:2] == g[:2] and isinstance(w[3], list)):
        return False
    (_, _, wi, wv), (_, _, gi, gv) = w, g
    if wi == gi or difference(wv, gv) is not None:
        return False
    return all(isinstance(v[wi], float) and isinstance(v[gi], float) and close(v[wi], v[gi])
               for v in (wv, gv))


def argmax_ties(want_log: list, got_log: list) -> str | None:
    """If the logs differ only in argmax ties (and rounded prints): a description."""
    differing = _beyond_formatting(want_log, got_log)
    if not differing or not all(argmax_tie(w, g) for _, w, g in differing):
        return None
    return "; ".join(f"log[{i}] {w[:2]}: argmax {w[2]} vs {g[2]} of values that tie"
                     for i, w, g in differing)


def branch_tie(want_log: list, got_log: list) -> str | None:
    """If the logs first differ after (or at) a branch both runs decided on values within
    tolerance of each other but on different sides of its threshold: a description."""
    n = 0
    while n < min(len(want_log), len(got_log)) and difference(want_log[n], got_log[n]) is None:
        n += 1
    for i in range(min(n, len(want_log) - 1, len(got_log) - 1), -1, -1):
        w, g = want_log[i], got_log[i]
        if (isinstance(w, tuple) and isinstance(g, tuple) and len(w) >= 4 and len(g) >= 4
                and w[0] in BRANCH_TAGS and w[:2] == g[:2]
                and isinstance(w[2], float) and isinstance(g[2], float) and close(w[2], g[2])):
            c = w[3]
            if (w[2] > c) != (g[2] > c):
                return f"log[{i}] {w[:2]}: {w[2]!r} vs {g[2]!r} on either side of {c}"
            return None  # the last branch went the same way: not a tie
    return None


def _recheck(source, path, mode, eager, status, detail, inject):
    """A float difference (``status`` mismatch or tie) checked by an exact run of ``mode``:
    *rounding* if op by op it equals eager to the bit, else a mismatch."""
    out = run(source, path, mode, exact=True)
    if inject is not None:
        inject(out)
    exact_status, exact_detail = compare(eager, out, exact=True)
    if exact_status == "ok":
        return "rounding", f"{detail} (op by op: equal to the bit)"
    return "mismatch", f"{detail}; op by op: {exact_detail}"


class Verdict(dict):
    """One program's result: status ('ok', 'mismatch', 'crash', 'tie', 'rounding', 'invalid'), the
    failing mode and what differed, eager fallbacks, co-executed iterations, seconds."""


def compare(eager: Outcome, other: Outcome, exact: bool = False) -> tuple[str, str | None]:
    if other.error is not None:
        if eager.error is not None and eager.error[0] == other.error[0]:
            return "ok", None
        return "crash", f"{other.error[0]}: {other.error[1]}"
    want, got = eager.result, other.result
    if exact:  # (no tolerance, so no ties and no rounded prints that differ)
        d = difference(want[1], got[1], "log", EXACT) or difference(want[0], got[0], "values", EXACT)
        return ("ok", None) if d is None else ("mismatch", d)
    d = difference(want[0], got[0], "values")
    dl = difference(want[1], got[1], "log")
    if dl is not None:
        tie = branch_tie(want[1], got[1]) or argmax_ties(want[1], got[1])
        if tie:
            return "tie", tie
        if not _only_formatting(want[1], got[1]):
            return "mismatch", dl
    if d is not None:
        return "mismatch", d
    return "ok", None


def _only_formatting(want_log, got_log) -> bool:
    return _beyond_formatting(want_log, got_log) == []


def _beyond_formatting(want_log, got_log) -> list | None:
    """The log entries (index, eager's, the other's) that differ by more than a rounded
    print; None if the logs differ in length."""
    if len(want_log) != len(got_log):
        return None
    return [(i, w, g) for i, (w, g) in enumerate(zip(want_log, got_log))
            if difference(w, g) is not None and not formatted_tie(w, g)]


def check(source: str, modes=MODES, path: str | None = None, inject=None,
          exact: bool = False) -> Verdict:
    """Run ``source`` eagerly and in ``modes``; the first mode that differs decides.
    ``exact``: every mode runs op by op and must equal eager to the bit.  Otherwise a
    mismatch or tie is run again exactly in its mode (*rounding* if that equals eager).
    ``inject(outcome)`` may alter a terra_bc outcome before it is compared (the self-test)."""
    own = path is None
    path = path or write_source(source)
    try:
        eager = run(source, path, "eager")
        v = Verdict(status="ok", mode=None, detail=None, seconds=eager.seconds,
                    fallbacks={}, coexecuted={}, traced={})
        if eager.error is not None:
            v.update(status="invalid", detail=f"eager raised {eager.error[0]}: {eager.error[1]}")
            return v
        if not (isinstance(eager.result, tuple) and len(eager.result) == 2):
            # (a shrinking cut that left a `yield` in main: it returns a generator)
            v.update(status="invalid", detail=f"main returned {type(eager.result).__name__}, "
                                              "not (values, log)")
            return v
        for mode in modes:
            out = run(source, path, mode, exact)
            if inject is not None:
                inject(out)
            v["seconds"] += out.seconds
            v["fallbacks"][mode] = out.stats.get("eager_fallbacks", 0)
            v["coexecuted"][mode] = out.stats.get("iterations_coexecuted", 0)
            v["traced"][mode] = out.stats.get("iterations_traced", 0)
            status, detail = compare(eager, out, exact)
            if status in ("mismatch", "tie") and not exact:
                status, detail = _recheck(source, path, mode, eager, status, detail, inject)
            if status != "ok" and v["status"] in ("ok", "tie", "rounding"):
                v.update(status=status, mode=mode, detail=detail)
        return v
    finally:
        if own:
            os.unlink(path)
