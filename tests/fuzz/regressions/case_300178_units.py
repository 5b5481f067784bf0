# Bug: jnp.asarray(<float64 NumPy array>, jnp.float32) in a co-executed turn handed Python the
# fed NumPy array itself (the op is the identity on its fed input): a float32 placeholder
# whose value was float64. Fixed in runtime/coexecution.py (bind).
# Found by: python -m tests.fuzz --seed 300178 --programs 1 --size 1
# Mode: units
# Failure before the fix: mismatch: values['hist'][2]: array float32(4,) != float64(4,)
# terra_bc differential fuzzer, program seed 300178
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(300178)
    key = jax.random.PRNGKey(300178)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def step(a, b, u, w, t, key, lr, it):
        return a, b, u, w, t, key
    step = decorate(step)
    for it in range(2):
        hist.append(jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32))
        if len(hist) > 3:
            hist.pop(0)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
