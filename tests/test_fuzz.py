"""The differential fuzzer (tests/fuzz/, docs/reliability.md): a fixed-seed sample of
generated programs gives eager's values and side-effect log under terra_bc; the saved
reproducers of bugs it found stay fixed; and the comparison itself is shown to fail when
terra_bc's outcome is wrong (a check that cannot fail proves nothing)."""
import copy
import glob
import json
import os
import re

import numpy as np
import pytest

from fuzz import harness
from fuzz.__main__ import logged_verdicts, main, read_log, run_batch, summary
from fuzz.generator import generate
from fuzz.shrink import bodies, shrink

REGRESSIONS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fuzz", "regressions", "case_*.py")))

# The CI sample: programs (seeds) run in one worker process, eagerly and in both terra_bc
# modes: about 20 s of CPU (XLA compiles dominate), 25-80 s of wall time on a shared
# 2-core machine.  The long mode: `python -m tests.fuzz --programs 10000 --seed N`.
SAMPLE_SEEDS = list(range(20260101, 20260107))


def test_fixed_seed_sample_matches_eager():
    results = run_batch(SAMPLE_SEEDS, timeout=120)
    s = summary(results)
    bad = [v for v in results if v["status"] not in ("ok", "tie", "rounding")]
    assert not bad, bad
    assert s["programs"] == len(SAMPLE_SEEDS)
    assert s["coexecuted_share"] >= 0.8, s  # the programs really ran as units


def test_fixed_seed_sample_equals_eager_to_the_bit_op_by_op():
    """Exact runs (segments dispatched one equation at a time): every float equal to
    eager's, no tolerance, so a wrong value within the normal mode's 1e-5 is caught."""
    results = run_batch(SAMPLE_SEEDS[:3], timeout=120, exact=True)
    bad = [v for v in results if v["status"] != "ok"]
    assert not bad, bad
    assert summary(results)["runs_coexecuted"] >= 4, summary(results)


# **** the comparison can fail ****

PROGRAM = """
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    x = jnp.arange(4.0)
    def step(x):
        return x * 0.5 + 1.0
    step = decorate(step)
    for i in range(5):
        x = step(x)
        v = float(jnp.sum(x))
        log.append(('if', i, v, 6.0))
        if v > 6.0:
            log.append(('big', i))
    return {'x': x, 'n': i}, log
"""


def _first_array(tree):
    if isinstance(tree, tuple) and len(tree) == 4 and tree[0] == "array":
        return tree[3]
    for v in tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ():
        found = _first_array(v)
        if found is not None:
            return found
    return None


def test_a_resumed_run_runs_only_the_seeds_its_log_lacks(tmp_path):
    """``--resume``: a long run stopped early goes on where its log ends.  The log holds a
    verdict for the first seed (made up: a mismatch, so it shows in the counts) and a line
    a killed run cut short; only the second seed runs, and the counts cover both."""
    first = SAMPLE_SEEDS[0]
    log = tmp_path / "run.jsonl"
    made_up = dict(seed=first, status="mismatch", mode="units", detail="made up", seconds=1.0,
                   fallbacks={"units": 0}, coexecuted={"units": 1}, traced={"units": 1})
    log.write_text(json.dumps(made_up) + "\n" + '{"seed": %d, "sta' % (first + 1))
    assert set(logged_verdicts(str(log), [first, first + 1])) == {first}
    out = tmp_path / "run.json"
    rc = main(["--programs", "2", "--seed", str(first), "--modes", "units", "--log", str(log),
               "--resume", "--json", str(out), "--compile-cache", "off"])
    verdicts = json.loads(out.read_text())
    assert rc == 1  # the logged mismatch still counts as a failure
    assert verdicts["summary"]["programs"] == 2 and verdicts["summary"]["resumed"] == 1
    assert verdicts["summary"]["mismatches"] == 1
    assert [v["seed"] for v in verdicts["verdicts"]] == [first, first + 1]
    assert verdicts["verdicts"][0]["detail"] == "made up"  # counted, not run again
    assert verdicts["verdicts"][1]["status"] == "ok"
    logged = [json.loads(line) for line in log.read_text().splitlines()[2:]]
    assert [v["seed"] for v in logged] == [first + 1]  # only the missing seed ran
    # --summarize reads the same log, the line cut short skipped
    assert [v["seed"] for v in read_log(str(log))] == [first, first + 1]
    assert main(["--summarize", str(log)]) == 0


