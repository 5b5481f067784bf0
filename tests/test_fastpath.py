"""The C fast path of a co-executed op (terra_bc/_fastop.c) against eager JAX.

It checks an op against the recorded ``Event.fast`` spec and skips it, or answers MISS and
the runtime's general path decides.  These tests pin that it is really taken on the common
case (its own counters move), and that every near-miss (an equal static that is another
object, a number of another type, a settled placeholder from an earlier call, another
thread's iteration) still gives eager JAX's values.  Timing lives in benchmarks/coexec.py.
"""
import threading

import numpy as np

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc import _hook

N = 6


def fast_skipped():
    return _hook.fast_counters()[0]


def close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_plain_ops_are_skipped_in_c():
    def step(x, y):
        h = jnp.tanh(x @ y) + 1.0      # a site (tanh), operators (@, +) on placeholders
        return jnp.sum(h * h) - 0.5

    xs = [jnp.full((3, 4), 0.1 * i) for i in range(N)]
    y = jnp.ones((4, 2))
    want = [step(x, y) for x in xs]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x, y) for x in xs]
    close(got, want)
    s = terra_bc.stats()
    # 6 ops per call; the first call traces: the other N - 1 skip all of them in C.
    assert fast_skipped() == 6 * (N - 1) == s["ops_skipped"], s
    assert s["iterations_coexecuted"] == N - 1 and s["divergences"] == 0, s


def test_an_equal_static_made_afresh_matches():
    def step(x, n):
        return jnp.sum(jnp.reshape(jnp.tanh(x), (n, 6 // n)) * 2.0, 0)  # a new tuple each call

    x = jnp.arange(6.0)
    want = [step(x, 2) for _ in range(N)]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x, 2) for _ in range(N)]
    close(got, want)
    s = terra_bc.stats()
    assert s["divergences"] == 0 and s["iterations_coexecuted"] == N - 1, s
    assert fast_skipped() >= 3 * (N - 1), s


def test_an_op_with_a_static_output_is_skipped_in_c():
    """With one device a placeholder's ``x.sharding`` is an op whose output is a static
    value (Flax NNX reads it at every Variable update): skipped in C, the recorded value
    handed back as the general path hands it."""
    def step(x):
        h = jnp.tanh(x) * 2.0
        same = h.sharding == x.sharding     # two ops with a static output each
        return jnp.sum(h) if same else jnp.sum(x)

    xs = [jnp.full((3, 4), 0.1 * i) for i in range(N)]
    want = [step(x) for x in xs]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x) for x in xs]
    close(got, want)
    s = terra_bc.stats()
    # tanh, mul, h.sharding, x.sharding (the argument is a placeholder too), sum: on each
    # of the N - 1 co-executed calls, all in C.
    assert s["divergences"] == 0 and s["iterations_coexecuted"] == N - 1, s
    assert fast_skipped() == 5 * (N - 1) == s["ops_skipped"], s


def test_numbers_of_another_type_take_the_general_path():
    """A float was fed where an int (or a bool) now comes: C says MISS; eager's values."""
    def step(x, s):
        return jnp.tanh(x) * s + s

    x = jnp.arange(4.0)
    scales = [0.5, 1.5, 2, True, 0.25, 3, 0.75]
    want = [step(x, s) for s in scales]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x, s) for s in scales]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
    close(got, want)
    assert terra_bc.stats()["iterations_coexecuted"] >= 3


def test_a_settled_placeholder_is_fed_by_value():
    """A value kept from an earlier call (a settled placeholder) enters a later one as a
    feed of the recorded aval."""
    kept = []

    def step(x):
        y = jnp.tanh(x) * 2.0
        kept.append(y)                  # escapes: a settled placeholder afterwards
        if len(kept) > 1:
            return y + kept[-2] * 0.5   # last call's value, fed
        return y + 0.0 * y

    xs = [jnp.full((3,), 0.1 * i) for i in range(N)]
    want = [step(x) for x in xs]
    kept.clear()
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x) for x in xs]
    close(got, want)
    assert terra_bc.stats()["iterations_coexecuted"] >= N - 3


def test_iterations_in_two_threads_stay_apart():
    """The open iteration is per thread: two units co-executing at once in two threads."""
    def make(k):
        def step(x):
            return jnp.sum(jnp.tanh(x * k) + k)
        return step

    inputs = [jnp.full((8,), 0.01 * i) for i in range(40)]
    want = {k: [make(k)(x) for x in inputs] for k in (1.0, 2.0)}
    got, errors = {}, []

    def run(k):
        try:
            unit = terra_bc.function(make(k))
            got[k] = [unit(x) for x in inputs]
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in want:
        close(got[k], want[k])


def test_keyword_arguments_are_checked_in_c():
    """jnp.sum(x, axis=0, keepdims=True): keyword statics and feeds in call order; another
    order of the same names takes the general path, another value diverges; eager's values."""
    def step(x, w, order, axis):
        h = jnp.tanh(x)
        if order:
            s = jnp.sum(h, axis=axis, keepdims=True)
        else:
            s = jnp.sum(h, keepdims=True, axis=axis)
        return jnp.where(s > 0, s, w) + jnp.mean(h, axis=-1, keepdims=True)

    x = jnp.arange(12.0).reshape(3, 4) / 10
    w = jnp.ones((1, 4))
    calls = [(True, 0)] * 4 + [(False, 0), (True, 0), (True, 0), (True, 1)]
    want = [step(x, w, o, a) for o, a in calls]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x, w, o, a) for o, a in calls[:4]]
    # The 2nd-4th calls skip all 6 ops in C (tanh, sum, >, where, mean, +).
    assert fast_skipped() == 18, terra_bc.stats()
    got += [unit(x, w, o, a) for o, a in calls[4:]]
    close(got, want)


