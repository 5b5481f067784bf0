"""Debugging (issue 13, second part): why a unit diverged (the journal), the terra_bc
logger, segment names JAX shows, jax.jit / make_jaxpr of a unit, and tracebacks without
terra_bc's frames."""
import html
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import terra_bc
from terra_bc.frames import PACKAGE_DIR
from terra_bc.runtime.journal import Compiled, Diverged, Fallback, identifier


@pytest.fixture
def settings_back():
    """Settings a test changes are put back after it."""
    saved = terra_bc.config()
    yield
    terra_bc.config(max_paths=saved["max_paths"], log=saved["log"],
                    background_compile=saved["background_compile"])


def unit_of(fn):
    return fn.__terra_bc_unit__


def divergences(fn):
    return [r for r in unit_of(fn).journal if type(r) is Diverged]


def line_of(fn, text):
    """The file:line of the first line of ``fn``'s source holding ``text``."""
    code = fn.__wrapped__.__code__
    with open(code.co_filename) as f:
        lines = f.read().splitlines()
    for n in range(code.co_firstlineno, len(lines) + 1):
        if text in lines[n - 1]:
            return f"{code.co_filename}:{n}"
    raise AssertionError(text)


def make_branching_step():
    def step(x):
        y = jnp.tanh(x) * 0.5
        s = float(jnp.sum(y))
        if s > 0:
            y = jnp.sin(y)
        elif s < 0:
            y = jnp.cos(y) + 1.0  # (the other branch)
        else:
            y = jnp.exp(y)
        return y * 2.0
    return terra_bc.function(step)


def name_of(fn):
    return unit_of(fn).name


def three_ways(n):
    """Inputs taking each of the three branches (with max_paths=1, the third runs eagerly:
    a fallback).  Tests that count compiles use sizes no other test uses: structurally
    equal segments share executables across the process."""
    return (jnp.ones(n), -jnp.ones(n), jnp.zeros(n), jnp.zeros(n))


# **** the journal: expected / got ****

W = jnp.ones((64, 64))


def test_a_shape_change_is_journaled_with_the_op_expected_and_the_op_python_ran():
    def step(n):
        x = np.ones((n, 64), np.float32)  # (jnp.ones((n, 64)) would be the op that diverges)
        return jnp.sum(jnp.matmul(x, W))  # (the op that diverges)
    step = terra_bc.function(step)
    for n in (32, 32, 16):
        step(n)
    (d,) = divergences(step)
    assert "matmul(" in d.expected and "matmul(" in d.got
    assert "f32[32,64]" in d.expected and "f32[16,64]" in d.got
    assert "f32[64,64]" in d.expected and "f32[64,64]" in d.got
    assert d.where == line_of(step, "(the op that diverges)")
    assert (d.path, d.then) == (1, "traced new path 2")
    assert str(d).startswith(f"divergence in unit {name_of(step)} at {d.where}: expected matmul(")


def test_a_changed_static_number_is_journaled_with_both_values():
    def step(x, c):
        return jnp.clip(jnp.sin(x), 0.0, c) * 2.0
    step = terra_bc.function(step)
    x = jnp.ones(3)
    for c in (0.5, 0.5, 0.75):
        step(x, c)
    (d,) = divergences(step)
    assert "clip(" in d.expected and "0.5" in d.expected and "0.75" not in d.expected
    assert "clip(" in d.got and "0.75" in d.got


def test_a_new_branch_is_journaled_and_shown_by_the_report_and_the_diff():
    step = make_branching_step()
    step(jnp.ones(3))
    step(jnp.ones(3))
    before = terra_bc.explain(step)
    step(-jnp.ones(3))
    (d,) = divergences(step)
    assert d.expected.startswith("sin(v") and d.got.startswith("cos(v") and "f32[3]" in d.got
    assert d.where == line_of(step, "(the other branch)")
    after = terra_bc.explain(step)
    assert str(d) in str(after) and "journal:" in str(after)
    assert html.escape(f"divergence in unit {name_of(step)}") in after._repr_html_()
    assert str(d) not in str(before)
    changes = terra_bc.diff(before, after)
    assert "since the left report:" in str(changes) and str(d) in str(changes)
    new = changes.units[0].journal
    assert d in new and not {r.number for r in new} & {r.number for r in before.units[0].journal}


