"""A CNN classifier in Equinox on MNIST-shaped synthetic data, the way Equinox's own CNN
tutorial writes it, with dropout.

The model is an Equinox module of ``eqx.nn.Conv2d``, ``MaxPool2d``, ``Linear`` and
``Dropout`` layers whose ``__call__`` takes one example; the loss runs it through
``jax.vmap(model)(x, key=keys)`` with one dropout key per example (split in the step),
``eqx.filter_value_and_grad`` differentiates it, optax's AdamW on a warm-up cosine schedule
makes the updates. The loop fetches the loss and the batch accuracy every step; the test
accuracy runs the model in ``eqx.nn.inference_mode``. ``--jit`` is the tutorial's
``eqx.filter_jit`` of the step.

    python examples/lib_equinox_cnn.py --steps 30 [--jit] [--seed 0]
"""
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import checksum, param_change, parse_args, report

BATCH, CLASSES, LOG_EVERY = 32, 10, 5


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    hidden: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 8, kernel_size=3, key=k1)
        self.conv2 = eqx.nn.Conv2d(8, 16, kernel_size=3, key=k2)
        self.pool = eqx.nn.MaxPool2d(kernel_size=2, stride=2)
        self.hidden = eqx.nn.Linear(16 * 5 * 5, 64, key=k3)
        self.dropout = eqx.nn.Dropout(0.1)
        self.head = eqx.nn.Linear(64, CLASSES, key=k4)

    def __call__(self, x, *, key=None):
        # x: [1, 28, 28], one example
        x = self.pool(jax.nn.relu(self.conv1(x)))   # [8, 13, 13]
        x = self.pool(jax.nn.relu(self.conv2(x)))   # [16, 5, 5]
        x = jax.nn.relu(self.hidden(jnp.ravel(x)))
        x = self.dropout(x, key=key)
        return jax.nn.log_softmax(self.head(x))


@eqx.filter_value_and_grad(has_aux=True)
def compute_loss(model, x, y, keys):
    logits = jax.vmap(model)(x, key=keys)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def make_step_fn(optim):
    def make_step(model, opt_state, x, y, key):
        keys = jax.random.split(key, x.shape[0])
        (loss, acc), grads = compute_loss(model, x, y, keys)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return loss, acc, model, opt_state
    return make_step


def make_batch(rng, templates, n):
    # Each class is a fixed random 28x28 template plus noise.
    y = rng.integers(0, CLASSES, size=n)
    x = templates[y] + 0.5 * rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int32)


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    templates = rng.standard_normal((CLASSES, 1, 28, 28)).astype(np.float32)
    key = jax.random.PRNGKey(args.seed)
    key, init_key = jax.random.split(key)
    model = CNN(init_key)
    params0 = eqx.filter(model, eqx.is_array)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, max(args.steps, 10))
    optim = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    make_step = make_step_fn(optim)
    if args.jit:
        make_step = eqx.filter_jit(make_step)

    losses, accs, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_batch(rng, templates, BATCH)
        key, step_key = jax.random.split(key)
        loss, acc, model, opt_state = make_step(model, opt_state, x, y, step_key)
        loss, acc = float(loss), float(acc)
        losses.append(loss)
        accs.append(acc)
        times.append(time.perf_counter() - t0)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {loss:.4f}  acc {acc:.3f}")

    x, y = make_batch(np.random.default_rng(4321), templates, 128)
    inference = eqx.nn.inference_mode(model)
    test_acc = float(jnp.mean(jnp.argmax(jax.vmap(inference)(x), axis=-1) == y))
    print(f"test accuracy {test_acc:.3f}")
    report(times, checksum(param_change(eqx.filter(model, eqx.is_array), params0), losses,
                           accs, test_acc))


if __name__ == "__main__":
    main()
