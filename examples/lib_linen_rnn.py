"""A sequence classifier with a Flax linen LSTM, the way Flax's own RNN examples write it.

``nn.RNN(nn.OptimizedLSTMCell(...))`` runs the cell over the time axis: linen's ``nn.RNN``
is an ``nn.scan`` whose parameters are broadcast to every step (``variable_broadcast=
"params"``), so every call partially evaluates the cell to hoist them out of the loop.
A ``flax.training.train_state.TrainState`` holds the parameters and optax's Adam with
gradient clipping; the step takes ``jax.value_and_grad`` of a loss that calls
``state.apply_fn``, the loss is fetched with ``float()`` every step and the accuracy every
few. The task: tell which of two noisy frequencies a sequence carries. ``--jit`` is the
tutorial's ``jax.jit`` of the step.

    python examples/lib_linen_rnn.py --steps 30 [--jit] [--seed 0]
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from _common import checksum, param_change, parse_args, report

BATCH, LENGTH, FEATURES, HIDDEN, CLASSES = 32, 16, 4, 32, 2
LOG_EVERY = 5


class SequenceClassifier(nn.Module):
    hidden: int
    classes: int

    @nn.compact
    def __call__(self, x):
        h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)  # (batch, time, hidden)
        h = nn.LayerNorm()(h[:, -1])
        return nn.Dense(self.classes)(nn.relu(nn.Dense(self.hidden)(h)))


def make_batch(rng, n):
    y = rng.integers(0, CLASSES, size=n)
    t = np.arange(LENGTH)[None, :, None]
    freq = np.where(y == 0, 0.3, 0.7)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, FEATURES))
    x = np.sin(freq * t + phase) + 0.3 * rng.standard_normal((n, LENGTH, FEATURES))
    return x.astype(np.float32), y.astype(np.int32)


def train_step(state, x, y):
    def loss_fn(params):
        logits = state.apply_fn(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return state, loss, accuracy


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    model = SequenceClassifier(HIDDEN, CLASSES)
    x0, _ = make_batch(rng, BATCH)
    params = model.init(jax.random.PRNGKey(args.seed), x0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    params0 = state.params
    step_fn = jax.jit(train_step) if args.jit else train_step

    losses, accuracies, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_batch(rng, BATCH)
        state, loss, accuracy = step_fn(state, x, y)
        losses.append(float(loss))
        if step % LOG_EVERY == 0:
            accuracies.append(float(accuracy))
            print(f"step {step:3d}  loss {losses[-1]:.4f}  accuracy {accuracies[-1]:.3f}")
        times.append(time.perf_counter() - t0)

    x, y = make_batch(np.random.default_rng(4321), 256)
    acc = float(jnp.mean(jnp.argmax(model.apply(state.params, x), -1) == y))
    print(f"eval accuracy {acc:.3f}")
    report(times, checksum(param_change(state.params, params0), losses, accuracies, acc))


if __name__ == "__main__":
    main()
