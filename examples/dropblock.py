"""DropBlock (Ghiasi et al., 2018) on a small CNN, after miguelvr/dropblock.

The regulariser draws its seed mask with NumPy *inside the forward pass*, the
way the reference implementation draws it with ``torch.rand``, and a
LinearScheduler raises ``drop_prob`` from Python every iteration. Under a naive
``jax.jit`` both are read once at trace time: the mask and the drop rate freeze.

    python examples/dropblock.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _common import checksum, param_change, parse_args, report


class DropBlock2D:
    """Drops contiguous block_size x block_size regions of NHWC feature maps."""

    def __init__(self, drop_prob, block_size):
        self.drop_prob = drop_prob
        self.block_size = block_size

    def draw_seeds(self, n, h, w):
        # Seed points drawn on the host, exactly like torch.rand(...) < gamma.
        gamma = self.drop_prob / self.block_size ** 2
        return (np.random.rand(n, h, w) < gamma).astype(np.float32)

    def __call__(self, x, training, seeds=None):
        if not training or (seeds is None and self.drop_prob == 0.0):
            return x
        if seeds is None:
            seeds = self.draw_seeds(*x.shape[:3])
        # Grow every seed into a block: max-pool the seed mask.
        block = lax.reduce_window(jnp.asarray(seeds), 0.0, lax.max,
                                  (1, self.block_size, self.block_size), (1, 1, 1), "SAME")
        keep = 1.0 - block
        # Rescale so the expected activation is unchanged.
        return x * keep[..., None] * (keep.size / (keep.sum() + 1e-6))


class LinearScheduler:
    """Ramps drop_prob linearly over the first nr_steps iterations."""

    def __init__(self, dropblock, start_value, stop_value, nr_steps):
        self.dropblock = dropblock
        self.values = np.linspace(start_value, stop_value, nr_steps)
        self.i = 0

    def step(self):
        if self.i < len(self.values):
            self.dropblock.drop_prob = float(self.values[self.i])
        self.i += 1


def conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_params(key):
    k = jax.random.split(key, 4)
    he = lambda k, shape: jax.random.normal(k, shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    return {
        "conv1": he(k[0], (3, 3, 3, 16)),
        "conv2": he(k[1], (3, 3, 16, 32)),
        "conv3": he(k[2], (3, 3, 32, 32)),
        "fc_w": he(k[3], (32, 10)),
        "fc_b": jnp.zeros(10),
    }


dropblock = DropBlock2D(drop_prob=0.0, block_size=3)


def forward(params, x, training=True, seeds=(None, None)):
    x = jax.nn.relu(conv(x, params["conv1"]))
    x = jax.nn.relu(conv(x, params["conv2"], stride=2))
    x = dropblock(x, training, seeds[0])
    x = jax.nn.relu(conv(x, params["conv3"]))
    x = dropblock(x, training, seeds[1])
    x = x.mean(axis=(1, 2))
    return x @ params["fc_w"] + params["fc_b"]


def loss_fn(params, x, y, seeds=(None, None)):
    logits = forward(params, x, training=True, seeds=seeds)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), axis=-1))


def train_step(params, velocity, x, y, seeds=(None, None), lr=0.05, momentum=0.9):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, seeds)
    velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
    return params, velocity, loss


def train_step_split(params, velocity, x, y, _jitted=jax.jit(train_step)):
    """--jit-split: the same step with the NumPy seed masks drawn outside jax.jit."""
    seeds = (None, None)
    if dropblock.drop_prob > 0.0:  # same draws, same order as the eager forward
        seeds = tuple(dropblock.draw_seeds(x.shape[0], 8, 8) for _ in range(2))
    return _jitted(params, velocity, x, y, seeds)


def make_data(rng, n):
    # Ten classes of noisy oriented stripes, 16x16 RGB.
    y = rng.integers(0, 10, size=n)
    yy, xx = np.mgrid[0:16, 0:16]
    angle = y[:, None, None] * np.pi / 10
    img = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8)
    x = np.repeat(img[..., None], 3, axis=-1) + 0.3 * rng.standard_normal((n, 16, 16, 3))
    return x.astype(np.float32), y


def main():
    args = parse_args(__doc__, split=True)
    rng = np.random.default_rng(args.seed)
    params = init_params(jax.random.PRNGKey(args.seed))
    params0 = params
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    scheduler = LinearScheduler(dropblock, start_value=0.0, stop_value=0.25, nr_steps=10)
    step_fn = jax.jit(train_step) if args.jit else train_step_split if args.jit_split else train_step

    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        scheduler.step()
        x, y = make_data(rng, 8)
        params, velocity, loss = step_fn(params, velocity, x, y)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}  drop_prob {dropblock.drop_prob:.3f}")

    x, y = make_data(np.random.default_rng(1234), 32)
    acc = float(jnp.mean(jnp.argmax(forward(params, x, training=False), -1) == y))
    print(f"eval accuracy {acc:.3f}")
    report(times, checksum(param_change(params, params0), losses, acc))


if __name__ == "__main__":
    main()
