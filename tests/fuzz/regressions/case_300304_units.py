# Fixed (runtime/bodies.py): jax.vmap of a function that draws NumPy randomness runs its
# Python at every call, as eager JAX does (it was traced once and its draws were stale).
# Found by: python -m tests.fuzz --seed 300304 --programs 1 --size 1
# Mode: units
# Failure: mismatch: values['a']: array element (np.int64(0), np.int64(2)): np.float32(-0.027154142) != np.float32(-0.049760494)
# terra_bc differential fuzzer, program seed 300304
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(300304)
    key = jax.random.PRNGKey(300304)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def f2(x, y):
        return jnp.tanh(jax.nn.elu(x.at[2].max(jnp.mean(jnp.asarray(rs.standard_normal((4, 4)), jnp.float32)))))
    def step(a, b, u, w, t, key, lr, it):
        return a, b, u, w, t, key
    step = decorate(step)
    it = 0
    while it < 3:
        it += 1
        a = jax.vmap(lambda r: f2(r, t))(a)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
