"""Regression with an Equinox MLP, the way Equinox's own tutorials write it.

The model is an ``eqx.nn.MLP`` (a PyTree of arrays and Python callables);
``eqx.filter_value_and_grad`` differentiates with respect to its arrays only, optax's Adam
makes the updates from ``eqx.filter(model, eqx.is_array)`` and ``eqx.apply_updates``
applies them. The loop fetches ``float(loss)`` every step and keeps a Python early-stopping
check on it (best loss, patience). ``--jit`` is the tutorial's ``eqx.filter_jit`` of the
step.

    python examples/lib_equinox_mlp.py --steps 30 [--jit] [--seed 0]
"""
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import checksum, param_change, parse_args, report

IN, OUT, WIDTH, DEPTH = 8, 2, 64, 2
BATCH, LOG_EVERY, PATIENCE, TARGET = 64, 5, 20, 1e-4


def target(x):
    # A smooth two-output function of the inputs.
    return np.stack([np.sin(x[:, :4].sum(1)), np.cos(x[:, 4:].sum(1))], axis=1)


def make_batch(rng, n):
    x = rng.uniform(-1.0, 1.0, size=(n, IN)).astype(np.float32)
    return x, target(x).astype(np.float32)


@eqx.filter_value_and_grad
def compute_loss(model, x, y):
    pred = jax.vmap(model)(x)
    return jnp.mean((pred - y) ** 2)


def make_step_fn(optim):
    def make_step(model, opt_state, x, y):
        loss, grads = compute_loss(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return loss, model, opt_state
    return make_step


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    model = eqx.nn.MLP(IN, OUT, WIDTH, DEPTH, activation=jax.nn.tanh,
                       key=jax.random.PRNGKey(args.seed))
    params0 = eqx.filter(model, eqx.is_array)
    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    make_step = make_step_fn(optim)
    if args.jit:
        make_step = eqx.filter_jit(make_step)

    losses, times = [], []
    best, since_best = float("inf"), 0
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_batch(rng, BATCH)
        loss, model, opt_state = make_step(model, opt_state, x, y)
        loss = float(loss)
        losses.append(loss)
        times.append(time.perf_counter() - t0)
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}  loss {loss:.5f}")
        # Early stopping in Python, on the fetched loss.
        if loss < best - 1e-6:
            best, since_best = loss, 0
        else:
            since_best += 1
        if loss < TARGET or since_best >= PATIENCE:
            print(f"early stop at step {step}: loss {loss:.5f}, best {best:.5f}")
            break

    x, y = make_batch(np.random.default_rng(4321), 256)
    test_mse = float(jnp.mean((jax.vmap(model)(x) - y) ** 2))
    print(f"test mse {test_mse:.5f}")
    report(times, checksum(param_change(eqx.filter(model, eqx.is_array), params0), losses, test_mse))


if __name__ == "__main__":
    main()
