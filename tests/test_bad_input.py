"""Bad input (docs/reliability.md, "Bad input"): odd statics, odd array-likes, huge pytrees,
deep recursion, code objects with unusual flags.  Each program runs eagerly, then under
terra_bc with loop and function units on; both must give the same values (or raise the
same exception type) and have the same side effects."""
import asyncio
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import terra_bc


@pytest.fixture(autouse=True)
def units_on():
    terra_bc.reset_stats()
    yield
    terra_bc.disable()
    terra_bc.config(loops=False, functions=False)


def outcome(fn):
    """fn()'s result as plain data, or ("raised", its type, the types in its cause chain)."""
    try:
        result = fn()
    except Exception as e:
        chain, c = [], e
        while c is not None:
            chain.append(type(c).__name__)
            c = c.__cause__ or c.__context__
        return ("raised", type(e).__name__, tuple(chain))
    return jax.tree.map(lambda v: np.asarray(v).round(4).tolist() if hasattr(v, "shape") else v,
                        result)


def both(fn, reset=lambda: None):
    """fn's outcome eagerly, then under terra_bc (loop and function units on)."""
    reset()
    eager = outcome(fn)
    reset()
    terra_bc.reset_stats()
    terra_bc.enable(loops=True, functions=True)
    try:
        hooked = outcome(fn)
    finally:
        terra_bc.disable()
    return eager, hooked


def coexecuted():
    return terra_bc.stats()["iterations_coexecuted"]


# ------------------------------------------------------------------ statics

class RaisingEq:
    def __init__(self, k):
        self.k = k

    def __hash__(self):
        return hash(self.k)

    def __eq__(self, other):
        raise RuntimeError("no __eq__")


class ArrayEq(RaisingEq):
    def __eq__(self, other):
        return np.array([True, False])


def jit_with_static(make):
    def program():
        f = jax.jit(lambda x, c: jnp.sin(x) * c.k, static_argnums=1)
        x = jnp.ones(3)
        for _ in range(5):
            x = f(x, make()) + jnp.cos(x)
        return x
    return program


@pytest.mark.parametrize("cls", [RaisingEq, ArrayEq])
def test_static_whose_eq_fails_raises_as_eagerly(cls):
    """A new static each turn, equal hashes: JAX compares them, and the __eq__ fails."""
    eager, hooked = both(jit_with_static(lambda: cls(2.0)))
    assert eager[:2] == ("raised", "ValueError") and hooked[:2] == eager[:2]


def test_same_static_whose_eq_raises_passes_as_eagerly():
    """The same static object each call of a user's jax.jit: the jitted function is
    dispatched as JAX dispatches it (trace_rules.dispatched_as_is), whose C++ cache
    short-cuts on identity, so its raising __eq__ is never called, as eagerly."""
    static = RaisingEq(2.0)
    eager, hooked = both(jit_with_static(lambda: static))
    assert hooked == eager


def test_unhashable_static_raises_as_eagerly():
    def program():
        f = jax.jit(lambda x, c: jnp.sin(x) * c[0], static_argnums=1)
        x = jnp.ones(3)
        for _ in range(4):
            x = f(x, [2.0]) + jnp.cos(x)
        return x
    eager, hooked = both(program)
    assert eager[:2] == ("raised", "ValueError") and hooked[:2] == eager[:2]


def test_list_and_numpy_statics():
    def program():
        x = jnp.ones((3, 4)) * jnp.arange(4.0)
        for _ in range(5):
            x = jnp.transpose(jnp.transpose(x, [1, 0]) * 2, axes=[1, 0]) \
                + jnp.sum(x, axis=np.int64(0)) * 0.01
        return x
    eager, hooked = both(program)
    assert hooked == eager and coexecuted() >= 3


def test_static_with_raising_eq_inside_a_tree_map():
    def program():
        x, out = jnp.ones((3, 4)), []
        for _ in range(5):
            w = jax.tree.map(lambda v: v * RaisingEq(2.0).k, {"a": jnp.sum(x * 2, axis=0)})
            x = x + jnp.tanh(x) * 0.1 + w["a"].sum()
            out.append(float(x.sum()))
        return out
    eager, hooked = both(program)
    assert hooked == pytest.approx(eager, rel=1e-5) and coexecuted() >= 3


# ------------------------------------------------------------------ odd array-likes

class ArrayLike:
    calls = 0

    def __init__(self, v):
        self.v = v

    def __array__(self, dtype=None, copy=None):
        ArrayLike.calls += 1
        return np.asarray(self.v, dtype=dtype)


