"""Random imperative JAX programs (``generate(seed) -> Program``).

Every program has the same frame, so that any statement can be removed (the shrinker's
job) and the rest still runs: ``main(decorate)`` draws a pool of arrays — ``a``, ``b``
(4x4), ``u``, ``w`` (4,), ``t`` (a 0-d array), a PRNG ``key`` — and Python state (``lr`` a
float that changes, ``hist`` a list and ``cfg`` a dict mutated in place, ``log`` the ordered
side-effect log), defines helper functions (losses for ``jax.grad``/``value_and_grad``/
``vjp``, maps, a recursive function, a generator, a jitted function), a ``step`` function
(``step = decorate(step)``: ``@terra_bc.function`` in one mode) and runs a training-style
outer loop that calls ``step`` each turn.  Generated statements only ever assign a pool
variable an expression of the variable's own shape, so they compose in any order.

Statements: assignments from a wide op table (elementwise, ``jax.nn``, reductions with axes
and ``keepdims``, matmul/einsum, indexing with Python ints, NumPy and JAX index arrays,
``.at[]`` updates, reshapes, concatenation and stacking, ``jnp.linalg.solve``), ``jax.random``
with keys split in Python, fetched values logged (``float``, ``.tolist()``, ``int``,
``bool``, ``np.asarray``), ``if`` on fetched values and on Python state, ``while`` loops on
fetched values, nested ``for`` loops with ``break``/``continue``, ``try/except/finally`` with
exceptions raised mid-iteration (by the program and by JAX's shape checks), an exception
that leaves ``step``, early ``return``, closures made afresh, generators, recursion,
``jax.grad``/``value_and_grad``(``has_aux``)/``vjp``, ``jax.jacrev``/``jacfwd``/``hessian``/
``checkpoint`` (inside ``grad`` too), ``jax.jit``/``vmap``/``lax`` control flow, list/dict
mutation and Python numbers that change every turn.

Values stay bounded (assignments go through ``tanh`` or a convex mix), so comparisons are
not drowned by overflow.  No callbacks (``jax.debug.*``, ``pure_callback``, ``io_callback``)
are generated: see docs/reliability.md.
"""
from __future__ import annotations

import dataclasses
import random

from .program import Block, Program, Stmt

KINDS = ("M", "V", "S")  # a 4x4 matrix, a 4-vector, a 0-d array (all float32)
POOL = {"M": ["a", "b"], "V": ["u", "w"], "S": ["t"]}


@dataclasses.dataclass
class Env:
    """What generated code may use where it is placed."""
    arrays: dict  # kind -> names of arrays in scope
    numbers: list  # Python number expressions in scope
    ints: list  # Python int expressions in 0..3 (indices, shifts)
    fetch: bool = True  # may convert arrays to Python values (not inside grad/jit)
    rs: bool = True  # may draw NumPy randomness
    state: bool = True  # may read hist / cfg
    key: bool = False  # has a PRNG key variable `key` to split
    loop: bool = False  # inside a loop: break / continue allowed
    step: bool = False  # inside step(): early return / escaping raise allowed
    depth: int = 0  # nesting depth of blocks

    def but(self, **changes) -> Env:
        return dataclasses.replace(self, **changes)


