"""An MLP classifier trained with optax, the way optax's own tutorials write it.

Parameters are a plain pytree, the loss a plain function; ``jax.value_and_grad`` gives the
gradients, ``optax.chain(clip_by_global_norm, adam(schedule))`` turns them into updates
(warm-up then cosine decay), ``optax.apply_updates`` applies them. Every step fetches the
loss with ``float()`` into a Python list and logs it every few steps. ``--jit`` is the
tutorial's ``jax.jit`` of the step.

    python examples/lib_optax_mlp.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import checksum, param_change, parse_args, report

SIZES = (16, 64, 64, 4)  # input features, two hidden layers, classes
BATCH, LOG_EVERY = 32, 5


def init_params(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    return [{"w": jax.random.normal(k, (n_in, n_out)) * np.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, SIZES[:-1], SIZES[1:])]


def forward(params, x):
    *hidden, last = params
    for layer in hidden:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


def loss_fn(params, x, y):
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_optimizer(steps):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=3e-3, warmup_steps=max(1, steps // 10), decay_steps=max(2, steps))
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def make_train_step(optimizer):
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss
    return train_step


# Four Gaussian blobs in 16 dimensions, fixed centres; a fresh batch every step.
CENTRES = np.random.default_rng(1234).normal(size=(SIZES[-1], SIZES[0])).astype(np.float32)


def make_batch(rng, n):
    y = rng.integers(0, SIZES[-1], size=n)
    x = CENTRES[y] + 1.5 * rng.standard_normal((n, SIZES[0]))
    return x.astype(np.float32), y.astype(np.int32)


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    optimizer = make_optimizer(args.steps)
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer)
    step_fn = jax.jit(train_step) if args.jit else train_step

    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_batch(rng, BATCH)
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")

    x, y = make_batch(np.random.default_rng(4321), 256)
    acc = float(jnp.mean(jnp.argmax(forward(params, x), -1) == y))
    print(f"eval accuracy {acc:.3f}")
    report(times, checksum(param_change(params, params0), losses, acc))


if __name__ == "__main__":
    main()
