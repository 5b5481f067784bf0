"""Whole-run behaviour: abstract tracing and the persistent cache (docs/whole-run.md).

Abstract tracing changes *when* values are computed in a traced iteration, never what Python
sees: every test compares values and Python side effects with eager JAX (and with eager-valued
tracing), and checks from terra_bc.stats() how the traced iteration computed them.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc.runtime.settings import settings
from terra_bc.runtime.settings import LAZY_LAUNCHES

RTOL, ATOL = 1e-4, 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def abstract_tracing_on():
    terra_bc.config(abstract_tracing=True)
    terra_bc.reset_stats()
    yield
    terra_bc.config(abstract_tracing=True)


def params(seed, sizes):
    r = np.random.default_rng(seed)
    return [(jnp.asarray(r.normal(size=(a, b)) * 0.3, jnp.float32), jnp.zeros(b, jnp.float32))
            for a, b in zip(sizes[:-1], sizes[1:])]


def batches(seed, n, width):
    r = np.random.default_rng(seed)
    return [(jnp.asarray(r.normal(size=(8, width)), jnp.float32),
             jnp.asarray(r.normal(size=(8, 1)), jnp.float32)) for _ in range(n)]


def make_step(log):
    """An SGD step that fetches the loss mid-step and branches on it (Python-adapted lr),
    draws a NumPy mask (a feed), and logs: three ways Python reads or feeds values."""
    masks = np.random.default_rng(7)

    def loss_fn(ps, x, y):
        h = x
        for w, b in ps[:-1]:
            h = jnp.tanh(h @ w + b)
            h = h * jnp.asarray(masks.random(h.shape) > 0.1, jnp.float32)
        w, b = ps[-1]
        return jnp.mean((h @ w + b - y) ** 2)

    def step(ps, x, y, lr):
        loss, grads = jax.value_and_grad(loss_fn)(ps, x, y)
        value = float(loss)                      # a fetch in the middle of the step
        lr = lr * (0.5 if value > 1.0 else 1.01)
        log.append(round(value, 4))
        new = [(w - lr * gw, b - lr * gb) for (w, b), (gw, gb) in zip(ps, grads)]
        return new, lr, jnp.sum(new[0][0])
    return step


def train(decorate, sizes, n=8):
    log = []
    step = make_step(log)
    if decorate:
        step = decorate(step)
    ps, lr, outs = params(3, sizes), 0.05, []
    for x, y in batches(4, n, sizes[0]):
        ps, lr, s = step(ps, x, y, lr)
        outs.append(s)
    return ps, lr, outs, log


def assert_same(got, want):
    g_ps, g_lr, g_outs, g_log = got
    w_ps, w_lr, w_outs, w_log = want
    assert g_log == w_log
    assert g_lr == pytest.approx(w_lr, rel=RTOL)
    for g, w in zip(jax.tree_util.tree_leaves((g_ps, g_outs)), jax.tree_util.tree_leaves((w_ps, w_outs))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


def test_traced_iteration_computes_by_the_segments_coexecution_reuses():
    sizes = (6, 17, 17, 1)  # (widths no other test uses: the compile cache is shared)
    want = train(None, sizes)
    terra_bc.reset_stats()
    # (compiled at their first launch: whether a segment whose operations the eager run
    # above warmed runs eagerly until a background compile is ready depends on measured
    # times, and the count below then depended on the machine's load)
    was = settings["background_compile"]
    terra_bc.config(background_compile=False)
    try:
        got = train(terra_bc.function, sizes)
    finally:
        terra_bc.config(background_compile=was)
    assert_same(got, want)
    s = terra_bc.stats()
    assert s["iterations_traced"] == 1 and s["iterations_coexecuted"] == 7, s
    # The traced iteration ran two segments, to the fetch and to its end; the 7 co-executed
    # iterations launch the same two each, and nothing is compiled after the first call.
    assert s["trace_launches"] == 1 and s["segments_launched"] == 16, s
    assert s["compiles"] == 2 and s["divergences"] == 0, s
    assert s["compile_seconds"] > 0


def test_eager_valued_tracing_gives_the_same_values_and_effects():
    # Compiled at once, or run eagerly until that pays (sizes of their own: executables are
    # shared by structure).
    for background, sizes in ((False, (6, 19, 19, 1)), (True, (6, 21, 21, 1))):
        want = train(None, sizes)
        terra_bc.config(abstract_tracing=False, background_compile=background)
        terra_bc.reset_stats()
        got = train(terra_bc.function, sizes)
        assert_same(got, want)
        s = terra_bc.stats()
        assert s["trace_launches"] == 0, s
        if background:
            assert s["segments_eager"] > 0 and s["compiles"] <= s["compiles_background"], s
        else:
            assert s["compiles"] == 2 and s["segments_eager"] == 0, s
    terra_bc.config(background_compile=True)


def test_a_traced_iteration_that_reads_values_often_records_eagerly_after_a_few():
    """Each fetch in a traced iteration costs a segment compile: past LAZY_LAUNCHES of them
    the rest of the iteration records eagerly, and so do the unit's later traces."""
    n = LAZY_LAUNCHES + 4
    seen = []

    def step(x):
        for _ in range(n):
            x = jnp.sin(x) + 1.0
            seen.append(round(float(jnp.sum(x)), 4))  # a fetch after each op
        return x

    x0 = jnp.linspace(0.0, 1.0, 7)
    want = step(x0)
    want_seen, seen[:] = list(seen), []
    unit = terra_bc.function(step)
    got = unit(x0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL)
    assert seen == want_seen
    s = terra_bc.stats()
    assert s["trace_launches"] == LAZY_LAUNCHES, s
    assert unit.__terra_bc_unit__.abstract_tracing is False
    assert "next trace: eager-valued (a traced call read values too often" in str(terra_bc.explain(unit))
    seen[:] = []
    np.testing.assert_allclose(np.asarray(unit(x0)), np.asarray(want), rtol=RTOL)
    assert seen == want_seen