class Generator:
    def __init__(self, seed: int, size: int = 1, exact: bool = False):
        self.r = random.Random(seed)
        self.seed = seed
        self.size = size
        self.exact = exact  # programs for exact runs: see jacobian()
        self.n = 0  # unique ids for names and log entries
        self.losses: list = []  # (name, kind of x, kind of y)
        self.maps: list = []  # (name, kind of x, kind of y, pure): returns kind of x
        self.recs: list = []  # (name, kind, fetches)
        self.gens: list = []  # (name, kind)
        self.jits: list = []  # (name, kind of x, kind of y)

    # **** helpers ****

    def uid(self) -> int:
        self.n += 1
        return self.n

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def const(self, lo=-1.0, hi=1.0) -> str:
        return repr(round(self.r.uniform(lo, hi), 3))

    def threshold(self) -> str:
        return repr(round(self.r.uniform(-0.6, 0.6), 3))

    def index(self, env: Env) -> str:
        opts = ["0", "1", "2", "3"] + env.ints * 2
        if env.fetch and self.chance(0.15):
            return f"int(jnp.argmax({self.expr('V', 1, env)}))"
        return self.r.choice(opts)

    def cut(self, env: Env) -> str:
        """A slice bound in 1..3 (a changing Python int gives changing intermediate shapes)."""
        opts = ["1", "2", "3"] + [f"({i} % 3 + 1)" for i in env.ints if i.endswith("% 4")]
        return self.r.choice(opts)

    def index_array(self, env: Env) -> str:
        opts = ["np.array([2, 0, 3, 1])", "np.array([1, 1, 3, 0])", "jnp.array([3, 2, 1, 0])"]
        if env.rs:
            opts += ["rs.randint(0, 4, 4)", "rs.permutation(4)"]
        if self.chance(0.3):
            return f"jnp.argsort({self.expr('V', 1, env)})"
        return self.r.choice(opts)

    def number(self, env: Env) -> str:
        opts = [self.const(0.1, 1.5)] + env.numbers
        return self.r.choice(opts)

    # **** expressions ****

    def leaf(self, kind: str, env: Env) -> str:
        names = env.arrays.get(kind, [])
        if names and self.chance(0.75):
            return self.r.choice(names)
        opts = {
            "M": ["jnp.eye(4)", f"jnp.full((4, 4), {self.const()})",
                  "jnp.asarray(np.linspace(-1.0, 1.0, 16).reshape(4, 4), jnp.float32)"],
            "V": ["jnp.linspace(-1.0, 1.0, 4)", f"(jnp.arange(4.0) * {self.const()})"],
            "S": [f"jnp.asarray({self.const()}, jnp.float32)"],
        }[kind]
        if env.rs:
            opts += {"M": ["jnp.asarray(rs.standard_normal((4, 4)), jnp.float32)"],
                     "V": ["jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)"],
                     "S": ["jnp.float32(rs.uniform(-1.0, 1.0))"]}[kind] * 2
        if env.state:
            opts += {"M": [], "V": ["hist[-1]"], "S": ["cfg['acc']"]}[kind]
        return self.r.choice(opts)

    def expr(self, kind: str, depth: int, env: Env) -> str:
        if depth <= 0 or self.chance(0.2):
            return self.leaf(kind, env)
        d = depth - 1
        E = lambda k: self.expr(k, d, env)  # noqa: E731
        ax = self.r.choice(["0", "1"])
        choice = self.r.random()
        if choice < 0.22:  # elementwise unary
            return self.r.choice(UNARY).format(E(kind))
        if choice < 0.40:  # elementwise binary (same kind, broadcasting, Python numbers)
            op = self.r.choice(BINARY)
            if kind != "S" and self.chance(0.25):
                return op.format(E(kind), E("S"))
            if kind == "M" and self.chance(0.2):
                return op.format(E("M"), E("V"))
            if self.chance(0.2):
                return self.r.choice(["({} * {})", "({} + {})", "({} - {})"]).format(E(kind), self.number(env))
            return op.format(E(kind), E(kind))
        if choice < 0.46:
            return f"jnp.where({E(kind)} > {self.const(-0.3, 0.3)}, {E(kind)}, {E(kind)})"
        return self.r.choice(SHAPED[kind])(self, E, ax, env)


UNARY = ["jnp.tanh({})", "jnp.sin({})", "jnp.cos({})", "jax.nn.sigmoid({})", "jax.nn.relu({})",
         "jax.nn.gelu({})", "jax.nn.silu({})", "jax.nn.softplus({})", "jax.nn.elu({})",
         "jax.nn.leaky_relu({}, 0.1)", "jnp.abs({})", "jnp.exp(-jnp.square({}))",
         "jnp.log1p(jnp.abs({}))", "jnp.sqrt(jnp.abs({}) + 1.0)", "jnp.clip({}, -0.5, 0.5)",
         "(-{})", "jnp.arctan({})", "jax.nn.soft_sign({})", "jnp.square(jnp.tanh({}))",
         "jax.nn.relu6({})", "jnp.sinh(jnp.tanh({}))"]

BINARY = ["({} + {})", "({} - {})", "({} * {})", "({} / (1.0 + jnp.square({})))",
          "jnp.maximum({}, {})", "jnp.minimum({}, {})", "jnp.arctan2({}, 1.5 + jnp.abs({}))"]


def _m(*options):
    return list(options)


