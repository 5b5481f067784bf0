# Bug: jax.vjp/grad/jvp differentiated a value the function used through a closure when the
# same value was also the differentiated input (here vjp of lambda p: f1(p, t) at t gave a
# cotangent of 0.708 where JAX gives 0). Fixed in runtime/autodiff.py (differentiated_inputs).
# Found by: python -m tests.fuzz --seed 1013 --programs 1 --size 1
# Mode: units
# Failure before the fix: mismatch: values['t']: array element (): np.float32(0.16997695) != np.float32(0.5242932)
# terra_bc differential fuzzer, program seed 1013
import numpy as np
import jax
import jax.numpy as jnp
def main(decorate=lambda f: f):
    log = []
    rs = np.random.RandomState(1013)
    key = jax.random.PRNGKey(1013)
    a = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    b = jnp.asarray(rs.standard_normal((4, 4)) * 0.5, jnp.float32)
    u = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    w = jnp.asarray(rs.uniform(-1.0, 1.0, 4), jnp.float32)
    t = jnp.asarray(0.1, jnp.float32)
    lr = 0.1
    hist = [jnp.zeros(4)]
    cfg = {'scale': 0.5, 'n': 0, 'acc': jnp.zeros(())}
    def f1(x, y):
        return jnp.tanh(y)
    def step(a, b, u, w, t, key, lr, it):
        t = jnp.tanh(jnp.sum(b[0]))
        return a, b, u, w, t, key
    step = decorate(step)
    for it in range(1):
        a, b, u, w, t, key = step(a, b, u, w, t, key, lr, it)
        out7, pull7 = jax.vjp(lambda p: f1(p, t), t)
        (ct7,) = pull7(jnp.ones_like(out7))
        t = 0.5 * out7 + 0.5 * jnp.tanh(ct7)
    return {'a': a, 'b': b, 'u': u, 'w': w, 't': t, 'key': key, 'lr': lr, 'hist': hist, 'cfg': cfg}, log
if __name__ == '__main__':
    print(main())
