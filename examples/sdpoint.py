"""SDPoint (Kuen et al., CVPR 2018): stochastic downsampling point in a ResNet.

Every training iteration picks, with Python's ``random``, *where* in the
network the feature map is downsampled and by how much (or not at all), so the
executed graph and its shapes change from one iteration to the next. A naive
``jax.jit`` of the step draws the choice once at trace time and keeps it.

    python examples/sdpoint.py --steps 30 [--jit] [--seed 0]
"""
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _common import checksum, param_change, parse_args, report

N_BLOCKS = 3
RATIOS = [0.5, 0.75]


def conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_params(key, width=16, n_classes=10):
    keys = jax.random.split(key, 2 * N_BLOCKS + 2)
    he = lambda k, shape: jax.random.normal(k, shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    params = {"stem": he(keys[0], (3, 3, 3, width)), "blocks": []}
    for i in range(N_BLOCKS):
        params["blocks"].append({"w1": he(keys[1 + 2 * i], (3, 3, width, width)),
                                 "w2": he(keys[2 + 2 * i], (3, 3, width, width)) * 0.1})
    params["fc_w"] = he(keys[-1], (width, n_classes))
    params["fc_b"] = jnp.zeros(n_classes)
    return params


def downsample(x, ratio):
    n, h, w, c = x.shape
    size = (n, max(1, int(h * ratio)), max(1, int(w * ratio)), c)
    return jax.image.resize(x, size, method="linear")


def draw_point():
    # The SDPoint choice: one of the blocks (or none) and a ratio.
    return random.randint(0, N_BLOCKS), random.choice(RATIOS)


def forward(params, x, training=True, choice=None):
    point, ratio = N_BLOCKS, 1.0
    if training:
        point, ratio = choice or draw_point()  # a fresh choice every forward
    x = jax.nn.relu(conv(x, params["stem"]))
    for i, block in enumerate(params["blocks"]):
        if i == point:
            x = downsample(x, ratio)
        h = jax.nn.relu(conv(x, block["w1"]))
        x = jax.nn.relu(x + conv(h, block["w2"]))
    x = x.mean(axis=(1, 2))  # global pooling: any spatial size works
    return x @ params["fc_w"] + params["fc_b"]


def loss_fn(params, x, y, choice=None):
    logits = forward(params, x, choice=choice)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), axis=-1))


def train_step(params, velocity, x, y, choice=None, lr=0.05, momentum=0.9):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, choice)
    velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
    return params, velocity, loss


def train_step_split(params, velocity, x, y, _jitted=jax.jit(train_step, static_argnums=4)):
    """--jit-split: the choice drawn outside, passed as a static argument (one compile per choice)."""
    return _jitted(params, velocity, x, y, draw_point())


def make_data(rng, n):
    # Ten classes: a bright square at one of ten positions on a noisy 16x16 image.
    y = rng.integers(0, 10, size=n)
    x = 0.3 * rng.standard_normal((n, 16, 16, 3))
    for i, c in enumerate(y):
        r, col = 2 + 3 * (c // 5), 1 + 3 * (c % 5)
        x[i, r:r + 4, col:col + 3, c % 3] += 1.5
    return x.astype(np.float32), y


def main():
    args = parse_args(__doc__, split=True)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    step_fn = jax.jit(train_step) if args.jit else train_step_split if args.jit_split else train_step

    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_data(rng, 8)
        params, velocity, loss = step_fn(params, velocity, x, y)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")

    x, y = make_data(np.random.default_rng(1234), 32)
    acc = float(jnp.mean(jnp.argmax(forward(params, x, training=False), -1) == y))
    print(f"eval accuracy {acc:.3f}")
    report(times, checksum(param_change(params, params0), losses, acc))


if __name__ == "__main__":
    main()
