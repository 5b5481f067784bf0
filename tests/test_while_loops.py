"""While-loop units: a `while` loop whose turns call DL ops co-executes turn by turn, like a
`for` loop, and every way of leaving it (condition false, break, continue to the condition,
return, an exception caught in the frame or leaving it) ends the turn there, so the code
after the loop never runs inside the loop's last iteration.  Each case runs eagerly first."""
import inspect

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc import _hook
from terra_bc.rewrite import rewrite

from conftest import on_and_off

RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)


def recorded_lines():
    """The source lines of every event the units have recorded."""
    from terra_bc.runtime.units import all_units
    return {ev.where for unit in list(all_units) for path in unit.paths for ev in path.events}


def line_of(fn, text):
    """`file:line` of the first line of fn's source containing text."""
    lines, first = inspect.getsourcelines(fn)
    k = next(k for k, line in enumerate(lines) if text in line)
    return f"{fn.__code__.co_filename}:{first + k}"


def assert_close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


def sgd_while(steps, log_every=5):
    """`while step < n:` with a logged loss and a DL op after the loop."""
    w = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    x = jnp.arange(4.0) / 4
    step, logged = 0, []
    while step < steps:
        y = jnp.tanh(w @ x)
        loss = jnp.sum(y * y)
        w = w - 0.05 * jnp.outer(y * (1 - y * y), x)
        if step % log_every == 0:
            logged.append(float(loss))
        step += 1
    after = jnp.max(jnp.abs(w)) * 2.0  # after the loop: not part of the last turn
    return logged, float(after), w


def test_while_loop_coexecutes_turn_by_turn():
    want, got = on_and_off(sgd_while, 30)
    assert_close(got, want)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 25, s
    assert s["ops_skipped"] > 0 and s["eager_fallbacks"] == 0, s


def test_code_after_the_loop_is_not_in_the_last_turn():
    want, got = on_and_off(sgd_while, 20, 1)
    assert_close(got, want)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 15, s
    lines = recorded_lines()
    assert line_of(sgd_while, "w = w - 0.05") in lines          # the turns were recorded
    assert line_of(sgd_while, "after the loop") not in lines    # what follows them was not


class Env:
    """A deterministic stand-in for a gym environment: episode k ends after lengths[k % n]
    steps (one length: every episode as long)."""

    def __init__(self, lengths):
        self.lengths = lengths if isinstance(lengths, list) else [lengths]
        self.episode, self.length, self.t = -1, 0, 0

    def reset(self):
        self.episode += 1
        self.length = self.lengths[self.episode % len(self.lengths)]
        self.t = 0
        return np.full(4, 0.1, np.float32)

    def step(self, action):
        self.t += 1
        obs = np.sin(np.arange(4, dtype=np.float32) * self.t + action).astype(np.float32)
        return obs, float(action) - 0.5, self.t >= self.length


def dqn_like(episodes, length, batch=8):
    """`while not done:` over an environment, a NumPy replay buffer, acting with
    int(jnp.argmax(...)) and an update only once the buffer holds a batch."""
    env, rng = Env(length), np.random.default_rng(0)
    w = jnp.linspace(-0.5, 0.5, 8).reshape(4, 2)
    buffer, returns, losses = [], [], []
    for _ in range(episodes):
        obs, done, total = env.reset(), False, 0.0
        while not done:
            action = int(jnp.argmax(jnp.asarray(obs) @ w))
            nxt, reward, done = env.step(action)
            buffer.append((obs, action, reward))
            total += reward
            obs = nxt
            if len(buffer) >= batch:
                idx = rng.choice(len(buffer), batch, replace=False)
                o = jnp.asarray(np.stack([buffer[i][0] for i in idx]))
                a = np.array([buffer[i][1] for i in idx])
                r = jnp.asarray(np.array([buffer[i][2] for i in idx], np.float32))
                q = (o @ w)[jnp.arange(batch), a]
                loss = jnp.mean((q - r) ** 2)
                g = jax.grad(lambda w: jnp.mean(((o @ w)[jnp.arange(batch), a] - r) ** 2))(w)
                w = w - 0.1 * g
                losses.append(float(loss))
        returns.append(total)
    return returns, losses, w


@pytest.mark.parametrize("lengths", [10, [9, 12, 7, 11]], ids=["short", "varying"])
def test_short_episodes_keep_the_while_loop_as_the_unit(lengths):
    """Episodes shorter than settings["inner_turns"]: the episode loop, already a unit when
    the loop around it turns again, stays the unit (the outer loop would record a whole
    episode per iteration, a new path whenever the episode length changes)."""
    want, got = on_and_off(dqn_like, 8, lengths)
    assert_close(got, want)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 50 and s["eager_fallbacks"] == 0, s
    assert s["iterations_traced"] <= 6, s


def test_dqn_like_while_loop_forms_a_unit():
    # Episodes longer than settings["inner_turns"]: the `while` loop is the repeating level.
    want, got = on_and_off(dqn_like, 3, 25)
    assert_close(got, want)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 30 and s["ops_skipped"] > 0, s
    assert s["eager_fallbacks"] == 0, s