def test_work_on_constants_alone_is_computed_where_it_is_recorded():
    """``0.9 * jax_array`` inside a traced iteration touches no graph value: it is computed
    as eager JAX would (and fed to what uses it), not launched as a segment."""
    ema = [jnp.float32(1.0)]

    def step(x):
        decayed = 0.9 * ema[0]             # constants only: computed as it is recorded
        ema[0] = decayed + 0.1 * jnp.mean(x)
        return jnp.tanh(x) * 2.0

    x = jnp.arange(5.0)
    unit = terra_bc.function(step)
    out = unit(x)
    s = terra_bc.stats()
    assert s["trace_launches"] == 0, s     # nothing was read before the iteration's end
    np.testing.assert_allclose(np.asarray(out), np.tanh(np.arange(5.0)) * 2.0, rtol=RTOL)
    assert "next trace: abstract" in str(terra_bc.explain(unit))
    np.testing.assert_allclose(float(ema[0]), 0.9 + 0.1 * 2.0, rtol=RTOL)


def test_a_graph_break_in_a_traced_iteration_gets_computed_inputs():
    """x[mask] (a data-dependent shape) runs eagerly: its inputs are computed first."""
    def step(x):
        y = jnp.cos(x) * 3.0
        kept = y[y > 0.0]                  # refused by the recorder: a graph break
        return jnp.sum(kept * 2.0), y + 1.0

    x = jnp.linspace(-3.0, 3.0, 11)
    want = step(x)
    unit = terra_bc.function(step)
    for _ in range(3):
        got = unit(x)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)
    assert terra_bc.stats()["iterations_coexecuted"] == 2


def test_config_checks_the_new_settings():
    with pytest.raises(ValueError):
        terra_bc.config(abstract_tracing=1)
    with pytest.raises(ValueError):
        terra_bc.config(cache_dir=3)


