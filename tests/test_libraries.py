"""Library code that computes with JAX co-executes: its call sites are rewritten like the
user's (terra_bc/scope.py decides which packages), its loops and functions never become
units, and the user's loop around it is the unit.  Each program runs eagerly first."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

import terra_bc
from terra_bc import _hook, scope
from terra_bc.runtime import trace_rules

try:
    from conftest import on_and_off
except ImportError:  # imported by the subprocess programs below for their training loops
    on_and_off = None

RTOL, ATOL = 1e-5, 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("loop_units_on")  # (conftest.py)


# ------------------------------------------------------------------ which code is rewritten

def test_jax_numpy_and_terra_bc_are_never_rewritten():
    for fn in (jnp.sum, jax.grad, np.sum, terra_bc.function):
        code = getattr(fn, "__code__", None) or fn.__wrapped__.__code__
        assert not scope.in_scope(code.co_filename, "user"), fn
    for fn in (jnp.sum, jax.grad, terra_bc.function):  # not even under --scope all
        code = getattr(fn, "__code__", None) or fn.__wrapped__.__code__
        assert not scope.in_scope(code.co_filename, "all"), fn


def test_libraries_that_require_jax_are_rewritten_others_are_not():
    assert scope.in_scope(optax.adam.__code__.co_filename, "user")
    assert scope.wants_jax("optax")
    assert not scope.in_scope(pytest.main.__code__.co_filename, "user")
    assert scope.in_scope(pytest.main.__code__.co_filename, "all")
    import json
    assert not scope.in_scope(json.dumps.__code__.co_filename, "user")
    assert scope.in_scope(__file__, "user")  # the user's own code
    assert not scope.is_library(__file__) and scope.is_library(optax.adam.__code__.co_filename)


def test_include_and_exclude_change_the_decision():
    optax_file, pytest_file = optax.adam.__code__.co_filename, pytest.main.__code__.co_filename
    try:
        settings = terra_bc.config(exclude=["optax"], include=["_pytest", "pytest"])
        assert settings["exclude"] == ["optax"] and "pytest" in settings["include"]
        assert not scope.in_scope(optax_file, "user")
        assert scope.in_scope(pytest_file, "user")
    finally:
        terra_bc.config(exclude=[], include=[])
    assert scope.in_scope(optax_file, "user") and not scope.in_scope(pytest_file, "user")
    with pytest.raises(TypeError):
        terra_bc.config(include="optax")  # a string is not a list of names


def _fake_library(root, name, requires):
    """A package installed into ``root`` with its metadata beside it (pip --target)."""
    pkg = os.path.join(root, name)
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(textwrap.dedent("""
            import jax.numpy as jnp

            def scaled_sum(xs):
                total = 0.0
                for x in xs:
                    total = total + jnp.sum(x) * 2.0
                return total
        """))
    info = os.path.join(root, f"{name}-1.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        f.writelines(f"Requires-Dist: {r}\n" for r in requires)
    with open(os.path.join(info, "top_level.txt"), "w") as f:
        f.write(name + "\n")
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write(f"{name}/__init__.py,,\n")


def test_library_installed_outside_site_dirs_is_a_library(tmp_path):
    """On PYTHONPATH with its metadata beside it: a library.  One that requires jax is
    rewritten without loop marks; one that does not (matplotlib-like) is left alone."""
    _fake_library(str(tmp_path), "jaxlike", ["jax>=0.4"])
    _fake_library(str(tmp_path), "plotlike", ["numpy", 'jax; extra == "jax"'])
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import jax.numpy as jnp
        import jaxlike, plotlike
        from terra_bc import _hook
        from terra_bc._hook import LoopMark
        xs = [jnp.ones(3), jnp.ones(3)]
        for step in range(4):
            a, b = jaxlike.scaled_sum(xs), plotlike.scaled_sum(xs)
        print(float(a), float(b))
        rewritten = _hook.cached_decision(jaxlike.scaled_sum.__code__)
        print(type(rewritten).__name__,
              any(isinstance(c, LoopMark) for c in rewritten.co_consts),
              _hook.cached_decision(plotlike.scaled_sum.__code__))
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    out = subprocess.run([sys.executable, "-m", "terra_bc", str(script)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    values, decisions = out.stdout.strip().splitlines()
    assert values == "12.0 12.0"
    assert decisions == "code False None"  # rewritten, no loop marks; left alone


def test_library_code_that_calls_no_dl_op_runs_its_original_code(tmp_path):
    """A library's pure-Python machinery (a graph walk) runs its original code once it has
    run without calling a DL op (frames.revert_unrouted); code that calls DL ops stays
    rewritten.  Reverted code that calls a DL op later (from step 30 on) still gives eager
    JAX's values: JAX's own call, on a placeholder, fetches it."""
    pkg = tmp_path / "graphlike"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import jax.numpy as jnp

        def walk(tree):
            return [tree[k] for k in sorted(tree)]

        def apply(tree, x):
            for w in walk(tree):
                x = jnp.tanh(x @ w)
            return x

        def late(x, step):
            if max(step, 0) >= 30:  # (a call each run: its site counts the runs)
                return jnp.sin(x) * 2.0
            return x
    """))
    info = tmp_path / "graphlike-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: graphlike\nVersion: 1.0\n"
                                   "Requires-Dist: jax>=0.4\n")
    (info / "top_level.txt").write_text("graphlike\n")
    (info / "RECORD").write_text("graphlike/__init__.py,,\n")
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import sys
        import jax.numpy as jnp
        import graphlike

        def main():
            params = {"a": jnp.eye(4) * 0.9, "b": jnp.ones((4, 4)) * 0.1}
            x, losses = jnp.linspace(0.0, 1.0, 8).reshape(2, 4), []
            for step in range(40):
                y = graphlike.late(graphlike.apply(params, x), step)
                loss = jnp.mean(y ** 2)
                params = {k: w - 0.01 * loss * w for k, w in params.items()}
                losses.append(round(float(loss), 6))
            print(losses, round(float(jnp.sum(params["a"])), 6))
            if "terra_bc" in sys.modules:
                import terra_bc
                from terra_bc import _hook
                s = terra_bc.stats()
                print(s["code_objects_reverted"], s["eager_fallbacks"], s["iterations_coexecuted"],
                      *(type(_hook.cached_decision(f.__code__)).__name__
                        for f in (graphlike.walk, graphlike.apply, graphlike.late)), file=sys.stderr)

        main()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    plain = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    for revert, want in (("1", "NoneType code NoneType"), ("0", "code code code")):
        out = subprocess.run([sys.executable, "-m", "terra_bc", str(script)],
                             env=dict(env, TERRA_BC_REVERT_LIBRARY_CODE=revert),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout == plain.stdout
        reverted, fallbacks, coexecuted, *decisions = out.stderr.strip().splitlines()[-1].split()
        assert " ".join(decisions) == want, out.stderr[-2000:]
        assert (int(reverted) >= 2) == (revert == "1") and fallbacks == "0", out.stderr[-2000:]
        assert int(coexecuted) >= 30, out.stderr[-2000:]


# ------------------------------------------------------------------ optax

def optax_training(steps):
    """An optax loop as its tutorials write it: chain, clip_by_global_norm, a schedule."""
    data = np.random.default_rng(0)
    X = jnp.asarray(data.normal(size=(64, 8)), jnp.float32)
    Y = jnp.asarray(data.integers(0, 4, 64))
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (8, 16)) * 0.3, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 4)) * 0.3, "b2": jnp.zeros(4)}

    def loss_fn(p, x, y):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"], y).mean()

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(optax.cosine_decay_schedule(1e-2, steps)))
    opt_state = tx.init(params)
    losses = []
    for step in range(steps):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, Y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, params, opt_state