# Ops with a shape of their own, by result kind: fn(gen, E, ax, env) -> source.
SHAPED = {
    "M": _m(
        lambda g, E, ax, env: f"({E('M')} @ {E('M')})",
        lambda g, E, ax, env: f"jnp.matmul({E('M')}, {E('M')}.T)",
        lambda g, E, ax, env: f"jnp.einsum('ij,jk->ik', {E('M')}, {E('M')})",
        lambda g, E, ax, env: f"jnp.transpose({E('M')})",
        lambda g, E, ax, env: f"jnp.outer({E('V')}, {E('V')})",
        lambda g, E, ax, env: f"({E('V')}[:, None] * {E('V')}[None, :])",
        lambda g, E, ax, env: f"jnp.tile({E('V')}, (4, 1))",
        lambda g, E, ax, env: f"jnp.broadcast_to({E('V')}, (4, 4))",
        lambda g, E, ax, env: f"jnp.stack([{E('V')}, {E('V')}, {E('V')}, {E('V')}], axis={ax})",
        lambda g, E, ax, env: f"jnp.reshape(jnp.concatenate([{E('V')}, {E('V')}, {E('V')}, {E('V')}]), (4, 4))",
        lambda g, E, ax, env: f"{E('M')}.reshape(2, 8).reshape(4, 4)",
        lambda g, E, ax, env: f"jnp.reshape({E('M')}, (8, 2)).T.reshape(4, 4)",
        lambda g, E, ax, env: f"jnp.flip({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jnp.roll({E('M')}, {g.index(env)}, axis={ax})",
        lambda g, E, ax, env: f"jnp.rot90({E('M')})",
        lambda g, E, ax, env: f"jnp.{g.r.choice(['triu', 'tril'])}({E('M')})",
        lambda g, E, ax, env: (lambda k: f"jnp.concatenate([{E('M')}[:{k}], {E('M')}[{k}:]], axis=0)")(g.cut(env)),
        lambda g, E, ax, env: (lambda k: f"jnp.concatenate([{E('M')}[:, :{k}], {E('M')}[:, {k}:]], axis=1)")(g.cut(env)),
        lambda g, E, ax, env: f"jnp.vstack([{E('M')}[:2], {E('M')}[2:]])",
        lambda g, E, ax, env: f"{E('M')}[{g.index_array(env)}]",
        lambda g, E, ax, env: f"{E('M')}[:, {g.index_array(env)}]",
        lambda g, E, ax, env: f"{E('M')}.at[{g.index(env)}].set({E('V')})",
        lambda g, E, ax, env: f"{E('M')}.at[{g.index(env)}].add({E('V')})",
        lambda g, E, ax, env: f"{E('M')}.at[:, {g.index(env)}].multiply({E('S')})",
        lambda g, E, ax, env: f"{E('M')}.at[{g.index(env)}, {g.index(env)}].set({E('S')})",
        lambda g, E, ax, env: f"{E('M')}.at[{g.index_array(env)}].add(0.25)",
        lambda g, E, ax, env: f"{E('M')}.at[1:3].set(0.0)",
        lambda g, E, ax, env: f"jax.nn.one_hot(jnp.argmax({E('M')}, axis=1), 4)",
        lambda g, E, ax, env: f"(jnp.eye(4) * {E('V')})",
        lambda g, E, ax, env: f"jnp.diag({E('V')})",
        lambda g, E, ax, env: f"jax.nn.softmax({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jax.nn.log_softmax({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jax.nn.standardize({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"({E('M')} - jnp.mean({E('M')}, axis={ax}, keepdims=True))",
        lambda g, E, ax, env: f"({E('M')} / (1.0 + jnp.sum(jnp.abs({E('M')}), axis={ax}, keepdims=True)))",
        lambda g, E, ax, env: f"(jnp.max({E('M')}, axis={ax}, keepdims=True) * {E('M')})",
        lambda g, E, ax, env: f"jnp.linalg.inv(jnp.eye(4) * 4.0 + jnp.tanh({E('M')}))",
        lambda g, E, ax, env: f"jax.vmap(jnp.cumsum)({E('M')})",
    ),
    "V": _m(
        lambda g, E, ax, env: f"({E('M')} @ {E('V')})",
        lambda g, E, ax, env: f"({E('V')} @ {E('M')})",
        lambda g, E, ax, env: f"jnp.einsum('ij,j->i', {E('M')}, {E('V')})",
        lambda g, E, ax, env: f"jnp.sum({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jnp.mean({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jnp.max({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jnp.min({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jax.nn.logsumexp({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jnp.linalg.norm({E('M')}, axis={ax})",
        lambda g, E, ax, env: f"jnp.prod(jnp.tanh({E('M')}), axis={ax})",
        lambda g, E, ax, env: f"{E('M')}.var(axis={ax})",
        lambda g, E, ax, env: f"{E('M')}[{g.index(env)}]",
        lambda g, E, ax, env: f"{E('M')}[:, {g.index(env)}]",
        lambda g, E, ax, env: f"jnp.diag({E('M')})",
        lambda g, E, ax, env: f"{E('M')}.reshape(16)[{g.index(env)}::4]",
        lambda g, E, ax, env: (lambda i: f"jnp.ravel({E('M')})[{i}:{i} + 4]")(g.r.choice(["0", "2", "3"] + env.ints)),
        lambda g, E, ax, env: (lambda k: f"jnp.squeeze({E('M')}[:, {k}:{k} + 1], axis=1)")(g.cut(env)),
        lambda g, E, ax, env: f"jax.nn.softmax({E('V')})",
        lambda g, E, ax, env: f"jax.nn.log_softmax({E('V')})",
        lambda g, E, ax, env: f"({E('V')} - jnp.mean({E('V')}, keepdims=True))",
        lambda g, E, ax, env: f"jnp.cumsum({E('V')})",
        lambda g, E, ax, env: f"jnp.sort({E('V')})",
        lambda g, E, ax, env: f"jnp.flip({E('V')})",
        lambda g, E, ax, env: f"{E('V')}[::-1]",
        lambda g, E, ax, env: f"jnp.roll({E('V')}, {g.index(env)})",
        lambda g, E, ax, env: (lambda k: f"jnp.concatenate([{E('V')}[:{k}], {E('V')}[{k}:]])")(g.cut(env)),
        lambda g, E, ax, env: f"{E('V')}[{g.index_array(env)}]",
        lambda g, E, ax, env: f"jnp.take({E('V')}, {g.index_array(env)})",
        lambda g, E, ax, env: f"{E('V')}.at[{g.index(env)}].set({E('S')})",
        lambda g, E, ax, env: f"{E('V')}.at[{g.index(env)}].add({E('S')})",
        lambda g, E, ax, env: f"{E('V')}.at[{g.index_array(env)}].add(0.5)",
        lambda g, E, ax, env: f"{E('V')}.at[1:3].set(0.0)",
        lambda g, E, ax, env: f"{E('V')}.at[{g.index(env)}].max({E('S')})",
        lambda g, E, ax, env: f"({E('S')} * jnp.ones(4))",
        lambda g, E, ax, env: f"jnp.full((4,), {E('S')})",
        lambda g, E, ax, env: f"jnp.stack([{E('S')}, {E('S')}, {E('S')}, {E('S')}])",
        lambda g, E, ax, env: f"jnp.linalg.solve(jnp.eye(4) * 4.0 + jnp.tanh({E('M')}), {E('V')})",
        lambda g, E, ax, env: f"jax.lax.fori_loop(0, 3, lambda i, z: jnp.tanh(z * 1.1 + 0.1), {E('V')})",
        lambda g, E, ax, env: f"jax.lax.cond(jnp.sum({E('V')}) > {g.const(-0.3, 0.3)}, lambda z: z * 0.5, lambda z: -z, {E('V')})",
    ),
    "S": _m(
        lambda g, E, ax, env: f"jnp.sum({E('M')})",
        lambda g, E, ax, env: f"jnp.mean({E('M')})",
        lambda g, E, ax, env: f"jnp.max({E('M')})",
        lambda g, E, ax, env: f"jnp.linalg.norm({E('M')})",
        lambda g, E, ax, env: f"jnp.trace({E('M')})",
        lambda g, E, ax, env: f"jnp.sum({E('M')}, axis=(0, 1))",
        lambda g, E, ax, env: f"{E('M')}.std()",
        lambda g, E, ax, env: f"jnp.sum({E('V')})",
        lambda g, E, ax, env: f"jnp.mean({E('V')})",
        lambda g, E, ax, env: f"jnp.min({E('V')})",
        lambda g, E, ax, env: f"jnp.dot({E('V')}, {E('V')})",
        lambda g, E, ax, env: f"({E('V')} @ {E('V')})",
        lambda g, E, ax, env: f"jnp.std({E('V')})",
        lambda g, E, ax, env: f"jax.nn.logsumexp({E('V')})",
        lambda g, E, ax, env: f"{E('M')}[{g.index(env)}, {g.index(env)}]",
        lambda g, E, ax, env: f"{E('V')}[{g.index(env)}]",
        lambda g, E, ax, env: f"jnp.sum({E('M')}[{g.index(env)}])",
    ),
}


