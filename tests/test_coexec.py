"""Co-execution engine, end to end: ``@terra_bc.function`` against plain eager JAX.

Every semantic test follows one pattern:

1. a factory ``make(...)`` builds the step function (so each run gets a *fresh* function
   object; the decorator is only ever applied to its own copy and the eager reference is
   unaffected);
2. the step runs N times eagerly (plain Python + JAX), recording results and side effects
   (appended lists, printed text, NumPy draws from an identically seeded
   ``np.random.default_rng``);
3. ``terra_bc.reset_stats()``; ``terra_bc.function(make(...))`` runs the same N iterations;
4. values, the exact sequence of side effects and ``terra_bc.stats()`` are compared.
   The stats prove co-execution really happened (iterations co-executed, DL-op sites
   skipped by Python, compiles bounded) or, for programs that must take another path,
   that a divergence was counted *and* the result is still right.

Tolerance: ``rtol=1e-5, atol=1e-6`` (float32).  Compiled segments may fuse and reassociate
float sums, so values are close to eager, not bit-identical.  Where a test compares printed
text, the printed numbers are built from small integers (exact in float32 whatever the
summation order), so the text must be identical.

Timing is never asserted here (see benchmarks/coexec.py).
"""
import gc
import pickle
import traceback

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc

RTOL, ATOL = 1e-5, 1e-6
N = 6  # iterations per test unless said otherwise

STAT_KEYS = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
             "compiles", "segments_launched", "fetches", "feeds", "ops_skipped",
             "ops_traced", "ops_eager")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def fresh_stats():
    terra_bc.reset_stats()
    yield
    terra_bc.reset_stats()


class Stats(dict):
    """terra_bc.stats(), shown in assertion messages with the co-execution keys only."""

    def __repr__(self):
        return "stats(" + ", ".join(f"{k}={self[k]}" for k in STAT_KEYS if k in self) + ")"


def stats():
    s = terra_bc.stats()
    missing = [k for k in STAT_KEYS if k not in s]
    assert not missing, f"terra_bc.stats() lacks {missing}"
    return Stats(s)


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def to_np(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_close(got, want, what=""):
    got_l, want_l = leaves(got), leaves(want)
    assert len(got_l) == len(want_l), f"{what}: {len(got_l)} leaves vs {len(want_l)}"
    for i, (g, w) in enumerate(zip(got_l, want_l)):
        g, w = to_np(g), to_np(w)
        assert g.shape == w.shape, f"{what} leaf {i}: shape {g.shape} vs {w.shape}"
        assert g.dtype == w.dtype, f"{what} leaf {i}: dtype {g.dtype} vs {w.dtype}"
        if g.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w, err_msg=f"{what} leaf {i}")
        else:
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{what} leaf {i}")


def assert_coexecuted(s, n=N, min_coexec=3, max_compiles=3, max_traced=3):
    """The stats of a unit that should settle into co-execution after a few iterations."""
    assert s["iterations_traced"] + s["iterations_coexecuted"] >= n, s
    assert s["iterations_coexecuted"] >= min_coexec, s
    assert s["iterations_traced"] <= max_traced, s
    assert s["ops_skipped"] > 0, s
    assert s["compiles"] <= max_compiles, s
    assert s["segments_launched"] >= 1, s


def eager_and_terra(make_step, run):
    """{"eager"|"terra": (run(step), log)}: a fresh step from make_step(log) run eagerly, then
    as a terra_bc.function (stats reset just before)."""
    out = {}
    for mode in ("eager", "terra"):
        log = []
        step = make_step(log)
        if mode == "terra":
            terra_bc.reset_stats()
            step = terra_bc.function(step)
        out[mode] = (run(step), log)
    return out


def chain(step, state, xs):
    """state = step(state, x) for each x; the last state."""
    for x in xs:
        state = step(state, x)
    return state


def randn(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def mlp_params(seed, sizes):
    r = np.random.default_rng(seed)
    return [(jnp.asarray((r.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)),
             jnp.asarray((0.1 * r.standard_normal(n)).astype(np.float32)))
            for m, n in zip(sizes[:-1], sizes[1:])]


def data(seed, n=N, batch=8, din=4, dout=2):
    r = np.random.default_rng(seed)
    return [(randn(r, batch, din), randn(r, batch, dout)) for _ in range(n)]


SIZES = (4, 16, 16, 2)


# ----------------------------------------------------------------------------- 1. pure

def make_mlp_loss():
    def step(params, x, y):
        h = x
        for W, b in params[:-1]:
            h = jnp.tanh(h @ W + b)
        W, b = params[-1]
        out = h @ W + b
        return jnp.mean((out - y) ** 2)
    return step


def test_pure_mlp_forward_loss():
    params, batches = mlp_params(0, SIZES), data(1)
    eager = make_mlp_loss()
    want = [eager(params, x, y) for x, y in batches]

    terra_bc.reset_stats()
    unit = terra_bc.function(make_mlp_loss())
    got = [unit(params, x, y) for x, y in batches]

    assert_close(got, want, "loss")
    s = stats()
    assert_coexecuted(s)
    assert s["divergences"] == 0, s
    assert s["eager_fallbacks"] == 0, s


# ----------------------------------------------------------------------------- 2. training

def mlp_outputs(params, x):
    h = x
    for W, b in params[:-1]:
        h = jnp.tanh(h @ W + b)
    W, b = params[-1]
    return h @ W + b


def make_train_step(lr=0.1):
    def loss_fn(params, x, y):
        return jnp.mean((mlp_outputs(params, x) - y) ** 2)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        new = [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)]
        return new, loss
    return step


def run_chain(step, params, batches):
    losses, trail = [], []
    for x, y in batches:
        params, loss = step(params, x, y)
        losses.append(loss)
        trail.append(params)
    return params, losses, trail


def test_training_step_value_and_grad_chained():
    params0, batches = mlp_params(2, SIZES), data(3)
    want_p, want_l, want_trail = run_chain(make_train_step(), params0, batches)

    terra_bc.reset_stats()
    got_p, got_l, got_trail = run_chain(terra_bc.function(make_train_step()), params0, batches)

    for i in range(N):
        assert_close(got_l[i], want_l[i], f"loss {i}")
        assert_close(got_trail[i], want_trail[i], f"params after step {i}")
    assert isinstance(got_p, list) and all(isinstance(t, tuple) for t in got_p)
    assert_coexecuted(stats())
    assert stats()["divergences"] == 0


