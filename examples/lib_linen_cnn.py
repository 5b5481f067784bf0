"""A Flax linen CNN with BatchNorm, the way Flax's linen tutorials write it.

The model is an ``nn.Module`` with ``@nn.compact``; a ``flax.training.train_state.TrainState``
subclass carries the parameters, the optax optimiser state and BatchNorm's
``batch_stats``. The step calls ``state.apply_fn(..., mutable=["batch_stats"])`` inside
``jax.value_and_grad(has_aux=True)``, then ``state.apply_gradients`` and
``state.replace(batch_stats=...)``; the loop fetches loss and accuracy with ``float()``
every step. The data are synthetic 28x28x1 images of ten classes, generated with NumPy.
``--jit`` is the tutorial's ``jax.jit`` of the train step.

    python examples/lib_linen_cnn.py --steps 30 [--jit] [--seed 0]
"""
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from _common import checksum, mnist_like_batch, param_change, parse_args, report

BATCH, LOG_EVERY = 16, 5


class CNN(nn.Module):
    """A small LeNet-style CNN."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(features=8, kernel_size=(3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=16, kernel_size=(3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(features=64)(x))
        return nn.Dense(features=10)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any


def create_train_state(key, learning_rate, momentum):
    cnn = CNN()
    variables = cnn.init(key, jnp.ones((1, 28, 28, 1)), train=False)
    # SGD with momentum: BatchNorm makes the conv biases' gradients exactly zero in
    # theory, float noise in practice, which Adam would scale up to learning-rate-sized
    # steps (differently in eager and compiled runs).
    tx = optax.sgd(learning_rate, momentum)
    return TrainState.create(apply_fn=cnn.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])


def train_step(state, batch):
    """Train for a single step."""
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits=logits, labels=batch["label"]).mean()
        return loss, (logits, updates)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, updates)), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates["batch_stats"])
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return state, metrics


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    state = create_train_state(jax.random.PRNGKey(args.seed), 0.05, 0.9)
    params0 = state.params
    step_fn = jax.jit(train_step) if args.jit else train_step

    history, times = {"loss": [], "accuracy": []}, []
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = mnist_like_batch(rng, BATCH)
        state, metrics = step_fn(state, batch)
        for name, value in metrics.items():
            history[name].append(float(value))
        times.append(time.perf_counter() - t0)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {history['loss'][-1]:.4f}  accuracy {history['accuracy'][-1]:.3f}")

    batch = mnist_like_batch(np.random.default_rng(4321), 128)
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False)
    test_acc = float(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    print(f"test accuracy {test_acc:.3f}")
    report(times, checksum(param_change(state.params, params0), history["loss"], test_acc))


if __name__ == "__main__":
    main()
