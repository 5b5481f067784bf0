"""Compiling off the critical path (terra_bc/runtime/compiling.py, docs/whole-run.md).

A unit whose traces record eagerly-valued runs a new segment's equations eagerly, compiles it
on a worker thread once that has paid, and runs the executable from the first launch after
the compile is done.  Every test compares values and Python side effects with eager JAX, and
reads the decisions from terra_bc.stats().
"""
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc.runtime import compiling

RTOL, ATOL = 1e-5, 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def eager_valued_tracing():
    terra_bc.config(abstract_tracing=False, background_compile=True)
    compiling.wait_for_compiles()
    terra_bc.reset_stats()
    yield
    compiling.wait_for_compiles()
    terra_bc.config(abstract_tracing=True, background_compile=True)


@pytest.fixture
def compiles_at_second_launch(monkeypatch):
    """Compiling pays at once: the cost model still waits for a segment's second launch."""
    monkeypatch.setattr(compiling, "expected_compile_seconds", lambda segment: 0.0)


def weights(seed, width, depth=3):
    """Each test its own width: executables are shared by structure, process-wide."""
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(width, width)) * 0.3, jnp.float32) for _ in range(depth)]


def make_step(log, scale):
    """An SGD-like step that fetches its loss, logs it and branches on the step number
    (Python's choice), so a divergence can fall while a compile is in flight."""
    def step(ws, x, i):
        h = x
        for w in ws:
            h = jnp.tanh(h @ w) * scale
        if i % 7 == 6:                       # a second path, taken now and then
            h = jnp.sin(h) + 1.0
        loss = jnp.mean(h ** 2)
        log.append(round(float(loss), 5))    # a fetch, and a side effect in program order
        return [w - 0.05 * jnp.mean(h) * w for w in ws], loss
    return step


def run_steps(step, ws, n, start=0):
    x = jnp.ones((4, ws[0].shape[0]), jnp.float32)
    losses = []
    for i in range(start, start + n):
        ws, loss = step(ws, x, i)
        losses.append(np.asarray(loss))
    return ws, losses