def test_training_step_loss_fn_defined_inside_step():
    """The common pattern: a fresh closure ``loss_fn`` each iteration, differentiated."""
    def make(lr=0.1):
        def step(params, x, y):
            def loss_fn(p):
                h = x
                for W, b in p[:-1]:
                    h = jnp.tanh(h @ W + b)
                return jnp.mean((h @ p[-1][0] + p[-1][1] - y) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            return [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)], loss
        return step

    params0, batches = mlp_params(4, SIZES), data(5)
    _, want_l, want_trail = run_chain(make(), params0, batches)
    terra_bc.reset_stats()
    _, got_l, got_trail = run_chain(terra_bc.function(make()), params0, batches)
    assert_close(got_l, want_l, "losses")
    assert_close(got_trail, want_trail, "params")
    assert_coexecuted(stats())



def test_gradient_function_of_a_fresh_closure_is_not_kept():
    """jax.value_and_grad(loss_fn) made inside the unit is reused while the same loss_fn
    comes back; a closure made afresh each step (over that step's batch) is let go after
    the next iteration, so the unit holds no old batches."""
    import weakref
    made = []

    def step(params, x, y):
        def loss_fn(p):
            return jnp.mean((jnp.tanh(x @ p[0][0] + p[0][1]) @ p[1][0] + p[1][1] - y) ** 2)
        made.append(weakref.ref(loss_fn))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return [(W - 0.1 * dW, b - 0.1 * db) for (W, b), (dW, db) in zip(params, grads)], loss

    params0, batches = mlp_params(6, (4, 16, 2)), data(7)
    _, want_l, _ = run_chain(step, params0, batches)
    made.clear()
    terra_bc.reset_stats()
    unit = terra_bc.function(step)  # kept alive: it is what must not hold the closures
    _, got_l, _ = run_chain(unit, params0, batches)
    gc.collect()
    assert_close(got_l, want_l, "losses")
    assert [r() is None for r in made[:-2]] == [True] * (len(made) - 2)
    assert_coexecuted(stats())


def test_returned_containers_are_the_ones_built():
    """A list or dict the unit returns is the object it built (a caller may hold it), in its
    own key order, with jax.Arrays in it; a tuple of them likewise."""
    kept = []

    def step(x):
        out = {"z": jnp.tanh(x), "a": jnp.sum(x * 2.0)}
        seq = [jnp.exp(x) + 1.0, 3]
        kept.append((out, seq))
        return out, seq

    xs = [jnp.arange(4.0) + i for i in range(N)]
    want = [step(x) for x in xs]
    kept.clear()
    unit = terra_bc.function(step)
    for x, (wd, ws) in zip(xs, want):
        gd, gs = unit(x)
        assert gd is kept[-1][0] and gs is kept[-1][1]
        assert list(gd) == ["z", "a"] and gs[1] == 3
        assert all(type(v) is type(wd["z"]) for v in (gd["z"], gd["a"], gs[0]))
        assert_close((gd, gs), (wd, ws), "results")
    assert_coexecuted(stats())



def test_fed_numbers_keep_their_value_and_sign():
    """Python numbers fed to a segment reach it as device arrays made once per value (jit
    would convert them at every call): equal values of another sign (0.0, -0.0) stay apart."""
    def step(x, s):
        return jnp.tanh(x) / s + 1.0 / (s + 3.0)

    x = jnp.arange(1.0, 5.0)
    scales = [0.5, -0.0, 0.0, -0.0, 1e-30, 0.5, -0.0, 0.0]
    want = [step(x, s) for s in scales]
    terra_bc.reset_stats()
    unit = terra_bc.function(step)
    got = [unit(x, s) for s in scales]
    for s, g, w in zip(scales, got, want):
        assert np.array_equal(np.signbit(np.asarray(g)), np.signbit(np.asarray(w))), s
        assert_close(g, w, f"scale {s}")
    assert_coexecuted(stats(), n=len(scales), min_coexec=5)


def make_aux_step(lr=0.1):
    def loss_fn(params, x, labels):
        logits = mlp_outputs(params, x)
        probs = jax.nn.softmax(logits)  # a custom_jvp rule: its linearization computes it its own way
        return -jnp.mean(jnp.log(probs[jnp.arange(len(labels)), labels])), logits

    def step(params, x, labels):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, labels)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        new = [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)]
        return new, loss, logits, accuracy
    return step


def count_primitive(jaxpr, name):
    """Equations of primitive ``name`` in ``jaxpr``, counted inside nested jaxprs too."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                n += count_primitive(inner, name)
    return n


def test_a_gradients_aux_output_is_computed_by_its_linearized_forward_once(monkeypatch):
    """value_and_grad(..., has_aux=True): the aux (logits kept for a metric) comes from the
    forward JAX linearizes, as eager's does, so the launched segment computes the forward
    once: as many matrix products as jax.jit's step (it computed the forward twice: the
    recorded one for the aux, the linearized one for the gradient).  Values equal eager's."""
    from terra_bc.runtime import compiling
    sizes, rng = (4, 16, 16, 3), np.random.default_rng(5)
    params0 = mlp_params(6, sizes)
    batches = [(randn(rng, 8, 4), jnp.asarray(rng.integers(0, 3, 8).astype(np.int32))) for _ in range(N)]

    def run(step):
        params, out = params0, []
        for x, labels in batches:
            params, loss, logits, acc = step(params, x, labels)
            out.append((params, loss, logits, acc))
        return out
    want = run(make_aux_step())
    launched = []
    run_segment = compiling.run
    monkeypatch.setattr(compiling, "run", lambda it, entry, args, donate=(): (
        launched.append(entry.segment), run_segment(it, entry, args, donate))[1])
    terra_bc.reset_stats()
    got = run(terra_bc.function(make_aux_step()))
    assert_close(got, want, "params, loss, logits, accuracy")
    s = stats()
    assert_coexecuted(s)
    x, labels = batches[0]
    jitted = count_primitive(jax.make_jaxpr(make_aux_step())(params0, x, labels).jaxpr, "dot_general")
    step_segment = max(launched, key=lambda seg: count_primitive(seg.jaxpr.jaxpr, "dot_general"))
    assert count_primitive(step_segment.jaxpr.jaxpr, "dot_general") == jitted, step_segment.jaxpr


