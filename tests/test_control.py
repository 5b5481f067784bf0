"""Control flow and dynamic values (issue 4): multi-path TraceGraphs, automatic dynamism,
bounded specialisation, loops.  Each case runs the same code eagerly first and compares
values, side effects and counts of traces and compiles from ``terra_bc.stats()``.

``paths_recorded`` counts the paths units keep: each is traced once (an iteration traced from
its start, or the rest of one that left every recorded path mid-way)."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc

RTOL, ATOL = 1e-5, 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh():
    saved = terra_bc.config()
    terra_bc.reset_stats()
    yield
    terra_bc.config(**saved)
    terra_bc.reset_stats()


def close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


def traced(s):
    return s["paths_recorded"]


def snapshot():
    s = terra_bc.stats()
    return {k: s[k] for k in ("iterations_traced", "divergences", "compiles", "eager_fallbacks",
                              "iterations_coexecuted", "ops_skipped", "paths_recorded")}


def run_both(make, inputs, n_tail=0):
    """Run make()'s step over inputs eagerly and as a unit; returns (eager results, unit
    results, stats when n_tail iterations were left, final stats)."""
    want = [make()(*a) for a in inputs]
    terra_bc.reset_stats()
    unit = terra_bc.function(make())
    got, before_tail = [], None
    for k, a in enumerate(inputs):
        if k == len(inputs) - n_tail:
            before_tail = snapshot()
        got.append(unit(*a))
    return want, got, before_tail, snapshot()


def params(seed, sizes=(4, 8, 8, 2)):
    r = np.random.default_rng(seed)
    return [(jnp.asarray(r.normal(size=(a, b)) / np.sqrt(a), jnp.float32), jnp.zeros(b))
            for a, b in zip(sizes[:-1], sizes[1:])]


def batch(seed, n=16):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(n, 4)), jnp.float32)
    return x, jnp.sin(x[:, :2])


# ----------------------------------------------------------------------------- 1. paths

def make_three_path_step(draws, log):
    """SDPoint-like: a path drawn with Python's random each iteration, inside the
    differentiated function (its choice and its branch run as Python every iteration)."""
    def loss_fn(p, x, y):
        choice = draws.choice([0, 1, 2])
        log.append(choice)
        h = x @ p[0][0] + p[0][1]
        if choice == 0:
            h = jnp.tanh(h)
        elif choice == 1:
            h = jax.nn.relu(h) * 0.5
        else:
            h = jnp.sin(h) + h[::-1]
        h = jnp.tanh(h @ p[1][0] + p[1][1])
        return jnp.mean((h @ p[2][0] + p[2][1] - y) ** 2)

    def step(p, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        return [(w - 0.1 * gw, b - 0.1 * gb) for (w, b), (gw, gb) in zip(p, g)], loss
    return step


def test_path_drawn_at_random_among_three_stops_tracing_and_compiling():
    n, tail = 40, 12
    x, y = batch(1)
    results = {}
    for mode in ("eager", "terra"):
        draws, log = random.Random(3), []
        step = make_three_path_step(draws, log)
        if mode == "terra":
            terra_bc.reset_stats()
            step = terra_bc.function(step)
        p, losses = params(0), []
        for k in range(n):
            if k == n - tail and mode == "terra":
                before = snapshot()
            p, loss = step(p, x, y)
            losses.append(loss)
        results[mode] = (p, losses, log)
    close(results["terra"][:2], results["eager"][:2])
    assert results["terra"][2] == results["eager"][2]  # the same draws, once each, in order
    assert set(results["eager"][2][-tail:]) == {0, 1, 2}  # every path taken in the tail
    after = snapshot()
    assert traced(after) == 3, after  # one trace per path
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)
    assert after["iterations_coexecuted"] == n - 1 and after["eager_fallbacks"] == 0, after


def make_logging_step(printed, checkpoints, state):
    """`if step % 3 == 0` logging, `if loss > best` checkpointing, a helper that branches."""
    def clipped(g, limit):  # a nested call deciding on a fetched value
        norm = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(g)))
        if norm > limit:
            return jax.tree_util.tree_map(lambda a: a * (limit / norm), g)
        return g

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p[0][0] + p[0][1])
        h = jnp.tanh(h @ p[1][0] + p[1][1])
        return jnp.mean((h @ p[2][0] + p[2][1] - y) ** 2)

    def step(k, p, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        g = clipped(g, 0.35)
        if k % 3 == 0:
            printed.append(f"{k}: {float(loss):.4f}")
        if loss < state["best"]:  # an improvement: checkpoint
            state["best"] = loss
            checkpoints.append(np.asarray(p[0][0]))
        return [(w - 0.3 * gw, b - 0.3 * gb) for (w, b), (gw, gb) in zip(p, g)]
    return step


def test_logging_checkpoint_and_clipping_branches_are_merged():
    n, tail = 36, 12
    out = {}
    for mode in ("eager", "terra"):
        printed, checkpoints, state = [], [], {"best": 1e9}
        step = make_logging_step(printed, checkpoints, state)
        if mode == "terra":
            terra_bc.reset_stats()
            step = terra_bc.function(step)
        p = params(1)
        for k in range(n):
            if k == n - tail and mode == "terra":
                before = snapshot()
            p = step(k, p, *batch(k % 4))  # four batches in turn: the loss rises now and then
        out[mode] = (p, printed, checkpoints, float(state["best"]))
    close(out["terra"][0], out["eager"][0])
    assert out["terra"][1] == out["eager"][1]
    assert len(out["terra"][2]) == len(out["eager"][2]) > 1
    close(out["terra"][2], out["eager"][2])
    np.testing.assert_allclose(out["terra"][3], out["eager"][3], rtol=RTOL)
    after = snapshot()
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)
    assert after["eager_fallbacks"] == 0, after


def test_shorter_path_needs_no_trace():
    """An iteration that ends where a longer recorded path goes on: a new path, no trace."""
    def make():
        def step(k, x):
            y = jnp.sin(x) * 2.0
            if k % 2:
                return y
            return jnp.cos(y) + 1.0
        return step
    x = jnp.arange(6.0)
    want, got, before, after = run_both(make, [(k, x) for k in range(10)], n_tail=6)
    close(got, want)
    assert after["iterations_traced"] == 1 and traced(after) == 2, after  # the end: no trace
    assert before["compiles"] == after["compiles"], (before, after)


def test_containers_passed_to_a_unit_are_the_callers_own():
    """A KV cache list the unit appends to grows for the caller (and the next call)."""
    def make():
        def step(x, cache, info):
            cache.append(x * 1.0)
            info["n"] = len(cache)
            return jnp.sum(jnp.stack(cache)), (x, x + 1.0)
        return step
    out = {}
    for mode in ("eager", "terra"):
        step = make() if mode == "eager" else terra_bc.function(make())
        cache, info = [], {}
        res = [step(jnp.ones(2) * k, cache, info) for k in range(5)]
        out[mode] = (res, len(cache), info["n"])
    close(out["terra"][0], out["eager"][0])
    assert out["terra"][1:] == out["eager"][1:] == (5, 5)


# ----------------------------------------------------------------------------- 2. dynamism

def make_scheduled_step():
    def step(k, key, x):
        lr = 0.1 * 0.9 ** k                 # a Python float that changes every call
        noise = jax.random.normal(jax.random.fold_in(key, k), x.shape)  # a step counter
        x = jnp.clip(x + lr * noise, -1.0 + lr, 1.0 - lr)  # named op with changing floats
        return jnp.where(x > lr, x, jnp.full_like(x, lr))
    return step


def test_changing_python_numbers_stop_recompiling_after_one_retrace():
    key = jax.random.PRNGKey(0)
    x = jnp.linspace(-1.0, 1.0, 8)
    want, got, before, after = run_both(make_scheduled_step, [(k, key, x) for k in range(14)],
                                        n_tail=10)
    close(got, want)
    assert traced(after) <= 2, after
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)
    assert after["ops_skipped"] - before["ops_skipped"] >= 10 * 5, (before, after)


def test_a_token_id_used_as_an_index_is_fed_after_one_retrace():
    """Greedy decoding's `table[tok]` with a Python int that changes every step."""
    def make():
        def step(tok, w):
            table = jnp.tanh(w)             # a value of the iteration: indexing it is an op
            return jnp.sum(table[tok] * 2.0) + tok
        return step
    w = jnp.arange(40.0).reshape(10, 4) / 40.0
    toks = [3, 7, 1, 9, 4, 4, 0, 8, 2, 6, 5, 3]
    want, got, before, after = run_both(make, [(t, w) for t in toks], n_tail=8)
    close(got, want)
    assert traced(after) <= 2, after
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)


