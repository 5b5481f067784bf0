# Bug: x.at[i].add(v) on a concrete x with a placeholder index i (turn 2 of a loop unit) ran
# as an opaque op and recursed without end (RecursionError). Fixed in runtime/dispatch.py.
# Found by: python -m tests.fuzz --seed 1003 --programs 1 --size 1
# Mode: units
# Failure before the fix: crash: RecursionError: maximum recursion depth exceeded
# terra_bc differential fuzzer, program seed 1003
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(1003)
    key = jax.random.PRNGKey(1003)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def step(a, b, u, w, t, key, lr, it):
        a = jnp.tanh(jax.nn.gelu(b.at[jnp.argsort(u)].add(0.25)))
        return a, b, u, w, t, key
    step = decorate(step)
    it = 0
    while it < 2:
        it += 1
        a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