def test_a_python_exponent_is_baked_and_fed_once_it_changes(monkeypatch):
    """``x ** 2``: the exponent is baked, so JAX makes it a multiplication (integer_pow), as
    eager and jax.jit do; fed, it was a general power whose derivative selects on x == 0.
    An exponent that changes between iterations is fed from then on (one divergence)."""
    from terra_bc.runtime import compiling

    def make():
        def step(w, x, n):
            loss = lambda w: jnp.mean((x @ w - 1.0) ** 2) + jnp.mean(jnp.abs(w) ** n)
            return jax.value_and_grad(loss)(w)
        return step
    rng = np.random.default_rng(9)
    w, x = randn(rng, 4, 3), randn(rng, 8, 4)
    exponents = [3, 3, 3, 4, 5, 6, 7]
    want = [make()(w, x, n) for n in exponents]
    launched = []
    run_segment = compiling.run
    monkeypatch.setattr(compiling, "run", lambda it, entry, args, donate=(): (
        launched.append(entry.segment), run_segment(it, entry, args, donate))[1])
    terra_bc.reset_stats()
    step = terra_bc.function(make())
    got = [step(w, x, n) for n in exponents]
    assert_close(got, want, "loss, gradient")
    s = stats()
    assert s["iterations_coexecuted"] >= len(exponents) - 3 and s["divergences"] <= 2, s
    last = launched[-1].jaxpr.jaxpr
    assert count_primitive(last, "integer_pow") >= 1, last   # x ** 2, baked
    assert count_primitive(last, "pow") >= 1, last           # ** n, fed once it changed


# ----------------------------------------------------------------------------- 3. dropout

def make_dropout_step(rng, draws, log=None, lr=0.1):
    """A NumPy-drawn dropout mask inside the differentiated function; float(loss) logged."""
    def loss_fn(params, x, y):
        W1, b1 = params[0]
        h = jnp.tanh(x @ W1 + b1)
        draws.append(h.shape)
        mask = rng.random(h.shape) > 0.1            # NumPy, drawn fresh every call
        h = h * mask / 0.9
        W2, b2 = params[1]
        return jnp.mean((h @ W2 + b2 - y) ** 2)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        if log is not None:
            log.append(float(loss))
        new = [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)]
        return new, loss
    return step


def test_numpy_dropout_mask_inside_grad_and_float_logging():
    sizes = (4, 32, 2)
    params0, batches = mlp_params(6, sizes), data(7)

    eager_draws, eager_log = [], []
    _, want_l, want_trail = run_chain(
        make_dropout_step(np.random.default_rng(123), eager_draws, eager_log), params0, batches)

    terra_bc.reset_stats()
    draws, log = [], []
    _, got_l, got_trail = run_chain(
        terra_bc.function(make_dropout_step(np.random.default_rng(123), draws, log)),
        params0, batches)

    for i in range(N):
        assert_close(got_l[i], want_l[i], f"loss {i}")
        assert_close(got_trail[i], want_trail[i], f"params after step {i}")
    # One mask per iteration, drawn in Python in program order, same shapes.
    assert draws == eager_draws == [(8, 32)] * N
    assert len(log) == N and all(type(v) is float for v in log)
    np.testing.assert_allclose(log, eager_log, rtol=RTOL, atol=ATOL)
    s = stats()
    assert_coexecuted(s)
    assert s["feeds"] > 0 and s["fetches"] > 0, s

    # The contrast that motivates terra_bc: jax.jit traces loss_fn once and freezes the
    # mask (one draw, baked in as a constant), so from step 2 on its results are wrong.
    jit_draws = []
    jitted = jax.jit(make_dropout_step(np.random.default_rng(123), jit_draws, log=None))
    _, jit_l, _ = run_chain(jitted, params0, batches)
    assert len(jit_draws) == 1, "jax.jit should have drawn the mask once, at trace time"
    np.testing.assert_allclose(np.asarray(jit_l[0]), np.asarray(want_l[0]), rtol=RTOL, atol=ATOL)
    assert not np.allclose(np.asarray(jit_l), np.asarray(want_l), rtol=RTOL, atol=ATOL), \
        "a frozen mask should change the losses after step 1"


def make_numpy_buffer_step():
    scale = np.ones(4, np.float64)  # one NumPy buffer the step writes into, as a host-side loop does

    def step(x, k):
        scale[:] = k                           # Python writes into the buffer,
        y = x * scale                          # an op reads it (a fed NumPy array),
        scale[:] = -1.0                        # and Python writes it again before any launch
        z = jnp.asarray(scale, jnp.float32)    # the identity on a fed float64 array: Python gets it back
        w = (y + z) / np.float64(2.0)          # a NumPy scalar operand
        m = jnp.where(np.arange(4) % 2 == 0, w, 0.0)  # a NumPy mask
        return m, z
    return step


def test_numpy_values_fed_to_ops_are_read_as_they_were_at_the_op():
    """A NumPy array an op reads is kept as it was at the op (Python may write into it before
    the segment is launched), and a fed array Python gets back (an identity op) is the
    device array eager JAX returns, of the recorded dtype."""
    x = jnp.arange(4.0)
    step = make_numpy_buffer_step()
    want = [step(x, k) for k in range(1, N + 1)]
    terra_bc.reset_stats()
    step = terra_bc.function(make_numpy_buffer_step())
    got = [step(x, k) for k in range(1, N + 1)]
    s = stats()
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"iteration {k}")
        assert isinstance(g[1], jax.Array) and g[1].dtype == jnp.float32, type(g[1])
    assert_coexecuted(s)
    assert s["divergences"] == 0 and s["iterations_coexecuted"] >= N - 1, s


# ----------------------------------------------------------------------------- 4. print

def make_printing_step():
    def step(i, x, w):
        print(f"step {i} begins")
        y = x @ w                       # small integers: exact in float32
        loss = jnp.sum(y * y) / 4.0
        print(float(loss))
        print("loss is", loss)          # print(array) is a fetch too
        print(f"{loss:.2f} | {int(jnp.max(y))}")
        z = loss + jnp.sum(x)
        print("done", float(z))
        return z
    return step