def test_a_growing_token_list_is_fed_from_the_first_trace():
    """Greedy decoding as nanoGPT's generate writes it: the context is a list, the prompt's
    NumPy ints then one Python int per token (``int(argmax)``), cropped and turned into an
    array (``jnp.asarray(ids[-6:])``).  Each token's position in the window moves at every
    step, and some tokens repeat from one call to the next: fed only where a value was seen
    to differ, the others left the path again at later calls, walking back one window each
    time (one new path each).  An array's elements are data: fed from the start."""
    def make():
        def decode(w, prompt):
            ids = list(prompt)
            for _ in range(4):
                window = jnp.asarray(ids[-6:])
                logits = jnp.sum(jnp.tanh(w[window]), axis=0)
                ids.append(int(jnp.argmax(logits)))
            return ids[-4:]
        return decode
    rng = np.random.default_rng(2)  # (its 4th token repeats in the first calls: 0)
    w = jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)
    prompts = [list(rng.integers(0, 10, size=6).astype(np.int32)) for _ in range(30)]
    want, got, before, after = run_both(make, [(w, p) for p in prompts], n_tail=10)
    assert got == want
    # The elements are fed from the first trace (tracing._record_op): one path.  Fed only
    # once a value had differed, this program made 4 paths, walking back one window a call.
    assert traced(after) == 1 and after["divergences"] == 0, after
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)