class Growing:
    """__array__ with a side effect and a shape that changes from call to call."""
    n = 0

    def __array__(self, dtype=None, copy=None):
        Growing.n += 1
        return np.ones(Growing.n % 3 + 1, dtype=dtype)


class BadArray:
    def __array__(self, dtype=None, copy=None):
        raise ValueError("bad __array__")


class JaxArray:
    def __init__(self, v):
        self.v = v

    def __jax_array__(self):
        return jnp.asarray(self.v)


class BadJaxArray:
    def __jax_array__(self):
        raise TypeError("bad __jax_array__")


ODD = {"array_like": lambda i: ArrayLike(np.ones(3) * i), "growing": lambda i: Growing(),
       "bad_array": lambda i: BadArray(), "jax_array": lambda i: JaxArray(np.ones(3) * i),
       "bad_jax_array": lambda i: BadJaxArray()}


def reset_odd():
    ArrayLike.calls = Growing.n = 0


@pytest.mark.parametrize("kind", sorted(ODD))
def test_odd_array_likes_given_to_ops(kind):
    make = ODD[kind]

    def program():
        x, out = jnp.ones(3), []
        for i in range(5):
            try:
                x = jnp.tanh(jnp.sin(x) + jnp.asarray(make(i))) * 2
            except (ValueError, TypeError) as e:
                out.append(type(e).__name__)
                x = jnp.cos(x) + 1
            try:
                out.append(jnp.multiply(x, make(i)).shape)
            except (ValueError, TypeError) as e:
                out.append(type(e).__name__)
        return x, out, ArrayLike.calls, Growing.n  # (__array__ called as often)
    eager, hooked = both(program, reset_odd)
    assert hooked == eager


@pytest.mark.parametrize("kind", sorted(ODD))
def test_odd_array_likes_as_operands_of_placeholders(kind):
    make = ODD[kind]

    def program():
        x, out = jnp.ones(3), []
        for i in range(5):
            y = jnp.sin(x) * 2
            for expr in (lambda: y + make(i), lambda: make(i) + y, lambda: y * make(i)):
                try:
                    r = expr()
                    out.append(np.asarray(r).round(4).tolist() if hasattr(r, "shape") else type(r).__name__)
                except Exception as e:
                    out.append(type(e).__name__)
            x = jnp.cos(y) + 1
        return x, out, ArrayLike.calls, Growing.n
    eager, hooked = both(program, reset_odd)
    assert hooked == eager


# ------------------------------------------------------------------ huge pytrees