def test_print_float_loss_in_order(capsys):
    r = np.random.default_rng(8)
    ins = [(i, jnp.asarray(r.integers(-3, 4, (4, 3)).astype(np.float32)),
            jnp.asarray(r.integers(-2, 3, (3, 2)).astype(np.float32))) for i in range(N)]
    eager = make_printing_step()
    want = [eager(*a) for a in ins]
    want_out = capsys.readouterr().out

    terra_bc.reset_stats()
    unit = terra_bc.function(make_printing_step())
    got = [unit(*a) for a in ins]
    got_out = capsys.readouterr().out

    assert got_out == want_out
    assert_close(got, want, "z")
    s = stats()
    assert_coexecuted(s)
    assert s["fetches"] >= 4 * s["iterations_coexecuted"], s


# ----------------------------------------------------------------------------- 5. value branch

def make_branchy_step(log, state):
    def step(i, w, x, threshold):
        loss = jnp.mean((x @ w) ** 2)
        if loss > threshold:                    # a case assertion on a fetched value
            log.append((i, "above"))
            out = w - 0.1 * jnp.tanh(w)
        else:
            log.append((i, "below"))
            out = w * 1.01 + jnp.mean(x)
        if loss < state["best"]:                # Python float first, then an array
            state["best"] = loss
            log.append((i, "best"))
        return out, loss
    return step


def test_branch_on_fetched_value_flips():
    r = np.random.default_rng(9)
    w, base = randn(r, 3, 3), randn(r, 5, 3)
    l0 = float(jnp.mean((base @ w) ** 2))
    # loss = scale**2 * l0; threshold l0 -> above, above, above, below, above, below, ...
    scales = [2.0, 1.5, 1.8, 0.5, 1.2, 0.6, 0.4, 2.5]
    ins = [(i, w, base * s, l0) for i, s in enumerate(scales)]

    log_e, state_e = [], {"best": float("inf")}
    eager = make_branchy_step(log_e, state_e)
    want = [eager(*a) for a in ins]

    terra_bc.reset_stats()
    log_t, state_t = [], {"best": float("inf")}
    unit = terra_bc.function(make_branchy_step(log_t, state_t))
    got = [unit(*a) for a in ins]

    assert [k for _, k in log_e if k != "best"] == \
        ["above", "above", "above", "below", "above", "below", "below", "above"]
    assert log_t == log_e
    assert_close(got, want, "outputs")
    assert_close(state_t["best"], state_e["best"], "best")
    s = stats()
    assert s["divergences"] >= 1, s
    assert s["iterations_coexecuted"] >= 1, s


# ----------------------------------------------------------------------------- 6. Python branch

def make_counter_branch_step():
    def step(k, x, w):
        h = jnp.tanh(x @ w)
        if k % 3 == 0:                          # Python state decides the path
            h = h * 2.0 + jnp.sin(h)
            h = h - jnp.mean(h)
        return jnp.sum(h ** 2), h
    return step


def test_branch_on_python_state():
    r = np.random.default_rng(10)
    n = 9
    ins = [(k, randn(r, 4, 3), randn(r, 3, 3)) for k in range(n)]
    eager = make_counter_branch_step()
    want = [eager(*a) for a in ins]

    terra_bc.reset_stats()
    unit = terra_bc.function(make_counter_branch_step())
    got = [unit(*a) for a in ins]

    assert_close(got, want, "outputs")
    s = stats()
    assert s["iterations_coexecuted"] >= 3, s
    assert s["ops_skipped"] > 0, s


@pytest.mark.parametrize("decided_by", ["python_state", "fetched_value"])
def test_paths_are_merged_into_the_tracegraph(decided_by):
    """DESIGN.md, divergence: the new path is merged into the TraceGraph so the next
    iteration on that path co-executes too.  Two paths taken in turn for 12 iterations must
    cost a bounded number of divergences, not one per switch."""
    r = np.random.default_rng(25)
    n = 12
    w = randn(r, 3, 3)
    base = randn(r, 4, 3)
    l0 = float(jnp.mean((base @ w) ** 2))

    def make():
        def step(k, x):
            loss = jnp.mean((x @ w) ** 2)
            take = (k % 3 == 0) if decided_by == "python_state" else (loss > l0)
            if take:
                out = jnp.sin(x) * 2.0 + loss
            else:
                out = jnp.cos(x) - loss
            return jnp.sum(out * out)
        return step

    ins = [(k, base * (2.0 if k % 3 == 0 else 0.5)) for k in range(n)]
    eager = make()
    want = [eager(*a) for a in ins]
    terra_bc.reset_stats()
    unit = terra_bc.function(make())
    got = [unit(*a) for a in ins]
    assert_close(got, want, "outputs")
    s = stats()
    assert 1 <= s["divergences"] <= 3, s
    assert s["iterations_traced"] + s["divergences"] == 2, s  # one trace per path, then none
    assert s["iterations_coexecuted"] >= n - 4, s
    assert s["segments_launched"] >= n - 4 - s["divergences"], s


# ----------------------------------------------------------------------------- 7. shapes

def make_shape_step(log):
    def step(w, x):
        n = x.shape[0]
        log.append(n)
        h = jnp.tanh(x @ w)
        return jnp.sum(h) / n, h.T @ h
    return step


def test_changing_batch_shape():
    r = np.random.default_rng(11)
    w = randn(r, 4, 3)
    batches = [8, 8, 8, 5, 8, 5, 8]
    xs = [randn(r, b, 4) for b in batches]

    log_e = []
    eager = make_shape_step(log_e)
    want = [eager(w, x) for x in xs]

    terra_bc.reset_stats()
    log_t = []
    unit = terra_bc.function(make_shape_step(log_t))
    got = [unit(w, x) for x in xs]

    assert log_t == log_e == batches
    assert_close(got, want, "outputs")
    s = stats()
    assert s["divergences"] >= 1, s
    assert s["iterations_coexecuted"] >= 2, s


# ----------------------------------------------------------------------------- 8. escaping

ESCAPED = []  # a module global the unit appends to


class Holder:
    def __init__(self, ema):
        self.value = None
        self.ema = ema


def make_escaping_step(holder, cache):
    def step(x, w):
        h = jnp.tanh(x @ w)
        ESCAPED.append(h)                       # into a global list
        holder.value = h * 2.0                  # into an attribute
        cache["sq"] = h ** 2                    # into a dict
        loss = jnp.mean(h)
        holder.ema = 0.9 * holder.ema + 0.1 * loss   # read back next iteration (a feed)
        return loss
    return step