# ----------------------------------------------------------------------------- cache

PROGRAM = """
import numpy as np, jax, jax.numpy as jnp, terra_bc

def step(ws, x):
    loss, g = jax.value_and_grad(lambda ws: jnp.mean((jnp.ACT(x @ ws[0]) @ ws[1]) ** 2))(ws)
    return [w - 0.1 * gw for w, gw in zip(ws, g)], loss

r = np.random.default_rng(0)
ws = [jnp.asarray(r.normal(size=(5, 9)), jnp.float32), jnp.asarray(r.normal(size=(9, 2)), jnp.float32)]
x = jnp.asarray(r.normal(size=(4, 5)), jnp.float32)
step = terra_bc.function(step)
for _ in range(4):
    ws, loss = step(ws, x)
print("loss %.6f" % float(loss))
"""


def run_program(tmp_path, cache, act="tanh"):
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM.replace("ACT", act))
    env = dict(os.environ, TERRA_BC_CACHE_DIR=str(cache), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def entries(cache):
    return sorted(os.listdir(cache))


def test_a_second_run_loads_every_executable_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = run_program(tmp_path, cache)
    kept = entries(cache)
    # Segments are kept, under names that say their unit and path (the same each run).
    assert any("terra_bc__step__p1__" in k for k in kept), kept
    second = run_program(tmp_path, cache)
    assert second.stdout == first.stdout
    assert entries(cache) == kept      # nothing compiled anew: every executable was loaded


def test_changed_code_compiles_what_changed(tmp_path):
    cache = tmp_path / "cache"
    run_program(tmp_path, cache)
    kept = set(entries(cache))
    changed = run_program(tmp_path, cache, act="sin")
    new = set(entries(cache)) - kept
    assert new, "a changed op in the step must miss the cache"
    assert changed.stdout.startswith("loss ")


def test_a_corrupted_cache_entry_is_ignored_with_a_warning(tmp_path):
    cache = tmp_path / "cache"
    first = run_program(tmp_path, cache)
    for name in entries(cache):
        (cache / name).write_bytes(b"not an executable")
    again = run_program(tmp_path, cache)
    assert again.stdout == first.stdout
    assert "Warning" in again.stderr


def test_concurrent_runs_share_a_cache_folder(tmp_path):
    # Two processes of the same program start together on an empty cache folder: both
    # compile and write the same entries (JAX writes each under a temporary name, then
    # renames it); both print what a run alone prints, and a third run loads every entry.
    alone = run_program(tmp_path, tmp_path / "alone")
    cache = tmp_path / "cache"
    path = tmp_path / "prog.py"
    env = dict(os.environ, TERRA_BC_CACHE_DIR=str(cache), PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out == alone.stdout
        assert "Warning" not in err, err
    kept = entries(cache)
    assert any("terra_bc__step__p1__" in k for k in kept), kept
    assert run_program(tmp_path, cache).stdout == alone.stdout
    assert entries(cache) == kept      # nothing compiled anew


def test_cache_dir_setting_points_jax_at_the_folder(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        terra_bc.config(cache_dir=str(tmp_path / "c"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert os.path.isdir(tmp_path / "c")
    finally:
        terra_bc.config(cache_dir="")
        jax.config.update("jax_compilation_cache_dir", before)
        from jax._src import compilation_cache
        compilation_cache.reset_cache()


def test_a_unit_whose_paths_never_come_back_traces_eagerly_valued():
    """Abstract tracing compiles each path it records; a unit whose shapes change every
    call (4 paths, none co-executed again) records its next traces eagerly instead."""
    def step(x):
        return jnp.sum(jnp.tanh(x) * 2.0) + jnp.max(x)

    unit = terra_bc.function(step)
    core = unit.__terra_bc_unit__
    for n in range(1, 7):
        x = jnp.linspace(0.0, 1.0, n)
        np.testing.assert_allclose(float(unit(x)), float(step(x)), rtol=RTOL)
        if n == 4:
            assert len(core.paths) == 4 and not core.reused
            assert not core.traces_abstractly()
    assert "paths were co-executed again" in str(terra_bc.explain(unit))
    # A path that comes back is co-executed, and counts as reused.
    x = jnp.linspace(0.0, 1.0, 3)
    np.testing.assert_allclose(float(unit(x)), float(step(x)), rtol=RTOL)
    assert core.reused


def test_a_divergence_records_the_new_path_from_its_start_one_segment_per_path():
    """Leaving a path mid-iteration, the rest is recorded abstractly with the prefix not
    computed yet: the iteration's end computes the new path whole, by the segment that
    path's later iterations launch.  One compile per path, however often Python switches."""
    choices = [0, 0, 1, 1, 0, 2, 2, 1, 0, 2, 1, 1]
    log = []

    def step(x, w, choice):
        h = jnp.tanh(x @ w)
        log.append(choice)
        if choice == 0:
            h = h * 2.0
        elif choice == 1:
            h = jnp.sin(h) + 1.0
        else:
            h = jnp.cos(h) - h
        return jnp.sum(h * h), h

    r = np.random.default_rng(5)
    x = jnp.asarray(r.normal(size=(3, 4)), jnp.float32)
    w = jnp.asarray(r.normal(size=(4, 5)), jnp.float32)
    want = [step(x, w, c) for c in choices]
    want_log, log[:] = list(log), []
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x, w, c) for c in choices]
    assert log == want_log
    for g, e in zip(got, want):
        for a, b in zip(g, e):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
    s = terra_bc.stats()
    assert s["paths_recorded"] == 3 and s["divergences"] >= 2, s
    # One segment per path (compiled, or run eagerly where the cost model finds that
    # cheaper: the three paths share most operations; which it picks depends on the
    # compile rate this process measured).
    assert [len(p.segments) for p in unit.__terra_bc_unit__.paths] == [1, 1, 1]
    assert 1 <= s["compiles"] <= 3, s


def slice_step(x, w, n):
    """A step whose path depends on a Python int: ``h[:n]`` takes a new shape for each n."""
    h = jnp.tanh(x @ w)
    h = jnp.sin(h) * 2.0 + h
    tail = h[:n]
    return jnp.sum(jnp.cos(tail) * tail + jnp.exp(-tail))


@pytest.mark.parametrize("mode", ["rule", "no rule", "setting off"])
def test_a_trace_leaving_a_compiled_path_records_abstractly(monkeypatch, mode):
    """A unit whose paths have not come back traces new ones eagerly-valued (shapes that
    keep changing: Unit.traces_abstractly), each operation run eagerly as it is recorded.
    Where the path it leaves was compiled, none of its operations ran eagerly, so each would
    compile one by one: the new path is recorded abstractly instead
    (compiling.eager_trace_costs_more).  "no rule" switches that off: the same calls then
    trace eagerly-valued (the check fails without the rule).  With abstract tracing off
    (the setting) every trace is eagerly-valued, the rule included.  Values equal eager."""
    from terra_bc.runtime import compiling, journal
    monkeypatch.setattr(compiling, "_rate", [0.0, 0])  # (the prior: not the suite's rate)
    if mode == "no rule":
        monkeypatch.setattr(compiling, "eager_trace_costs_more", lambda path, stop: False)
    if mode == "setting off":
        terra_bc.config(abstract_tracing=False)
    r = np.random.default_rng(12)
    x = jnp.asarray(r.normal(size=(6, 5)), jnp.float32)
    w = jnp.asarray(r.normal(size=(5, 5)) * 0.5, jnp.float32)
    unit = terra_bc.function(slice_step)
    ns = [6, 6, 5, 4, 3, 2]
    got = [float(unit(x, w, n)) for n in ns]
    np.testing.assert_allclose(got, [float(slice_step(x, w, n)) for n in ns], rtol=RTOL)
    core = unit.__terra_bc_unit__
    thens = [rec.then for rec in core.journal if isinstance(rec, journal.Diverged)]
    assert len(thens) == 4 and len(core.paths) == 5 and not core.traces_abstractly(), thens
    eager_valued = [t.endswith("eagerly-valued") for t in thens]
    if mode == "setting off":
        assert eager_valued == [True] * 4, thens
        return
    # The first two new paths trace abstractly under either rule (few paths yet); the
    # unit's history then says eagerly-valued, unless the path left was compiled.
    assert thens[:2] == ["traced new path 2", "traced new path 3"], thens
    assert eager_valued[2:] == ([False, False] if mode == "rule" else [True, True]), thens


def test_placement_of_a_value_recorded_abstractly_needs_no_launch():
    """Libraries ask where a value lives (Flax NNX reads ``.sharding``): with one device the
    answer is known without computing the value."""
    def step(x):
        y = jnp.tanh(x)
        where = y.sharding
        return y * 2.0, where

    x = jnp.arange(4.0)
    want, want_where = step(x)
    unit = terra_bc.function(step)
    got, where = unit(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL)
    if jax.device_count() == 1:
        assert where == want_where
        assert terra_bc.stats()["trace_launches"] == 0


def tree_step(w, x, order):
    """A tree-shaped model: one cell applied at each node, in an order Python draws, so each
    order is a path of its own made of the same operations."""
    h = x
    for k in order:
        h = jnp.tanh(h @ w[k] + h)
    return jnp.sum(h * h)


def test_a_new_path_made_of_operations_run_eagerly_before_is_not_compiled(monkeypatch):
    """Eager JAX compiles each operation once, whatever the path: a path whose operations
    the unit already ran eagerly costs nothing to run eagerly, so its traced iteration runs
    it eagerly (abstract tracing), and it is compiled only once that pays.  A path with an
    operation never run eagerly (a new shape) is compiled at once, as before."""
    from terra_bc.runtime import compiling
    monkeypatch.setattr(compiling, "_rate", [0.0, 0])  # (the prior: not the suite's rate)
    r = np.random.default_rng(11)
    w = [jnp.asarray(r.normal(size=(7, 7)) * 0.3, jnp.float32) for _ in range(2)]
    x = jnp.asarray(r.normal(size=(3, 7)), jnp.float32)
    unit = terra_bc.function(tree_step)
    terra_bc.config(abstract_tracing=False)   # the first path's operations run as recorded
    got = [float(unit(w, x, (0, 1, 0)))]
    terra_bc.config(abstract_tracing=True)
    terra_bc.reset_stats()
    got.append(float(unit(w, x, (1, 1, 0, 1))))  # a new order: traced abstractly, then run
    s = terra_bc.stats()
    # (one launch: the traced iteration's end computes the path recorded abstractly)
    assert s["iterations_traced"] == 1 and s["segments_eager"] == 1 and s["compiles"] == 0, s
    got.append(float(unit(w, x, (1, 1, 0, 1))))  # comes back: co-executed, still eagerly
    assert terra_bc.stats()["compiles"] == 0
    # A new shape is an operation never run eagerly: compiled at its traced iteration.
    x5 = jnp.asarray(r.normal(size=(5, 7)), jnp.float32)
    got.append(float(unit(w, x5, (0, 1))))
    assert terra_bc.stats()["compiles"] == 1
    want = [tree_step(w, x, (0, 1, 0)), tree_step(w, x, (1, 1, 0, 1)),
            tree_step(w, x, (1, 1, 0, 1)), tree_step(w, x5, (0, 1))]
    np.testing.assert_allclose(got, [float(v) for v in want], rtol=RTOL)
    assert "run eagerly 2 time(s)" in str(terra_bc.explain(unit))
