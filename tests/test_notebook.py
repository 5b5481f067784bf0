"""Debugging in notebooks (issue 13): reports, diffs, reset, limit warnings, the notebook
on-ramp (enable(), %load_ext, %%terra_bc) and enabling at interpreter start."""
import html
import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import terra_bc
from terra_bc.runtime.diff import PathDiff, ReportDiff
from terra_bc.runtime.report import PathReport, Report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_branching_step():
    """A unit whose step branches on a fetched value: sin on one side, cos + 1 on the other."""
    def step(x):
        y = jnp.tanh(x) * 0.5
        if float(jnp.sum(y)) > 0:
            y = jnp.sin(y)
        else:
            y = jnp.cos(y) + 1.0
        return y * 2.0
    return terra_bc.function(step)


def run_both_ways(step):
    for x in (jnp.ones(3), -jnp.ones(3), jnp.ones(3), -jnp.ones(3)):
        step(x)


@pytest.fixture
def limits():
    """Limits changed by a test are put back after it."""
    saved = terra_bc.config()
    yield
    terra_bc.config(max_paths=saved["max_paths"], max_compiles=saved["max_compiles"])


# **** reports ****

def test_a_report_shows_ops_fetches_and_where_paths_leave_each_other():
    step = make_branching_step()
    run_both_ways(step)
    rep = terra_bc.explain(step)
    assert isinstance(rep, Report) and len(rep.paths) == 2
    assert all(isinstance(p, PathReport) for p in rep.paths)
    text = str(rep)
    # The op each path takes, with its output's shape and dtype; the fetch names its op.
    assert "op sin(" in text and "op cos(" in text and "-> v" in text and "f32[3]" in text
    assert "fetch (float) of" in text and "(made by sum at " in text
    assert "shares its first" in text and "then op cos" in text
    first, second = rep.paths
    assert [e.name for e in first.events if e.kind == "op"][-2:] == ["sin", "mul"]
    assert [e.name for e in second.events if e.kind == "op"][-3:] == ["cos", "add", "mul"]
    assert second.parent == 1 and first.events[second.shared].name == "sin"
    assert second.events[second.shared].name == "cos"
    page = rep._repr_html_()
    assert "op sin(" in page and "op cos(" in page and "fetch (float) of" in page
    assert f"leaves path 1 after {second.shared} events" in page
    assert "op cos(" in second._repr_html_() and "op sin(" not in second._repr_html_()
    assert "op cos(" in str(second) and "op sin(" not in str(second)
    pretty = pytest.importorskip("IPython.lib.pretty")
    assert pretty.pretty(rep) == text and pretty.pretty(second) == str(second)