def test_optax_loop_coexecutes_and_matches_eager():
    want_losses, want_params, want_state = optax_training(12)
    with terra_bc.enabled():
        got_losses, got_params, got_state = optax_training(12)
    np.testing.assert_allclose(got_losses, want_losses, rtol=RTOL, atol=ATOL)
    for got, want in zip(jax.tree.leaves((got_params, got_state)),
                         jax.tree.leaves((want_params, want_state))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 8, stats
    assert stats["eager_fallbacks"] == 0, stats
    assert stats["ops_skipped"] > 100 * 8, stats  # optax's own ops are skipped too


def test_tree_map_of_a_jax_function_is_an_op_of_the_iteration():
    """jax.tree.map(jnp.sum, tree) from user or library code: jnp.sum is called by JAX's
    tree code, which is not rewritten; it still runs as an op of the iteration."""
    tree = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}

    def run():
        out = []
        for step in range(5):
            sums = jax.tree.map(jnp.sum, jax.tree.map(lambda x: x * step, tree))
            out.append(float(sums["a"] + sums["b"]))
        return out

    want, got = on_and_off(run)
    assert got == want
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 3 and stats["eager_fallbacks"] == 0, stats


def test_metadata_functions_run_as_python_not_as_ops():
    """result_type, issubdtype, isrealobj, typeof... read what a placeholder carries: no
    event, no guard, and the same answers as eager."""
    from terra_bc.runtime.events import key_name
    from terra_bc.runtime.units import all_units

    def run():
        x, out = jnp.ones((4, 3)), []
        for step in range(8):
            y = jnp.cos(x) + step
            meta = (jnp.result_type(y, 1.0), jnp.issubdtype(y.dtype, jnp.floating),
                    jnp.isrealobj(y), jnp.iscomplexobj(y), str(jax.typeof(y)),
                    jnp.promote_types(y.dtype, jnp.int32), jnp.can_cast(y.dtype, jnp.float64))
            x = x * 0.9 + jnp.tanh(y) * 0.01
            out.append((meta, float(jnp.sum(x))))
        return out

    want, got = on_and_off(run)
    assert [m for m, _ in got] == [m for m, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 5 and stats["eager_fallbacks"] == 0, stats
    recorded = {key_name(ev.key) for unit in list(all_units) for path in unit.paths
                for ev in path.events}
    assert {"cos", "tanh"} <= recorded
    assert not recorded & set(trace_rules.METADATA_FUNCTIONS), recorded


def test_numpy_scalar_in_a_shape_stays_static():
    """hk.Flatten computes the flattened size with NumPy (an np.int64) inside the loss JAX
    differentiates: fed like an array, reshape could not record it; it is baked instead."""
    def run():
        w, out = jnp.full((12, 2), 0.1), []
        for step in range(8):
            x = jnp.ones((4, 3, 4)) * (step + 1)

            def loss(w):
                flat = jnp.reshape(x, (x.shape[0], np.prod(x.shape[1:]) // np.int64(1)))
                return jnp.mean((flat @ w) ** 2)

            value, g = jax.value_and_grad(loss)(w)
            w = w - 1e-4 * g
            out.append(float(value))
        return out

    want, got = on_and_off(run)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 5 and stats["eager_fallbacks"] == 0, stats


def test_a_step_the_user_jitted_is_not_compiled_again():
    """A loop whose turn is one jax.jit call and a fetch: the call is dispatched as JAX
    dispatches it, with the executable JAX compiled for the user's own call (no compile of
    ours)."""
    step = jax.jit(lambda w, x: (w - 0.1 * jnp.tanh(x.T @ (x @ w)), jnp.sum(x @ w)))

    def run():
        w, out = jnp.full((4, 4), 0.2), []
        for k in range(10):
            w, loss = step(w, jnp.ones((2, 4)) * k)
            out.append(float(loss))
        return out, w

    want, got = on_and_off(run)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 7 and stats["ops_eager"] >= 7, stats
    # (jnp.ones((2, 4)) * k is the unit's one segment; the jitted step is never in one)
    assert stats["compiles"] <= 1, stats
    assert not _segments_holding_a_jitted_lambda()


def test_a_segment_of_one_jitted_call_is_dispatched_without_binding_or_compiling():
    """A segment that is one call of a jitted function (here `jnp.tanh`, which JAX jits)
    is launched through a JAX dispatch object made once per segment, not by binding the
    call (which builds one anew at each launch: ~20 µs of Python), and that object finds
    the executable JAX compiled for the program's own eager call: no XLA compile."""
    from terra_bc import jaxpr_builder
    from terra_bc.runtime.units import all_units

    def turn(w):
        return jnp.tanh(w)

    w0 = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    plain = w0
    for _ in range(10):
        plain = turn(plain)  # (JAX compiles tanh here, as the program runs it eagerly)
    compiles = []

    def on_event(event, seconds, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiles.append(seconds)

    unit = terra_bc.function(turn)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        got = w0
        for _ in range(10):
            got = unit(got)
        got = np.asarray(got)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    np.testing.assert_allclose(got, np.asarray(plain), rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 8 and stats["eager_fallbacks"] == 0, stats
    assert compiles == [], f"{len(compiles)} XLA compile(s) under terra_bc"
    one_call = [entry.segment for u in list(all_units) for p in u.paths
                for entry in p.segments.values() if len(entry.segment.jaxpr.jaxpr.eqns) == 1]
    assert one_call, "no segment of the one jitted call was recorded"
    if jaxpr_builder._jit_impl_known():  # (a JAX whose impl rule it knows: not a bind)
        made = jaxpr_builder._one_jit_call(one_call[0].jaxpr)
        assert type(made).__name__ == "PjitFunction", type(made)


def _segments_holding_a_jitted_lambda():
    from terra_bc.runtime.units import all_units
    return [e for u in list(all_units) for p in u.paths for entry in p.segments.values()
            for e in entry.segment.jaxpr.eqns
            if str(e.primitive) in ("jit", "pjit") and "<lambda>" in str(e.params.get("name"))]


def test_a_jitted_function_among_other_ops_is_never_compiled_into_a_segment():
    """Ops before and after the user's jitted step, and a branch that makes a second path:
    the segments hold the other ops; the jitted computation runs as the user's own call."""
    step = jax.jit(lambda w, x: (w - 0.1 * jnp.tanh(x.T @ (x @ w)), jnp.sum(x @ w)))

    def run():
        w, out = jnp.full((4, 4), 0.2), []
        for k in range(12):
            x = jnp.tanh(jnp.ones((2, 4)) * k / 12)
            w, loss = step(w, x)
            w = w * 0.99 if k % 3 else w + 0.001
            out.append(float(loss * 2.0))
        return out, w

    from terra_bc.runtime.units import all_units
    want, got = on_and_off(run)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 9 and stats["eager_fallbacks"] == 0, stats
    assert any(p.segments for u in list(all_units) for p in u.paths)
    assert not _segments_holding_a_jitted_lambda()


def test_a_jit_wrapper_made_afresh_each_turn_is_the_same_callee():
    """``jax.jit(loss)(w, x)`` and ``jax.jit(jax.grad(loss))`` written inside the loop make
    new wrappers every turn; JAX reuses its executable for them (same function, same
    options), and so do the unit's paths: one path after the first changed number, where
    identity made a new path every turn and the unit fall back to eager."""
    def loss(w, x):
        return jnp.sum((x @ w) ** 2)

    def run():
        w, out = jnp.ones((4, 2)), []
        for k in range(10):
            x = jnp.full((3, 4), k / 10.0)
            g = jax.jit(jax.grad(loss))(w, x)
            v = jax.jit(loss)(w, x)
            w = w - 0.01 * g
            out.append(float(v))
        return out, w

    want, got = on_and_off(run)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 8 and stats["eager_fallbacks"] == 0, stats
    assert stats["divergences"] <= 1 and stats["paths_recorded"] <= 2, stats
    from terra_bc.runtime.guards import same_callee
    assert same_callee(jax.jit(loss), jax.jit(loss))
    assert not same_callee(jax.jit(loss), jax.jit(loss, static_argnums=1))
    assert not same_callee(jax.jit(loss), jax.jit(lambda w, x: loss(w, x)))


def test_a_jit_its_author_marked_inline_is_recorded_not_a_graph_break():
    """optax's tree_bias_correction is ``jax.jit(..., inline=True)``: a piece meant for the
    computation around it.  It is recorded as one op, and the step stays one segment (a
    graph break there split each step in three)."""
    correct = jax.jit(lambda m, decay, count: m / (1 - decay ** count), inline=True)

    def run():
        m, out = jnp.ones(4), []
        for k in range(1, 10):
            m = 0.9 * m + jnp.full(4, float(k))
            out.append(float(jnp.sum(correct(m, 0.9, k))))
        return out

    want, got = on_and_off(run)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6 and stats["eager_fallbacks"] == 0, stats
    # (jnp.ones before the loop is eager; dispatched as a user's jit, 9 more would be)
    assert stats["ops_eager"] <= 1, stats
    assert not trace_rules.dispatched_as_is(correct)
    assert trace_rules.dispatched_as_is(jax.jit(lambda m: m * 2))


def test_eval_shape_of_the_same_function_over_the_same_data_is_reused():
    """flax linen's Scope.param calls ``jax.eval_shape(lambda: init(key, *shape))`` for each
    parameter at every apply: a new lambda over a new tuple.  Its shapes are found once and
    reused while the function's code and what it closes over are the same; a changed
    shape in the closure finds new shapes (and the values stay eager's)."""
    def init(key, shape, dtype):
        return jax.random.normal(key, shape, dtype)

    def shapes_of(shape):
        out = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), shape, jnp.float32))
        return out.shape

    def run():
        w, out = jnp.ones((3, 5)), []
        for k in range(12):
            shape = (3, 5) if k < 8 else (3, 6)
            got = shapes_of(tuple(list(shape)))  # (a new tuple each turn, equal by value)
            w = w * 0.5 + 1.0
            out.append((got, float(jnp.sum(w))))
        return out

    want, got = on_and_off(run)
    assert [s for s, _ in got] == [s for s, _ in want] == [(3, 5)] * 8 + [(3, 6)] * 4
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 9 and stats["eager_fallbacks"] == 0, stats
    assert 8 <= stats["shapes_reused"] <= 10, stats  # (found afresh when the shape changed)


def test_shapes_found_are_kept_across_turns_that_do_not_ask():
    """A DQN acts every turn and updates every second one (CleanRL): shapes the update's
    apply finds are asked for every second turn.  Dropped after each turn that did not ask,
    they were found afresh at every update; kept MEMO_IDLE_TURNS turns unasked, they serve."""
    def init(key, shape, dtype):
        return jax.random.normal(key, shape, dtype)

    def run():
        w, out = jnp.ones((3, 5)), []
        for k in range(16):
            if k % 2 == 0:
                out.append(jax.eval_shape(lambda: init(jax.random.PRNGKey(0), (3, 5),
                                                       jnp.float32)).shape)
            w = w * 0.5 + 1.0
            out.append(float(jnp.sum(w)))
        return out

    want, got = on_and_off(run)
    assert got == want
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 12 and stats["eager_fallbacks"] == 0, stats
    # (found when first asked, and in the turn that traced a path asking, then reused)
    assert stats["shapes_reused"] >= 5, stats


class _Sized:  # (an object changed in place between turns)
    rows = 1


ROWS = 1  # (a global rebound between turns)


def test_eval_shape_of_a_function_reading_state_changed_in_place_is_traced_again():
    """Eager JAX traces eval_shape's function at every call.  Shapes from an object the
    function closes over that was changed in place, or from a global rebound between
    turns, must be found afresh (reused, they were the first turn's: (1, 2) every turn)."""
    def run():
        global ROWS
        cfg, w, out = _Sized(), jnp.ones(3), []
        for step in range(9):
            cfg.rows = step % 3 + 1
            ROWS = (step + 1) % 3 + 1
            out.append(jax.eval_shape(lambda: jnp.zeros((cfg.rows, 2))).shape)
            out.append(jax.eval_shape(lambda: jnp.zeros((ROWS, 3))).shape)
            w = w * 1.01
            out.append(float(jnp.sum(w)))
        return out

    want, got = on_and_off(run)
    assert [x for x in got if isinstance(x, tuple)] == [x for x in want if isinstance(x, tuple)]
    assert want[:2] == [(1, 2), (2, 3)] and want[3:5] == [(2, 2), (3, 3)]
    np.testing.assert_allclose([x for x in got if isinstance(x, float)],
                               [x for x in want if isinstance(x, float)], rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6 and stats["eager_fallbacks"] == 0, stats


def test_the_eval_shape_key_tells_functions_and_data_apart():
    from terra_bc.runtime.guards import traced_function_key as key

    def make(scale, shape):
        return lambda: jnp.zeros(shape) * scale
    assert key(make(1, (2, 3)), (), {}) == key(make(1, (2, 3)), (), {})
    assert key(make(1, (2, 3)), (), {}) != key(make(1, (2, 4)), (), {})
    assert key(make(1, (2, 3)), (), {}) != key(make(2.0, (2, 3)), (), {})
    assert key(make(1, (2, 3)), (), {}) != key(lambda: jnp.zeros((2, 3)), (), {})
    assert key(jnp.sum, (), {}) is None or key(jnp.sum, (), {}) == key(jnp.sum, (), {})
    assert key(make(1, [2, 3]), (), {}) != key(make(1, (2, 3)), (), {})
    def double(x):
        return x * 2
    assert key(double, (jnp.ones(3),), {}) == key(double, (jnp.zeros(3),), {})  # (avals)
    assert key(double, (jnp.ones(3),), {}) != key(double, (jnp.ones(4),), {})

    def recursive():
        return recursive  # (a function closing over itself)
    assert key(recursive, (), {}) == key(recursive, (), {})

    # Classes and modules are keys by identity, themselves; a class whose metaclass
    # defines == is held by identity too (its == is never asked).
    assert key(make(int, (2,)), (), {}) != key(make(float, (2,)), (), {})
    assert key(make(np, (2,)), (), {}) == key(make(np, (2,)), (), {}) != key(make(jnp, (2,)), (), {})

    class AllEqual(type):
        def __eq__(cls, other):
            return True
        __hash__ = type.__hash__
    a, b = AllEqual("A", (), {}), AllEqual("B", (), {})
    assert key(make(a, (2,)), (), {}) != key(make(b, (2,)), (), {})
    assert key(make(a, (2,)), (), {}) == key(make(a, (2,)), (), {})

    held = _Sized()
    assert key(lambda: jnp.zeros((held.rows, 2)), (), {}) is None  # (could change in place)
    assert key(make(1, (2, 3)), (held,), {}) is None
    assert key(lambda: jnp.zeros((ROWS, 2)), (), {}) is not None  # (a global, by value)


def test_the_eval_shape_key_holds_a_linen_module_by_its_fields():
    """A closure over a linen module (DenseGeneral's kernel_init_wrap, behind every linen
    attention) is keyed by the module's class and field values, where it was refused and
    traced at every call; a module that differs in any field gets another key, also one
    changed in place (keyed by value, at every call); another object of the program's none."""
    import flax.linen as nn
    from terra_bc.runtime.guards import traced_function_key as key

    def check(module):
        return lambda: jnp.zeros((module.features, 2))
    a, b = nn.Dense(3), nn.Dense(3)
    assert key(check(a), (), {}) is not None
    assert key(check(a), (), {}) == key(check(b), (), {})
    assert key(check(a), (), {}) != key(check(nn.Dense(4)), (), {})
    assert key(check(a), (), {}) != key(check(nn.Dense(3, use_bias=False)), (), {})
    assert key(check(a), (), {}) != key(check(nn.Dense(3, kernel_init=nn.initializers.zeros)), (), {})
    before = key(check(a), (), {})
    a.features = 4  # (an unbound module may be changed: the key sees it)
    assert key(check(a), (), {}) != before and key(check(a), (), {}) == key(check(nn.Dense(4)), (), {})
    assert key(check(_Sized()), (), {}) is None


def attention_turns(steps):
    """A linen attention layer applied at every turn."""
    import flax.linen as nn
    layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x0 = jnp.ones((2, 3, 8))
    params = layer.init(jax.random.PRNGKey(0), x0, x0)
    out = []
    for step in range(steps):
        x = x0 * (0.1 * step)
        out.append(float(layer.apply(params, x, x).sum()))
    return out


def test_a_linen_attentions_shape_checks_are_reused():
    terra_bc.reset_stats()
    want, got = on_and_off(attention_turns, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 4 and stats["eager_fallbacks"] == 0, stats
    # (four DenseGeneral kernels and biases a turn: every co-executed turn reuses them all)
    assert stats["shapes_reused"] >= 8 * stats["iterations_coexecuted"], stats


def test_linen_module_sized_by_a_numpy_integer_coexecutes():
    """gymnasium's action_space.n is an np.int64; as a linen Dense's features, flax's
    Scope.param checks the parameter's shape with jax.eval_shape(lambda: init(key, shape))
    on every apply: no array of ours goes in, so JAX's tracing of it is JAX's business
    (it made the unit run eagerly)."""
    import flax.linen as nn

    class Q(nn.Module):
        actions: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.actions)(nn.relu(nn.Dense(8)(x)))

    q = Q(actions=np.int64(2))
    params = q.init(jax.random.PRNGKey(0), np.ones(4, np.float32))

    def loop():
        out = []
        for i in range(10):
            out.append(float(q.apply(params, np.full(4, i, np.float32)).sum()))
        return out

    want, got = on_and_off(loop)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 7 and stats["eager_fallbacks"] == 0, stats


def test_scope_all_runs_a_jax_program(tmp_path):
    """--scope all rewrites every library but JAX itself, and the program's results are
    eager's."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from tests.test_libraries import optax_training
        losses, params, _ = optax_training(6)
        print(repr([round(v, 5) for v in losses]))
    """))
    env = dict(os.environ, PYTHONPATH=ROOT)
    plain = subprocess.run([sys.executable, str(script), ROOT], env=env, capture_output=True,
                           text=True, timeout=300)
    hooked = subprocess.run([sys.executable, "-m", "terra_bc", "--scope", "all", str(script), ROOT],
                            env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert hooked.returncode == 0, hooked.stderr
    assert hooked.stdout == plain.stdout


# ------------------------------------------------------------------ transforms of code we do not rewrite

_EXEC_SOURCE = """
import jax.numpy as jnp
def loss(w, x):
    return jnp.mean((x @ w) ** 2)
"""


def test_grad_of_a_function_we_do_not_rewrite_is_one_op():
    """A loss defined by exec (as IPython's %%time cells are) is out of scope: its gradient
    is computed as JAX computes it, one op of the iteration, and equals eager's."""
    namespace = {}
    exec(compile(_EXEC_SOURCE, "<timed exec>", "exec"), namespace)
    loss = namespace["loss"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)

    def run():
        w, out = jnp.ones((4, 2)), []
        for step in range(6):
            value, g = jax.value_and_grad(loss)(w, x)
            w = w - 0.1 * g
            _, pullback = jax.vjp(loss, w, x)
            out.append((float(value), float(pullback(1.0)[0].sum())))
        return out, w

    want_out, want_w = run()
    with terra_bc.enabled():
        got_out, got_w = run()
    np.testing.assert_allclose(got_out, want_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=RTOL, atol=ATOL)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 3 and stats["eager_fallbacks"] == 0, stats


# ------------------------------------------------------------------ Equinox and Flax NNX

def equinox_training(steps):
    """Equinox as its tutorials write it: eqx.nn.MLP, filter_value_and_grad, optax,
    eqx.apply_updates, and a Python early-stop check on float(loss)."""
    import equinox as eqx
    data = np.random.default_rng(0)
    X = jnp.asarray(data.normal(size=(64, 4)), jnp.float32)
    Y = jnp.sin(X.sum(1, keepdims=True))
    model = eqx.nn.MLP(4, 1, 16, 2, key=jax.random.PRNGKey(0))
    tx = optax.adam(1e-2)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_value_and_grad
    def loss_fn(m, x, y):
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    losses = []
    for step in range(steps):
        loss, grads = loss_fn(model, X, Y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        losses.append(float(loss))
        if losses[-1] < 1e-6:
            break
    return losses, eqx.filter(model, eqx.is_array)


def nnx_training(steps):
    """Flax NNX as its tutorials write it: an nnx.Module with Linear, Dropout and
    BatchNorm, nnx.value_and_grad, nnx.Optimizer(...).update mutating the model in place."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 16, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

    data = np.random.default_rng(0)
    X = jnp.asarray(data.normal(size=(64, 4)), jnp.float32)
    Y = jnp.sin(X.sum(1, keepdims=True))
    model = MLP(nnx.Rngs(0))
    # (SGD: BatchNorm cancels l1's bias gradient, and Adam would scale that float noise
    # up to learning-rate-sized steps, in eager and compiled runs alike.)
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    def loss_fn(m, x, y):
        return jnp.mean((m(x) - y) ** 2)

    losses = []
    for step in range(steps):
        loss, grads = nnx.value_and_grad(loss_fn)(model, X, Y)
        optimizer.update(model, grads)
        losses.append(float(loss))
    return losses, nnx.state(model), optimizer.step[...]


def _numbers(x):
    """An array's numbers (a PRNG key's data: the RNG streams' state is compared too)."""
    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def linen_training(steps):
    """Flax linen as its tutorials write it: a CNN with BatchNorm, a TrainState carrying
    batch_stats, state.apply_fn inside jax.value_and_grad(has_aux=True), apply_gradients.
    Module.apply is wrapped by JAX's api_boundary: it must run as Python, op by op."""
    import flax.linen as nn
    from flax.training import train_state

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(3)(nn.relu(x).reshape((x.shape[0], -1)))

    class TrainState(train_state.TrainState):
        batch_stats: dict

    data = np.random.default_rng(0)
    X = jnp.asarray(data.normal(size=(16, 6, 6, 1)), jnp.float32)
    Y = jnp.asarray(data.integers(0, 3, 16))
    model = CNN()
    variables = model.init(jax.random.PRNGKey(0), X, train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=optax.sgd(0.05), batch_stats=variables["batch_stats"])

    def loss_fn(params, batch_stats):
        logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, X,
                                         train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), updates

    losses = []
    for step in range(steps):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats)
        state = state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"])
        losses.append(float(loss))
    return losses, state.params, state.batch_stats


def haiku_training(steps):
    """Haiku as its tutorials write it: hk.transform_with_state with BatchNorm (module
    methods are wrapped by jax.named_call: they must run as Python, op by op), optax."""
    import haiku as hk

    def forward(x, is_training):
        x = hk.Linear(16)(x)
        x = hk.BatchNorm(True, True, 0.9)(x, is_training)
        return hk.Linear(1)(jax.nn.relu(x))

    data = np.random.default_rng(0)
    X = jnp.asarray(data.normal(size=(64, 4)), jnp.float32)
    Y = jnp.sin(X.sum(1, keepdims=True))
    model = hk.transform_with_state(forward)
    params, state = model.init(jax.random.PRNGKey(0), X, True)
    tx = optax.sgd(0.05)
    opt_state = tx.init(params)

    def loss_fn(params, state, x, y):
        pred, state = model.apply(params, state, None, x, True)
        return jnp.mean((pred - y) ** 2), state

    losses = []
    for step in range(steps):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, X, Y)
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, params, state


