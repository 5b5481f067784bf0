# Bug: in a traced turn, b[p] with b a jax.Array (from the eager turn 1) and p a placeholder
# gave Python a recording tracer; used by a later op and then returned, it was never computed:
# reading it after the loop raised. Fixed in runtime/launching.py (held).
# Found by: python -m tests.fuzz --seed 200026 --programs 1 --size 1
# Mode: units
# Failure before the fix: crash: RuntimeError: terra_bc: a value recorded abstractly was read after its iteration ended without being computed
# terra_bc differential fuzzer, program seed 200026
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(200026)
    key = jax.random.PRNGKey(200026)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def step(a, b, u, w, t, key, lr, it):
        key, sub = jax.random.split(key)
        b = b[jax.random.permutation(sub, 4)]
        t = jnp.tanh(jnp.sum((b + t)))
        return a, b, u, w, t, key
    step = decorate(step)
    it = 0
    while it < 2:
        it += 1
        t = jnp.tanh(t)
        a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