def test_numbers_jax_needs_static_stay_static_and_guarded():
    """An axis and a reshape size that change: fed they would fail, so they stay static; each
    value is its own path and the results are right."""
    def make():
        def step(k, x):
            s = jnp.sum(x, axis=k % 2)
            r = x.reshape(2 + 2 * (k % 2), -1)
            return s * 2.0, r + 1.0
        return step
    x = jnp.arange(24.0).reshape(4, 6)
    want, got, before, after = run_both(make, [(k, x) for k in range(12)], n_tail=6)
    for g, w in zip(got, want):
        close(g, w)
    assert traced(after) <= 4, after
    assert traced(before) == traced(after), (before, after)
    assert after["eager_fallbacks"] == 0, after


# ----------------------------------------------------------------------------- 3. shapes

def make_selection_step(log):
    """A shape-stable head, then boolean-mask selection whose size changes every call."""
    def step(w, x, thr):
        h = jnp.tanh(x @ w)
        scores = jnp.max(h, axis=1)
        keep = np.asarray(scores) > thr           # data-dependent: NumPy mask
        sel = h[jnp.asarray(keep)]
        log.append(int(keep.sum()))
        return jnp.sum(jnp.exp(sel) * 0.5), scores
    return step


def test_shapes_changing_every_iteration_are_bounded_and_correct():
    r = np.random.default_rng(0)
    w = jnp.asarray(r.normal(size=(5, 7)), jnp.float32)
    xs = [jnp.asarray(r.normal(size=(40, 5)), jnp.float32) for _ in range(30)]
    ins = [(w, x, 0.6 + 0.01 * k) for k, x in enumerate(xs)]
    terra_bc.config(max_paths=8)
    logs = ([], [])
    want = [make_selection_step(logs[0])(*a) for a in ins]
    terra_bc.reset_stats()
    unit = terra_bc.function(make_selection_step(logs[1]))
    got = []
    for k, a in enumerate(ins):
        if k == 20:
            before = snapshot()
        got.append(unit(*a))
    after = snapshot()
    close(got, want)
    assert logs[0] == logs[1] and len(set(logs[0])) > 10
    assert traced(after) <= 8 and after["compiles"] <= 16, after       # bounded by max_paths
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)
    # past the limit the tail runs eagerly; the shape-stable head stays co-executed
    assert after["eager_fallbacks"] - before["eager_fallbacks"] >= 5, (before, after)
    assert after["ops_skipped"] - before["ops_skipped"] >= 10 * 3, (before, after)


def test_max_paths_limits_variants():
    terra_bc.config(max_paths=2)
    def make():
        def step(k, x):
            if k % 3 == 0:
                return jnp.sin(x) + 1.0
            if k % 3 == 1:
                return jnp.cos(x) * 2.0
            return jnp.tanh(x) - 3.0
        return step
    x = jnp.arange(5.0)
    want, got, _, after = run_both(make, [(k, x) for k in range(12)])
    close(got, want)
    assert traced(after) == 2, after
    assert after["eager_fallbacks"] >= 3, after  # the third path runs eagerly, correctly


