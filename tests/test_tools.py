"""Tools run alongside terra_bc (docs/reliability.md, "Tools run alongside"): pdb, trace and
profile functions, cProfile, coverage.py, faulthandler, pytest's assertion rewriting.  Each
case runs the same program eagerly first; the tool must report what it reports there, and
the program must compute the same values."""
import cProfile
import faulthandler
import json
import os
import pstats
import subprocess
import sys
import textwrap

import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc import _hook


def run(args, cwd, stdin=None, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=300, env=None if env is None else {**os.environ, **env})


def stats_of(stderr):
    lines = [l for l in stderr.splitlines() if l.startswith("terra_bc stats: ")]
    assert len(lines) == 1, stderr
    return json.loads(lines[0][len("terra_bc stats: "):])


@pytest.fixture
def units_on():
    """Loop units on, counters zeroed; off after.  (Function units stay off here: several
    tests run `watched_loops`, which would become a function unit whose one iteration holds
    both loops; they are on in the CLI tests below.)"""
    terra_bc.config(loops=True, functions=False)
    terra_bc.reset_stats()
    yield
    terra_bc.disable()
    terra_bc.config(loops=False, functions=False)


# ------------------------------------------------------------------ pdb

PDB_PROGRAM = textwrap.dedent('''
    import sys
    import jax.numpy as jnp
    import terra_bc

    mode = sys.argv[1]

    def step(x, k):
        y = jnp.sin(x) * 2.0
        z = y + k
        if k == 4:
            breakpoint()
        w = jnp.cos(z)
        return w + 1.0

    if mode == "decorated":
        step = terra_bc.function(step)
    x = jnp.ones(3)
    if mode == "loop":
        for k in range(8):
            y = jnp.sin(x) * 2.0
            z = y + k
            if k == 4:
                breakpoint()
            w = jnp.cos(z)
            x = w + 1.0
    else:
        for k in range(8):
            x = step(x, k)
    print("final", round(float(x.sum()), 4))
''')
# Stepping on from the breakpoint: values made before it (placeholders of the open iteration)
# and after it (plain arrays once the iteration runs eagerly) print as eager JAX prints them.
PDB_COMMANDS = "\n".join([
    "p round(float(y.sum()), 4), round(float(z.sum()), 4)",
    "n", "n",
    "p type(w).__name__, round(float(w.sum()), 4)",
    "p w.shape, w.dtype, str(w.sum())[:5]",
    "p [type(v).__name__ for v in (w, w + 1, jnp.tanh(w))]",
    "c", ""])


@pytest.mark.parametrize("mode", ["loop", "function", "decorated"])
def test_pdb_in_a_unit_steps_through_real_values(tmp_path, mode):
    path = tmp_path / "prog.py"
    path.write_text(PDB_PROGRAM)
    plain = run([str(path), mode], tmp_path, PDB_COMMANDS)
    flags = ["--no-loops"] if mode != "loop" else []
    hooked = run(["-m", "terra_bc", "--stats", *flags, str(path), mode], tmp_path, PDB_COMMANDS)
    assert plain.returncode == hooked.returncode == 0, hooked.stderr
    assert "ArrayImpl" in plain.stdout and "final" in plain.stdout, plain.stdout
    assert hooked.stdout == plain.stdout
    s = stats_of(hooked.stderr)
    # The unit co-executed before the debugger started and after it left (pdb's `c`); the
    # iteration open at the breakpoint ran its rest eagerly.
    assert s["iterations_coexecuted"] >= 4 and s["eager_fallbacks"] >= 1, s


# ------------------------------------------------------------------ trace and profile functions

def helper(v):
    return jnp.tanh(v) * 0.5


def watched_loops(start, stop, events, install, remove):
    """A for loop and a while loop, each with a tool installed mid-run (in the frame already
    running: its own lines are watched too) and removed a few turns later."""
    x, out = jnp.ones(3), []
    for step in range(10):
        if step == start:
            install()
        if step == stop:
            remove()
        y = helper(x) + step
        x = jnp.sin(y) * 2.0
        out.append(float(x.sum()))
    i = 0
    while i < 8:
        if i == start:
            install()
        if i == stop:
            remove()
        x = x * 0.9 + helper(x)
        i += 1
    out.append(float(x.sum()))
    return out


