"""A small imperative JAX training script, the kind terra_bc is for.

Eager jnp calls mixed with NumPy (a dropout mask drawn inside the loss), a Python branch
on the loss and a printed float every few steps: `jax.jit` of `loss_fn` would freeze the
mask; eager JAX runs it op by op.  Run it as `python -m terra_bc --stats examples/demo.py`.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(64, 8)), dtype=jnp.float32)
y = jnp.sin(x.sum(axis=1, keepdims=True))


def init(key, sizes=(8, 32, 1)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def loss_fn(params, x, y):
    (w1, b1), (w2, b2) = params
    h = jnp.tanh(x @ w1 + b1)
    mask = rng.random(h.shape) > 0.1          # NumPy randomness, fresh every step
    h = h * jnp.asarray(mask) / 0.9
    return jnp.mean((h @ w2 + b2 - y) ** 2)


params = init(jax.random.PRNGKey(0))
best = float("inf")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
for step in range(steps):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    params = [(w - 0.1 * gw, b - 0.1 * gb) for (w, b), (gw, gb) in zip(params, grads)]
    if loss < best:                            # a Python branch on a tensor value
        best = float(loss)
    if step % 10 == 0:
        print(f"step {step:3d}  loss {float(loss):.4f}")
print(f"best loss {best:.4f}")