def squares(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def test_a_report_names_differentiated_code_and_graph_breaks():
    import jax

    def step(w, x):
        loss, g = jax.value_and_grad(squares)(w, x)
        positive = x[x > 0]                      # a data-dependent shape: a graph break
        return w - 0.1 * g, float(loss) + float(jnp.sum(positive))

    step = terra_bc.function(step)
    w, x = jnp.ones((3, 2)), jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    for _ in range(2):
        w, _ = step(w, x)
    text = str(terra_bc.explain(step))
    # (the argument enters the gradient as a copy of its own: autodiff.differentiated_inputs)
    assert re.search(r"grad-begin grad of squares\(v\d+ f32\[3,2\]\)", text), text
    assert "graph break: getitem(" in text and "bool[4,3]" in text
    assert "(made by grad of squares at " in text  # the loss fetched: made by the gradient
    assert "op sum(feed f32[6]" in text           # the break's result enters as a feed


def test_html_columns_of_a_short_and_a_long_path():
    def step(x):
        if float(jnp.sum(x)) > 1:
            return x * 2.0
        for _ in range(5):
            x = jnp.sin(x)
        return x

    step = terra_bc.function(step)
    for sign in (1, -1, 1):
        step(jnp.ones(3) * sign)
    short, long = terra_bc.explain(step).paths
    page = terra_bc.explain(step)._repr_html_()
    assert len(long.events) - len(short.events) >= 4
    assert page.count("op sin(") == 5 and page.count("op mul(") == 1
    assert page.count("border-top:3px solid #c00") == 2  # each path's first event of its own
    assert page.count('colspan="2"') == long.shared and long.parent == short.number


def test_a_report_is_a_snapshot():
    step = make_branching_step()
    run_both_ways(step)
    rep = terra_bc.explain(step)
    before = str(rep)
    terra_bc.reset(step)
    step(jnp.ones(3))
    assert str(rep) == before
    assert len(terra_bc.explain(step).paths) == 1


def test_explain_of_every_unit_tells_units_of_the_same_name_apart():
    first, second = make_branching_step(), make_branching_step()
    first(jnp.ones(3))
    second(jnp.ones(3))
    names = [u.name for u in terra_bc.explain().units if u.name.startswith("make_branching_step")]
    mine = [n for n in names if "test_notebook.py" in n]
    assert len(mine) >= 2 and len(set(mine)) == len(mine), names


# **** diff ****

def test_diff_of_two_paths_names_the_differing_op_on_each_side():
    step = make_branching_step()
    run_both_ways(step)
    rep = terra_bc.explain(step)
    d = terra_bc.diff(rep.paths[0], rep.paths[1])
    assert isinstance(d, PathDiff)
    assert d.shared == rep.paths[1].shared
    assert (d.first.left.name, d.first.right.name) == ("sin", "cos")
    assert "op: sin vs cos" in d.first.differences
    text = str(d)
    assert f"{d.shared} shared events" in text and "op: sin vs cos" in text
    assert "only on the right" in text  # cos's "+ 1.0" has no counterpart on the sin side
    page = d._repr_html_()
    assert "op sin(" in page and "op cos(" in page and "op: sin vs cos" in page
    # The value the branch was decided on: the last fetch before the paths part.
    assert d.last_fetch.kind == "fetch" and "made by sum at " in d.last_fetch.source
    assert f"they part after Python read {d.last_fetch}" in text
    assert html.escape(f"they part after Python read {d.last_fetch}") in page


def test_diff_of_paths_a_numpy_draw_chose_says_no_value_was_read():
    rng = np.random.default_rng(0)  # (draws 0.64, then 0.27)

    def step(x):
        y = jnp.tanh(x)
        if rng.random() < 0.5:  # (Python's own value decides: no fetch)
            y = jnp.flip(y)
        return y * 2.0

    step = terra_bc.function(step)
    for _ in range(2):
        step(jnp.arange(3.0))
    d = terra_bc.diff(*terra_bc.explain(step).paths)
    assert d.last_fetch is None and d.first.right.name in ("rev", "flip")
    assert "no value read from the graph before" in str(d)


def test_diff_of_paths_names_a_fed_value_a_branch_read():
    def step(x, flip):
        y = jnp.tanh(x)
        if flip:  # (a NumPy bool: fed into the unit, then read)
            y = jnp.flip(y)
        return y * 2.0

    step = terra_bc.function(step)
    for flip in (False, True):
        step(jnp.arange(3.0), np.bool_(flip))
    d = terra_bc.diff(*terra_bc.explain(step).paths)
    assert d.last_fetch.name == "bool" and d.last_fetch.source.startswith("fed into the unit")


def test_diff_of_a_path_with_itself_finds_no_difference():
    step = make_branching_step()
    run_both_ways(step)
    path = terra_bc.explain(step).paths[0]
    d = terra_bc.diff(path, path)
    assert d.first is None and f"{len(path.events)} shared events: no difference" in str(d)


SOURCE = """
import jax.numpy as jnp
def step(x):
    y = jnp.clip(x, 0.0, {bound})
    return jnp.tanh(y) * 2.0
"""


def define_step(bound, folder):
    """``step`` as a notebook cell defines it (its source changing from one run to the next;
    ipykernel compiles each cell under a file name of its own)."""
    namespace, source = {}, SOURCE.format(bound=bound)
    path = folder / f"cell_{len(list(folder.iterdir()))}.py"
    path.write_text(source)
    exec(compile(source, str(path), "exec"), namespace)
    return terra_bc.function(namespace["step"])


def test_diff_of_reports_before_and_after_redefining_a_function(tmp_path):
    step = define_step(0.5, tmp_path)
    step(jnp.ones(3))
    before = terra_bc.explain(step)
    step = define_step(0.75, tmp_path)  # the "edit"
    step(jnp.ones(3))
    after = terra_bc.explain(step)
    d = terra_bc.diff(before, after)
    assert isinstance(d, ReportDiff) and len(d.units) == 1 and not d.unpaired
    (path_diff,) = d.units[0].paths
    assert path_diff.first.left.name == path_diff.first.right.name == "clip"
    assert "input 3: static 0.5 vs static 0.75" in path_diff.first.differences
    assert "static 0.5 vs static 0.75" in str(d) and "static 0.5 vs static 0.75" in d._repr_html_()


def test_diff_takes_reports_of_the_same_level():
    step = make_branching_step()
    step(jnp.ones(3))
    rep = terra_bc.explain(step)
    with pytest.raises(TypeError):
        terra_bc.diff(rep.paths[0], rep)


# **** reset and limit warnings ****

def test_reset_forgets_the_paths_and_the_next_call_traces():
    step = make_branching_step()
    run_both_ways(step)
    traced = terra_bc.stats()["iterations_traced"]
    step(jnp.ones(3))
    assert terra_bc.stats()["iterations_traced"] == traced  # a recorded path: co-executed
    terra_bc.reset(step)
    assert step.__terra_bc_unit__.paths == []
    step(jnp.ones(3))
    assert terra_bc.stats()["iterations_traced"] == traced + 1
    terra_bc.reset()  # every unit
    step(-jnp.ones(3))
    assert terra_bc.stats()["iterations_traced"] == traced + 2


def count_warnings(calls, about):
    """How many warnings about ``about`` ``calls()`` gave; each must point at the user's
    line that called the unit (this file), not at terra_bc's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (count each: the unit's own once is tested)
        calls()
    mine = [w for w in caught if about in str(w.message)]
    assert all(w.filename == __file__ for w in mine), [w.filename for w in mine]
    return len(mine)


def test_a_unit_warns_once_when_it_stops_making_paths(limits):
    terra_bc.config(max_paths=1)
    step = make_branching_step()
    assert count_warnings(lambda: [run_both_ways(step) for _ in range(3)], "max_paths") == 1
    assert "max_paths" in step.__terra_bc_unit__.frozen


def test_a_unit_warns_once_when_it_goes_eager_at_max_compiles(limits):
    terra_bc.config(max_compiles=0)
    step = make_branching_step()
    x = jnp.ones(11)  # (a shape no other test compiles for: the compile cache is shared)
    assert count_warnings(lambda: [step(x) for _ in range(5)], "max_compiles") == 1
    assert "max_compiles" in step.__terra_bc_unit__.eager_reason


# **** enable(loops=...) ****

def loop_of_steps(n):
    x, seen = jnp.ones(4), []
    for _ in range(n):
        x = jnp.tanh(x * 1.5) + 0.1
        seen.append(round(float(jnp.sum(x)), 5))
    return seen


def test_enable_with_loops_forms_a_loop_unit():
    want = loop_of_steps(6)
    terra_bc.reset_stats()
    terra_bc.enable()  # as before: loop units stay off
    assert loop_of_steps(6) == want
    assert terra_bc.stats()["iterations_coexecuted"] == 0
    terra_bc.disable()
    try:
        terra_bc.enable(loops=True)
        assert loop_of_steps(6) == want
    finally:
        terra_bc.disable()
        terra_bc.set_loops(False)
    assert terra_bc.stats()["iterations_coexecuted"] >= 4
    assert any(u.name.startswith("loop at ") and "test_notebook.py" in u.name
               for u in terra_bc.explain().units)


# **** enabling at interpreter start ****

SCRIPT = """
import sys
import jax.numpy as jnp
x, seen = jnp.ones(4), []
for i in range(6):                      # (module level: a loop unit only if the hook is on)
    x = jnp.tanh(x * 1.5) + 0.1
    seen.append(round(float(jnp.sum(x)), 5))
print(seen)
if "terra_bc" in sys.modules:
    import terra_bc
    print("coexecuted", terra_bc.stats()["iterations_coexecuted"], file=sys.stderr)
"""


def run_python(args, tmp_path, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TERRA_BC")}
    return subprocess.run([sys.executable, *args], env=dict(clean, **env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def coexecuted(result):
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("coexecuted ")]
    return int(lines[-1].split()[1]) if lines else None


def test_auto_import_and_terra_bc_env_run_as_the_command_line_does(tmp_path):
    (tmp_path / "plain.py").write_text(SCRIPT)
    (tmp_path / "auto.py").write_text("import terra_bc.auto\n" + SCRIPT)
    plain = run_python(["plain.py"], tmp_path)
    cli = run_python(["-m", "terra_bc", "plain.py"], tmp_path)
    auto = run_python(["auto.py"], tmp_path)
    env = run_python(["plain.py"], tmp_path, TERRA_BC="1")
    assert coexecuted(plain) is None  # terra_bc never imported
    assert coexecuted(cli) >= 4
    assert coexecuted(auto) == coexecuted(env) == coexecuted(cli)
    assert plain.stdout == cli.stdout == auto.stdout == env.stdout


def test_without_terra_bc_set_terra_bc_is_not_imported(tmp_path):
    probe = ["-c", "import sys; print('terra_bc' in sys.modules, 'jax' in sys.modules)"]
    assert run_python(probe, tmp_path).stdout.split() == ["False", "False"]
    assert run_python(probe, tmp_path, TERRA_BC="0").stdout.split() == ["False", "False"]
    on = run_python(probe, tmp_path, TERRA_BC="1").stdout.split()
    assert on[0] == "True", "terra_bc-startup.pth is not installed: reinstall (pip install -e .)"


def test_an_exception_under_auto_exits_as_plain_python_does(tmp_path):
    (tmp_path / "fails.py").write_text("import terra_bc.auto\nprint('ran')\n1 / 0\n")
    result = run_python(["fails.py"], tmp_path)
    assert result.returncode == 1 and result.stdout == "ran\n"
    assert "ZeroDivisionError" in result.stderr and 'fails.py", line 3' in result.stderr


def test_build_py_places_the_startup_pth_at_the_top_of_the_build(tmp_path):
    pytest.importorskip("setuptools")  # (pip builds in an environment of its own that has it)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    line = (tmp_path / "terra_bc-startup.pth").read_text()
    assert line.startswith("import ") and "TERRA_BC" in line and "terra_bc.auto" in line
    assert (tmp_path / "terra_bc" / "auto.py").exists()


# **** IPython ****

def test_import_terra_bc_does_not_import_ipython(tmp_path):
    probe = ["-c", "import sys, terra_bc; print('IPython' in sys.modules)"]
    assert run_python(probe, tmp_path).stdout.split() == ["False"]


CELLS = [
    "import sys; print(sys.executable)",
    "%load_ext terra_bc",
    textwrap.dedent("""\
        import jax.numpy as jnp, terra_bc
        @terra_bc.function
        def step(x):
            y = jnp.tanh(x)
            if float(jnp.sum(y)) > 0:
                return jnp.sin(y)
            return jnp.cos(y) + 1.0
        step(jnp.ones(3)), step(-jnp.ones(3))  # (two paths of step)
        for x in (jnp.ones(3), -jnp.ones(3), jnp.ones(3)):
            step(x)                            # (a loop unit: step is part of its turns)"""),
    "terra_bc.explain(step)",
    textwrap.dedent("""\
        %%terra_bc
        total = 0.0
        for i in range(6):
            total += float(jnp.sum(jnp.tanh(jnp.ones(4) * i) * 2.0 + 1.0))"""),
    "print(terra_bc.explain())",
]