def test_unaltered_program_is_ok():
    assert harness.check(PROGRAM)["status"] == "ok"


def test_the_command_line_runs_a_program_as_the_units_mode_does():
    v = harness.check(PROGRAM, modes=("cli", "units"))
    assert v["status"] == "ok", v
    assert v["coexecuted"]["cli"] == v["coexecuted"]["units"] > 0, v
    assert v["traced"]["cli"] == v["traced"]["units"], v


def test_a_wrong_value_is_a_mismatch():
    def inject(out):
        out.result[0]["x"][3][2] += 1e-3  # one element, 1e-3 off (tolerance: 1e-5 relative)
    v = harness.check(PROGRAM, inject=inject)
    assert v["status"] == "mismatch" and "values['x']" in v["detail"], v


def test_an_exact_run_dispatches_segments_op_by_op_and_equals_eager_to_the_bit():
    path = harness.write_source(PROGRAM)
    try:
        eager = harness.run(PROGRAM, path, "eager")
        out = harness.run(PROGRAM, path, "units", exact=True)
    finally:
        os.unlink(path)
    assert harness.compare(eager, out, exact=True) == ("ok", None)
    assert out.stats["iterations_coexecuted"] > 0 and out.stats["segments_eager"] > 0, out.stats
    assert out.stats["compiles"] == 0, out.stats
    import terra_bc
    assert terra_bc.config()["op_by_op"] is False  # (put back after the run)
    assert harness.check(PROGRAM, exact=True)["status"] == "ok"


def test_an_exact_run_flags_a_difference_in_the_last_bit():
    def inject(out):
        x = out.result[0]["x"][3]
        x[2] = np.nextafter(x[2], np.float32(np.inf))  # one ulp: within the tolerance
    assert harness.check(PROGRAM, inject=inject)["status"] == "ok"
    v = harness.check(PROGRAM, inject=inject, exact=True)
    assert v["status"] == "mismatch" and "values['x']" in v["detail"], v


def test_a_float_difference_gone_op_by_op_is_rounding_and_one_that_stays_a_mismatch():
    calls = []

    def compiled_only(out):  # off in the compiled run only: the exact run is eager's
        calls.append(out)
        if len(calls) == 1:
            out.result[0]["x"][3][2] += 1e-3
    v = harness.check(PROGRAM, modes=("units",), inject=compiled_only)
    assert len(calls) == 2 and v["status"] == "rounding" and "equal to the bit" in v["detail"], v

    def always(out):
        out.result[0]["x"][3][2] += 1e-3
    v = harness.check(PROGRAM, modes=("units",), inject=always)
    assert v["status"] == "mismatch" and "op by op: values['x']" in v["detail"], v


def test_a_changed_log_is_a_mismatch():
    for change in (lambda log: log.pop(), lambda log: log.insert(0, ("extra",)),
                   lambda log: log.__setitem__(1, ("big", 99)), lambda log: log.reverse()):
        def inject(out):
            change(out.result[1])
        v = harness.check(PROGRAM, modes=("units",), inject=inject)
        assert v["status"] == "mismatch" and v["mode"] == "units", v


def test_a_wrong_python_number_is_a_mismatch():
    def inject(out):
        out.result[0]["n"] = 5  # eager: 4
    assert harness.check(PROGRAM, modes=("function",), inject=inject)["status"] == "mismatch"