def test_ten_thousand_leaves_in_and_out_of_a_unit():
    n = 10_000

    def step(params, state, lr):
        a, b = params[1], params[-1]
        g = jnp.tanh(a * b) + jnp.sin(state["w"][n // 2])
        state["w"][0] = state["w"][0] + g.sum()   # a list the unit mutates in place
        return (a - lr * g,) + params[1:-1] + (b + lr * g,), jnp.sum(g ** 2)

    def program(f):
        params = tuple(jnp.full((2,), float(i % 7) / 7) for i in range(n))
        state = {"w": [jnp.full((2,), float(i % 5) / 5) for i in range(n)]}
        losses = []
        for _ in range(5):
            params, loss = f(params, state, 0.1)
            losses.append(float(loss))
        return losses + [float(params[0].sum()), float(params[-1].sum()), len(params),
                         float(state["w"][0].sum()), float(sum(p.sum() for p in params[2:50]))]
    eager = program(step)
    hooked = program(terra_bc.function(step))
    assert hooked == pytest.approx(eager, rel=1e-5)
    assert coexecuted() >= 3


# ------------------------------------------------------------------ deep recursion

def test_recursion_near_the_limit_inside_a_unit():
    def rec(x, n):
        return x if n == 0 else rec(jnp.sin(x) + 0.1, n - 1)

    def program():
        x = jnp.ones(3)
        for _ in range(4):
            x = rec(x, sys.getrecursionlimit() - 200) * 0.5
        return x
    eager, hooked = both(program)
    assert hooked == eager and eager[0] != "raised"


def test_recursion_past_the_limit_inside_a_unit():
    """RecursionError raised anywhere (in JAX, in terra_bc's runtime) while a turn recurses;
    the user catches it and the loop goes on with correct values."""
    def rec(x, n):
        return rec(jnp.sin(x) + 0.1, n + 1)

    def program():
        x, hits = jnp.ones(3), 0
        for _ in range(5):
            try:
                rec(x, 0)
            except RecursionError:
                hits += 1
            x = jnp.cos(x) * 2 + 1
        return x, hits
    eager, hooked = both(program)
    assert hooked == eager and eager[1] == 5


# ------------------------------------------------------------------ unusual code objects

async def async_step(x):
    return jnp.sin(x) * 2


def test_generators_coroutines_exec_and_compile_inside_units():
    def gen(x):
        for k in range(3):
            x = jnp.sin(x) + k
            yield x

    def program():
        ns = {"jnp": jnp}
        exec(compile("def made(x):\n    return jnp.cos(x) * 3 + x\n", "<made>", "exec"), ns)
        x, out = jnp.ones(3), []
        for _ in range(5):
            for v in gen(x):                      # a generator's frames
                out.append(float(v.sum()))
            x = asyncio.run(async_step(v)) + 1.0  # a coroutine: never rewritten
            env = {"x": x, "jnp": jnp}
            exec("y = jnp.tanh(x) * 2", env)      # exec'd code (library scope)
            x = jnp.sin(ns["made"](env["y"])) * 0.5  # compile()'d code
        return x, out
    eager, hooked = both(program)
    assert hooked == eager and coexecuted() >= 1


def test_varargs_cells_and_replaced_code():
    def program():
        total = jnp.zeros(3)

        def acc(v):                      # a closure that rebinds a cell
            nonlocal total
            total = total + jnp.tanh(v) * 2 + jnp.sin(v)
            return total

        def va(*args, **kw):             # *args / **kwargs
            return sum(jnp.sin(a) for a in args) * kw.get("s", 1.0) + jnp.cos(args[0])

        def f(x):
            return jnp.sin(x) * 2 + jnp.cos(x) - x * 0.5

        def g(x):
            return jnp.cos(x) * 3 + jnp.sin(x) + x * 0.1
        x, out = jnp.ones(3), []
        for i in range(8):
            if i == 4:
                f.__code__ = g.__code__  # replaced while f is a unit
            x = f(va(x, x * 2, s=0.5) * 0.3) * 0.2 + acc(x) * 0.1
            out.append(float(x.sum()))
        return x, out, total
    eager, hooked = both(program)
    assert hooked == eager and coexecuted() >= 4


def test_star_call_error_names_the_callee():
    """f(*5) at a routed site raises CPython's message, naming f (not terra_bc's handler)."""
    def program():
        x, out = jnp.ones(3), []
        for _ in range(4):
            x = jnp.sin(x) + 1
            try:
                jnp.add(*5)
            except TypeError as e:
                out.append(str(e))
        return x, out
    eager, hooked = both(program)
    assert hooked == eager and "argument after * must be an iterable" in eager[1][0]


# ------------------------------------------------------------------ gradients JAX refuses

GRAD_REFUSALS = {
    "non-scalar output": (lambda w: (lambda x: w * x), 1.0),
    "integer input": (lambda w: (lambda x: jnp.sum(w) * x), 1),
    "integer output": (lambda w: (lambda x: (jnp.sum(w) * x).astype(jnp.int32)), 1.0),
    "complex output": (lambda w: (lambda x: (jnp.sum(w) * x).astype(jnp.complex64)), 1.0),
}


@pytest.mark.parametrize("case", sorted(GRAD_REFUSALS))
@pytest.mark.parametrize("transform", ["grad", "value_and_grad"])
def test_a_gradient_jax_refuses_raises_jaxs_error_at_every_turn(case, transform):
    """jax.grad of a non-scalar, integer or complex output, or of an integer input, raises
    JAX's TypeError at every turn.  Recorded, the forward was differentiated as if it were
    a real scalar (no error: `sum` of the output's gradient), and an integer input failed
    with an unrelated TypeError."""
    make, arg = GRAD_REFUSALS[case]
    grad = getattr(jax, transform)

    def program():
        w, said = jnp.ones(2), []
        for step in range(4):
            w = w * 2.0
            try:
                said.append(float(jnp.sum(jax.tree.leaves(grad(make(w))(arg))[-1])))
            except TypeError as e:
                said.append(str(e))
        return said, w

    eager, hooked = both(program)
    assert all(isinstance(s, str) and "grad" in s.lower() for s in eager[0]), eager
    assert hooked == eager


# ------------------------------------------------------------------ a jax.Array's own queries

def test_buffer_queries_answer_as_a_jax_array_does_from_code_not_rewritten():
    # jax.core.Tracer refuses these (a tracer has no buffer); a placeholder is a Tracer, so
    # code the rewriter does not see (operator.methodcaller, eval, a library) met JAX's
    # ConcretizationTypeError, and `weak_type` was an AttributeError (found by a hunt of
    # plain JAX programs, 2026-12-01).
    import operator

    def program():
        x = jnp.arange(3.0)
        seen = []
        for t in range(4):
            y = x * (t + 1)
            z = jnp.sin(y)
            w = y + 1
            w.copy_to_host_async()
            d = jnp.cos(w)
            d.delete()
            seen.append((
                y.weak_type, (y * 2.0).weak_type, str(y.device), y.is_fully_addressable,
                len(y.global_shards), y.on_device_size_in_bytes(), y.nbytes,
                operator.methodcaller("is_deleted")(y), operator.methodcaller("is_ready")(z) in (True, False),
                eval("y.addressable_data(0)").tolist(), eval("y.tobytes()") == np.asarray(y).tobytes(),
                operator.attrgetter("is_fully_addressable")(z), str(eval("y.format"))[:6],
                float(z.clone().sum()), d.is_deleted(), float(w.sum())))
        return seen

    eager, hooked = both(program)
    assert hooked == eager
    assert coexecuted() > 0
    assert terra_bc.stats()["eager_fallbacks"] == 0


def test_iterating_a_0d_value_raises_what_a_jax_array_raises():
    # (found by a hunt of Python features, 2026-12-01: list() of a 0-d placeholder said
    # "len() of unsized object", reversed() raised IndexError where jax.Array raises TypeError)
    def program():
        s, seen = jnp.array(1.0), []
        for _ in range(4):
            s = s + 1
            for f in (list, reversed, iter):
                try:
                    f(s)
                    seen.append((f.__name__, "no error"))
                except Exception as e:
                    seen.append((f.__name__, type(e).__name__, str(e)))
            v = jnp.arange(3.0) * s
            seen.append([float(a) for a in reversed(v)] + [float(a) for a in v])
        return seen

    eager, hooked = both(program)
    assert hooked == eager
    assert coexecuted() > 0


def test_a_leaked_tracer_raises_at_its_op_as_eagerly():
    # (found by a hunt of Python features, 2026-12-01: an lru_cache kept a jitted function's
    # intermediate; recorded, the op raised at the next read, after Python had gone on)
    import functools

    def program():
        @functools.lru_cache
        def ones(n):
            return jnp.ones(n)

        @jax.jit
        def f(x):
            return x * ones(3)

        x, log = jnp.ones(3), []
        try:
            for i in range(3):
                y = f(x)
                log.append(("before", i))
                z = y * ones(3)  # a leaked tracer
                log.append(("after", i))
                log.append(float(z.sum()))
        except Exception as e:
            log.append(type(e).__name__)
        return log

    eager, hooked = both(program)
    assert eager == hooked == [("before", 0), "UnexpectedTracerError"]


def test_a_configuration_change_between_loops_lowers_their_equal_segments_afresh():
    # (found by a hunt of configuration edges, 2026-12-01: jax_threefry_partitionable changes
    # how random bits lower, not the jaxpr; the second loop's segment, equal to the first's,
    # ran the executable lowered before the change: the first loop's random numbers again)
    def program():
        saved = jax.config.jax_threefry_partitionable
        key, out = jax.random.key(0), []
        try:
            jax.config.update("jax_threefry_partitionable", True)
            for i in range(4):
                out.append(jax.random.randint(jax.random.fold_in(key, i), (3,), 0, 100).tolist())
            jax.config.update("jax_threefry_partitionable", False)
            for i in range(4):  # (another loop: its own unit, the same equations)
                out.append(jax.random.randint(jax.random.fold_in(key, i), (3,), 0, 100).tolist())
        finally:
            jax.config.update("jax_threefry_partitionable", saved)
        return out

    eager, hooked = both(program)
    assert hooked == eager
    assert eager[:4] != eager[4:]  # (the two settings draw different numbers)
    assert coexecuted() > 0


def test_asarray_of_a_changing_python_number_is_an_array_in_every_turn():
    # (found by a hunt of scientific programs, 2026-12-01: jnp.asarray(k) of a fed number is
    # the identity on the feed, and co-executed turns handed Python the number itself:
    # repr() printed 1.5, np.asarray gave float64, .item() raised AttributeError)
    def program():
        out = []
        for it in range(5):
            a = jnp.asarray(it * 1.5)
            b = jnp.asarray(it)
            out.append((repr(a), str(np.asarray(a).dtype), a.item(), a.tolist(),
                        repr(b), str(np.asarray(b).dtype), b.item(), float(a + b)))
        return out

    eager, hooked = both(program)
    assert hooked == eager
    assert coexecuted() > 0