def test_compiles_and_fallbacks_are_journaled(settings_back):
    step = make_branching_step()
    terra_bc.config(max_paths=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (max_paths reached: said once)
        for x in three_ways(13):
            step(x)
    journal = list(unit_of(step).journal)
    compiles = [r for r in journal if type(r) is Compiled]
    # The fetch of the first (traced) call computes what was recorded so far.
    assert compiles[0].path == 1 and compiles[0].why == "a traced iteration needs its values: the unit's first path"
    assert compiles[0].how == "now, on the calling thread"
    assert all(r.stop > r.start for r in compiles)
    falls = [r for r in journal if type(r) is Fallback]
    assert len(falls) == 1 and "made 1 paths (max_paths)" in falls[0].reason  # noted once
    assert [d.then for d in divergences(step)][-1] == "ran the rest eagerly"
    terra_bc.reset(step)
    assert not unit_of(step).journal


# **** the terra_bc logger ****

def test_each_category_logs_one_line_per_record(caplog, settings_back):
    caplog.set_level(logging.INFO, logger="terra_bc")
    terra_bc.config(log="all", max_paths=1)
    step = make_branching_step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in three_ways(17):
            step(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "terra_bc"]
    name = name_of(step)
    for head in (f"divergence in unit {name} at ", f"compile in unit {name}: path 1",
                 f"eager fallback in unit {name} at ", f"fetch (float) in unit {name} at "):
        assert any(line.startswith(head) for line in lines), (head, lines)
    assert sum("divergence" in line for line in lines) == len(divergences(step))


def test_only_the_categories_asked_for_are_logged(caplog, settings_back):
    caplog.set_level(logging.INFO, logger="terra_bc")
    terra_bc.config(log=["divergences"])
    assert terra_bc.config()["log"] == "divergences"
    step = make_branching_step()
    for x in (jnp.ones(3), jnp.ones(3), -jnp.ones(3)):
        step(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "terra_bc"]
    assert len(lines) == 1 and lines[0].startswith(f"divergence in unit {name_of(step)} at ")
    with pytest.raises(ValueError):
        terra_bc.config(log="compile")


def test_the_environment_variable_logs_to_stderr(tmp_path):
    (tmp_path / "prog.py").write_text(textwrap.dedent("""\
        import jax.numpy as jnp, terra_bc
        @terra_bc.function
        def step(x):
            return jnp.sin(x) * 2.0
        for n in (3, 3, 4):
            step(jnp.ones(n))
    """))
    out = subprocess.run([sys.executable, "prog.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, TERRA_BC_LOG="divergences"))
    assert out.returncode == 0, out.stderr
    assert "terra_bc: divergence in unit step at " in out.stderr
    assert "expected enter(f32[3]), got enter(f32[4])" in out.stderr


# **** names of segment executables ****

def test_segments_are_named_after_unit_path_and_range(caplog, settings_back):
    def my_step(x):
        return jnp.sum(jnp.tanh(x) * 3.0)
    my_step = terra_bc.function(my_step)
    x = jnp.arange(7.0)  # (a shape no other test compiles)
    terra_bc.config(background_compile=False)  # (compiled at its first launch, whatever it costs)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.DEBUG):
            my_step(x)
            my_step(x)
    finally:
        jax.config.update("jax_log_compiles", False)
    text = caplog.text
    (compiled,) = [r for r in unit_of(my_step).journal if type(r) is Compiled]
    name = f"terra_bc__{identifier(name_of(my_step))}__p1__{compiled.start}_{compiled.stop}"
    assert name.startswith("terra_bc__test_segments_are_named_after_unit_path_and_range_my_step")
    assert name in text, text
    assert "jit_terra_bc_segment" not in text


# **** JAX transforms of a unit ****

def test_make_jaxpr_and_jit_of_a_unit_see_the_plain_function():
    def f(x):
        return jnp.sin(x) * 2.0 + jnp.sum(x)
    unit = terra_bc.function(f)
    x = jnp.arange(4.0)
    unit(x)  # (the unit has a path: tracing it still sees the plain function)
    assert str(jax.make_jaxpr(unit)(x)) == str(jax.make_jaxpr(f)(x))
    np.testing.assert_allclose(jax.jit(unit)(x), jax.jit(f)(x))
    np.testing.assert_allclose(jax.grad(lambda v: unit(v).sum())(x),
                               jax.grad(lambda v: f(v).sum())(x))
    assert unit_of(unit).eager_reason is None
    before = terra_bc.stats()["iterations_coexecuted"]
    unit(x)
    assert terra_bc.stats()["iterations_coexecuted"] == before + 1


# **** tracebacks ****

def shown_frames(tb):
    """The frames a traceback shows once filtered as pytest and IPython filter it."""
    shown = []
    while tb is not None:
        if not tb.tb_frame.f_locals.get("__tracebackhide__"):
            shown.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return shown


def helper(x, fail):
    if fail:
        raise ValueError("boom")
    return x


@pytest.mark.parametrize("where", ["body", "grad"])
def test_an_error_in_user_code_shows_no_terra_bc_frame(where):
    def loss(x, fail):
        return jnp.sum(helper(jnp.sin(x), fail))

    def step(x, fail):
        y = jnp.tanh(x)
        if where == "grad":
            return jax.grad(loss)(y, fail)
        return helper(y, fail) * 2.0
    step = terra_bc.function(step)
    for fail in (False, False, True):  # traced, co-executed, then raising
        try:
            step(jnp.ones(3), fail)
        except ValueError as e:
            frames = shown_frames(e.__traceback__)
    names = [c.co_name for c in frames]
    assert names[-2:] == ["loss", "helper"] if where == "grad" else names[-2:] == ["step", "helper"]
    assert not [c for c in frames if c.co_filename.startswith(PACKAGE_DIR)], names


def test_an_error_in_a_jax_op_inside_a_unit_shows_no_terra_bc_frame():
    def step(x):
        return jnp.dot(jnp.sin(x), jnp.ones(5))  # (a shape mismatch)
    step = terra_bc.function(step)
    with pytest.raises(TypeError) as caught:
        step(jnp.ones(3))
    frames = shown_frames(caught.value.__traceback__)
    assert "step" in [c.co_name for c in frames]
    assert not [c for c in frames if c.co_filename.startswith(PACKAGE_DIR)]
    # The op failed recorded, then again eagerly: the error is shown once, not chained.
    assert caught.value.__suppress_context__


PROGRAM = """\
import jax.numpy as jnp, terra_bc

def helper(y, fail):
    if fail:
        raise ValueError("boom")
    return y

@terra_bc.function
def step(x, fail):
    return helper(jnp.tanh(x), fail) * 2.0

for fail in (False, False, True):
    step(jnp.ones(3), fail)
"""


def tracebacks_files(text):
    return re.findall(r'File "([^"]+)"', re.sub(r"\x1b\[[0-9;]*m", "", text))


def test_the_command_line_prints_only_the_users_frames(tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    out = subprocess.run([sys.executable, "-m", "terra_bc", "prog.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "ValueError: boom" in out.stderr
    files = tracebacks_files(out.stderr)
    assert files and all(f.endswith("prog.py") for f in files), out.stderr
    assert "in helper" in out.stderr and "in step" in out.stderr


def test_ipython_shows_only_the_users_frames(tmp_path):
    pytest.importorskip("IPython")
    (tmp_path / "prog.py").write_text(PROGRAM)
    out = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "prog.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TERM="dumb"))
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert "ValueError" in text and "boom" in text, text
    assert "prog.py" in text and "helper" in text, text
    # (IPython writes "File /path/to/file.py:5, in f", home folders as ~)
    assert PACKAGE_DIR + os.sep not in text and "units.py" not in text, text


# **** the timeline ****

def test_a_timeline_saves_iterations_launches_compiles_and_fetches(tmp_path):
    import json
    from terra_bc.runtime import timeline as timeline_module
    step = make_branching_step()
    with terra_bc.timeline() as tl:
        for x in (jnp.ones(19), jnp.ones(19), -jnp.ones(19)):
            step(x)
    tl.save(tmp_path / "trace.json")
    with open(tmp_path / "trace.json") as f:
        events = json.load(f)
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all({"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) for e in spans)
    by_kind = {}
    for e in spans:
        by_kind.setdefault(e["cat"], []).append(e)
    assert [e["name"] for e in by_kind["iteration"]] == [f"iteration of {name_of(step)}"] * 3
    prefix = f"terra_bc__{identifier(name_of(step))}__p"
    assert by_kind["launch"] and all(e["name"].startswith(prefix) for e in by_kind["launch"])
    assert by_kind["compile"] and by_kind["fetch"]
    first, last = by_kind["iteration"][0], by_kind["iteration"][-1]
    assert 0 <= first["ts"] and first["ts"] + first["dur"] <= last["ts"]
    assert any(e["ph"] == "M" and e["args"]["name"] == "MainThread" for e in events)
    kept = len(tl.spans)
    step(jnp.ones(3))  # (not recording: nothing is kept)
    assert len(tl.spans) == kept and not timeline_module._ring and not timeline_module.on
    assert "iteration: 3" in repr(tl)


def test_a_timeline_cuts_each_thread_into_its_innermost_activity():
    from terra_bc.runtime.timeline import Span, Timeline
    tl = Timeline()  # (spans as a recording would leave them: a compile inside a launch)
    tl.spans = [Span("iteration of f", "iteration", 10.0, 10.0, "MainThread", "tracing"),
                Span("seg", "launch", 12.0, 3.0, "MainThread", "tracing"),
                Span("seg", "compile", 13.0, 1.0, "MainThread", "on the calling thread"),
                Span("fetch (float) v3", "fetch", 16.0, 2.0, "MainThread", "tracing"),
                Span("iteration of f", "iteration", 21.0, 1.0, "MainThread", "co-execution"),
                Span("seg", "compile", 20.5, 4.0, "terra_bc-compile", "on the worker thread")]
    tl.began = 9.0
    first, second = tl.iterations()
    assert first.parts == {"compile": 1.0, "launch": 2.0, "fetch": 2.0, "python": 5.0}
    assert second.parts == {"compile": 0.0, "launch": 0.0, "fetch": 0.0, "python": 1.0}
    assert (first.span.detail, second.span.detail) == ("tracing", "co-execution")
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    assert tl.plot(ax=ax) is ax.figure and len(ax.figure.axes) == 1  # (the lanes only)
    assert lanes_drawn(ax) == {  # (ms since the recording began, and how long)
        "Python (iteration), tracing": [(1000, 2000), (6000, 1000), (9000, 2000)],
        "Python (iteration), co-execution": [(12000, 1000)],
        "launch (dispatch)": [(3000, 1000), (5000, 1000)],
        "compile (calling thread)": [(4000, 1000)], "fetch wait": [(7000, 2000)],
        "compile (worker)": [(11500, 4000)]}


def lanes_drawn(ax):
    """What each lane of ``ax`` holds: its label -> the (start, width) bars drawn there."""
    from matplotlib.collections import PolyCollection
    drawn = {}
    for c in ax.collections:
        if isinstance(c, PolyCollection) and c.get_label():
            drawn[c.get_label()] = sorted((round(p.vertices[:, 0].min(), 6),
                                           round(np.ptp(p.vertices[:, 0]), 6)) for p in c.get_paths())
    return drawn


def test_a_timeline_draws_lanes_and_each_iterations_share():
    pytest.importorskip("matplotlib")
    from terra_bc.runtime.timeline import LANES
    step = make_branching_step()
    with terra_bc.timeline() as tl:
        for x in (jnp.ones(23), jnp.ones(23), -jnp.ones(23), jnp.ones(23)):
            step(x)
    fig = tl.plot()
    lanes, shares, lengths = fig.axes
    assert [t.get_text() for t in lanes.get_yticklabels()] == [label for _, label in LANES]
    drawn = lanes_drawn(lanes)
    # The first call traces (and compiles on the calling thread), the second co-executes,
    # the third leaves the path (traces again), the fourth co-executes path 1.
    assert {"Python (iteration), tracing", "Python (iteration), co-execution",
            "launch (dispatch)", "compile (calling thread)", "fetch wait",
            "segment running (device)"} <= set(drawn)
    # Each launch is seen to finish on the device: from its launch until its values were ready.
    launches = [s for s in tl.spans if s.category == "launch"]
    device = [s for s in tl.spans if s.category == "device"]
    assert len(device) == len(launches) and {s.thread for s in device} == {"device"}
    for d in device:
        (launch,) = [s for s in launches if s.start == d.start and s.name == d.name]
        assert d.seconds >= launch.seconds
    python_ms = sum(w for label, bars in drawn.items() if label.startswith("Python")
                    for _, w in bars)
    iterations = tl.iterations()
    assert [it.span.detail for it in iterations] == ["tracing", "co-execution", "tracing",
                                                     "co-execution"]
    assert python_ms == pytest.approx(sum(it.parts["python"] for it in iterations) * 1e3)
    numbered = [int(t.get_text()) for t in lanes.texts]  # (starts too close are not)
    assert numbered[0] == 1 and numbered == sorted(set(numbered)) and numbered[-1] <= 4
    # Per iteration: the activities' shares stack to the whole iteration, and its length.
    assert [c.get_label() for c in shares.containers] == ["python", "launch", "compile", "fetch"]
    tops = [sum(bars[i].get_height() for bars in shares.containers) for i in range(4)]
    assert tops == pytest.approx([100.0] * 4, abs=1e-6)
    assert shares.containers[2][0].get_height() > 0  # the first call compiled
    assert shares.containers[2][1].get_height() == 0  # the second did not
    (dots,) = lengths.lines
    assert list(dots.get_ydata()) == pytest.approx([it.span.seconds * 1e3 for it in iterations])
    # Zoomed to the co-executed iterations: the lanes' x range is theirs.
    zoomed = tl.plot(iterations=range(4, 5)).axes[0]
    fourth = iterations[3].span
    assert zoomed.get_xlim() == pytest.approx(((fourth.start - tl.began) * 1e3,
                                               (fourth.start + fourth.seconds - tl.began) * 1e3))
    assert "iterations 4-4 of 4" in zoomed.get_title()


def test_a_timeline_renders_as_a_picture_in_notebooks(monkeypatch):
    pytest.importorskip("matplotlib")
    step = make_branching_step()
    with terra_bc.timeline() as tl:
        for x in (jnp.ones(2), jnp.ones(2)):
            step(x)
    bundle = tl._repr_mimebundle_()
    assert bundle["image/png"].startswith(b"\x89PNG")
    assert bundle["text/html"].startswith('<img src="data:image/png;base64,')
    assert "<table>" in bundle["text/html"] and bundle["text/plain"] == repr(tl)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # (as if not installed)
    assert tl.png() is None
    bundle = tl._repr_mimebundle_()
    assert "image/png" not in bundle and bundle["text/html"].startswith("<table>")


def test_a_segment_shows_its_jaxpr_and_source_lines_on_request():
    @terra_bc.function
    def step(x):
        y = jnp.tanh(x) * 2.0
        return jnp.sum(y * y)

    for k in range(3):
        step(jnp.arange(4.0) + k)
    seg = terra_bc.explain(step).units[0].paths[0].segments[0]
    text = seg.source()
    assert "tanh" in text and "reduce_sum" in text
    line = step.__wrapped__.__code__.co_firstlineno
    assert f"test_debugging.py:{line + 2}" in text and f"test_debugging.py:{line + 3}" in text


def test_a_segment_serving_a_narrower_request_is_listed_once():
    """Which values Python holds at a launch varies (the cyclic collector frees a library's
    reference cycles when it runs): a later launch asking fewer outputs of the same
    equations is served by the wider segment, kept under that request too (Path.segment).
    explain() lists each segment once, with the outputs it computes."""
    from terra_bc.runtime.units import unit_of

    @terra_bc.function
    def step(x):
        y = jnp.tanh(x) * 2.0
        z = jnp.sin(y)
        float(jnp.sum(z))                    # a launch: y, z and the sum are held or read
        return y + z

    for k in range(3):
        step(jnp.arange(4.0) + k)
    path = unit_of(step, "test").paths[0]
    (start, stop, outputs, skip), wide = next(iter(path.segments.items()))
    assert len(outputs) >= 2
    served = path.segment(start, stop, outputs[:1], skip)  # as launching.run asks
    assert served is wide and len(path.segments) == 3
    text = str(terra_bc.explain(step))
    assert text.count(f"segment [{start}, {stop}):") == 1, text
    assert f"{len(outputs)} outputs" in text
    listed = terra_bc.explain(step).units[0].paths[0].segments
    assert [(s.start, s.stop) for s in listed] == [(start, stop), (stop, path.recorder.mark())]


def test_guard_keys_print_as_names_in_reasons():
    """explain()'s reasons name a transform's key by its kind and the user's function
    (before: the repr of a tuple holding a code object, cut at 40 characters)."""
    from terra_bc.runtime.events import key_name

    def loss(w):
        return w
    assert key_name(("jvp-apply", 17, ("jvp", loss.__code__, 1))).endswith("jvp-apply of test_guard_keys_print_as_names_in_reasons.<locals>.loss")
    assert key_name(loss.__code__) == loss.__code__.co_qualname
    assert key_name(("grad", 3)) == "grad"