@pytest.mark.parametrize("training", [equinox_training, nnx_training, linen_training,
                                      haiku_training])
def test_module_library_loop_coexecutes_and_matches_eager(training):
    want = training(10)
    terra_bc.reset_stats()
    with terra_bc.enabled():
        got = training(10)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=ATOL)
    got_leaves, want_leaves = jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:])
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(_numbers(g), _numbers(w), rtol=1e-4, atol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6, stats
    assert stats["eager_fallbacks"] == 0, stats


@pytest.mark.parametrize("flax_first", [False, True])
def test_nnx_sees_eager_trace_state_whichever_is_imported_first(tmp_path, flax_first):
    """NNX asks ``jax.extend.core.get_opaque_trace_state``; terra_bc answers it as eager
    JAX would whether ``jax.extend`` was imported before terra_bc (set in place) or after
    it (it takes the answer from JAX's core, where terra_bc set it)."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, sys.argv[1])
        if {flax_first}:
            import flax.nnx
        import terra_bc
        assert ("jax.extend" in sys.modules) == {flax_first}
        from tests.test_libraries import nnx_training
        want = nnx_training(6)[0]
        terra_bc.set_loops(True)
        with terra_bc.enabled():
            got = nnx_training(6)[0]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4 * max(map(abs, want)), (got, want)
        stats = terra_bc.stats()
        assert stats["iterations_coexecuted"] >= 3 and stats["eager_fallbacks"] == 0, stats
        print("ok")
    """))
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, str(script), ROOT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_excluding_a_library_the_gradient_goes_through_gives_eager_results(tmp_path):
    """--exclude equinox: equinox calls jax.value_and_grad itself, from code we do not
    rewrite, on the user's rewritten loss.  JAX's tracers must not reach the recorder: the
    unit runs eagerly (the reason is in explain()), with eager's results."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import terra_bc
        from tests.test_libraries import equinox_training
        losses, _ = equinox_training(5)
        print(repr([round(v, 6) for v in losses]))
        print("transforms this code" in str(terra_bc.explain()), file=sys.stderr)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT)
    plain = subprocess.run([sys.executable, str(script), ROOT], env=env, capture_output=True,
                           text=True, timeout=300)
    hooked = subprocess.run([sys.executable, "-m", "terra_bc", "--exclude", "equinox",
                             str(script), ROOT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert hooked.returncode == 0, hooked.stderr
    assert hooked.stdout == plain.stdout
    assert hooked.stderr.strip().splitlines()[-1] == "True"


def test_a_transform_from_excluded_code_met_on_a_later_path_gives_eager_results(tmp_path):
    """The unit's first paths never meet the excluded package; a later turn calls its
    jax.value_and_grad of the user's loss while the turn co-executes.  The divergence
    inside JAX's transform must not start a recording there (JAX restores its own trace on
    return, and `0.1 * g` recursed until RecursionError): that turn's rest runs eagerly."""
    pkg = tmp_path / "gradlib_excluded"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import jax\n\ndef value_and_grad_of(f, w, x):\n    return jax.value_and_grad(f)(w, x)\n")
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import jax.numpy as jnp
        import terra_bc
        from gradlib_excluded import value_and_grad_of

        def loss(w, x):
            return jnp.sum(jnp.tanh(x @ w) ** 2)

        def main():
            w, x, out = jnp.ones((4, 3)) * 0.1, jnp.arange(8.0).reshape(2, 4) / 8, []
            for step in range(12):
                if step < 6:
                    l, g = loss(w, x), jnp.zeros_like(w) + 0.01
                else:
                    l, g = value_and_grad_of(loss, w, x)
                w = w - 0.1 * g
                out.append(float(l))
            print(repr([round(v, 6) for v in out]), repr(round(float(jnp.sum(w)), 6)))
            s = terra_bc.stats()
            print(s["iterations_coexecuted"], s["eager_fallbacks"], file=sys.stderr)

        import sys
        main()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    plain = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                           text=True, timeout=300)
    hooked = subprocess.run([sys.executable, "-m", "terra_bc", "--exclude", "gradlib_excluded",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert hooked.returncode == 0, hooked.stderr[-3000:]
    assert hooked.stdout == plain.stdout
    coexecuted, fallbacks = map(int, hooked.stderr.strip().splitlines()[-1].split())
    assert coexecuted >= 5 and fallbacks == 6, hooked.stderr[-2000:]


def equinox_batchnorm_training(steps):
    """Equinox's stateful BatchNorm as its docs write it: make_with_state, and
    jax.vmap(model, axis_name="batch") of the module inside filter_value_and_grad."""
    import equinox as eqx

    class Model(eqx.Module):
        l1: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.l1 = eqx.nn.Linear(8, 16, key=k1)
            self.bn = eqx.nn.BatchNorm(16, axis_name="batch", momentum=0.9)
            self.l2 = eqx.nn.Linear(16, 3, key=k2)

        def __call__(self, x, state):
            x, state = self.bn(self.l1(x), state)
            return self.l2(jax.nn.relu(x)), state

    def loss_fn(model, state, x, y):
        logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                                 out_axes=(0, None))(x, state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    model, state = eqx.nn.make_with_state(Model)(jax.random.PRNGKey(0))
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    rng, losses = np.random.default_rng(0), []
    for _ in range(steps):
        x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
        y = jnp.asarray(np.argmax(np.asarray(x)[:, :3], axis=1))
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        losses.append(float(loss))
    return losses, eqx.filter(model, eqx.is_array)


def test_equinox_stateful_batchnorm_under_vmap_of_the_module():
    """jax.vmap(model, axis_name=...) of a module holding this turn's weights only makes a
    function; recorded as an op, later turns ran the first turn's weights (the loss
    stopped following eager's from the second turn)."""
    want, got = on_and_off(equinox_batchnorm_training, 8)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 5 and stats["eager_fallbacks"] == 0, stats


def nnx_mutation_inside_jax_grad(steps):
    """A model taken apart with nnx.split and put together inside jax.grad (of user code),
    whose call mutates a Variable: eager NNX refuses (the merged Variable belongs to the
    grad's trace, the count it writes back to does not).  Mutating one made inside is fine."""
    from flax import nnx

    class Count(nnx.Variable):
        pass

    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3))
            self.calls = Count(jnp.array(0, jnp.int32))

        def __call__(self, x):
            self.calls[...] += 1
            return jnp.sum(self.w[...] * x)

    model = M()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x)

    def loss_counting_inside(params, x):
        inner = Count(jnp.array(0, jnp.int32))
        inner[...] += 1
        return jnp.sum(params["w"][...] * x) * inner[...]

    said = []
    for step in range(steps):
        x = jnp.full(3, float(step))
        try:
            said.append(float(jax.grad(loss)(params, rest, x)["w"][...].sum()))
        except Exception as e:
            said.append(type(e).__name__)
        said.append(float(jax.grad(loss_counting_inside)(params, x)["w"][...].sum()))
    return said, int(model.calls[...])