def test_array_methods_with_keywords_are_skipped_in_c():
    def step(x):
        h = jnp.tanh(x)
        return h.mean(axis=-1, keepdims=True) * h.sum(axis=0).max()

    x = jnp.arange(12.0).reshape(3, 4) / 10
    want = [step(x + i) for i in range(N)]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x + i) for i in range(N)]
    close(got, want)
    # 5 ops (tanh, mean, sum, max, *) per call, all skipped in C after the first call.
    assert fast_skipped() == 5 * (N - 1), terra_bc.stats()


def test_a_call_that_fails_to_start_leaves_the_thread_as_it_was(monkeypatch):
    """If taking a call's arguments fails (here: made to fail), the error propagates and no
    iteration stays open in the thread: later calls and plain ops are unaffected."""
    import pytest
    from terra_bc import runtime

    def step(x):
        return jnp.tanh(x) * 2.0 + 1.0

    unit = terra_bc.function(step)
    x = jnp.arange(3.0)
    close(unit(x), step(x))                      # traced
    real_enter = runtime.Iteration.enter

    def failing_enter(self, args, kwargs):
        raise RuntimeError("cannot take these arguments")
    for mode in range(2):                        # co-executed, then a fresh unit (tracing)
        if mode:
            unit = terra_bc.function(step)
        monkeypatch.setattr(runtime.Iteration, "enter", failing_enter)
        with pytest.raises(RuntimeError, match="cannot take"):
            unit(x)
        monkeypatch.setattr(runtime.Iteration, "enter", real_enter)
        assert _hook.set_iteration(None) is None  # none was left open
        assert _hook.set_thread_routing(False) is False
        close(jnp.sum(x) * 2.0, 6.0)
        close(unit(x + 1), step(x + 1))
        close(unit(x + 2), step(x + 2))


def test_numpy_scalar_operands_are_skipped_in_c():
    """A NumPy scalar the step computes and feeds to an op (``x / np.sqrt(d)``) is matched
    in C by its type and bound as it is; one of another type (a Python float where an
    np.float32 was recorded) is a different input, which the general path decides.  An
    identity op handing the fed scalar back (``jnp.asarray`` of a float64 to float32, once
    fed) stays on the general path: Python gets eager's device array from it."""
    scales = np.linspace(1.0, 3.5, N + 2).astype(np.float32)
    calls = [0]

    def step(x, as_float=False):
        k = calls[0]
        calls[0] += 1
        s = float(scales[k]) if as_float else scales[k]    # np.float32
        t = np.sqrt(np.float64(2.0 + k))                    # np.float64
        h = jnp.tanh(x) / s
        h = h * t + jnp.asarray(s)                          # asarray: the identity too
        back = jnp.asarray(t, jnp.float32)                  # the identity on the fed value
        return jnp.sum(h * h), back

    x = jnp.linspace(0.0, 1.0, 12).reshape(3, 4)
    want = [step(x) for _ in range(N)] + [step(x, True)]
    calls[0] = 0
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x) for _ in range(N)]
    s = terra_bc.stats()
    in_c = fast_skipped()
    got.append(unit(x, True))
    close(got, want)
    for _, back in got:
        assert isinstance(back, jax.Array) and back.dtype == jnp.float32, type(back)
    assert s["divergences"] == 0 and s["iterations_coexecuted"] == N - 1, s
    # tanh, div, mul, add, mul, sum in C; the two asarray (identities) on the general path.
    assert in_c == 6 * (N - 1), (in_c, s)
    assert s["ops_skipped"] == 8 * (N - 1), s
    assert fast_skipped() < in_c + 6, "a float where np.float32 was recorded matched in C"


def test_static_tuples_and_none_are_checked_in_c():
    """An op whose argument is a plain tuple of static values (an axis tuple, an index with
    slices, a shape, nested pad widths) or None is skipped in C: the tuple is compared
    element by element, types included, as the general path compares its leaves.  A tuple
    that differs in a value, in a type (an np.int64 where an int was recorded) or in its
    nesting, and None where a value was recorded, take the general path (a divergence),
    with eager's values."""
    def step(x, shape=(2, 6), col=1, axis=None, pad=((1, 0), (0, 2))):
        h = jnp.tanh(x)[:, col]                   # an index tuple: (slice(None), col)
        s = jnp.sum(jnp.reshape(x, shape), axis=(0, 1))
        m = jnp.mean(jnp.pad(x, pad), axis=axis)  # nested tuples; None
        return jnp.sum(h) + s + m

    x = jnp.linspace(0.0, 1.0, 12).reshape(3, 4)
    variants = [{}, {"shape": (3, 4)}, {"col": np.int64(1)}, {"axis": 0},
                {"pad": (1, 0)}, {"pad": ((1, 0), (0, 3))}, {"col": -1}]
    want = [step(x) for _ in range(N)] + [step(x, **v) for v in variants[1:]]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x) for _ in range(N)]
    s = terra_bc.stats()
    in_c = fast_skipped()
    # tanh, getitem, reshape, sum, pad, mean, sum, add, add: all in C once traced.
    assert s["divergences"] == 0 and s["iterations_coexecuted"] == N - 1, s
    assert in_c == s["ops_skipped"] == 9 * (N - 1), (in_c, s)
    for v in variants[1:]:
        got.append(unit(x, **v))
    close(got, want)
    for g, w in zip(got[N:], want[N:]):
        assert g.shape == w.shape, (g.shape, w.shape)
    # each variant leaves the path, none matched in C
    assert terra_bc.stats()["divergences"] == len(variants) - 1, terra_bc.stats()
