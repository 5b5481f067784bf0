"""Loop units (opt-in): a training loop written inline co-executes turn by turn, and every
way of leaving a loop closes its iteration.  Each case runs the same code eagerly first."""
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc

RTOL, ATOL = 1e-5, 1e-6


pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)


def hooked(fn, *args):
    with terra_bc.enabled():
        return fn(*args)


def init(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return [(jax.random.normal(k1, (8, 16)) / 3.0, jnp.zeros(16)),
            (jax.random.normal(k2, (16, 1)) / 4.0, jnp.zeros(1))]


def train(steps, stop_at=None, fail_at=None, log=None):
    """An imperative training loop: NumPy dropout mask inside the loss, float(loss) logged."""
    data = np.random.default_rng(1)
    x = jnp.asarray(data.normal(size=(32, 8)), jnp.float32)
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    masks = np.random.default_rng(2)

    def loss_fn(params, x, y):
        (w1, b1), (w2, b2) = params
        h = jnp.tanh(x @ w1 + b1)
        h = h * jnp.asarray(masks.random(h.shape) > 0.2) / 0.8
        return jnp.mean((h @ w2 + b2 - y) ** 2)

    params, losses = init(), []
    for step in range(steps):
        if fail_at is not None and step == fail_at:
            raise ValueError(f"stop at {step}")
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        params = [(w - 0.1 * gw, b - 0.1 * gb) for (w, b), (gw, gb) in zip(params, grads)]
        losses.append(float(loss))
        if log is not None:
            log.append(step)
        if stop_at is not None and step == stop_at:
            break
    return losses, float(jnp.sum(params[0][0])), params


def test_inline_training_loop_coexecutes_turn_by_turn():
    want = train(12)
    got = hooked(train, 12)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], rtol=RTOL, atol=ATOL)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 9, s   # turn 1 eager, turn 2 traced, then co-executed
    # Turn 3 leaves turn 2's path at `w - 0.1 * gw` (turn 2's w came from the eager turn 1:
    # ArrayImpl - placeholder is a reflected subtraction; from turn 3 on it is a placeholder's
    # own): one segment computes the traced turn 2, one the new path turn 3 records (its
    # prefix with it), which later turns launch too.
    assert s["iterations_traced"] <= 2 and s["compiles"] <= 2, s
    assert s["ops_skipped"] > 0 and s["fetches"] >= 9, s


def test_break_closes_the_iteration_and_values_stay_usable():
    want = train(12, stop_at=7)
    got = hooked(train, 12, 7)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], rtol=RTOL, atol=ATOL)
    # the parameters left by the last turn behave as arrays outside any unit
    np.testing.assert_allclose(np.asarray(got[2][1][0]), np.asarray(want[2][1][0]), rtol=RTOL, atol=ATOL)
    assert len(got[0]) == 8


def test_exception_in_a_turn_propagates_and_later_loops_work():
    log_e, log_t = [], []
    with pytest.raises(ValueError, match="stop at 6"):
        train(12, fail_at=6, log=log_e)
    with pytest.raises(ValueError, match="stop at 6"):
        hooked(train, 12, None, 6, log_t)
    assert log_t == log_e == list(range(6))
    want = train(5)
    got = hooked(train, 5)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)


def test_short_inner_loop_stays_inside_the_turn():
    def run(steps):
        params, out = init(), []
        x = jnp.ones((4, 8))
        for step in range(steps):
            h = x
            for w, b in params[:-1]:          # a loop over layers: part of each turn
                h = jnp.tanh(h @ w + b)
            out.append(float(jnp.sum(h @ params[-1][0])))
            x = x * 0.9
        return out
    want = run(8)
    got = hooked(run, 8)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert terra_bc.stats()["iterations_coexecuted"] >= 5


def test_short_inner_loop_in_the_first_turn_is_not_the_unit():
    """A loop over a tuple of heads (2 turns) inside the first turn of the training loop
    stays part of it: the training loop is the unit from its first turn (one trace)."""
    def run(steps):
        heads = tuple((jnp.eye(8) * (0.5 + k), jnp.full(8, 0.1 * k)) for k in range(2))
        out, x = [], jnp.ones((4, 8))
        for step in range(steps):
            h = x
            for w, b in heads:                # short: a tuple says it turns twice
                h = jnp.tanh(h @ w + b)
            out.append(float(jnp.sum(h)))
            x = x * 0.9
        return out
    from terra_bc.runtime.units import all_units
    want = run(8)
    terra_bc.reset()
    got = hooked(run, 8)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    s = terra_bc.stats()
    assert s["iterations_traced"] == 1 and s["iterations_coexecuted"] == 7, s
    inner = f"{__file__}:{run.__code__.co_firstlineno + 5}"  # (the `for w, b` line)
    assert not any(u.name.endswith(inner) and u.paths for u in list(all_units))