def mine(frame):
    return frame.f_code.co_filename == __file__


@pytest.mark.parametrize("kind", ["settrace", "setprofile"])
def test_trace_and_profile_functions_see_what_they_see_eagerly(units_on, kind):
    def run_with_tool():
        events = []

        def tool(frame, event, arg):
            if mine(frame):
                events.append((event, frame.f_code.co_name, frame.f_lineno))
            return tool
        if kind == "settrace":
            def install():
                sys.settrace(tool)
                sys._getframe(1).f_trace = tool  # (as pdb does: the running frame too)

            def remove():
                sys.settrace(None)
                sys._getframe(1).f_trace = None
        else:
            install, remove = (lambda: sys.setprofile(tool)), (lambda: sys.setprofile(None))
        return watched_loops(3, 6, events, install, remove), events

    want, want_events = run_with_tool()
    terra_bc.enable()
    got, got_events = run_with_tool()
    terra_bc.disable()
    assert got == pytest.approx(want, rel=1e-5)
    assert got_events == want_events and len(want_events) > 10
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 4 and s["eager_fallbacks"] >= 1, s


def test_a_tool_started_inside_a_differentiated_function(units_on):
    """A trace function set inside a function terra_bc differentiates: the gradient it is
    recording goes on (its ops unseen by the tool), the iteration then runs eagerly."""
    lines = []

    def tool(frame, event, arg):
        if mine(frame) and event == "line":
            lines.append(frame.f_code.co_name)
        return tool

    def loss_fn(w, step):
        h = jnp.cos(w) * 3.0
        if step == 3:
            sys.settrace(tool)
            sys._getframe().f_trace = tool
        h = helper(h) + w
        return jnp.sum(h ** 2)

    def train():
        w, losses = jnp.arange(4.0) / 4, []
        for step in range(7):
            loss, g = jax.value_and_grad(loss_fn)(w, step)
            w = w - 0.1 * g
            if step == 3:
                sys.settrace(None)
                sys._getframe().f_trace = None
            losses.append(float(loss))
        return losses, float(w.sum())

    want, want_lines = train(), list(lines)
    lines.clear()
    terra_bc.enable()
    got = train()
    terra_bc.disable()
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == pytest.approx(want[1], rel=1e-5)
    assert lines == want_lines and "loss_fn" in lines and "helper" in lines
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 3 and s["eager_fallbacks"] >= 1, s


def test_no_iteration_opens_while_a_tool_watches(units_on):
    """Frames that begin under a trace function run their original code, eagerly; once it
    is gone the same units co-execute again."""
    def plain_step(x):
        return jnp.tanh(x @ x.T).sum(axis=0) + 1.0
    step = terra_bc.function(plain_step)

    def program(step):
        x, out = jnp.ones((3, 3)) / 3, []
        for _ in range(5):
            x = x * 0.5 + step(x)
            out.append(float(x.sum()))
        return out

    want = program(plain_step)
    codes = []

    def tool(frame, event, arg):
        if mine(frame) and event == "call":
            codes.append(frame.f_code)
        return None
    terra_bc.reset_stats()
    with terra_bc.enabled():
        sys.settrace(tool)
        try:
            watched = program(step)
        finally:
            sys.settrace(None)
        s = terra_bc.stats()
        assert s["iterations_traced"] == 0 and s["iterations_coexecuted"] == 0, s
        # (frames_swapped counts every thread's frames: the watched frames are checked by
        # what the tool saw, below; in the full suite another thread's frames were counted)
        seen_while_watched = set(codes)
        after = program(step)
    assert watched == want and after == pytest.approx(want, rel=1e-5)
    # The tool saw the user's own code objects, not terra_bc's rewritten copies.
    assert seen_while_watched == {plain_step.__code__, program.__code__}, seen_while_watched
    assert terra_bc.stats()["iterations_coexecuted"] >= 3