def run_escaping(decorate):
    r = np.random.default_rng(12)
    ins = [(randn(r, 4, 3), randn(r, 3, 5)) for _ in range(N)]
    ESCAPED.clear()
    holder, cache = Holder(jnp.float32(0.0)), {}
    step = make_escaping_step(holder, cache)
    if decorate:
        step = decorate(step)
    snaps = []
    for a in ins:
        loss = step(*a)
        snaps.append((ESCAPED[-1], holder.value, cache["sq"], holder.ema, loss))
    esc = list(ESCAPED)
    ESCAPED.clear()
    return snaps, esc


def test_escaped_values_behave_like_arrays():
    want, want_esc = run_escaping(None)
    terra_bc.reset_stats()
    got, got_esc = run_escaping(terra_bc.function)

    assert len(got_esc) == len(want_esc) == N
    for i, (g, w) in enumerate(zip(got, want)):
        for name, gv, wv in zip(("global", "attr", "dict", "ema", "loss"), g, w):
            a = np.asarray(gv)
            np.testing.assert_allclose(a, np.asarray(wv), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} {i}")
            np.testing.assert_allclose(np.asarray(jax.device_get(gv)), a, rtol=0, atol=0)
            assert pickle.loads(pickle.dumps(a)).tolist() == a.tolist()
            # further eager JAX on the escaped value
            np.testing.assert_allclose(np.asarray(jnp.sin(gv) * 2.0 + jnp.sum(gv)),
                                       np.asarray(jnp.sin(wv) * 2.0 + jnp.sum(wv)),
                                       rtol=RTOL, atol=ATOL, err_msg=f"{name} {i} after sin")
            assert gv.shape == wv.shape and gv.dtype == wv.dtype
    np.testing.assert_allclose(float(got[-1][3]), float(want[-1][3]), rtol=RTOL, atol=ATOL)
    # Two segments: the traced call computes its path by one; the 2nd call leaves that path
    # (holder.ema is now a value of the unit's own, not a fed array) and records the new
    # path from its start, computed whole by the one segment later calls launch too.
    assert_coexecuted(stats(), max_compiles=2)


def test_escaped_values_are_jax_arrays():
    got, got_esc = run_escaping(terra_bc.function)
    for snap in got:
        for v in snap:
            assert isinstance(v, jax.Array), type(v)
    assert all(isinstance(v, jax.Array) for v in got_esc)
    # Still usable after everything else has been released.
    gc.collect()
    assert np.isfinite(np.asarray(got_esc[0])).all()


# ----------------------------------------------------------------------------- 9. return value

def make_returning_step():
    def step(x):
        y = jnp.cumsum(x) * 0.5
        return y, jnp.sum(y), {"max": jnp.max(y), "n": x.shape[0]}
    return step


def test_return_value_is_a_usable_array():
    r = np.random.default_rng(13)
    xs = [randn(r, 7) for _ in range(N)]
    eager = make_returning_step()
    want = [eager(x) for x in xs]
    terra_bc.reset_stats()
    unit = terra_bc.function(make_returning_step())
    got = [unit(x) for x in xs]

    for (gy, gs, gd), (wy, ws, wd) in zip(got, want):
        assert isinstance(gy, jax.Array) and isinstance(gs, jax.Array)
        assert gd["n"] == 7 and type(gd["n"]) is int
        np.testing.assert_allclose(np.asarray(gy), np.asarray(wy), rtol=RTOL, atol=ATOL)
        assert abs(float(gs) - float(ws)) <= ATOL + RTOL * abs(float(ws))
        assert abs(gd["max"].item() - wd["max"].item()) <= ATOL + RTOL * abs(wd["max"].item())
        np.testing.assert_allclose(np.asarray(jnp.exp(gy) @ gy + gs),
                                   np.asarray(jnp.exp(wy) @ wy + ws), rtol=RTOL, atol=1e-5)
        assert gy.shape == (7,) and gy.dtype == jnp.float32 and gs.shape == ()
        assert np.asarray(gy[2:4]).tolist() == pytest.approx(np.asarray(wy[2:4]).tolist(),
                                                             rel=RTOL, abs=ATOL)
        assert (gs > -1e9) and bool(gs == gs)
    # Results of earlier iterations stay valid after later ones ran.
    assert_close(got[0], want[0], "first result, read last")
    assert_coexecuted(stats())


# ----------------------------------------------------------------------------- 10. exceptions

RAISE_MARK = "# <- the user's raise"


def make_raising_step(counter, log):
    def step(x):
        h = jnp.tanh(x) * 3.0
        counter[0] += 1
        log.append(counter[0])
        if counter[0] == 4:
            raise ValueError(f"counter hit {counter[0]}")  # <- the user's raise
        return jnp.sum(h * h)
    return step


def run_raising(step, xs):
    out = []
    for x in xs:
        try:
            out.append(step(x))
        except ValueError as e:
            out.append(e)
    return out


def test_exception_in_coexecuted_iteration_propagates():
    r = np.random.default_rng(14)
    xs = [randn(r, 5) for _ in range(N + 1)]
    counter_e, log_e = [0], []
    want = run_raising(make_raising_step(counter_e, log_e), xs)

    terra_bc.reset_stats()
    counter_t, log_t = [0], []
    unit = terra_bc.function(make_raising_step(counter_t, log_t))
    got = []
    for i, x in enumerate(xs):
        if i == 3:
            with pytest.raises(ValueError) as info:
                unit(x)
            got.append(info.value)
        else:
            got.append(unit(x))

    err = got[3]
    assert type(err) is ValueError and str(err) == str(want[3]) == "counter hit 4"
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1]
    assert last.filename == __file__ and last.name == "step", frames
    assert RAISE_MARK in (last.line or ""), frames
    assert log_t == log_e == list(range(1, N + 2))
    for i in (0, 1, 2, 4, 5, 6):
        assert_close(got[i], want[i], f"result {i}")
    s = stats()
    assert s["iterations_coexecuted"] >= 3, s   # 1-2 traced, the raising one and later co-executed


def make_jax_error_step():
    def step(x, w):
        h = jnp.tanh(x)
        return jnp.sum(h @ w)
    return step


