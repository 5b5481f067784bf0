"""Threads: units in worker threads co-execute as in the main thread, with eager's values.

Under ``python -m terra_bc`` every thread the program starts runs with the hook (the
process-wide default, ``_hook.set_default``); a unit is run by one thread at a time and a
thread that finds it busy gets a copy of its own (``Unit.claim``); a placeholder of another
thread's open iteration is a value computed from that iteration's recording (``foreign``).
Every join is bounded: a deadlock fails the test instead of hanging it.
"""
import json
import queue
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import terra_bc
from terra_bc import _hook

JOIN_SECONDS = 60


def run_threads(targets, timeout=JOIN_SECONDS):
    """Run each callable in its own thread; re-raise the first error; fail on a hang."""
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish: deadlock?"
    if errors:
        raise errors[0]


# ------------------------------------------------------------------ under python -m terra_bc

TRAIN = textwrap.dedent('''
    import json, sys, threading
    import jax, jax.numpy as jnp, numpy as np

    STEPS, THREADS, LOOP = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    results, placeholder_turns = {}, {}

    def step(rng, w, losses):
        x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
        h = jnp.tanh(x @ w)
        loss = jnp.mean(h * h) + 0.01 * jnp.sum(w * w)
        losses.append(float(loss))
        return w - 0.05 * jnp.tanh(w + loss), type(h).__name__ == "Placeholder"

    def train(seed):
        rng = np.random.default_rng(seed)
        w = jnp.full((4, 4), 0.1 * (seed + 1))
        losses, held = [], 0
        if LOOP == "for":
            for _ in range(STEPS):
                w, inside = step(rng, w, losses)
                held += inside  # (this turn ran inside an iteration)
        else:
            i = 0
            while i < STEPS:
                w, inside = step(rng, w, losses)
                held += inside
                i += 1
        results[seed] = losses + [float(jnp.sum(w))]
        placeholder_turns[seed] = held

    threads = [threading.Thread(target=train, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    print(json.dumps({"results": results, "turns": placeholder_turns}))
''')


def _run(args, tmp_path):
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)


def _stats(stderr):
    line = [line for line in stderr.splitlines() if line.startswith("terra_bc stats: ")][0]
    return json.loads(line[len("terra_bc stats: "):])


@pytest.mark.parametrize("options, loop", [([], "for"), (["--no-functions"], "for"),
                                           (["--no-functions"], "while")])
