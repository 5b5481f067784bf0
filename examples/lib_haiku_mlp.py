"""A Haiku MLP with BatchNorm, the way Haiku's own tutorials write it.

The network is a plain function of ``hk.Flatten``, ``hk.Linear`` and ``hk.BatchNorm`` layers,
turned into a pure ``init``/``apply`` pair by ``hk.transform_with_state`` (BatchNorm's moving
averages are the state). The loss returns the new state as aux, ``jax.value_and_grad(loss_fn,
has_aux=True)`` differentiates it with respect to the parameters, optax's Adam makes the
updates and ``optax.apply_updates`` applies them. The loop fetches ``float(loss)`` every step
and checks it in Python (divergence guard, best loss so far). The data are synthetic 28x28x1
images of ten classes, generated with NumPy. ``--jit`` is the tutorial's ``jax.jit`` of the
update step.

    python examples/lib_haiku_mlp.py --steps 30 [--jit] [--seed 0]
"""
import math
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import checksum, mnist_like_batch, param_change, parse_args, report

HIDDEN, CLASSES = (64,), 10
BATCH, LOG_EVERY = 32, 5


def net_fn(images, is_training):
    x = hk.Flatten()(images)
    for width in HIDDEN:
        # No bias before BatchNorm (its offset does that job): such a bias's gradient is pure
        # rounding noise, which Adam would scale up to learning-rate-sized steps.
        x = hk.Linear(width, with_bias=False)(x)
        x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
        x = jax.nn.relu(x)
    return hk.Linear(CLASSES)(x)


network = hk.transform_with_state(net_fn)
optimizer = optax.adam(1e-3)


def loss_fn(params, state, batch):
    logits, state = network.apply(params, state, None, batch["image"], is_training=True)
    labels = jax.nn.one_hot(batch["label"], CLASSES)
    loss = optax.softmax_cross_entropy(logits, labels).mean()
    return loss, state


def update(params, state, opt_state, batch):
    """One SGD step: new params, BatchNorm state, optimiser state, and the loss."""
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, state, opt_state, loss


def evaluate(params, state, batch):
    logits, _ = network.apply(params, state, None, batch["image"], is_training=False)
    return jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    sample = mnist_like_batch(rng, BATCH)
    params, state = network.init(jax.random.PRNGKey(args.seed), sample["image"], is_training=True)
    params0, state0 = params, state
    opt_state = optimizer.init(params)
    step_fn = jax.jit(update) if args.jit else update

    losses, times = [], []
    best = float("inf")
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = mnist_like_batch(rng, BATCH)
        params, state, opt_state, loss = step_fn(params, state, opt_state, batch)
        loss = float(loss)
        losses.append(loss)
        times.append(time.perf_counter() - t0)
        # Python checks on the fetched loss.
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss diverged at step {step}: {loss}")
        best = min(best, loss)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {loss:.4f}  best {best:.4f}")

    batch = mnist_like_batch(np.random.default_rng(4321), 256)
    test_acc = float(evaluate(params, state, batch))
    print(f"test accuracy {test_acc:.3f}")
    report(times, checksum(param_change(params, params0), param_change(state, state0),
                           losses, test_acc))


if __name__ == "__main__":
    main()
