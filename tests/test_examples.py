"""The example programs: eager vs ``python -m terra_bc``.

The ten programs after the Terra paper (issue 5) and the library programs
(``examples/lib_*.py``: optax, Flax NNX, Flax linen, Equinox, Haiku, written as their
tutorials write them, and a DQN on gymnasium's CartPole-v1 whose episodes are
``while not done:`` loops); each library program's ``--jit`` (the library's own jit) must
match eager too.

Every program runs in quick mode in its own process, eagerly and under
``python -m terra_bc --stats``; the checksums must agree and the stats line
must show that terra_bc really ran its sites. A test asks for co-execution
(iterations co-executed, ops skipped) of every program; where the engine cannot yet
co-execute a program it is a strict xfail, which starts failing, and so forces removal of
its marker, the day the engine makes it pass.

Speed: the runs go two at a time, and the children share a throw-away JAX
persistent compilation cache so the terra_bc run reuses the eager run's
compilations (eager JAX compiles every op at every new shape; cold, that is
most of a quick run). The cache only saves XLA work, it cannot change results.
"""
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import (BEGIN, END, LIBRARY_PROGRAMS, PROGRAMS, RTOL,  # noqa: E402
                            SPLIT_PROGRAMS, checksums_match, command, exception_summary,
                            parse_output, write_section)

ALL_PROGRAMS = PROGRAMS + LIBRARY_PROGRAMS

QUICK_STEPS = 10  # sdpoint's random paths need a few steps to repeat (a bug showed at step 7)
TIMEOUT_S = 300


def _terra_bc_importable():
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('terra_bc.__main__') is None)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=120)
    return proc.returncode == 0


def _run(program, mode, env):
    proc = subprocess.run(command(program, mode, QUICK_STEPS), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            **parse_output(proc.stdout, proc.stderr)}


def _run_modes(program, env, with_terra):
    # Eager first, so the later runs find the compilation cache warm.
    runs = {"eager": _run(program, "eager", env)}
    if with_terra:
        runs["terra_bc"] = _run(program, "terra_bc", env)
    if program in SPLIT_PROGRAMS:
        runs["jit_split"] = _run(program, "jit_split", env)
    if program in LIBRARY_PROGRAMS:
        runs["jit"] = _run(program, "jit", env)
    return runs


@pytest.fixture(scope="session")
def terra_bc_available():
    return _terra_bc_importable()


@pytest.fixture(scope="session")
def runs(request, tmp_path_factory, terra_bc_available):
    """program -> future of {mode: run}, for the programs of the selected tests only."""
    wanted = []
    for item in request.session.items:
        program = getattr(getattr(item, "callspec", None), "params", {}).get("program")
        if program and program not in wanted:
            wanted.append(program)
    env = dict(os.environ,
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {p: pool.submit(_run_modes, p, env, terra_bc_available) for p in wanted}


def _describe(run):
    return f"exit {run['returncode']}; stderr tail:\n{run['stderr'][-2000:]}"


@pytest.mark.parametrize("program", ALL_PROGRAMS)
def test_eager_runs(runs, program):
    eager = runs[program].result()["eager"]
    assert eager["returncode"] == 0, _describe(eager)
    assert eager["step_times"] is not None and len(eager["step_times"]) == QUICK_STEPS
    assert eager["checksum"] is not None and math.isfinite(eager["checksum"])


def _assert_mode_matches_eager(result, mode):
    eager, other = result["eager"], result[mode]
    assert other["returncode"] == 0, _describe(other)
    assert checksums_match(other["checksum"], eager["checksum"]), (other["checksum"], eager["checksum"])


@pytest.mark.parametrize("program", sorted(SPLIT_PROGRAMS))
def test_jit_split_matches_eager(runs, program):
    """The benchmark's jax.jit upper bound must compute what the eager program computes."""
    _assert_mode_matches_eager(runs[program].result(), "jit_split")


@pytest.mark.parametrize("program", LIBRARY_PROGRAMS)
def test_library_jit_matches_eager(runs, program):
    """The library's own jit of the step (the benchmark's jit column) computes what eager does."""
    _assert_mode_matches_eager(runs[program].result(), "jit")


@pytest.mark.parametrize("program", ALL_PROGRAMS)
def test_terra_bc_matches_eager(runs, program, terra_bc_available):
    if not terra_bc_available:
        pytest.skip("terra_bc cannot be imported yet (python -m terra_bc unavailable)")
    result = runs[program].result()
    eager, terra = result["eager"], result["terra_bc"]
    assert eager["returncode"] == 0, _describe(eager)
    assert terra["returncode"] == 0, _describe(terra)
    assert checksums_match(terra["checksum"], eager["checksum"]), (
        f"terra_bc checksum {terra['checksum']!r} != eager {eager['checksum']!r} (rtol {RTOL})")
    assert terra["stats"] is not None, "no 'terra_bc stats:' line on stderr"
    # Zero sites executed would mean terra_bc ran the program without its hook.
    assert terra["stats"].get("sites_executed", 0) > 0, terra["stats"]


NOT_COEXECUTED_YET = {}  # program -> why; none left since jax.vjp of user code is supported


@pytest.mark.parametrize("program", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=NOT_COEXECUTED_YET[p]))
    if p in NOT_COEXECUTED_YET else p for p in ALL_PROGRAMS])