def test_eight_threads_each_training_co_execute_under_the_cli(tmp_path, options, loop):
    """Eight worker threads run one training loop each (the same loop statement): every
    turn in every thread runs inside an iteration, values are eager's, and the counters add
    up.  With function units on, ``train`` (called by each thread) is a unit too: its calls
    are iterations until the loop inside turns more than ``inner_turns`` times."""
    steps, n = 20, 8
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    args = [str(script), str(steps), str(n), loop]
    plain, hooked = _run(args, tmp_path), _run(["-m", "terra_bc", "--stats", *options, *args], tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert hooked.returncode == 0, hooked.stderr
    want, got = json.loads(plain.stdout), json.loads(hooked.stdout)
    for k in map(str, range(n)):
        np.testing.assert_allclose(got["results"][k], want["results"][k], rtol=1e-5, atol=1e-6)
        assert got["turns"][k] >= steps - (loop == "while"), (k, got["turns"])  # inside iterations
    stats = _stats(hooked.stderr)
    assert stats["eager_fallbacks"] == 0, stats
    if options:  # each turn is one iteration of the loop (or of a thread's copy of it)
        # (a while loop's first turn runs plainly until the loop is known as a unit)
        assert n * steps - n <= stats["iterations_traced"] + stats["iterations_coexecuted"] <= n * steps, stats
        assert stats["iterations_coexecuted"] >= n * (steps - 3), stats
    else:
        assert stats["iterations_coexecuted"] >= n * 2, stats


def test_threads_follow_the_default_unless_they_chose():
    """``enable(threads=True)``: threads that never chose run with the hook (one started
    later included); one that called ``disable()`` does not; ``disable(threads=True)``
    uninstalls it once no thread chose on."""
    seen = {}

    def probe(name, choose=None):
        def run():
            if choose is not None:
                choose()
            seen[name] = _hook.thread_enabled()
            _hook.set_thread_choice(None)  # (a thread that chose on keeps the hook installed)
        return run

    terra_bc.enable(threads=True)
    try:
        run_threads([probe("follows"), probe("off", terra_bc.disable), probe("on", terra_bc.enable)])
        assert seen == {"follows": True, "off": False, "on": True}
    finally:
        terra_bc.disable(threads=True)
    run_threads([probe("after")])
    assert seen["after"] is False
    assert not _hook.installed()


# ------------------------------------------------------------------ in one process

def _step(w, x):
    h = jnp.tanh(x @ w)
    loss = jnp.mean(h * h)
    return w - 0.1 * jnp.tanh(w + loss), loss


def test_four_threads_call_one_function_at_once():
    """One ``@terra_bc.function`` called by four threads at the same time: each gets eager's
    values; the threads that found it busy co-execute copies of their own."""
    step = terra_bc.function(_step)
    inputs = {k: [jnp.full((4, 4), 0.01 * (i + k)) for i in range(15)] for k in range(4)}

    def eager(k):
        w, out = jnp.eye(4), []
        for x in inputs[k]:
            w, loss = _step(w, x)
            out.append(float(loss))
        return out

    want = {k: eager(k) for k in range(4)}
    got, start = {}, threading.Barrier(4, timeout=JOIN_SECONDS)

    def worker(k):
        def run():
            start.wait()
            w, out = jnp.eye(4), []
            for x in inputs[k]:
                w, loss = step(w, x)
                out.append(float(loss))
            got[k] = out
        return run

    terra_bc.reset_stats()
    run_threads([worker(k) for k in range(4)])
    for k in range(4):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_traced"] + stats["iterations_coexecuted"] == 60, stats
    assert stats["iterations_coexecuted"] >= 60 - 2 * 4, stats
    unit = step.__terra_bc_unit__
    assert not unit.busy.locked() and all(not c.busy.locked() for c in unit.copies.values())


def test_enabling_in_one_thread_while_another_disables():
    """Threads switching the hook on and off (their own, and the default) while others run
    units: values equal to eager's, and the hook uninstalled once all are off."""
    step = terra_bc.function(_step)
    x = jnp.full((4, 4), 0.3)
    w_want, _ = _step(jnp.eye(4), x)
    stop = threading.Event()

    def toggler(default):
        def run():
            for _ in range(300):
                if default:
                    terra_bc.enable(threads=True)
                    terra_bc.disable(threads=True)
                else:
                    with terra_bc.enabled():
                        float(jnp.sum(jnp.ones(2)))
            stop.set()
        return run

    def runner():
        while not stop.is_set():
            w, _ = step(jnp.eye(4), x)
            np.testing.assert_allclose(w, w_want, rtol=1e-6)

    run_threads([toggler(True), toggler(False), runner, runner])
    assert not _hook.installed()


def test_a_units_arrays_handed_to_another_thread():
    """A placeholder put in a queue while its iteration is still open in the producer: the
    consumer (outside any unit, and inside a unit of its own) gets eager's values, and the
    producer's iteration goes on unchanged (no placeholder taken for another's)."""
    handed, done = queue.Queue(), threading.Event()

    def produce(x):
        y = jnp.tanh(x) * 2.0
        handed.put(y)
        assert done.wait(JOIN_SECONDS)  # the consumer reads y while this iteration is open
        done.clear()
        return jnp.sum(y + 1.0)

    def consume(v):
        return jnp.sum(v * 3.0) + jnp.max(v)

    producer, consumer = terra_bc.function(produce), terra_bc.function(consume)
    xs = [jnp.full((5,), 0.1 * i) for i in range(8)]
    got_p, got_c, got_plain = [], [], []

    def run_producer():
        for x in xs:
            got_p.append(float(producer(x)))

    def run_consumer():
        for _ in xs:
            v = handed.get(timeout=JOIN_SECONDS)
            got_plain.append(float(jnp.sum(v)))   # outside any iteration
            got_c.append(float(consumer(v)))      # fed to this thread's own unit
            done.set()

    run_threads([run_producer, run_consumer])
    ys = [jnp.tanh(x) * 2.0 for x in xs]
    np.testing.assert_allclose(got_p, [float(jnp.sum(y + 1.0)) for y in ys], rtol=1e-6)
    np.testing.assert_allclose(got_plain, [float(jnp.sum(y)) for y in ys], rtol=1e-6)
    np.testing.assert_allclose(got_c, [float(consume(y)) for y in ys], rtol=1e-6)
    assert terra_bc.stats()["iterations_coexecuted"] > 0
