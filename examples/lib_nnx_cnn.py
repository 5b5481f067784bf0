"""A Flax NNX CNN on MNIST-shaped data, the way Flax's own MNIST tutorial writes it.

The model is an ``nnx.Module`` (Conv, BatchNorm, Dropout, avg-pool, Linear) holding its own
state; ``nnx.value_and_grad`` with ``has_aux`` gives loss, logits and gradients,
``nnx.Optimizer(...).update`` mutates the model in place and an ``nnx.MultiMetric``
(accuracy, average loss) is updated in the step and read with ``float()`` every step. The
data are synthetic 28x28x1 images of ten classes, generated with NumPy. ``--jit`` is the
tutorial's ``@nnx.jit`` of the train step.

    python examples/lib_nnx_cnn.py --steps 30 [--jit] [--seed 0]
"""
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from _common import checksum, mnist_like_batch, param_change, parse_args, report

BATCH, LOG_EVERY = 16, 5


class CNN(nnx.Module):
    """A small LeNet-style CNN (the tutorial's, narrower)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.05, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(7 * 7 * 16, 64, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.05, rngs=rngs)
        self.linear2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dropout2(self.linear1(x)))
        return self.linear2(x)


def loss_fn(model, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"]).mean()
    return loss, logits


def train_step(model, optimizer, metrics, batch):
    """Train for a single step."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])  # in-place updates
    optimizer.update(model, grads)  # in-place updates


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    model = CNN(rngs=nnx.Rngs(args.seed))
    # A snapshot: nnx.state shares the model's Variables, which the optimizer updates in place.
    params0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # SGD with momentum: BatchNorm makes the conv biases' gradients exactly zero in
    # theory, float noise in practice, which Adam would scale up to learning-rate-sized
    # steps (differently in eager and compiled runs).
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
    step_fn = nnx.jit(train_step) if args.jit else train_step

    history, times = {"loss": [], "accuracy": []}, []
    model.train()  # Dropout on, BatchNorm uses batch statistics
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = mnist_like_batch(rng, BATCH)
        step_fn(model, optimizer, metrics, batch)
        for name, value in metrics.compute().items():  # the metric, read every step
            history[name].append(float(value))
        metrics.reset()
        times.append(time.perf_counter() - t0)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {history['loss'][-1]:.4f}  accuracy {history['accuracy'][-1]:.3f}")

    model.eval()  # Dropout off, BatchNorm uses its running averages
    batch = mnist_like_batch(np.random.default_rng(4321), 128)
    test_acc = float(jnp.mean(jnp.argmax(model(batch["image"]), -1) == batch["label"]))
    print(f"test accuracy {test_acc:.3f}")
    report(times, checksum(param_change(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params0),
                           history["loss"], test_acc))


if __name__ == "__main__":
    main()