def test_terra_bc_coexecutes(runs, program, terra_bc_available):
    """Matching eager is not enough: terra_bc must not silently run eagerly."""
    if not terra_bc_available:
        pytest.skip("terra_bc cannot be imported yet (python -m terra_bc unavailable)")
    terra = runs[program].result()["terra_bc"]
    stats = terra["stats"] or {}
    assert stats.get("iterations_coexecuted", 0) > 0, stats
    assert stats.get("ops_skipped", 0) > 0, stats


# ---------------------------------------------------------------- runner helpers
JAX_TRACEBACK = """\
Traceback (most recent call last):
  File "examples/bert_qa.py", line 150, in <module>
    main()
jax.errors.ConcretizationTypeError: Abstract tracer value encountered where concrete value is expected: traced array
The problem arose with the `int` function.
See https://docs.jax.dev/en/latest/errors.html#jax.errors.ConcretizationTypeError
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception.
"""


def test_exception_summary_takes_type_and_first_line():
    assert exception_summary(JAX_TRACEBACK) == (
        "jax.errors.ConcretizationTypeError: Abstract tracer value encountered where concrete "
        "value is expected: traced array")
    assert exception_summary("Traceback...\nValueError: bad\n") == "ValueError: bad"


def test_parse_output_and_tolerance():
    out = 'step 0\ntiming: {"step_times": [0.5, 0.1]}\nchecksum: 12.5\n'
    err = 'terra_bc stats: {"sites_executed": 3}\n'
    parsed = parse_output(out, err)
    assert parsed == {"step_times": [0.5, 0.1], "checksum": 12.5, "stats": {"sites_executed": 3}}
    assert checksums_match(100.0, 100.0 * (1 + RTOL / 2))
    assert not checksums_match(100.0, 100.0 * (1 + 2 * RTOL))
    assert not checksums_match(None, 1.0)


def test_write_section_keeps_other_sections(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_section(path, f"{BEGIN}\nv1\n{END}\n")
    assert path.read_text() == f"{BEGIN}\nv1\n{END}\n"
    path.write_text(f"# Benchmarks\n\n## Hook overhead\nkeep me\n\n{BEGIN}\nv1\n{END}\n\n## Later\nme too\n")
    write_section(path, f"{BEGIN}\nv2\n{END}\n")
    text = path.read_text()
    assert "keep me" in text and "me too" in text and "v2" in text and "v1" not in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1


def test_results_of_a_few_programs_merge_into_the_file(tmp_path):
    """`--programs a,b` replaces a and b's entries and keeps the others, each with its run."""
    import json
    from benchmarks.run import load_previous, merge, render_markdown
    path = tmp_path / "results.json"
    old_meta = {"date": "then", "steps": 20, "repeats": 1, "quick": False, "chart": None}
    entry = {"eager": {"outcome": "ok", "step_ms": 2.0}, "terra_bc": {"outcome": "ok", "step_ms": 1.0}}
    path.write_text(json.dumps({"meta": old_meta, "programs": {"dropblock": entry, "gpt2": entry}}))
    new_run = {"date": "now", "steps": 5, "repeats": 1, "quick": True}
    merged = merge(load_previous(path), {"lib_optax_mlp": {**entry, "run": new_run},
                                         "gpt2": {**entry, "run": new_run}})
    assert list(merged) == ["dropblock", "gpt2", "lib_optax_mlp"]
    assert merged["dropblock"]["run"]["date"] == "then" and merged["gpt2"]["run"]["date"] == "now"
    text = render_markdown({"chart": None}, merged)
    assert "Rows come from several runs" in text and "## Library programs" in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