def test_jax_error_inside_unit_propagates():
    r = np.random.default_rng(15)
    w = randn(r, 3, 2)
    good = [randn(r, 4, 3) for _ in range(4)]
    bad = randn(r, 4, 5)
    eager = make_jax_error_step()
    with pytest.raises(Exception) as want:
        eager(bad, w)
    unit = terra_bc.function(make_jax_error_step())
    for x in good:
        assert_close(unit(x, w), eager(x, w), "good")
    with pytest.raises(type(want.value)) as got:
        unit(bad, w)
    assert str(got.value) == str(want.value)
    assert_close(unit(good[0], w), eager(good[0], w), "after the error")


# ----------------------------------------------------------------------------- 11. jax.random

def make_random_step():
    def step(key, scale):
        key, sub = jax.random.split(key)
        a = jax.random.normal(sub, (3, 4)) * scale
        key, sub = jax.random.split(key)
        b = jax.random.uniform(sub, (4,))
        c = jax.random.bernoulli(jax.random.fold_in(sub, 7), 0.3, (5,))
        return key, a @ b, c
    return step


@pytest.mark.parametrize("kind", ["raw", "typed"])
def test_jax_random_keys(kind):
    key0 = jax.random.PRNGKey(42) if kind == "raw" else jax.random.key(42)
    scales = [jnp.float32(1.0 + i) for i in range(N)]

    def run(step):
        key, out = key0, []
        for s in scales:
            key, v, c = step(key, s)
            out.append((key, v, c))
        return out

    want = run(make_random_step())
    terra_bc.reset_stats()
    got = run(terra_bc.function(make_random_step()))
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"iteration {i}")
        assert g[0].dtype == w[0].dtype
    assert_coexecuted(stats())


# ----------------------------------------------------------------------------- 12. lr schedule

def make_scheduled_step():
    def loss_fn(w, x, y):
        return jnp.mean((jnp.tanh(x @ w) - y) ** 2)

    def step(k, w, x, y):
        lr = 0.1 / (1 + k)                      # a Python float, different every iteration
        loss, g = jax.value_and_grad(loss_fn)(w, x, y)
        return w - lr * g, loss
    return step


def scheduled_eager_and_unit(seed, batches):
    """(eager, terra_bc) results of make_scheduled_step chained over batches."""
    w0 = randn(np.random.default_rng(seed), 4, 2)

    def run(step):
        w, out = w0, []
        for k, (x, y) in enumerate(batches):
            w, loss = step(k, w, x, y)
            out.append((w, loss))
        return out

    want = run(make_scheduled_step())
    terra_bc.reset_stats()
    return want, run(terra_bc.function(make_scheduled_step()))


def test_python_scalar_learning_rate_changes():
    want, got = scheduled_eager_and_unit(16, data(17, dout=2))
    assert_close(got, want, "w, loss")
    s = stats()
    assert s["compiles"] <= N, s
    assert s["iterations_traced"] + s["iterations_coexecuted"] >= N, s


def test_python_scalar_learning_rate_is_learned_as_a_feed():
    """The stricter reading of DESIGN.md ("learn which is which per site"): a Python number
    that changes every iteration must become a feed, not a reason to re-trace forever."""
    n = 10
    want, got = scheduled_eager_and_unit(23, data(24, n=n, dout=2))
    assert_close(got, want, "w, loss")
    s = stats()
    assert s["iterations_coexecuted"] >= n // 2, s
    assert s["compiles"] <= 3, s


def test_a_number_new_each_iteration_fed_at_many_positions_is_left_to_jit():
    """A Python number fed at several positions of one launch but new at every iteration (a
    bias correction ``1 - b1 ** t`` applied to each parameter) is converted by jit, as a
    number seen once is (making its device array costs more); a number that comes back in
    later launches (a constant learning rate) is made a device array once.  Values equal
    eager's."""
    from terra_bc.runtime import values

    def make():
        def step(ws, t, lr):
            c = 1 - 0.9 ** t
            return [w - lr * (w / c) for w in ws]
        return step
    ws0 = [jnp.full(3, float(i + 1)) for i in range(4)]
    want, ws = [], ws0
    for t in range(1, N + 1):
        ws = make()(ws, t, 0.01)
        want.append(ws)
    values._device_numbers.clear()
    step, got, ws = terra_bc.function(make()), [], ws0
    for t in range(1, N + 1):
        ws = step(ws, t, 0.01)
        got.append(ws)
    assert_close(got, want, "parameters")
    made = {key[2] for key, v in values._device_numbers.items() if isinstance(v, jax.Array)}
    assert 0.01 in made, values._device_numbers
    assert not made & {1 - 0.9 ** t for t in range(1, N + 1)}, made
    assert_coexecuted(stats())


# ----------------------------------------------------------------------------- 13. NumPy in grad

def make_numpy_in_grad_step(log):
    def loss_fn(w, x):
        h = jnp.tanh(x @ w)
        s = float(np.asarray(h).mean())         # NumPy on an intermediate -> Python float
        log.append(s)
        return jnp.mean(h ** 2) * (1.0 + s)

    def step(w, x):
        loss, g = jax.value_and_grad(loss_fn)(w, x)
        return w - 0.05 * g, loss
    return step


def make_numpy_in_grad_reference(log):
    """What the step means in eager JAX terms: eager JAX refuses ``np.asarray`` on a grad
    tracer (TracerArrayConversionError), so the reference computes the same Python float
    from the forward value outside the differentiated function; it is a constant for
    differentiation, exactly like a NumPy result is."""
    def loss_fn(w, x, s):
        return jnp.mean(jnp.tanh(x @ w) ** 2) * (1.0 + s)

    def step(w, x):
        s = float(np.asarray(jnp.tanh(x @ w)).mean())
        log.append(s)
        loss, g = jax.value_and_grad(loss_fn)(w, x, s)
        return w - 0.05 * g, loss
    return step


def test_numpy_call_on_intermediate_inside_grad():
    r = np.random.default_rng(18)
    w0 = randn(r, 4, 3)
    xs = [randn(r, 6, 4) for _ in range(N)]

    def run(step):
        w, out = w0, []
        for x in xs:
            w, loss = step(w, x)
            out.append((w, loss))
        return out

    log_e = []
    want = run(make_numpy_in_grad_reference(log_e))
    terra_bc.reset_stats()
    log_t = []
    got = run(terra_bc.function(make_numpy_in_grad_step(log_t)))

    assert len(log_t) == N and all(type(v) is float for v in log_t)
    np.testing.assert_allclose(log_t, log_e, rtol=RTOL, atol=ATOL)
    assert_close(got, want, "w, loss")
    s = stats()
    assert_coexecuted(s)
    assert s["fetches"] >= s["iterations_coexecuted"], s