def test_config_validates_and_reads_the_environment():
    with pytest.raises(TypeError, match="unknown"):
        terra_bc.config(max_path=3)
    with pytest.raises(ValueError):
        terra_bc.config(max_paths=0)
    with pytest.raises(ValueError):
        terra_bc.config(warmup="2")
    assert terra_bc.config(warmup=1)["warmup"] == 1
    env = dict(os.environ, TERRA_BC_MAX_PATHS="5", TERRA_BC_WARMUP="2", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", "import terra_bc; c = terra_bc.config(); "
                          "print(c['max_paths'], c['warmup'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["5", "2"]


def test_warmup_calls_run_plainly_before_the_first_trace():
    terra_bc.config(warmup=2)
    def make():
        def step(x):
            return jnp.sin(x) * 2.0
        return step
    x = jnp.arange(4.0)
    want, got, _, after = run_both(make, [(x + k,) for k in range(6)])
    close(got, want)
    assert after["iterations_traced"] == 1 and after["iterations_coexecuted"] == 3, after


# ----------------------------------------------------------------------------- 4. loops

def hooked(fn, *args):
    terra_bc.set_loops(True)
    try:
        with terra_bc.enabled():
            return fn(*args)
    finally:
        terra_bc.set_loops(False)


def loop_program(steps, stop_at=None, use_generator=False):
    def batches():
        r = np.random.default_rng(5)
        for _ in range(steps):
            yield jnp.asarray(r.normal(size=(8, 4)), jnp.float32)

    w = jnp.full((4, 3), 0.1)
    source = batches() if use_generator else list(batches())
    losses = []
    for k, x in enumerate(source):
        h = jnp.tanh(x @ w)
        if k % 2:                       # alternating branch inside the turn
            h = h * 2.0 - 0.5
        loss = jnp.mean(h ** 2)
        w = w - 0.05 * jnp.mean(x, axis=0)[:, None] * loss
        losses.append(float(loss))
        if stop_at is not None and k == stop_at:
            return losses, w            # `return` from inside the loop
    return losses, w


@pytest.mark.parametrize("variant", ["list", "generator", "return"])
def test_loop_turns_with_branches_early_return_and_generators(variant):
    args = (20, 13 if variant == "return" else None, variant == "generator")
    want = loop_program(*args)
    for run in range(2):  # the second run of the same loop finds every path recorded
        terra_bc.reset_stats()
        got = hooked(loop_program, *args)
        assert got[0] == pytest.approx(want[0], rel=1e-5)
        close(got[1], want[1])
        s = snapshot()
        assert s["iterations_coexecuted"] >= 10 and traced(s) <= (4 if run == 0 else 0), s


def nested_program(outer, inner):
    w = jnp.ones((3,))
    out = []
    for i in range(outer):
        acc = jnp.zeros((3,))
        for j in range(inner):          # the repeating level: more than inner_turns turns
            acc = acc + jnp.sin(w * (j + 1))
        w = w * 0.9 + acc * 0.01
        out.append(float(jnp.sum(w)))
    return out


def test_nested_loops_pick_the_repeating_level():
    want = nested_program(3, 40)
    terra_bc.reset_stats()
    got = hooked(nested_program, 3, 40)
    assert got == pytest.approx(want, rel=1e-5)
    s = snapshot()
    assert s["iterations_coexecuted"] >= 3 * 30, s


def tree_model(node, w):
    """Recursion over a data structure: a tree-shaped model (TreeLSTM-like)."""
    if isinstance(node, int):
        return jnp.tanh(w[node])
    left, right = node
    return jnp.tanh(tree_model(left, w) + tree_model(right, w)) * 0.5


def test_recursion_over_a_tree_coexecutes_per_tree_shape():
    trees = [((0, 1), 2), (0, (1, (2, 3))), ((0, 1), 2), (0, (1, (2, 3)))] * 4
    w = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)

    def make():
        def step(tree, w):
            return jnp.sum(tree_model(tree, w) ** 2)
        return step
    want, got, before, after = run_both(make, [(t, w) for t in trees], n_tail=8)
    close(got, want)
    assert traced(after) == 2, after
    assert traced(before) == traced(after) and before["compiles"] == after["compiles"], (before, after)


# ----------------------------------------------------------------------------- 5. function units

def auto(fn, *args, loops=False):
    """fn(*args) as under `python -m terra_bc`: hook enabled, function units on."""
    terra_bc.config(functions=True, loops=loops)
    try:
        with terra_bc.enabled():
            return fn(*args)
    finally:
        terra_bc.config(functions=False, loops=False)