def test_an_exception_eager_did_not_raise_is_a_crash():
    def inject(out):
        out.result, out.error = None, ("RuntimeError", "boom")
    v = harness.check(PROGRAM, inject=inject)
    assert v["status"] == "crash" and v["detail"] == "RuntimeError: boom", v


def test_a_program_eager_cannot_run_is_invalid():
    assert harness.check(PROGRAM.replace("jnp.arange(4.0)", "jnp.arange(4.0) + jnp.ones(3)"))["status"] == "invalid"


def test_a_main_left_a_generator_by_a_shrinking_cut_is_invalid():
    """A cut that removes a helper's ``def`` can leave its ``yield`` in main: main then
    returns a generator, not (values, log) (the shrinker's subprocess crashed on it)."""
    source = PROGRAM.replace("    return {'x': x, 'n': i}, log", "    yield x")
    v = harness.check(source, modes=("units",))
    assert v["status"] == "invalid" and "generator" in v["detail"], v


def test_a_branch_flipped_within_tolerance_is_a_tie_and_outside_it_a_mismatch():
    want = [("if", 1, 0.30000001, 0.3), ("big", 1), ("v", 2, 1.0)]
    near = [("if", 1, 0.29999999, 0.3), ("v", 2, 1.0)]
    far = [("if", 1, 0.2, 0.3), ("v", 2, 1.0)]
    eager = harness.Outcome(({}, want))
    assert harness.compare(eager, harness.Outcome(({}, near)))[0] == "tie"
    assert harness.compare(eager, harness.Outcome(({}, far)))[0] == "mismatch"
    same_side = [("if", 1, 0.30000002, 0.3), ("v", 2, 1.0)]  # not a flip: a real difference
    assert harness.compare(eager, harness.Outcome(({}, same_side)))[0] == "mismatch"


def test_an_argmax_of_values_that_tie_is_a_tie_and_of_others_a_mismatch():
    """Values driven to one value (seed 801016): eager rounds all four alike, a fused
    segment the last two one ulp lower, and argmax picks another index."""
    tied = [0.57063925, 0.57063925, 0.57063925, 0.57063925]
    lower = [0.57063925, 0.57063925, 0.5706392, 0.5706392]
    eager = harness.Outcome(({}, [("i", 7, 0, tied), ("v", 2, 1.0)]))
    assert harness.compare(eager, harness.Outcome(({}, [("i", 7, 2, lower), ("v", 2, 1.0)])))[0] == "tie"
    apart = [0.1, 0.5, 0.9, 0.2]  # a wrong index among values that do not tie
    eager = harness.Outcome(({}, [("i", 7, 2, apart)]))
    assert harness.compare(eager, harness.Outcome(({}, [("i", 7, 1, apart)])))[0] == "mismatch"
    # a tie does not hide a real difference elsewhere in the log
    eager = harness.Outcome(({}, [("i", 7, 0, tied), ("v", 2, 1.0)]))
    got = harness.Outcome(({}, [("i", 7, 2, lower), ("v", 2, 2.0)]))
    assert harness.compare(eager, got)[0] == "mismatch"


def test_tolerance_is_the_documented_one():
    a = ("array", "float32", (2,), np.array([1.0, 2.0], np.float32))
    within = ("array", "float32", (2,), np.array([1.0 + 5e-6, 2.0], np.float32))
    beyond = ("array", "float32", (2,), np.array([1.0 + 5e-5, 2.0], np.float32))
    assert harness.difference(a, within) is None
    assert harness.difference(a, beyond) is not None
    keys = ("array", "uint32", (2,), np.array([1, 2], np.uint32))
    assert harness.difference(keys, ("array", "uint32", (2,), np.array([1, 3], np.uint32))) is not None


# **** the shrinker ****