def make_branch_in_grad_step(log):
    def loss_fn(w, x):
        h = jnp.tanh(x @ w)
        if jnp.mean(h) > 0:                     # eager JAX allows bool() under grad
            log.append("pos")
            return jnp.mean(h ** 2)
        log.append("neg")
        return jnp.mean(jnp.abs(h)) * 2.0

    def step(w, x):
        loss, g = jax.value_and_grad(loss_fn)(w, x)
        return g, loss
    return step


def test_branch_on_value_inside_grad():
    r = np.random.default_rng(19)
    w = randn(r, 4, 3)
    base = jnp.abs(randn(r, 6, 4))
    signs = [1, 1, 1, -1, 1, -1, -1]        # tanh is odd: the sign flips the branch
    xs = [base * s for s in signs]
    log_e = []
    eager = make_branch_in_grad_step(log_e)
    want = [eager(w, x) for x in xs]
    terra_bc.reset_stats()
    log_t = []
    unit = terra_bc.function(make_branch_in_grad_step(log_t))
    got = [unit(w, x) for x in xs]
    assert "pos" in log_e and "neg" in log_e
    assert log_t == log_e
    assert_close(got, want, "grad, loss")
    assert stats()["divergences"] >= 1


def make_device_get_step(log):
    """``jax.device_get`` of a pytree holding this iteration's values, a PRNG key, a Python
    number and a string: NumPy arrays (read-only, as eager JAX gives them), in the same
    structure; the host copies are then used as a program would (pickled, copied, mutated)."""
    import pickle

    def step(w, key):
        key, sub = jax.random.split(key)
        w = w * 1.5 + jax.random.normal(sub, w.shape) * 0.01
        host = jax.device_get({"w": w, "mean": w.mean(), "key": key, "n": 3, "s": "tag"})
        one = jax.device_get(w[0])
        log.append((sorted(host), type(host["w"]).__name__, host["w"].flags.writeable,
                    type(host["mean"]).__name__, type(host["key"]).__name__,
                    type(one).__name__, host["n"], host["s"]))
        copy = np.array(host["w"])
        copy[0] += 1.0
        log.append((pickle.loads(pickle.dumps(host))["w"].tolist(), copy.tolist(), float(one)))
        return w, key
    return step


def test_device_get_of_this_iterations_values_gives_numpy_arrays():
    start = (jnp.ones(3), jax.random.PRNGKey(0))
    out = eager_and_terra(make_device_get_step, lambda step: chain(lambda s, _: step(*s), start, range(N)))
    (want, log_e), (got, log_t) = out["eager"], out["terra"]
    assert log_e[0][1] == "ndarray"
    assert log_t[::2] == log_e[::2]  # types and structure: exact
    for (w_t, c_t, o_t), (w_e, c_e, o_e) in zip(log_t[1::2], log_e[1::2]):
        np.testing.assert_allclose(w_t, w_e, rtol=RTOL)
        np.testing.assert_allclose(c_t, c_e, rtol=RTOL)
        np.testing.assert_allclose(o_t, o_e, rtol=RTOL)
    assert_close(got, want, "w, key")
    s = stats()
    assert s["iterations_coexecuted"] >= N - 3 and s["eager_fallbacks"] == 0, s


# ----------------------------------------------------------------------------- 14. helpers

def dense(x, w, b):
    return jnp.dot(x, w) + b


def act(x):
    return jnp.tanh(x) * 0.5 + jax.nn.sigmoid(x)


def block(x, w, b):
    return act(dense(x, w, b))


def make_nested_step():
    def step(x, w1, b1, w2, b2):      # no JAX op of its own: everything is in helpers
        return block(block(x, w1, b1), w2, b2)
    return step


def test_nested_undecorated_helpers_are_coexecuted():
    r = np.random.default_rng(20)
    ws = (randn(r, 4, 5), randn(r, 5), randn(r, 5, 3), randn(r, 3))
    xs = [randn(r, 2, 4) for _ in range(N)]
    eager = make_nested_step()
    want = [eager(x, *ws) for x in xs]
    terra_bc.reset_stats()
    unit = terra_bc.function(make_nested_step())
    got = [unit(x, *ws) for x in xs]
    assert_close(got, want, "outputs")
    s = stats()
    assert_coexecuted(s)
    # 2 blocks x (dot, add, tanh, mul, add, sigmoid) sites, skipped in each co-executed step
    assert s["ops_skipped"] >= 6 * s["iterations_coexecuted"], s


# ----------------------------------------------------------------------------- 15. long run

def make_tiny_step():
    def step(x, c):
        return x * 0.5 + c, jnp.sum(x)
    return step


def test_many_iterations_stay_coexecuted():
    n = 300
    c = jnp.ones(4, jnp.float32)
    x0 = jnp.arange(4, dtype=jnp.float32)

    def run(step):
        x, sums = x0, []
        for _ in range(n):
            x, s = step(x, c)
            sums.append(s)
        return x, sums

    want_x, want_s = run(make_tiny_step())
    terra_bc.reset_stats()
    got_x, got_s = run(terra_bc.function(make_tiny_step()))
    assert_close(got_x, want_x, "final x")
    assert_close(got_s[::37], want_s[::37], "sums")
    s = stats()
    assert s["iterations_coexecuted"] >= n - 10, s
    assert s["compiles"] <= 3, s
    assert s["divergences"] == 0, s



