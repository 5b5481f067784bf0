"""ResNet (He et al., 2016) image classification with batch norm running statistics.

A small ResNet (stem + three basic blocks, the last two strided) on 16x16
synthetic images. As in many hand-written JAX/PyTorch ports, the batch-norm
running mean/variance live in a plain Python dict keyed by layer name, and the
training step updates that dict *in place* after each forward pass; evaluation
reads it. Under a naive ``jax.jit`` the dict ends up holding leaked tracers.

    python examples/resnet.py --steps 30 [--jit] [--seed 0]
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _common import checksum, param_change, parse_args, report

WIDTHS = [16, 16, 32, 32]  # stem, block1, block2 (stride 2), block3 (stride 2)
MOMENTUM, EPS = 0.9, 1e-5

# Running statistics, updated in place by train_step, read by evaluate().
bn_stats = {}


def conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_params(key):
    keys = iter(jax.random.split(key, 16))
    he = lambda shape: jax.random.normal(next(keys), shape) * np.sqrt(2.0 / np.prod(shape[:-1]))

    def bn(name, c):
        bn_stats[name] = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
        return {"g": jnp.ones(c), "b": jnp.zeros(c)}

    params = {"stem": {"w": he((3, 3, 3, WIDTHS[0])), "bn": bn("stem", WIDTHS[0])}}
    for i in range(1, 4):
        cin, cout = WIDTHS[i - 1], WIDTHS[i]
        block = {"w1": he((3, 3, cin, cout)), "bn1": bn(f"block{i}.bn1", cout),
                 "w2": he((3, 3, cout, cout)), "bn2": bn(f"block{i}.bn2", cout)}
        if cin != cout or i > 1:
            block["proj"] = he((1, 1, cin, cout))
        params[f"block{i}"] = block
    params["fc"] = {"w": he((WIDTHS[-1], 10)), "b": jnp.zeros(10)}
    return params


def batch_norm(p, x, name, training, new_stats):
    if training:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        # Collected here
        new_stats[name] = (mean, var, x.size // x.shape[-1])
    else:
        mean, var = bn_stats[name]["mean"], bn_stats[name]["var"]
    return p["g"] * (x - mean) / jnp.sqrt(var + EPS) + p["b"]


def forward(params, x, training, new_stats=None):
    x = jax.nn.relu(batch_norm(params["stem"]["bn"], conv(x, params["stem"]["w"]), "stem", training, new_stats))
    for i in range(1, 4):
        p, stride = params[f"block{i}"], 1 if i == 1 else 2
        h = jax.nn.relu(batch_norm(p["bn1"], conv(x, p["w1"], stride), f"block{i}.bn1", training, new_stats))
        h = batch_norm(p["bn2"], conv(h, p["w2"]), f"block{i}.bn2", training, new_stats)
        shortcut = conv(x, p["proj"], stride) if "proj" in p else x
        x = jax.nn.relu(h + shortcut)
    x = x.mean(axis=(1, 2))
    return x @ params["fc"]["w"] + params["fc"]["b"]


def loss_fn(params, x, y):
    new_stats = {}
    logits = forward(params, x, True, new_stats)
    loss = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), -1))
    return loss, new_stats


def update(params, velocity, running, x, y, lr=0.05, momentum=0.9, wd=5e-4):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    new_running = {}
    for name, (mean, var, n) in batch_stats.items():
        new_running[name] = {"mean": MOMENTUM * running[name]["mean"] + (1 - MOMENTUM) * mean,
                             "var": MOMENTUM * running[name]["var"] + (1 - MOMENTUM) * var * n / (n - 1)}
    velocity = jax.tree_util.tree_map(lambda v, g, p: momentum * v + g + wd * p, velocity, grads, params)
    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
    return params, velocity, loss, new_running


def train_step(params, velocity, x, y, update=update):
    params, velocity, loss, new_running = update(params, velocity, bn_stats, x, y)
    # Write the running statistics back in place, layer by layer.
    for name, stats in new_running.items():
        bn_stats[name]["mean"] = stats["mean"]
        bn_stats[name]["var"] = stats["var"]
    return params, velocity, loss


def make_data(rng, n):
    # Ten classes of checkerboards with class-dependent period and colour.
    y = rng.integers(0, 10, size=n)
    yy, xx = np.mgrid[0:16, 0:16]
    period = 2 + y % 5
    board = ((yy[None] // period[:, None, None] + xx[None] // period[:, None, None]) % 2) * 2.0 - 1
    colour = np.stack([(y >= 5), (y < 5), np.ones(n)], -1)[:, None, None, :]
    x = board[..., None] * colour + 0.3 * rng.standard_normal((n, 16, 16, 3))
    return x.astype(np.float32), y


def evaluate(params, rng):
    x, y = make_data(rng, 32)
    return float(jnp.mean(jnp.argmax(forward(params, x, training=False), -1) == y))


def main():
    args = parse_args(__doc__, split=True)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    step_fn = jax.jit(train_step) if args.jit else train_step
    if args.jit_split:  # jit the pure update; the dict is written outside it
        step_fn = functools.partial(train_step, update=jax.jit(update))

    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_data(rng, 8)
        params, velocity, loss = step_fn(params, velocity, x, y)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")

    acc = evaluate(params, np.random.default_rng(1234))
    print(f"eval accuracy {acc:.3f}  (running stats of {len(bn_stats)} BN layers)")
    report(times, checksum(param_change(params, params0), losses, acc, bn_stats))


if __name__ == "__main__":
    main()
