"""Differentially private SGD on an MLP, written after JAX's own
``examples/differentially_private_sgd.py``: per-example gradients with
``jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))``, each clipped to an L2 norm (a second
``jax.vmap``), summed, Gaussian noise added from a key split in Python, then an optax
momentum update. The loop fetches ``float(loss)`` every step and keeps a Python privacy
accountant (a running count of steps and the noise spent) and a log every few steps.
``--jit`` is the tutorial's ``jax.jit`` of the private update.

    python examples/lib_dpsgd_mlp.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import checksum, param_change, parse_args, report

IN, HIDDEN, CLASSES, BATCH = 32, 64, 4, 64
L2_CLIP, NOISE_MULTIPLIER, LR, LOG_EVERY = 1.0, 1.1, 0.15, 5


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN), "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
            "b2": jnp.zeros(CLASSES)}


def predict(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def loss(params, x, y):
    # One example (vmapped below): x [IN], y a class index.
    logits = predict(params, x)
    return -jax.nn.log_softmax(logits)[y]


def clipped(grads):
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, L2_CLIP / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads)


def make_update(tx):
    def private_update(params, opt_state, x, y, key):
        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
        per_example = jax.vmap(clipped)(per_example)
        leaves, tree = jax.tree.flatten(per_example)
        keys = jax.random.split(key, len(leaves))
        noisy = [jnp.sum(g, 0) + L2_CLIP * NOISE_MULTIPLIER * jax.random.normal(k, g.shape[1:])
                 for g, k in zip(leaves, keys)]
        grads = jax.tree.unflatten(tree, [g / x.shape[0] for g in noisy])
        updates, opt_state = tx.update(grads, opt_state, params)
        value = jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(params, x, y))
        return optax.apply_updates(params, updates), opt_state, value
    return private_update


def make_batch(rng):
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    y = (np.abs(x[:, :CLASSES]).argmax(1)).astype(np.int32)
    return x, y


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    params = init_params(key)
    params0 = params
    tx = optax.sgd(LR, momentum=0.9)
    opt_state = tx.init(params)
    update = make_update(tx)
    if args.jit:
        update = jax.jit(update)

    losses, times, spent = [], [], 0.0
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_batch(rng)
        key, sub = jax.random.split(key)
        params, opt_state, value = update(params, opt_state, x, y, sub)
        value = float(value)
        losses.append(value)
        spent += 1.0 / NOISE_MULTIPLIER ** 2  # a Python accountant (RDP order 1, roughly)
        times.append(time.perf_counter() - t0)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {value:.4f}  privacy spent {spent:.2f}")

    x, y = make_batch(np.random.default_rng(4321))
    accuracy = float(jnp.mean(jnp.argmax(predict(params, x), 1) == y))
    print(f"accuracy {accuracy:.3f}")
    report(times, checksum(param_change(params, params0), losses, accuracy))


if __name__ == "__main__":
    main()