def test_cprofile_started_mid_loop_sees_no_terra_bc_frames(units_on):
    def profiled():
        prof = cProfile.Profile()
        out = watched_loops(3, 6, None, prof.enable, prof.disable)
        found = {(os.path.basename(f[0]), f[2]) for f in pstats.Stats(prof).stats
                 if f[0] == __file__ or "terra_bc" in f[0]}
        return out, found

    want, want_found = profiled()
    terra_bc.enable()
    got, got_found = profiled()
    terra_bc.disable()
    assert got == pytest.approx(want, rel=1e-5)
    assert got_found == want_found and ("test_tools.py", "helper") in got_found
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 4 and s["eager_fallbacks"] >= 1, s


def test_escaped_placeholders_run_out_of_a_tools_sight(units_on):
    """A value carried out of a loop unit is a placeholder holding its value; what Python
    does with it later runs terra_bc's Python, which a tracer does not see."""
    def train():
        x = jnp.ones(3)
        for _ in range(4):
            x = jnp.sin(x) + 1.0
        return x
    with terra_bc.enabled():
        x = train()
    assert type(x).__name__ == "Placeholder"  # (an escaped array: docs/coexecution.md)
    seen = []

    def tool(frame, event, arg):
        seen.append(frame.f_code.co_filename)
        return tool
    sys.settrace(tool)
    try:
        y = (x * 2, x.sum(), x.T, x.at[0].set(5.0), float(x[1]), repr(x), x.shape, x.mean(axis=0))
    finally:
        sys.settrace(None)
    assert not [f for f in seen if "terra_bc" in f]
    assert float(y[1]) == pytest.approx(float(jnp.sum(y[0]) / 2))


# ------------------------------------------------------------------ coverage.py

COVERED_PROGRAM = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp

    def loss_fn(w, x):
        h = jnp.tanh(x @ w)
        if h.shape[0] > 100:
            return jnp.sum(h)              # never runs
        return jnp.mean(h ** 2)

    def step(w, x, lr):
        loss, g = jax.value_and_grad(loss_fn)(w, x)
        return w - lr * g, loss

    def main():
        w, x = jnp.ones((3, 2)) * 0.1, jnp.arange(6.0).reshape(2, 3)
        losses = []
        for i in range(8):
            if i == 4 and len(sys.argv) > 1:
                import coverage            # coverage started mid-run, from inside a unit
                cov = coverage.Coverage(data_file=sys.argv[1])
                cov.start()
            w, loss = step(w, x, 0.1)
            if float(loss) < -1:
                print("unreachable")
            losses.append(round(float(loss), 4))
        n = 0
        while n < 5:
            w = w * 0.99
            n += 1
        if len(sys.argv) > 1:
            cov.stop()
            cov.save()
        print(losses, round(float(w.sum()), 4))

    main()
