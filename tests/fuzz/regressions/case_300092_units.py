# Fixed: in a loop unit's traced turn, u[idx] with u a jax.Array and idx a placeholder hands
# Python a recording tracer; a later op whose shape check fails (here jnp.concatenate of a
# (4, 4) and a (4,) array) ran for real under the parent trace with that tracer and raised
# UnexpectedTracerError where eager JAX raises TypeError. A graph break now gives the op the
# tracer's value (tracing._graph_break).
# Found by: python -m tests.fuzz --seed 300092 --programs 1 --size 1
# Mode: units
# Failure: mismatch: log[1][2]: 'TypeError' != 'UnexpectedTracerError'
# terra_bc differential fuzzer, program seed 300092
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(300092)
    key = jax.random.PRNGKey(300092)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def step(a, b, u, w, t, key, lr, it):
        key, sub, _ = jax.random.split(key, 3)
        u = u[jax.random.randint(sub, (4,), 0, 4)]
        return a, b, u, w, t, key
    step = decorate(step)
    it = 0
    while it < 2:
        it += 1
        a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)
        try:
            a = jnp.concatenate([a, u])
        except (TypeError, ValueError) as e:
            log.append(('jaxerr', 10, type(e).__name__))
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