def check_equal(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


def test_a_new_segment_runs_eagerly_until_compiling_pays(compiles_at_second_launch):
    log, want_log = [], []
    step = terra_bc.function(make_step(log, 1.1))
    ws, losses = run_steps(step, weights(0, 10), 3)
    s = terra_bc.stats()
    assert s["compiles"] == 0 and s["iterations_coexecuted"] == 2
    # Two segments a step (up to the fetch, the rest).  Each one's first launch: eager, no
    # compile asked; its second: eager too, while the worker compiles it.
    assert s["compiles_skipped"] == 4 and s["compiles_background"] == 2
    assert s["segments_eager"] == 4
    assert s["compile_wait_seconds"] > 0  # (lowering the two segments, on this thread)
    compiling.wait_for_compiles()
    ws, more = run_steps(step, ws, 3, start=3)
    s = terra_bc.stats()
    assert s["compiles"] == 2 and s["segments_eager"] == 4  # the worker's executables ran
    want_ws, want = run_steps(make_step(want_log, 1.1), weights(0, 10), 6)
    check_equal((ws, losses + more), (want_ws, want))
    assert log == want_log


def test_steady_state_waits_for_no_compile(compiles_at_second_launch):
    step = terra_bc.function(make_step([], 0.9))
    ws, _ = run_steps(step, weights(1, 11), 3)
    compiling.wait_for_compiles()
    ws, _ = run_steps(step, ws, 2, start=3)  # the executable's first call (a retrace)
    before = terra_bc.stats()
    run_steps(step, ws, 5, start=7)  # (no step 6 mod 7: the first path only)
    after = terra_bc.stats()
    assert after["compile_wait_seconds"] == before["compile_wait_seconds"]
    assert after["compiles"] == before["compiles"] and after["segments_eager"] == before["segments_eager"]
    assert after["iterations_coexecuted"] - before["iterations_coexecuted"] == 5


def test_equal_results_and_effects_while_a_compile_is_in_flight(monkeypatch, compiles_at_second_launch):
    gate, started = threading.Event(), threading.Event()
    plain = compiling._compile

    def gated(job):  # (on the worker thread: no iteration there)
        started.set()
        assert gate.wait(60)
        plain(job)
    monkeypatch.setattr(compiling, "_compile", gated)
    log, want_log = [], []
    step = terra_bc.function(make_step(log, 1.05))
    try:
        ws, losses = run_steps(step, weights(2, 12), 10)  # step 6 takes the other path
        assert started.wait(30)
        s = terra_bc.stats()
        assert s["compiles"] == 0 and s["compiles_background"] >= 1
        assert s["divergences"] >= 1 and s["segments_eager"] >= 8
    finally:
        gate.set()
    compiling.wait_for_compiles()
    ws, more = run_steps(step, ws, 6, start=10)  # step 13 takes the other path again
    assert terra_bc.stats()["compiles"] >= 1
    want_ws, want = run_steps(make_step(want_log, 1.05), weights(2, 12), 16)
    check_equal((ws, losses + more), (want_ws, want))
    assert log == want_log


def test_a_path_seen_once_is_not_compiled(compiles_at_second_launch):
    """Shapes that change every call: each segment is launched once and never compiled."""
    @terra_bc.function
    def f(x):
        y = jnp.tanh(x) * 2.0
        for _ in range(4):
            y = jnp.sin(y) + y
        return jnp.sum(y)
    got = [float(f(jnp.arange(n, dtype=jnp.float32))) for n in range(103, 111)]
    want = [float(f.__wrapped__(jnp.arange(n, dtype=jnp.float32))) for n in range(103, 111)]
    np.testing.assert_allclose(got, want, rtol=RTOL)
    s = terra_bc.stats()
    assert s["compiles"] == 0 and s["compiles_background"] == 0
    assert s["iterations_traced"] >= 4


def test_setting_off_compiles_at_the_first_launch():
    terra_bc.config(background_compile=False)
    log, want_log = [], []
    step = terra_bc.function(make_step(log, 0.8))
    ws, losses = run_steps(step, weights(3, 13), 4)
    s = terra_bc.stats()
    assert s["compiles"] == 2 and s["segments_eager"] == 0 and s["compiles_background"] == 0
    assert s["compile_wait_seconds"] > 0
    want_ws, want = run_steps(make_step(want_log, 0.8), weights(3, 13), 4)
    check_equal((ws, losses), (want_ws, want))
    assert log == want_log


def test_explain_says_how_segments_compile(compiles_at_second_launch):
    step = terra_bc.function(make_step([], 1.0))
    run_steps(step, weights(4, 14), 3)
    text = str(terra_bc.explain(step))
    assert "next trace: eager-valued (setting)" in text
    assert text.count("run eagerly 2 time(s); compiling") + text.count("run eagerly 2 time(s); compiled, ready") == 2, text


def test_the_process_exits_cleanly_with_a_compile_in_flight(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import jax.numpy as jnp, terra_bc
        from terra_bc.runtime import compiling
        terra_bc.config(abstract_tracing=False)
        compiling.expected_compile_seconds = lambda segment: 0.0
        def step(x):
            for _ in range(12):  # (part of the outer loop's turn: it turns few times)
                x = jnp.tanh(x @ x) * 0.01 + 0.1
            return x
        x = jnp.ones((64, 64))
        for i in range(3):  # the unit: the 3rd turn asks for a compile, then Python exits
            x = step(x)
        print("sum", float(x.sum()))
    """))
    out = subprocess.run([sys.executable, "-m", "terra_bc", "--stats", str(script)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plain = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert out.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    stats = json.loads((out.stdout + out.stderr).split("terra_bc stats: ")[1].splitlines()[0])
    assert stats["compiles_background"] == 1 and stats["compiles"] == 0


class CompileCounter(logging.Handler):
    """Counts the executables JAX compiles (``jax_log_compiles``), by name."""
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


@pytest.fixture
def jax_compiles():
    counter = CompileCounter()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    was = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        yield counter
    finally:
        jax.config.update("jax_log_compiles", was)
        logger.removeHandler(counter)


def test_an_eager_run_of_a_gradient_reuses_the_traced_iterations_executables(jax_compiles,
                                                                             monkeypatch):
    """The traced iteration runs each op of a value_and_grad eagerly; the segment's eager runs
    after it bind the same equations and must find their executables (jax 0.10 keys them by
    the abstract mesh its linearize and transpose set: bound outside it, each op of the
    gradient compiled again, the cost of eager's first step once more)."""
    # (Its 16 equations are expected to compile in the 50 ms minimum, so three eager runs
    # slowed by a loaded machine paid for a background compile, which this test counted:
    # the 3.12 suite run beside the 3.13 one, once.  Compiling must not pay here.)
    monkeypatch.setattr(compiling, "expected_compile_seconds", lambda segment: 100.0)
    def loss_fn(w, x):
        return jnp.mean(jnp.tanh(x @ w) * 2.0)

    def step(w, x):
        loss, g = jax.value_and_grad(loss_fn)(w, x)
        return w - 0.1 * g, loss

    w0 = jnp.asarray(np.random.default_rng(7).normal(size=(17, 3)), jnp.float32)
    x = np.ones((5, 17), np.float32)
    fn = terra_bc.function(step)
    w, got = w0, []
    w, loss = fn(w, x)                       # traced: each op compiled as eager JAX compiles it
    got.append(float(loss))
    traced = len(jax_compiles.names)
    for _ in range(3):                       # its segment run eagerly (not compiled yet)
        w, loss = fn(w, x)
        got.append(float(loss))
    s = terra_bc.stats()
    assert s["iterations_traced"] == 1 and s["segments_eager"] == 3 and s["compiles"] == 0
    assert traced > 0
    assert jax_compiles.names[traced:] == []
    want_w, want = w0, []
    for _ in range(4):
        want_w, loss = step(want_w, x)
        want.append(float(loss))
    np.testing.assert_allclose(got, want, rtol=RTOL)
    check_equal(w, want_w)
