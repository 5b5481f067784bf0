# Fixed (runtime/bodies.py): jax.vmap of a function that draws NumPy randomness runs its
# Python at every call, as eager JAX does (it was traced once and its draws were stale).
# Found by: python -m tests.fuzz --seed 300326 --programs 1 --size 1
# Mode: function
# Failure: mismatch: values['b']: array element (np.int64(0), np.int64(0)): np.float32(-0.0862721) != np.float32(-0.16819839)
# terra_bc differential fuzzer, program seed 300326
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(300326)
    key = jax.random.PRNGKey(300326)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def f2(x, y):
        return jnp.tanh(jax.nn.gelu(jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)))
    def step(a, b, u, w, t, key, lr, it):
        b = jax.vmap(lambda r: f2(r, u))(b)
        return a, b, u, w, t, key
    step = decorate(step)
    for it in range(2):
        a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