def test_a_notebook_loads_the_extension_and_renders_reports(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [c.outputs for c in nb.cells]
    assert outputs[0][0]["text"].strip() == sys.executable, "the kernel runs another Python"
    (report,) = outputs[3]
    page = report["data"]["text/html"]
    # The cell defining step is In[3]: its lines are shown as IPython shows them.
    assert "op sin(" in page and "op cos(" in page and "fetch (float) of" in page
    assert "Cell In[3], line 4" in page
    stats = [o for o in outputs[4] if "text/html" in o.get("data", {})]
    assert stats and "iterations_coexecuted" in stats[0]["data"]["text/html"]
    printed = "".join(o.get("text", "") for o in outputs[5])
    assert "unit loop at Cell In[5], line 2" in printed  # the %%terra_bc cell's loop
    assert "unit loop at Cell In[3], line 9" in printed  # a loop of a cell, after %load_ext


# **** docs/notebooks/debugging.ipynb ****

NOTEBOOK = os.path.join(ROOT, "docs", "notebooks", "debugging.ipynb")


def outputs_of(nb, start):
    """The outputs of the one code cell whose source starts with ``start``: its streams
    joined (``stdout``, ``stderr``) and its rich outputs' data (mime type -> data)."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(start)]
    streams = {name: "".join(o["text"] for o in cell.outputs
                             if o["output_type"] == "stream" and o["name"] == name)
               for name in ("stdout", "stderr")}
    data = [o["data"] for o in cell.outputs if "data" in o]
    return streams, data


def test_the_debugging_notebook_runs_and_shows_each_feature(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    import json
    import time
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells), "commit the notebook without outputs"
    began = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"debugging.ipynb ran in {time.perf_counter() - began:.1f} s")
    (stats,) = outputs_of(nb, "%%terra_bc")[1]
    assert "iterations_coexecuted" in stats["text/html"]
    streams, _ = outputs_of(nb, "w = jnp.zeros")
    assert streams["stdout"].rstrip().endswith("4 paths")  # noise or not, clipped or not
    assert "terra_bc: divergence in unit step at Cell In[" in streams["stderr"]  # TERRA_BC_LOG
    assert "ipykernel_" not in streams["stderr"]
    (report,) = outputs_of(nb, "rep = terra_bc.explain(step)")[1]
    assert "op clip(" in report["text/html"] and "Cell In[3], line 15" in report["text/html"]
    # Paths 1 and 2 part on a NumPy draw (the noisy batch: an add only on the left)...
    (numpy_diff,) = outputs_of(nb, "terra_bc.diff(rep.paths[0], rep.paths[1])")[1]
    assert "no value read from the graph before" in numpy_diff["text/html"]
    assert "op add(" in numpy_diff["text/html"] and "only on the left" in numpy_diff["text/html"]
    # ... paths 1 and 3 after the loss was read: the clip, and the fetch that decided it.
    (loss_diff,) = outputs_of(nb, "terra_bc.diff(rep.paths[0], rep.paths[2])")[1]
    page = loss_diff["text/html"]
    assert "op clip(" in page and "only on the left" in page
    assert "they part after Python read fetch (float) of" in page
    assert re.search(r"fetch \(float\) of v\d+ f32\[\] = [0-9.]+ \(made by", page)  # its value
    assert "made by grad of loss_fn at Cell In[3], line 13" in page
    journal = outputs_of(nb, "for record in rep.units[0].journal")[0]["stdout"]
    assert "divergence in unit step at Cell In[3], line 16: expected clip(" in journal
    assert "ipykernel_" not in journal
    (edit,) = outputs_of(nb, "terra_bc.diff(before, terra_bc.explain(step))")[1]
    assert "static -1.0 vs static -0.5" in edit["text/html"]
    assert "since the left report" in edit["text/html"]
    # The timeline: saved as trace events (segment launches under their names), drawn.
    with open(tmp_path / "trace.json") as f:
        events = json.load(f)
    launches = [e for e in events if e["ph"] == "X" and e["cat"] == "launch"]
    assert launches and all(e["name"].startswith("terra_bc__step__p") for e in launches)
    assert sum(e["ph"] == "X" and e["cat"] == "iteration" for e in events) == 20
    (timeline,) = outputs_of(nb, "import json")[1]
    assert timeline["image/png"] and "<table>" in timeline["text/html"]
    (figure,) = outputs_of(nb, "tl.plot(")[1]
    assert figure["image/png"] and "Figure" in figure["text/plain"]
    reset = outputs_of(nb, "terra_bc.reset(step)")[0]["stdout"]
    assert "0 paths after reset" in reset and "1 path after one call" in reset


def test_a_terra_bc_cell_keeps_its_own_value_and_its_own_error():
    # (found by a hunt of entry points, 2026-12-01: run as a nested cell, a %%terra_bc
    # cell's value was stored as Out of the cell before it, and its error was shown but the
    # cell succeeded, so "Run All" and nbclient went on past it)
    probe = textwrap.dedent('''
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_cell("%load_ext terra_bc", store_history=True)
        ip.run_cell("x = 1\\nx + 1", store_history=True)
        r = ip.run_cell("%%terra_bc\\ns = 0\\nfor i in range(4):\\n    s = s + i\\ns * 7", store_history=True)
        print("VALUE", r.result, r.execution_count, sorted(ip.user_ns["Out"].items()))
        r = ip.run_cell("%%terra_bc\\nraise ValueError('boom')", store_history=True)
        print("ERROR", type(r.error_in_exec).__name__, r.success)
    ''')
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith(("VALUE", "ERROR"))]
    assert lines == ["VALUE 42 3 [(2, 2), (3, 42)]", "ERROR ValueError False"], out.stdout


@pytest.mark.usefixtures("loop_units_on")
def test_reset_inside_a_loop_unit_takes_effect_when_its_turn_ends():
    # (found by a hunt of entry points, 2026-12-01: under python -m terra_bc the loop is a
    # unit, and terra_bc.reset() in its body raised RuntimeError where python runs on)
    from conftest import on_and_off

    def train():
        w, out = jnp.ones(3), []
        for i in range(6):
            w = w * 0.9
            if i == 3:
                terra_bc.reset()
            out.append(float(w.sum()))
        return out

    plain, hooked = on_and_off(train)
    np.testing.assert_allclose(hooked, plain, rtol=1e-6)
    s = terra_bc.stats()
    # traced at its first turn, and again at the turn after the reset
    assert s["iterations_traced"] == 2 and s["iterations_coexecuted"] == 4, s