def sgd_step(params, x, y, lr):
    def loss_fn(p):
        h = jnp.tanh(x @ p[0][0] + p[0][1])
        return jnp.mean((h @ p[1][0] + p[1][1] - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return [(w - lr * gw, b - lr * gb) for (w, b), (gw, gb) in zip(params, grads)], loss


def while_training(n, fail_at=None):
    p, (x, y) = params(3, (4, 8, 2)), batch(3)
    losses, k = [], 0
    while k < n:                      # no `for` loop: the repeatedly called step is the unit
        if k == fail_at:
            p = sgd_step(p, x, None, 0.1)  # raises inside the unit (None - y)
        p, loss = sgd_step(p, x, y, 0.1 * 0.98 ** k)
        losses.append(float(loss))
        k += 1
    return losses, p


def test_a_function_called_repeatedly_is_a_unit_without_decoration():
    want = while_training(20)
    terra_bc.reset_stats()
    got = auto(while_training, 20)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    close(got[1], want[1])
    s = snapshot()
    assert s["iterations_coexecuted"] >= 16 and traced(s) <= 3, s


def test_an_exception_in_a_function_unit_propagates_and_later_calls_work():
    with pytest.raises(TypeError):
        while_training(8, fail_at=5)
    with pytest.raises(TypeError) as info:
        auto(while_training, 8, 5)
    assert "sgd_step" in "".join(str(f) for f in info.traceback)  # the user's frames
    want = while_training(10)
    got = auto(while_training, 10)
    assert got[0] == pytest.approx(want[0], rel=1e-5)


def tiny(x):
    return jnp.sin(x)


def many_tiny(n):
    return [float(tiny(jnp.float32(k))) for k in range(n)]


def test_functions_with_too_few_ops_are_dropped():
    want = many_tiny(12)
    terra_bc.reset_stats()
    got = auto(many_tiny, 12)
    assert got == pytest.approx(want, rel=1e-6)
    s = snapshot()
    assert s["iterations_traced"] + s["iterations_coexecuted"] <= 1, s  # no unit after one


def epoch(p, x, y, steps):
    for k in range(steps):            # turns often: the loop, not epoch(), is the unit
        p, _ = sgd_step(p, x, y, 0.05)
    return p


def epochs(n, steps):
    p, (x, y) = params(4, (4, 8, 2)), batch(4)
    out = []
    for _ in range(n):
        p = epoch(p, x, y, steps)
        out.append(float(jnp.sum(p[0][0])))
    return out


def test_a_long_loop_inside_a_repeated_function_becomes_the_unit():
    want = epochs(3, 40)
    terra_bc.reset_stats()
    got = auto(epochs, 3, 40, loops=True)
    assert got == pytest.approx(want, rel=1e-5)
    s = snapshot()
    assert s["iterations_coexecuted"] >= 80, s


# ----------------------------------------------------------------------------- 6. regressions

def test_a_number_jax_reads_as_a_shape_is_never_fed_and_baked():
    """jax.image.resize reads its size through operator.index: feeding it would record one
    size and replay it for another (sdpoint gave wrong losses).  Sizes stay static."""
    def make():
        def step(k, x):
            n = 4 if k % 3 else 6           # changes: automatic dynamism tries to feed it
            y = jax.image.resize(x, (n, n), method="linear")
            return jnp.sum(jnp.tanh(y) * 2.0) + jnp.mean(y)
        return step
    x = jnp.arange(25.0).reshape(5, 5) / 25.0
    want, got, before, after = run_both(make, [(k, x) for k in range(12)], n_tail=6)
    close(got, want)
    assert traced(before) == traced(after), (before, after)


def test_vjp_of_a_fresh_closure_each_step_and_a_frozen_unit_stay_correct():
    """faster_rcnn: jax.vjp(lambda p: f(p, batch), params) with a new lambda and batch each
    step co-executes; with max_paths=1 every other path runs eagerly, pullback included."""
    def make(log):
        def step(k, p, x):
            (y, s), pull = jax.vjp(lambda q: (jnp.tanh(x @ q), jnp.sum(x)), p)
            if k % 2:                         # a second path after the forward
                y = y * 2.0
            log.append(float(jnp.sum(y)))
            (g,) = pull((jnp.ones_like(y), jnp.float32(0.0)))
            return p - 0.1 * g
        return step
    r = np.random.default_rng(3)
    p0 = jnp.asarray(r.normal(size=(4, 3)), jnp.float32)
    xs = [jnp.asarray(r.normal(size=(5, 4)), jnp.float32) for _ in range(8)]
    for max_paths in (16, 1):
        terra_bc.config(max_paths=max_paths)
        logs = ([], [])
        pe = pt = p0
        unit = terra_bc.function(make(logs[1]))
        eager = make(logs[0])
        terra_bc.reset_stats()
        for k, x in enumerate(xs):
            pe, pt = eager(k, pe, x), unit(k, pt, x)
        close(pt, pe)
        np.testing.assert_allclose(logs[1], logs[0], rtol=RTOL)
        s = snapshot()
        assert s["iterations_coexecuted"] >= 6 and s["ops_skipped"] > 0, (max_paths, s)
        assert (s["eager_fallbacks"] > 0) == (max_paths == 1), (max_paths, s)
        assert s["paths_recorded"] <= 2, (max_paths, s)  # a fresh lambda is no new path