# **** statements ****

class Statements(Generator):
    def block(self, env: Env, budget: int) -> list:
        """``budget`` statements for a body placed in ``env``."""
        return [self.statement(env) for _ in range(max(1, budget))]

    def statement(self, env: Env):
        table = [(40, self.assign), (10, self.log_value), (5, self.state_update)]
        if env.key:
            table.append((6, self.random))
        if env.depth < 2:
            table += [(6, self.if_fetched), (4, self.if_state), (3, self.while_fetched),
                      (4, self.nested_for), (4, self.try_except), (3, self.closure),
                      (3, self.generator_use)]
        if self.losses:
            table.append((8, self.grad))
        if self.maps:
            table += [(3, self.vjp), (2, self.vmap_map), (2, self.jacobian)]
        if self.losses and not self.exact:
            table.append((1, self.hessian))
        if self.recs:
            table.append((2, self.recursion))
        if self.jits:
            table.append((3, self.jit_call))
        if env.loop:
            table.append((3, self.break_continue))
        if env.step:
            table += [(2, self.early_return), (2, self.raise_escape)]
        if "lr" in env.numbers and not env.step:
            table.append((3, self.change_number))
        table.append((1, self.jax_error))
        total = sum(w for w, _ in table)
        x = self.r.uniform(0, total)
        for w, fn in table:
            x -= w
            if x <= 0:
                return fn(env)
        return table[-1][1](env)

    def target(self, env: Env) -> tuple[str, str]:
        kind = self.r.choice(KINDS)
        return kind, self.r.choice(POOL[kind])

    def assign(self, env: Env) -> Stmt:
        kind, x = self.target(env)
        e = self.expr(kind, self.r.randint(1, 3), env)
        form = self.r.random()
        if form < 0.5:
            return Stmt(f"{x} = jnp.tanh({e})")
        if form < 0.8:
            return Stmt(f"{x} = 0.5 * {x} + 0.5 * jnp.tanh({e})")
        return Stmt(f"{x} = {x} - {self.number(env)} * 0.1 * jnp.tanh({e})")

    def log_value(self, env: Env) -> Stmt:
        k = self.uid()
        form = self.r.randrange(6)
        if form == 0:
            return Stmt(f"log.append(('v', {k}, float({self.expr('S', 2, env)})))")
        if form == 1:
            return Stmt(f"log.append(('l', {k}, {self.expr('V', 2, env)}.tolist()))")
        if form == 2:  # (the values too: an argmax of values that tie is a tie, harness.py)
            return Stmt(f"v{k} = {self.expr('V', 2, env)}\n"
                        f"log.append(('i', {k}, int(jnp.argmax(v{k})), v{k}.tolist()))")
        if form == 3:
            c = self.threshold()
            return Stmt(f"c{k} = {self.expr('S', 2, env)}\nlog.append(('b', {k}, float(c{k}), {c}, bool(c{k} > {c})))")
        if form == 4:
            return Stmt(f"log.append(('n', {k}, np.asarray({self.expr('M', 2, env)}).sum().item()))")
        return Stmt(f"c{k} = {self.expr('S', 1, env)}\nlog.append(('f', {k}, float(c{k}), f\"{{c{k}:.3f}}\"))")

    def state_update(self, env: Env) -> Stmt:
        form = self.r.randrange(4)
        if form == 0:
            return Stmt(f"hist.append({self.expr('V', 2, env)})\nif len(hist) > 3:\n    hist.pop(0)")
        if form == 1:
            return Stmt(f"cfg['acc'] = cfg['acc'] * 0.5 + jnp.tanh({self.expr('S', 2, env)})")
        if form == 2:
            return Stmt(f"cfg['scale'] = cfg['scale'] * {self.const(0.8, 1.1)}")
        return Stmt(f"cfg['n'] += 1\nlog.append(('cfg', cfg['n']))")

    def random(self, env: Env) -> Stmt:
        split = self.r.choice(["key, sub = jax.random.split(key)",
                               "key, sub = jax.random.split(key)",
                               "key, sub, _ = jax.random.split(key, 3)"])
        form = self.r.randrange(7)
        if form == 0:
            use = "u = u + 0.1 * jax.random.normal(sub, (4,))"
        elif form == 1:
            use = "a = jnp.where(jax.random.bernoulli(sub, 0.8, (4, 4)), a / 0.8, 0.0)"
        elif form == 2:
            use = "w = 0.5 * w + 0.5 * jax.random.uniform(sub, (4,), minval=-1.0, maxval=1.0)"
        elif form == 3:
            use = "b = b[jax.random.permutation(sub, 4)]"
        elif form == 4:
            use = "u = u[jax.random.randint(sub, (4,), 0, 4)]"
        elif form == 5:
            use = "t = t + 0.1 * jax.random.normal(jax.random.fold_in(sub, it), ())" if "it % 4" in env.ints \
                else "t = t + 0.1 * jax.random.normal(sub, ())"
        else:
            use = f"log.append(('r', {self.uid()}, jax.random.uniform(sub, ()).item()))"
        return Stmt(f"{split}\n{use}")

    def fetched_scalar(self, env: Env) -> str:
        return self.expr("S", self.r.randint(1, 2), env)

    def if_fetched(self, env: Env) -> Block:
        k, c = self.uid(), self.threshold()
        inner = env.but(depth=env.depth + 1)
        form = self.r.randrange(3)
        if form == 0:
            pre = f"c{k} = float({self.fetched_scalar(env)})\nlog.append(('if', {k}, c{k}, {c}))"
            header = f"if c{k} > {c}:"
        elif form == 1:
            pre = f"c{k} = {self.fetched_scalar(env)}\nlog.append(('if', {k}, float(c{k}), {c}))"
            header = f"if c{k} > {c}:"  # the array's own __bool__
        else:
            pre = f"c{k} = jnp.max({self.expr('V', 1, env)})\nlog.append(('if', {k}, float(c{k}), {c}))"
            header = f"if jnp.any(c{k} > {c}):"
        clauses = [("else:", self.block(inner, self.r.randint(1, 2)))] if self.chance(0.6) else []
        return Block(header, self.block(inner, self.r.randint(1, 3)), clauses, pre=pre)

    def if_state(self, env: Env) -> Block:
        inner = env.but(depth=env.depth + 1)
        cond = self.r.choice(["cfg['n'] % 2 == 0", "len(hist) > 2", "cfg['scale'] > 0.45"]
                             + [f"{i} % 2 == 1" for i in env.ints[:1]])
        k = self.uid()
        clauses = [("else:", self.block(inner, 1))] if self.chance(0.4) else []
        body = [Stmt(f"log.append(('is', {k}))")] + self.block(inner, self.r.randint(1, 2))
        return Block(f"if {cond}:", body, clauses)

    def while_fetched(self, env: Env) -> Block:
        k, c = self.uid(), self.threshold()
        inner = env.but(depth=env.depth + 1, loop=True)
        pre = f"n{k} = 0"
        header = (f"while not log.append(('wc', {k}, (c{k} := float({self.fetched_scalar(env)})), {c})) "
                  f"and c{k} > {c} and n{k} < {self.r.randint(1, 4)}:")
        body = [Stmt(f"n{k} += 1", keep=True)] + self.block(inner, self.r.randint(1, 3))
        return Block(header, body, pre=pre, post=f"log.append(('wh', {k}, n{k}))")

    def nested_for(self, env: Env) -> Block:
        k = self.uid()
        inner = env.but(depth=env.depth + 1, loop=True, ints=env.ints + [f"j{k} % 4"],
                        numbers=env.numbers + [f"(1.0 / (j{k} + 1))"])
        body = self.block(inner, self.r.randint(1, 3))
        if self.chance(0.5):
            body.insert(self.r.randrange(len(body) + 1), self.break_continue(inner))
        return Block(f"for j{k} in range({self.r.randint(1, 4)}):", body)

    def break_continue(self, env: Env) -> Block:
        k = self.uid()
        word = self.r.choice(["break", "continue"])
        if self.chance(0.6) and env.fetch:
            c = self.threshold()
            return Block(f"if c{k} > {c}:", [Stmt(f"log.append(('{word}', {k}))"), Stmt(word)],
                         pre=f"c{k} = float({self.fetched_scalar(env)})\nlog.append(('if', {k}, c{k}, {c}))")
        cond = self.r.choice([f"{i} % 3 == 2" for i in env.ints] or ["len(hist) > 2"])
        return Block(f"if {cond}:", [Stmt(f"log.append(('{word}', {k}))"), Stmt(word)])

    def try_except(self, env: Env) -> Block:
        k, c = self.uid(), self.threshold()
        inner = env.but(depth=env.depth + 1)
        body = self.block(inner, self.r.randint(0, 2))
        exc = self.r.choice(["ValueError", "KeyError", "RuntimeError"])
        if self.r.random() < 0.5:
            body.append(Block(f"if c{k} > {c}:", [Stmt(f"raise {exc}('e{k}')")],
                              pre=f"c{k} = float({self.fetched_scalar(env)})\nlog.append(('if', {k}, c{k}, {c}))"))
        else:  # raised in a function it calls
            body.append(Stmt(f"""
                def check{k}(z):
                    if float(jnp.max(z)) > {c}:
                        log.append(('raise', {k}))
                        raise {exc}('e{k}')
                    return z * 0.9
                u = check{k}(u)"""))
        body += self.block(inner, self.r.randint(0, 2))
        clauses = [(f"except {exc} as e:", [Stmt(f"log.append(('exc', {k}, str(e)))")] + self.block(inner, self.r.randint(0, 1)))]
        if self.chance(0.3):
            clauses.append(("finally:", [Stmt(f"log.append(('fin', {k}))")]))
        return Block("try:", body, clauses)

    def closure(self, env: Env) -> Stmt:
        k = self.uid()
        kind = self.r.choice(KINDS)
        inner = env.but(arrays={**env.arrays, kind: env.arrays.get(kind, []) + ["z"]}, fetch=False)
        x = self.r.choice(POOL[kind])
        return Stmt(f"""
            def f{k}(z):
                return jnp.tanh({self.expr(kind, 2, inner)})
            {x} = f{k}({x})""")

    def generator_use(self, env: Env) -> Stmt:
        k = self.uid()
        kind = self.r.choice(KINDS)
        x = self.r.choice(POOL[kind])
        inner = env.but(arrays={kind: ["z"]}, fetch=False, numbers=env.numbers + [f"(j + 1)"])
        form = self.r.randrange(3)
        gen = f"""
            def gen{k}(z, n):
                for j in range(n):
                    yield jnp.tanh({self.expr(kind, 2, inner)})"""
        if form == 0:
            return Stmt(gen + f"""
            for y{k} in gen{k}({x}, {self.r.randint(1, 3)}):
                {x} = 0.5 * {x} + 0.5 * y{k}""")
        if form == 1:
            return Stmt(gen + f"\n            {x} = sum(gen{k}({x}, 2)) * 0.5")
        return Stmt(f"log.append(('g', {k}, [float(jnp.sum(r)) for r in (a[i] for i in range(4))]))"
                    if env.fetch else f"u = jnp.stack([jnp.sum(r) for r in a]) * 0.25")

    def grad(self, env: Env) -> Stmt:
        name, kx, ky = self.r.choice(self.losses)
        x, y = self.r.choice(POOL[kx]), self.r.choice(POOL[ky])
        k = self.uid()
        form = self.r.randrange(5)
        lr = self.number(env)
        if form == 0:
            return Stmt(f"g{k} = jax.grad({name})({x}, {y})\n{x} = {x} - {lr} * 0.1 * jnp.tanh(g{k})")
        if form == 1:
            s = f"l{k}, g{k} = jax.value_and_grad({name})({x}, {y})\n{x} = {x} - {lr} * 0.1 * jnp.tanh(g{k})"
            return Stmt(s + (f"\nlog.append(('loss', {k}, float(l{k})))" if env.fetch else ""))
        if form == 2:
            if x == y:
                return Stmt(f"g{k} = jax.grad({name})({x}, {y})\n{x} = {x} - 0.05 * jnp.tanh(g{k})")
            return Stmt(f"gx{k}, gy{k} = jax.grad({name}, argnums=(0, 1))({x}, {y})\n"
                        f"{x} = {x} - 0.05 * jnp.tanh(gx{k})\n{y} = {y} - 0.05 * jnp.tanh(gy{k})")
        if form == 3:
            return Stmt(f"(l{k}, aux{k}), g{k} = jax.value_and_grad(lambda p, q: ({name}(p, q), p * 2.0), has_aux=True)({x}, {y})\n"
                        f"{x} = 0.5 * jnp.tanh(aux{k}) + 0.5 * ({x} - 0.1 * g{k})")
        return Stmt(f"g{k} = jax.grad(lambda p: {name}(p, {y}) * {lr})({x})\n{x} = {x} - 0.1 * jnp.tanh(g{k})")

    def vjp(self, env: Env) -> Stmt:
        name, kx, ky, _ = self.r.choice(self.maps)
        x, y = self.r.choice(POOL[kx]), self.r.choice(POOL[ky])
        k = self.uid()
        return Stmt(f"out{k}, pull{k} = jax.vjp(lambda p: {name}(p, {y}), {x})\n"
                    f"(ct{k},) = pull{k}(jnp.ones_like(out{k}))\n{x} = 0.5 * out{k} + 0.5 * jnp.tanh(ct{k})")

    def vmap_map(self, env: Env) -> Stmt:
        cands = [m for m in self.maps if m[1] == "V"]
        if not cands:
            return self.assign(env)
        name, _, ky, _ = self.r.choice(cands)
        y = self.r.choice(POOL[ky])
        x = self.r.choice(POOL["M"])
        return Stmt(f"{x} = jax.vmap(lambda r: {name}(r, {y}))({x})")

    def jacobian(self, env: Env) -> Stmt:
        """jax.jacrev / jacfwd / checkpoint of a map (a function JAX traces at every call):
        a V -> V map's Jacobian is a matrix, an S -> S map's a 0-d array.  Programs for
        exact runs keep checkpoint only: JAX's own jaxpr of a jacrev / jacfwd / hessian,
        evaluated op by op, differs from its eager evaluation in the last bits (plain JAX:
        ``eval_jaxpr(make_jaxpr(jax.jacfwd(f)))`` against ``jax.jacfwd(f)``, 30 of 30
        random functions; checkpoint and vmap 0 of 30), and terra_bc runs them so."""
        name, kx, ky, _ = self.r.choice(self.maps)
        x, y = self.r.choice(POOL[kx]), self.r.choice(POOL[ky])
        k = self.uid()
        form = self.r.randrange(4)
        if form == 3 or kx == "M" or self.exact:
            if self.chance(0.5):
                return Stmt(f"{x} = 0.5 * {x} + 0.5 * jax.checkpoint(lambda p: {name}(p, {y}))({x})")
            return Stmt(f"gc{k} = jax.grad(lambda p: jnp.sum(jax.checkpoint({name})(p, {y})))({x})\n"
                        f"{x} = {x} - 0.05 * jnp.tanh(gc{k})")
        jac = ("jax.jacrev", "jax.jacfwd", "jax.jacrev")[form]
        z = self.r.choice(POOL["M" if kx == "V" else "S"])
        return Stmt(f"j{k} = {jac}(lambda p: {name}(p, {y}))({x})\n{z} = 0.5 * {z} + 0.5 * jnp.tanh(j{k})")

    def hessian(self, env: Env) -> Stmt:
        cands = [m for m in self.losses if m[1] != "M"]
        if not cands:
            return self.assign(env)
        name, kx, ky = self.r.choice(cands)
        x, y = self.r.choice(POOL[kx]), self.r.choice(POOL[ky])
        k = self.uid()
        z = self.r.choice(POOL["M" if kx == "V" else "S"])
        return Stmt(f"h{k} = jax.hessian(lambda p: {name}(p, {y}))({x})\n{z} = 0.5 * {z} + 0.5 * jnp.tanh(h{k})")

    def recursion(self, env: Env) -> Stmt:
        name, kind, fetches = self.r.choice(self.recs)
        x = self.r.choice(POOL[kind])
        if fetches and not env.fetch:
            return self.assign(env)
        return Stmt(f"{x} = {name}({x}, {self.r.randint(0, 3)})")

    def jit_call(self, env: Env) -> Stmt:
        name, kx, ky = self.r.choice(self.jits)
        x, y = self.r.choice(POOL[kx]), self.r.choice(POOL[ky])
        return Stmt(f"{x} = {name}({x}, {y})")

    def early_return(self, env: Env) -> Block:
        k, c = self.uid(), self.threshold()
        return Block(f"if c{k} > {c}:", [Stmt(f"log.append(('ret', {k}))"), Stmt("return a, b, u, w, t, key")],
                     pre=f"c{k} = float({self.fetched_scalar(env)})\nlog.append(('if', {k}, c{k}, {c}))")

    def raise_escape(self, env: Env) -> Block:
        k, c = self.uid(), self.threshold()
        exc = self.r.choice(["ArithmeticError", "ZeroDivisionError", "FloatingPointError"])
        return Block(f"if c{k} > {c}:", [Stmt(f"raise {exc}('s{k}')")],
                     pre=f"c{k} = float({self.fetched_scalar(env)})\nlog.append(('if', {k}, c{k}, {c}))")

    def change_number(self, env: Env) -> Stmt:
        form = self.r.randrange(3)
        if form == 0:
            return Stmt(f"lr = lr * {self.const(0.7, 0.99)}")
        if form == 1:
            return Stmt(f"lr = 0.05 + 0.1 * abs(float({self.fetched_scalar(env)}))")
        return Stmt(f"lr = lr + 0.01 * (it % 3)" if "it % 4" in env.ints else "lr = lr * 0.95")

    def jax_error(self, env: Env) -> Block:
        k = self.uid()
        bad = self.r.choice(["u = jnp.reshape(u, (3,))", "u = a @ jnp.ones(3)",
                             "a = jnp.concatenate([a, u])", "t = jnp.sum(u, axis=2)"])
        before = self.block(env.but(depth=env.depth + 1), 1)
        return Block("try:", before + [Stmt(bad)],
                     [("except (TypeError, ValueError) as e:", [Stmt(f"log.append(('jaxerr', {k}, type(e).__name__))")])])