def leave_early(n, how):
    """Leave a `while True:` loop by break, return or an exception caught outside it."""
    w, k, seen = jnp.ones(3), 0, []
    try:
        while True:
            w = jnp.cos(w) + 0.1 * k
            seen.append(k)
            k += 1
            if k == n:
                if how == "break":
                    break
                if how == "return":
                    return float(jnp.sum(w)), seen
                raise KeyError(k)
    except KeyError:
        seen.append("caught")
    w = jnp.exp(-w)  # after the loop
    return float(jnp.sum(w)), seen


@pytest.mark.parametrize("how", ["break", "return", "raise"])
def test_leaving_a_while_loop_ends_the_turn(how):
    want, got = on_and_off(lambda: [leave_early(12, how) for _ in range(2)])
    for (gv, gs), (wv, ws) in zip(got, want):
        assert gs == ws
        np.testing.assert_allclose(gv, wv, rtol=RTOL)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 12, s
    lines = recorded_lines()
    assert line_of(leave_early, "jnp.cos(w)") in lines
    assert line_of(leave_early, "after the loop") not in lines


def raise_out_of_loop(n):
    w, k = jnp.ones(3), 0
    while k < 100:
        w = jnp.sin(w) * 1.5
        k += 1
        if k == n:
            raise ValueError(f"stop at {k}: {float(jnp.sum(w)):.6f}")
    return w


def test_exception_leaving_the_frame_ends_the_turn_and_later_loops_work():
    with pytest.raises(ValueError) as eager:
        raise_out_of_loop(9)
    with terra_bc.enabled():
        with pytest.raises(ValueError) as got:
            raise_out_of_loop(9)
        later = sgd_while(12)
    assert str(got.value) == str(eager.value)
    assert_close(later, sgd_while(12))


def with_continue(n):
    w, k, skipped = jnp.ones(3), 0, 0
    while k < n:
        k += 1
        if k % 4 == 0:
            skipped += 1
            continue
        w = jnp.tanh(w * 1.1) + 0.01
    return float(jnp.sum(w)), skipped


def test_continue_goes_back_to_the_condition():
    want, got = on_and_off(with_continue, 30)
    assert got[1] == want[1]
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    assert terra_bc.stats()["iterations_coexecuted"] > 0


def test_plain_python_while_loops_are_left_alone():
    from terra_bc.runtime import discovery

    def count(n):
        k, total = 0, 0
        while k < n:
            total += abs(k)  # a call, but no DL op: no turn is reported to the runtime
            k += 1
        return total

    plain, got = on_and_off(count, 1000)
    assert plain == got == sum(range(1000))
    s = terra_bc.stats()
    assert s["iterations_traced"] == 0 and s["iterations_coexecuted"] == 0, s
    ran = _hook.cached_decision(count.__code__)
    heads = [c for c in ran.co_consts if isinstance(c, _hook.LoopHead)]
    assert len(heads) == 1 and heads[0] not in discovery._loop_units


def warm_up_then_train(steps, learning_starts, kind):
    """Turns that act at random in NumPy until `learning_starts`, then call JAX: the loop
    becomes a unit once its turns call JAX (CleanRL's DQN loop is written so)."""
    w, rng, losses = jnp.full((4, 2), 0.1), np.random.default_rng(0), []

    def turn(step):
        nonlocal w
        if step < learning_starts:
            rng.random()  # a random action, no DL op
            return
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(jnp.ones((3, 4)) * step @ w) ** 2))(w)
        w = w - 0.01 * g
        losses.append(float(jnp.sum(w)))

    if kind == "for":
        for step in range(steps):
            turn(step)
    else:
        step = 0
        while step < steps:
            turn(step)
            step += 1
    return losses, w


@pytest.mark.parametrize("kind", ["for", "while"])
def test_a_loop_quiet_at_first_becomes_a_unit_once_it_calls_jax(kind):
    want, got = on_and_off(warm_up_then_train, 40, 10, kind)
    assert_close(got, want)
    s = terra_bc.stats()
    assert s["iterations_coexecuted"] >= 20 and s["eager_fallbacks"] == 0, s


def test_rewriter_marks_heads_and_exits():
    def shapes(n):
        k = 0
        while k < n:      # head after the condition, exit where the condition fails
            k += abs(1)
        while True:       # head at the body, exit at the break's target
            k -= abs(1)
            if k < 3:
                break
        return k

    out = rewrite(shapes.__code__)
    heads = [s for s in out.sites if isinstance(s, _hook.LoopHead)]
    assert len(heads) == 2
    consts = [c for c in out.code.co_consts if isinstance(c, _hook.LoopExit)]
    assert {id(c.head) for c in consts} == {id(h) for h in heads}
    assert all(c.raised == 0 for c in consts)
    fn = type(shapes)(out.code, shapes.__globals__)
    assert [fn(n) for n in range(6)] == [shapes(n) for n in range(6)]


def test_loop_marks_are_off_in_library_code():
    def lib(n):
        while n:
            n -= abs(1)
        return n

    assert any(isinstance(s, _hook.LoopHead) for s in rewrite(lib.__code__).sites)
    out = rewrite(lib.__code__, loops=False)
    assert len(out.sites) == 1 and isinstance(out.sites[0], _hook.Site)
    assert not any(isinstance(c, (_hook.LoopHead, _hook.LoopExit)) for c in out.code.co_consts)