@pytest.mark.parametrize("abstract", [True, False])
def test_steady_mode_from_the_second_iteration(abstract):
    """The engine's warm-up, call by call.  Abstract tracing: the 1st call records its ops
    and computes what Python holds at its end by the one segment it compiles; every later
    call co-executes on that segment, compiling nothing.  Eager-valued tracing with compiles
    on the calling thread: the 1st call computes op by op, the 2nd compiles the segment
    (benchmarks/coexec.py (c) times both; test_background_compile.py: compiles later)."""
    # (widths no other test uses: the structural compile cache is shared by all units)
    width = 13 if abstract else 15
    params, batches = mlp_params(12, (4, width, width, 2)), data(13, n=8)
    terra_bc.config(abstract_tracing=abstract, background_compile=False)
    unit = terra_bc.function(make_train_step())
    terra_bc.reset_stats()
    seen = []
    for x, y in batches:
        params, loss = unit(params, x, y)
        s = stats()
        seen.append((s["iterations_traced"], s["iterations_coexecuted"], s["compiles"],
                     s["segments_launched"], s["divergences"]))
    terra_bc.config(abstract_tracing=True, background_compile=True)
    if abstract:
        assert seen == [(1, k, 1, k + 1, 0) for k in range(8)], seen
    else:
        assert seen[0] == (1, 0, 0, 0, 0), seen
        assert seen[1:] == [(1, k, 1, k, 0) for k in range(1, 8)], seen


# ----------------------------------------------------------------------------- API

def test_stats_reset_and_explain():
    unit = terra_bc.function(make_mlp_loss())
    params, batches = mlp_params(21, SIZES), data(22)
    for x, y in batches:
        unit(params, x, y)
    s = stats()
    assert all(type(s[k]) is int for k in STAT_KEYS), s
    assert s["iterations_traced"] + s["iterations_coexecuted"] == N, s
    report = str(terra_bc.explain(unit))
    assert report.strip()
    assert "step" in report
    assert "segment" in report.lower()
    terra_bc.reset_stats()
    assert all(terra_bc.stats()[k] == 0 for k in STAT_KEYS)


# ----------------------------------------------------------------------------- library code

LIBRARY = {}
exec(compile("import jax.numpy as jnp\n"
             "def dense(w, h):\n"
             "    return jnp.tanh(h @ w)\n", "<library>", "exec"), LIBRARY)


def sgd_eager_and_unit(loss_fn, w0, xs, lr):
    """(eager, terra_bc) results of an SGD step on loss_fn(w, x) chained over xs."""
    def make():
        def step(w, x):
            loss, g = jax.value_and_grad(loss_fn)(w, x)
            return w - lr * g, loss
        return step

    def run(step):
        w, out = w0, []
        for x in xs:
            w, loss = step(w, x)
            out.append((w, loss))
        return out

    want = run(make())
    terra_bc.reset_stats()
    return want, run(terra_bc.function(make()))


def test_library_code_inside_grad_keeps_the_gradient_connected():
    """JAX code terra_bc does not rewrite (a library) gets placeholders: it must compute on
    the recorded values so the gradient flows through it, in every iteration."""
    r = np.random.default_rng(31)
    want, got = sgd_eager_and_unit(lambda w, x: jnp.mean(LIBRARY["dense"](w, x) ** 2),
                                   randn(r, 4, 3), [randn(r, 5, 4) for _ in range(N)], 0.1)
    assert_close(got, want, "w, loss")


def test_array_methods_and_properties_are_ops_of_the_iteration():
    """x.T, x.sum(...), x.var(...), x.reshape(...) inside a differentiated function are
    guarded ops (no divergence), and the gradient through them equals eager's."""
    def loss_fn(w, x):
        h = (x @ w.T).reshape(-1, 2)
        return h.var(-1, keepdims=True).sum() + w.mT.mean() + jnp.abs(h).max()

    r = np.random.default_rng(37)
    want, got = sgd_eager_and_unit(loss_fn, randn(r, 4, 6), [randn(r, 3, 6) for _ in range(N)], 0.05)
    assert_close(got, want, "w, loss")
    s = stats()
    assert s["divergences"] == 0 and s["iterations_coexecuted"] == N - 1, s


# ----------------------------------------------------------------------------- jax.vjp of user code

def make_vjp_step(rng, log):
    def step(p, x):
        def forward(p):
            h = jnp.tanh(x @ p["w"])
            mask = jnp.asarray(rng.random(h.shape) > 0.3)   # NumPy inside the vjp'd function
            return h * mask, jnp.sum(h)
        (h, total), pull = jax.vjp(forward, p)
        n = float(jnp.sum(h))                # a fetch between forward and backward
        log.append(n)
        sign = 2.0 if n > 0 else -1.0         # a branch on it
        (g,) = pull((jnp.ones_like(h) * sign, jnp.float32(1.0)))
        return {"w": p["w"] - 0.1 * g["w"]}
    return step


def test_vjp_of_user_code_with_python_inside_is_coexecuted():
    r = np.random.default_rng(7)
    p0 = {"w": randn(r, 4, 3)}
    xs = [randn(r, 5, 4) * (1.0 if k % 3 else -1.0) for k in range(N + 4)]
    out = eager_and_terra(lambda log: make_vjp_step(np.random.default_rng(8), log),
                          lambda step: chain(step, p0, xs))
    assert_close(out["terra"][0], out["eager"][0], "params")
    np.testing.assert_allclose(out["terra"][1], out["eager"][1], rtol=RTOL, atol=ATOL)
    s = stats()
    assert s["eager_fallbacks"] == 0 and s["iterations_coexecuted"] >= len(xs) - 3, s
    assert s["ops_skipped"] > 0, s


def make_jvp_step(rng, log):
    def step(w, x):
        def f(w):
            h = jnp.tanh(x @ w)
            return h * jnp.asarray(rng.random(h.shape) > 0.3), jnp.sum(h)  # NumPy inside
        (h, s), (th, ts) = jax.jvp(f, (w,), (jnp.ones_like(w),))
        log.append(float(ts))                 # a fetch of a tangent
        return w - 0.01 * jnp.sum(th) * w
    return step


def test_jvp_of_user_code_with_python_inside_is_coexecuted():
    r = np.random.default_rng(9)
    w0, x = randn(r, 4, 3), randn(r, 5, 4)
    out = eager_and_terra(lambda log: make_jvp_step(np.random.default_rng(10), log),
                          lambda step: chain(step, w0, [x] * (N + 2)))
    assert_close(out["terra"][0], out["eager"][0], "w")
    np.testing.assert_allclose(out["terra"][1], out["eager"][1], rtol=RTOL, atol=ATOL)
    s = stats()
    assert s["eager_fallbacks"] == 0 and s["iterations_coexecuted"] == N + 1 and s["ops_skipped"] > 0, s