def test_nnx_refuses_a_mutation_inside_jax_grad_as_eagerly():
    """Inside a differentiation terra_bc records, libraries see a trace state of their own
    (as under eager JAX's JVP trace): before, they saw the iteration's, so the mutation
    eager NNX refuses went through (TraceContextError not raised, the count changed)."""
    want, got = on_and_off(nnx_mutation_inside_jax_grad, 5)
    assert want[0][0] == "TraceContextError" and want[1] == 0
    assert got == want
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 3 and stats["eager_fallbacks"] == 0, stats


def lbfgs_training(steps):
    """optax's L-BFGS as its docs write it: value_and_grad_from_state, and update given the
    value, the gradient and value_fn (its zoom linesearch runs lax.while_loops whose bodies
    index the L-BFGS memory, a value of the iteration)."""
    x = jnp.arange(6.0)

    def f(p):
        return jnp.sum((p - x) ** 2 * (1.0 + 0.1 * jnp.arange(6.0)))
    params = jnp.zeros(6)
    opt = optax.lbfgs()
    state = opt.init(params)
    value_and_grad = optax.value_and_grad_from_state(f)
    values = []
    for _ in range(steps):
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=f)
        params = optax.apply_updates(params, updates)
        values.append(float(value))
    return values, params


def test_optax_lbfgs_coexecutes():
    """A placeholder given to a method inside a body JAX traces for the iteration enters
    the trace as a constant of the body (an input of its op); lowered to its value, the
    body used a value the iteration could not reproduce and the unit ran eagerly."""
    want, got = on_and_off(lbfgs_training, 8)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-5)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 5 and stats["eager_fallbacks"] == 0, stats


