# Bug: jax.vmap of a lambda closing over a placeholder whose .at[...] update ran inside the
# vmap (an op JAX runs itself): the placeholder's method re-entered the iteration as an op
# inside the opaque one and recursed (RecursionError). Fixed in runtime/placeholders.py (call).
# Found by: python -m tests.fuzz --seed 300056 --programs 1 --size 1
# Mode: units
# Failure before the fix: crash: RecursionError: maximum recursion depth exceeded while calling a Python object
# terra_bc differential fuzzer, program seed 300056
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(300056)
    key = jax.random.PRNGKey(300056)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def loss2(x, y):
        return jnp.sum(jnp.tanh(((jnp.flip(jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)) - cfg['scale']) - jax.nn.softplus((jnp.float32(rs.uniform(-1.0, 1.0)) - lr)))))
    def f3(x, y):
        return jnp.tanh((jnp.rot90(y.at[jnp.argsort(x)].add(0.25)) @ jnp.max(jnp.maximum(y, cfg['acc']), axis=0)))
    def step(a, b, u, w, t, key, lr, it):
        b = jax.vmap(lambda r: f3(r, a))(b)
        l7, g7 = jax.value_and_grad(loss2)(a, a)
        a = a - 1.023 * 0.1 * jnp.tanh(g7)
        return a, b, u, w, t, key
    step = decorate(step)
    it = 0
    while it < 3:
        it += 1
        a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