def test_shrinker_reduces_to_the_statements_that_matter():
    program = generate(7, size=2)

    def fails(source):  # a stand-in failure: any line mentioning `hist.append`
        return "hist.append" in source or "jnp.sort" in source

    if not fails(program.source()):
        program = next(generate(s, size=2) for s in range(100) if fails(generate(s, size=2).source()))
    small = shrink(program, fails, budget_s=60)
    src = small.source()
    assert fails(src)
    assert len(src.splitlines()) < len(program.source().splitlines()) / 2
    # what is left besides the program's fixed frame: the marked statement (and at most
    # the block it sits in)
    left = [x for body in bodies(small.body) for x in body if not x.keep]
    assert 1 <= len(left) <= 2, src


# **** reproducers of bugs the fuzzer found ****

def _case_params():
    params = []
    for path in REGRESSIONS:
        text = open(path).read()
        mode = re.search(r"^# Mode: (\w+)", text, re.M).group(1)
        xfail = re.search(r"^# xfail: (.+)$", text, re.M)
        marks = [pytest.mark.xfail(strict=True, reason=xfail.group(1))] if xfail else []
        params.append(pytest.param(path, mode, marks=marks, id=os.path.basename(path)[:-3]))
    return params


@pytest.mark.parametrize("path,mode", _case_params())
def test_regression(path, mode):
    v = harness.check(open(path).read(), (mode,), path=path)
    assert v["status"] == "ok", v


# **** bugs the fuzzer found, distilled ****

def _grads_with_closures(decorate=lambda f: f):
    """Differentiated inputs that the function also uses through a closure, or gets twice."""
    import jax
    import jax.numpy as jnp

    @decorate
    def step(x, c):
        y = jnp.sin(x) * 1.5
        g1 = jax.grad(lambda p: p * y)(y)  # a closure over the value differentiated
        g2 = jax.grad(lambda p: p * x)(x)  # the same, for the unit's own argument
        g3, g4 = jax.grad(lambda p, q: p * jnp.sin(q), argnums=(0, 1))(y, y)  # one array twice
        g5 = jax.grad(lambda p: p * c)(c)  # an array from outside the unit
        v, g6 = jax.value_and_grad(lambda p: jnp.sum(p * y))(y)
        out, pull = jax.vjp(lambda p: p * y, y)
        (g7,) = pull(jnp.ones_like(out))
        _, g8 = jax.jvp(lambda p: p * y, (y,), (jnp.ones_like(y),))
        return [g1, g2, g3, g4, g5, v, g6, g7, g8]

    x, c, res = jnp.asarray(0.3), jnp.asarray(0.7), []
    for _ in range(4):
        res.append([float(g) for g in step(x, c)])
        x = x + 0.1
    return res


@pytest.mark.parametrize("how", ["function", "units"])
def test_gradient_of_a_value_also_closed_over_is_jaxs(how):
    import terra_bc
    want = _grads_with_closures()
    if how == "function":
        got = _grads_with_closures(terra_bc.function)
    else:
        terra_bc.set_loops(True)
        terra_bc.set_functions(True)
        try:
            with terra_bc.enabled():
                got = _grads_with_closures()
        finally:
            terra_bc.set_loops(False)
            terra_bc.set_functions(False)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _vmap_reading_state():
    import jax
    import jax.numpy as jnp
    cfg, hist, out = {"s": 1.0}, [jnp.ones(4)], []
    for _ in range(5):
        y = jax.vmap(lambda r: r * cfg["s"] + hist[-1])(jnp.ones((2, 4)))
        cfg["s"] += 1.0
        hist.append(hist[-1] * 2)
        out.append(float(y.sum()))
    return out


def test_vmap_reads_python_state_each_call():
    # eager JAX traces a vmapped function at every call: the Python state it reads is the
    # call's own (runtime/bodies.py); recorded once and skipped, it was the traced call's.
    import terra_bc
    want = _vmap_reading_state()
    terra_bc.set_loops(True)
    try:
        with terra_bc.enabled():
            got = _vmap_reading_state()
    finally:
        terra_bc.set_loops(False)
    assert got == want == [16, 32, 56, 96, 168]  # (traced once: [16, 16, 16, 16, 16])