def haiku_dynamic_unroll_training(steps):
    import haiku as hk

    def net(xs):  # xs: [T, B, 2]
        core = hk.LSTM(8)
        outs, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]))
        return hk.Linear(1)(outs[-1])[:, 0]
    f = hk.without_apply_rng(hk.transform(net))
    rng = jax.random.PRNGKey(0)
    params = f.init(rng, jnp.zeros((5, 16, 2)))
    optim = optax.adam(1e-2)
    opt_state = optim.init(params)

    def loss_fn(params, xs, ys):
        return jnp.mean((f.apply(params, xs) - ys) ** 2)
    losses = []
    for _ in range(steps):
        rng, k = jax.random.split(rng)
        xs = jax.random.normal(k, (5, 16, 2))
        ys = jnp.sum(xs[:, :, 0] * xs[:, :, 1], axis=0)
        loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
        updates, opt_state = optim.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, [np.asarray(p) for p in jax.tree_util.tree_leaves(params)]


def test_haiku_dynamic_unroll_coexecutes():
    """hk.dynamic_unroll (a lax.scan whose body haiku builds, converting every parameter
    with jnp.asarray inside it) is an op of the iteration; it ran eagerly."""
    want, got = on_and_off(haiku_dynamic_unroll_training, 8)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    for w, g in zip(want[1], got[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 5 and stats["eager_fallbacks"] == 0, stats


def linen_rnn_training(steps):
    """linen's nn.RNN (an nn.scan with variable_broadcast="params": flax partially
    evaluates the cell to hoist the broadcast parameters out of the loop) inside
    jax.value_and_grad, optax's Adam."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.RNN(nn.LSTMCell(8))(x)
            return nn.Dense(1)(h[:, -1])

    model = Model()
    data = np.random.default_rng(0)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((4, 5, 3)))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        return jnp.mean((model.apply(params, x)[:, 0] - y) ** 2)

    losses = []
    for step in range(steps):
        x = data.normal(size=(4, 5, 3)).astype(np.float32)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, x.sum((1, 2)))
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, [np.asarray(p) for p in jax.tree_util.tree_leaves(params)]


def test_linen_rnn_coexecutes():
    """linen's nn.RNN ran eagerly at every turn: JAX's partial evaluation of the cell (flax
    0.12.8) computed on this turn's parameters with no op recorded; with flax 0.12.12's
    trace-then-eval_jaxpr, the jaxpr and debug info flax makes afresh at each call were
    static arguments compared by identity, a new path every turn."""
    want, got = on_and_off(linen_rnn_training, 8)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    for w, g in zip(want[1], got[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6, stats
    assert stats["eager_fallbacks"] == 0 and stats["divergences"] <= 1, stats
    assert stats["shapes_reused"] > 0, stats  # (Scope.param's eval_shape inside the cell)


def _partially_evaluated(fun, avals):
    """JAX's own trace_to_jaxpr_nounits of ``fun`` over unknown ``avals``, as a library calls it
    (its call site is rewritten: inside an iteration it reaches terra_bc)."""
    from jax._src import linear_util as lu
    from jax._src.interpreters import partial_eval as pe
    flat = lu.wrap_init(lambda *xs: list(fun(*xs)),
                        debug_info=jax.api_util.debug_info("test", fun, tuple(avals), {}))
    return pe.trace_to_jaxpr_nounits(flat, [pe.PartialVal.unknown(a) for a in avals])


def partial_evaluation_turns(steps):
    """Each turn partially evaluates a body over the turn's value ``w``, as flax's nn.scan
    does: what JAX gives (known values, the unknown part evaluated on ``x``, which is
    known)."""
    from jax._src import core
    aval = core.ShapedArray((3,), jnp.float32)
    x = jnp.arange(3.0)
    out = []
    for k in range(steps):
        w = jnp.full(3, 0.1 * k) + 0.5
        jaxpr, pvals, consts = _partially_evaluated(
            lambda a: (jnp.sin(w) * 2.0, a * jnp.cos(w), w.sum()), [aval])
        known = [np.asarray(p.get_known()) for p in pvals if p.is_known()]
        unknown = [np.asarray(v) for v in core.eval_jaxpr(jaxpr, consts, x)]
        out.append((known, unknown, [p.is_known() for p in pvals]))
    return out


def test_a_libraries_partial_evaluation_gives_what_jax_gives():
    """Inside an iteration, JAX's partial evaluation of a body over this turn's values: the
    outputs that do not depend on the inputs are the turn's values (an op), the others
    unknown with the jaxpr and residuals JAX would give (evaluated here to compare)."""
    terra_bc.reset_stats()
    want, got = on_and_off(partial_evaluation_turns, 6)
    for (wk, wu, wflags), (gk, gu, gflags) in zip(want, got):
        assert gflags == wflags == [True, False, True]
        for a, b in zip(gk + gu, wk + wu):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 3 and stats["eager_fallbacks"] == 0, stats


def linen_remat_training(steps):
    """linen's nn.remat around each block: flax folds a number that changes at every call
    into the block's RNG inside jax.checkpoint's body."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(x.shape[-1])(nn.tanh(x))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.remat(Block)()(x)
            return nn.Dense(1)(x)

    model = Model()
    data = np.random.default_rng(0)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((8, 6)))
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    losses = []
    for step in range(steps):
        x = data.normal(size=(8, 6)).astype(np.float32)
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply(p, x) - x[:, :1] ** 2) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, [np.asarray(p) for p in jax.tree_util.tree_leaves(params)]