''')


def covered_lines(tmp_path, data_file, name):
    out = tmp_path / (name + ".json")
    r = run(["-m", "coverage", "json", "-q", f"--data-file={data_file}", "-o", str(out),
             "--include=*prog.py"], tmp_path)
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads(out.read_text())["files"].values()
    return entry["executed_lines"], entry["missing_lines"]


CORES = ["ctrace"] + (["sysmon"] if sys.version_info >= (3, 12) else [])


@pytest.mark.parametrize("core", CORES)
def test_coverage_reports_the_lines_it_reports_eagerly(tmp_path, core):
    pytest.importorskip("coverage")
    path = tmp_path / "prog.py"
    path.write_text(COVERED_PROGRAM)
    env = {"COVERAGE_CORE": core}
    plain = run(["-m", "coverage", "run", "--data-file=plain.cov", str(path)], tmp_path, env=env)
    hooked = run(["-m", "coverage", "run", "--data-file=hooked.cov", "-m", "terra_bc", "--stats",
                  str(path)], tmp_path, env=env)
    assert plain.returncode == hooked.returncode == 0, hooked.stderr
    assert hooked.stdout == plain.stdout
    want = covered_lines(tmp_path, "plain.cov", "plain")
    assert want[1], "the program has lines that never run"
    assert covered_lines(tmp_path, "hooked.cov", "hooked") == want
    s = stats_of(hooked.stderr)
    assert s["frames_swapped"] == 0 and s["iterations_coexecuted"] == 0, s  # it ran unmodified


@pytest.mark.parametrize("core", CORES)
def test_coverage_started_inside_a_unit(tmp_path, core):
    pytest.importorskip("coverage")
    path = tmp_path / "prog.py"
    path.write_text(COVERED_PROGRAM)
    env = {"COVERAGE_CORE": core}
    plain = run([str(path), "plain.cov"], tmp_path, env=env)
    hooked = run(["-m", "terra_bc", "--stats", str(path), "hooked.cov"], tmp_path, env=env)
    assert plain.returncode == hooked.returncode == 0, hooked.stderr
    assert hooked.stdout == plain.stdout
    assert covered_lines(tmp_path, "hooked.cov", "hooked") == covered_lines(tmp_path, "plain.cov", "plain")
    s = stats_of(hooked.stderr)
    assert s["iterations_coexecuted"] >= 2, s  # (the turns before coverage started)


# ------------------------------------------------------------------ faulthandler

def test_faulthandler_dumps_the_users_frames(units_on, tmp_path):
    """faulthandler watches nothing: units co-execute, and a traceback it dumps from inside
    one shows the user's frames and lines, as eagerly."""
    def dump(tag):
        with open(tmp_path / tag, "a") as f:
            faulthandler.dump_traceback(f, all_threads=False)

    def inner(x, k, tag):
        y = jnp.sin(x) @ jnp.ones((3, 3)) + k
        if k == 5:
            dump(tag)
        return jnp.tanh(y) * 0.5

    def program(tag):
        x = jnp.ones(3)
        for k in range(7):
            x = inner(x, k, tag) + 1.0
        return float(x.sum())

    def frames(tag):
        return [l.strip() for l in (tmp_path / tag).read_text().splitlines()
                if __file__ in l and "in test_" not in l]  # (the caller's line is ours)
    want = program("plain")
    with terra_bc.enabled():
        got = program("hooked")
    assert got == pytest.approx(want, rel=1e-5)
    assert frames("hooked") == frames("plain") and len(frames("plain")) >= 3
    assert terra_bc.stats()["iterations_coexecuted"] >= 3


# ------------------------------------------------------------------ pytest's assertion rewriting

USER_TESTS = textwrap.dedent('''
    import os
    import jax.numpy as jnp
    import pytest
    import terra_bc

    ON = os.environ.get("UNDER_TERRA_BC") == "1"

    @pytest.fixture(autouse=True)
    def maybe_terra_bc():
        if ON:
            terra_bc.enable(loops=True, functions=True)
        yield
        terra_bc.disable()

    def train(n):
        x = jnp.ones(4)
        for k in range(n):
            x = jnp.sin(x) * 0.5 + k
            assert x.shape == (4,) and float(x.sum()) > -100.0
        return x

    def test_passes():
        x = train(8)
        assert float(x.sum()) > 0
        assert jnp.allclose(x, x)

    def test_fails_inside_a_loop_unit():
        x = jnp.ones(4)
        for k in range(8):
            x = jnp.sin(x) * 0.5 + k
            assert float(x[0]) < 5.0, f"turn {k}"

    def test_fails_on_an_array_comparison():
        x = train(6)
        assert round(float(x.sum()), 3) == 1.5

    def test_coexecuted():
        train(8)
        if ON:
            assert terra_bc.stats()["iterations_coexecuted"] >= 4
''')


def test_pytest_assertion_rewriting_of_user_tests(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"]
    plain = run(args, tmp_path, env={"UNDER_TERRA_BC": "0"})
    hooked = run(args, tmp_path, env={"UNDER_TERRA_BC": "1"})

    def explained(out):  # pytest's explanations of the failures (its rewritten asserts)
        return [l.rstrip() for l in out.splitlines() if l.startswith(("E ", ">", "FAILED"))]
    assert "2 failed, 2 passed" in plain.stdout, plain.stdout
    assert "2 failed, 2 passed" in hooked.stdout, hooked.stdout
    assert explained(hooked.stdout) == explained(plain.stdout)
    assert any("where" in l for l in explained(plain.stdout))  # (rewritten: values explained)