def test_plain_python_loops_are_left_alone():
    def count(n):
        total = 0
        for i in range(n):
            total += i * i
        return total
    assert hooked(count, 1000) == count(1000)
    s = terra_bc.stats()
    assert s["iterations_traced"] == s["iterations_coexecuted"] == 0


def test_loops_on_by_default_in_the_cli(tmp_path):
    import subprocess, sys, json
    script = tmp_path / "loop.py"
    script.write_text("import jax.numpy as jnp\nx = jnp.ones(3)\nfor i in range(6):\n"
                      "    x = jnp.sin(x) + 1.0\nprint(float(x.sum()))\n")
    outs = {}
    for flags in (["--no-loops"], []):
        r = subprocess.run([sys.executable, "-m", "terra_bc", "--stats", *flags, str(script)],
                           capture_output=True, text=True, timeout=120)
        stats = json.loads(r.stderr.strip().splitlines()[-1].split(": ", 1)[1])
        outs[not flags] = (r.stdout, stats["iterations_coexecuted"])
    assert outs[False][0] == outs[True][0]
    assert outs[False][1] == 0 and outs[True][1] >= 3


def fetch_after_host_work(steps, branch_every=3):
    """The last op before float(loss) launches the segment the fetch needs (early launch);
    every few turns Python instead runs one more op before reading (another path)."""
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    x = jnp.arange(4.0) / 4
    rng = np.random.default_rng(3)
    out = []
    for step in range(steps):
        y = jnp.tanh(w @ x)
        w = w - 0.1 * jnp.outer(y, x)
        loss = jnp.sum(y * y)
        host = float(np.sort(rng.standard_normal(100))[50])  # host work before the read
        time.sleep(0.002)  # (worth overlapping: EARLY_LAUNCH_GAP_SECONDS)
        if step % branch_every == 2:
            loss = loss * 2.0
        out.append(float(loss) + host)
    return out, w


@pytest.mark.parametrize("early", [True, False])
def test_early_launch_gives_the_values_of_a_launch_at_the_fetch(early):
    want = fetch_after_host_work(12)
    terra_bc.reset()
    terra_bc.config(early_launch=early)
    try:
        got = hooked(fetch_after_host_work, 12)
    finally:
        terra_bc.config(early_launch=True)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], rtol=RTOL, atol=ATOL)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 9, s
    assert (s["early_launches"] > 0) == early, s
    assert s["early_launches_dropped"] == 0, s  # (host work before every read: kept)


def test_operators_on_the_array_a_loop_starts_from_are_ops_of_its_turns():
    """``ema = 0.9 * ema + 0.1 * x``: in the first turn ``ema`` is the array made before the
    loop, later a past turn's value.  Both turns record the same events (one path), the
    operators are skipped like other ops (none runs eagerly), and the values are eager's;
    the same operators outside any loop stay JAX's own."""
    def run():
        ema, mom, out = jnp.zeros(8), jnp.ones(8), []
        rng = np.random.default_rng(5)
        for step in range(12):
            x = jnp.asarray(rng.normal(size=8), jnp.float32)
            ema = 0.9 * ema + 0.1 * x
            mom = mom * 0.5 - ema / 2.0
            out.append(float(jnp.sum(ema * mom)))
        return out, ema, mom

    want = run()
    terra_bc.reset()
    got = hooked(run)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 10 and stats["eager_fallbacks"] == 0, stats
    assert stats["paths_recorded"] == 1 and stats["divergences"] == 0, stats
    # (asarray, 0.9 * ema, 0.1 * x, +, mom * 0.5, ema / 2.0, -, ema * mom, sum: all skipped)
    assert stats["ops_skipped"] >= 9 * stats["iterations_coexecuted"], stats
    plain = jnp.ones(3) * 2.0 + jnp.ones(3)
    assert type(plain) is type(jnp.ones(3)) and float(jnp.sum(plain)) == 9.0