def test_linen_remat_coexecutes_with_one_path():
    """The numbers inside a jax.checkpoint body are fed like a traced body's own (compared,
    every turn was a new path: the unit traced at every turn)."""
    terra_bc.reset_stats()
    want, got = on_and_off(linen_remat_training, 8)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    for w, g in zip(want[1], got[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6 and stats["eager_fallbacks"] == 0, stats
    assert stats["divergences"] == 0, stats


def partial_einsum_turns(steps):
    """flax's attention computes its weights with ``einsum = functools.partial(jnp.einsum,
    precision=...)`` made afresh at every call; one site here calls it and, in other
    turns, a partial of a Python function of the program's own, whose Python must run."""
    import functools
    seen = []

    def scaled(a, b, s):
        seen.append(s)  # (Python of the program's: runs at every call)
        return jnp.tanh(a @ b.T) * s

    w = jnp.ones((4, 3))
    out = []
    for step in range(steps):
        x = jnp.full((2, 3), 0.1 * step)
        if step % 3 == 2:
            fn = functools.partial(scaled, s=float(step))
        else:
            fn = functools.partial(jnp.einsum, "ij,kj->ik", precision=None)
        y = fn(x, w)
        out.append(float(y.sum()))
    return out, seen


def test_a_partial_of_a_jax_function_is_an_op_and_one_of_python_runs_as_python():
    """A functools.partial of a JAX function is the call it stands for (an op, its guard key
    the function's); one of the program's own function at the same site still runs its
    Python (the site's classification is per wrapped function, not per partial type).
    flax's partial(jnp.einsum) ran outside the recorded ops: the unit fell back."""
    terra_bc.reset_stats()
    want, got = on_and_off(partial_einsum_turns, 12)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert got[1] == want[1] == [2.0, 5.0, 8.0, 11.0]
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 6 and stats["eager_fallbacks"] == 0, stats


def neural_ode_training(steps):
    """jax.experimental.ode.odeint of the program's function, inside jax.value_and_grad:
    odeint closure-converts the function and jits the integration with it (JAX runs its
    Python only where those caches miss)."""
    from jax.experimental.ode import odeint
    calls = []

    def dynamics(y, t, w):
        calls.append(1)  # (Python JAX runs while tracing, under its caches)
        return jnp.tanh(w @ y) - 0.1 * y

    data = np.random.default_rng(0)
    w = jnp.asarray(data.normal(size=(3, 3)) * 0.5, jnp.float32)
    ts = jnp.linspace(0.0, 1.0, 4)
    tx = optax.adam(1e-2)
    opt_state = tx.init(w)
    losses = []
    for step in range(steps):
        y0 = jnp.asarray(data.normal(size=3), jnp.float32)
        loss, g = jax.value_and_grad(
            lambda w: jnp.sum((odeint(dynamics, y0, ts, w)[-1] - 0.5 * y0) ** 2))(w)
        updates, opt_state = tx.update(g, opt_state)
        w = optax.apply_updates(w, updates)
        losses.append(float(loss))
    return losses, np.asarray(w), len(calls) > 0


def test_odeint_of_a_python_function_coexecutes():
    """Python a library runs under JAX's jit or closure_convert caches is not run at every
    call by eager JAX either: such an op is recorded and skipped like any other (it made
    the unit run eagerly, as a custom rule JAX calls at every differentiation does)."""
    terra_bc.reset_stats()
    want, got = on_and_off(neural_ode_training, 6)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)
    stats = terra_bc.stats()
    assert stats["iterations_coexecuted"] >= 4 and stats["eager_fallbacks"] == 0, stats


def custom_rule_turns(steps):
    """A custom_vjp whose rules count their calls: eager JAX runs them at every gradient."""
    calls = {"fwd": 0, "bwd": 0}

    @jax.custom_vjp
    def clip_grad(x):
        return x

    def fwd(x):
        calls["fwd"] += 1
        return x, None

    def bwd(_, g):
        calls["bwd"] += 1
        return (jnp.clip(g, -0.1, 0.1),)
    clip_grad.defvjp(fwd, bwd)
    w, out = jnp.ones(3), []
    for step in range(steps):
        g = jax.grad(lambda w: jnp.sum(clip_grad(w * step) ** 2))(w)
        w = w - 0.1 * g
        out.append(float(w.sum()))
    return out, dict(calls)


def test_a_custom_rule_jax_calls_at_every_gradient_runs_as_eagerly():
    want, got = on_and_off(custom_rule_turns, 6)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert got[1] == want[1] == {"fwd": 6, "bwd": 6}