# **** helpers and the program's frame ****

SHAPES = {"M": "(4, 4)", "V": "(4,)", "S": "()"}


class ProgramGenerator(Statements):
    def helper_env(self, kx: str, ky: str, pure: bool = False) -> Env:
        arrays = {kx: ["x"]}
        arrays.setdefault(ky, []).append("y")
        if pure:
            return Env(arrays, [], [], fetch=False, rs=False, state=False)
        return Env(arrays, ["lr", "cfg['scale']"], [], fetch=False, rs=True, state=True)

    def loss_helper(self) -> Stmt:
        k, kx, ky = self.uid(), self.r.choice(KINDS), self.r.choice(KINDS)
        env = self.helper_env(kx, ky)
        kind = self.r.choice(KINDS)
        lines = [f"def loss{k}(x, y):"]
        e = self.expr(kind, 3, env)
        if self.chance(0.35):  # a NumPy dropout mask drawn inside the differentiated function
            lines.append(f"    m = jnp.asarray(rs.random_sample({SHAPES[kind]}) > 0.2, jnp.float32)")
            e = f"({e}) * m"
        if self.chance(0.3):  # a branch on Python state inside it
            lines += ["    if cfg['n'] % 2 == 0:", f"        return jnp.mean(jnp.square({self.expr(kind, 2, env)}))"]
        lines.append(f"    return jnp.sum(jnp.tanh({e}))")
        self.losses.append((f"loss{k}", kx, ky))
        return Stmt("\n".join(lines))

    def map_helper(self) -> Stmt:
        k, kx, ky = self.uid(), self.r.choice(KINDS), self.r.choice(KINDS)
        # An impure map (NumPy draws, Python numbers and state it reads) is vmapped too:
        # eager JAX runs a vmapped function's Python at every call, and so must terra_bc
        # (runtime/bodies.py; tests/fuzz/regressions/case_300304_units.py).
        pure = self.chance(0.5)
        self.maps.append((f"f{k}", kx, ky, pure))
        env = self.helper_env(kx, ky, pure=pure)
        return Stmt(f"def f{k}(x, y):\n    return jnp.tanh({self.expr(kx, 3, env)})")

    def rec_helper(self) -> Stmt:
        k, kind = self.uid(), self.r.choice(KINDS)
        env = self.helper_env(kind, kind).but(arrays={kind: ["x"]})
        fetches = self.chance(0.5)
        cond = f"d <= 0 or float(jnp.sum(x)) > {self.threshold()}" if fetches else "d <= 0"
        self.recs.append((f"rec{k}", kind, fetches))
        base = f"        log.append(('rec', {k}, d))\n" if fetches else ""
        return Stmt(f"def rec{k}(x, d):\n    if {cond}:\n{base}        return x\n"
                    f"    return rec{k}(0.5 * x + 0.5 * jnp.tanh({self.expr(kind, 2, env)}), d - 1)")

    def jit_helper(self) -> Stmt:
        k, kx, ky = self.uid(), self.r.choice(KINDS), self.r.choice(KINDS)
        self.jits.append((f"jf{k}", kx, ky))
        return Stmt(f"@jax.jit\ndef jf{k}(x, y):\n    return jnp.tanh({self.expr(kx, 3, self.helper_env(kx, ky, pure=True))})")

    def program(self) -> Program:
        s = self.seed
        head = Stmt(f"""
            # terra_bc differential fuzzer, program seed {s}
            import numpy as np
            import jax
            import jax.numpy as jnp
            """, keep=True)
        pool = Stmt(f"""
            log = []
            rs = np.random.RandomState({s % 2**32})
            key = jax.random.PRNGKey({s % 2**31})
            a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
            b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
            u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
            w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
            t = jnp.asarray(0.1, jnp.float32)
            lr = 0.1
            hist = [jnp.zeros(4)]
            cfg = {{'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}}""", keep=True)
        helpers = []
        for make, p in ((self.loss_helper, 0.9), (self.loss_helper, 0.4), (self.map_helper, 0.7),
                        (self.rec_helper, 0.4), (self.jit_helper, 0.3)):
            if self.chance(p):
                helpers.append(make())
        size = self.size
        step_env = Env(dict(POOL), ["lr", "cfg['scale']", "(1.0 / (it + 1))"], ["it % 4"],
                       key=True, step=True)
        step = Block("def step(a, b, u, w, t, key, lr, it):",
                     self.block(step_env, self.r.randint(3, 6 * size)) + [Stmt("return a, b, u, w, t, key", keep=True)])
        loop_env = step_env.but(step=False, loop=True)
        turns = self.r.randint(4, 8)
        call = Block("try:", [Stmt("a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)")],
                     [("except ArithmeticError as e:", [Stmt("log.append(('step-exc', str(e)))")])])
        body = (self.block(loop_env, self.r.randint(0, 2 * size)) + [call]
                + self.block(loop_env, self.r.randint(1, 3 * size)))
        if self.chance(0.7):
            loop = Block(f"for it in range({turns}):", body)
            loop_pre = []
        else:  # (`it += 1` first, so that `continue` cannot skip it)
            loop = Block(f"while it < {turns}:", [Stmt("it += 1", keep=True)] + body)
            loop_pre = [Stmt("it = 0", keep=True)]
        ret = Stmt("return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, "
                   "'hist': hist, 'cfg': cfg}, log", keep=True)
        main = Block("def main(decorate=lambda f: f):",
                     [pool] + helpers + [step, Stmt("step = decorate(step)", keep=True)] + loop_pre + [loop, ret],
                     keep=True)
        tail = Stmt("""
            if __name__ == '__main__':
                print(main())""", keep=True)
        return Program(s, [head, main, tail])


def generate(seed: int, size: int = 1, exact: bool = False) -> Program:
    """Program ``seed``; ``exact``: one for exact runs (no jacrev / jacfwd / hessian)."""
    return ProgramGenerator(seed, size, exact).program()