def test_indexing_and_numpy_calls_on_arrays_from_outside_keep_one_path():
    """JAX work on arrays from outside the loop that no call site routes — ``X[:, None]``
    (indexing an array is JAX's own operator), ``np.sum(x)`` (NumPy calls the array's
    method) — gives a plain array in the traced turn as in co-executed ones: one path, no
    divergence, and the program never holds one of terra_bc's recording tracers.  (It made
    the operators that follow ops of co-executed turns only: every such loop left its path
    at its second turn and was traced again.)"""
    def run():
        X = jnp.arange(5.0)
        ls, out, kinds = jnp.array(0.5), [], []
        for step in range(10):
            d2 = (X[:, None] - X[None]) ** 2
            total = np.sum(X * 2.0)
            kinds.append(type(np.sum(X)).__name__)
            K = jnp.exp(-0.5 * d2 / ls ** 2)
            ls = ls + 0.01 * K.mean() + 0.001 * total
            out.append(float(ls))
        return out, kinds

    want = run()
    terra_bc.reset()
    got = hooked(run)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    assert got[1] == want[1], got[1]  # (jax.Array's own type, in every turn)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 8 and stats["eager_fallbacks"] == 0, stats
    # (the first turn starts from the array made before the loop, later turns from a
    # turn's value: that one change of ``ls`` is the only divergence there is)
    assert stats["divergences"] <= 1 and stats["paths_recorded"] <= 2, stats


def test_a_table_from_outside_indexed_by_this_turns_value_is_an_op():
    """``E[tok]`` and ``E[:, idx]``: an array made before the loop indexed by a value of
    the turn (an embedding lookup by the token just chosen) is an op of the turn, as
    indexing a placeholder is; JAX's own indexing read the placeholder's value, and the
    loop ran eagerly ("JAX code outside the recorded ops used a value")."""
    def run():
        E = jax.random.normal(jax.random.PRNGKey(3), (10, 4))
        tok, h, out = jnp.array(1), jnp.zeros(4), []
        for step in range(10):
            row = E[tok]
            col = E[:, jnp.argmax(h) % 4]
            pair = E[(tok, jnp.array(2))]
            h = jnp.tanh(h + row + 0.1 * col[:4] + pair)
            tok = jnp.argmax(E @ h) % 10
            out.append(float(h.sum()))
        return out, int(tok)

    want = run()
    terra_bc.reset()
    got = hooked(run)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    assert got[1] == want[1]
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 8 and stats["eager_fallbacks"] == 0, stats


def test_operators_called_by_jax_code_on_arrays_and_placeholders():
    """``jax.tree.map(operator.sub, arrays, values)``: JAX's code calls the operator; with a
    value of the turn among its operands it is an op of the turn, on constants alone it is
    JAX's work on constants (and ``E[jnp.array(2)]``: JAX's indexing compares the index
    with 0 on its own)."""
    import operator

    def run():
        a = {"x": jnp.ones(3), "y": jnp.zeros(2)}
        p = {"x": jnp.ones(3), "y": jnp.ones(2)}
        E = jnp.arange(12.0).reshape(4, 3)
        out = []
        for step in range(8):
            p = jax.tree.map(lambda t: jnp.tanh(t) * 1.5, p)
            d = jax.tree.map(operator.sub, a, p)
            e = jax.tree.map(operator.mul, a, a)
            p = jax.tree.map(operator.add, p, d)
            r = E[jnp.array(2)] + E[1]
            out.append((float(p["x"].sum()), float(e["x"].sum()), float(r.sum())))
        return out

    want = run()
    terra_bc.reset()
    got = hooked(run)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6 and stats["eager_fallbacks"] == 0, stats
    assert stats["divergences"] <= 1, stats


def test_np_array_of_a_value_is_a_writable_copy_as_of_a_jax_array():
    def run():
        v = jnp.zeros(3)
        for step in range(4):
            v = v + 1.0
        return v

    want, got = run(), hooked(run)
    a, b = np.array(want), np.array(got)
    assert a.flags.writeable and b.flags.writeable
    b[0] = 7.0  # (a copy: the value itself is unchanged)
    assert float(got[0]) == 4.0 and np.asarray(got).tolist() == np.asarray(want).tolist()
