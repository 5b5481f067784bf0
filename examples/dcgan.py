"""DCGAN (Radford et al., 2016) after the PyTorch examples/dcgan training loop.

Generator (dense -> transposed convs, batch norm, tanh) and discriminator
(strided convs, leaky ReLU) on 16x16 synthetic blob images, trained with two
separate Adam optimisers that alternate every iteration: one D step on real
and fake batches, then one G step. Labels are smoothed and noisy, drawn with
NumPy each iteration (one-sided smoothing plus a few flipped labels), and the
latent vectors come from NumPy too.

    python examples/dcgan.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _common import checksum, param_change, parse_args, report

NZ, NGF, NDF, BATCH = 16, 16, 16, 8
DN = ("NHWC", "HWIO", "NHWC")


def init_generator(key):
    k = jax.random.split(key, 3)
    return {
        "fc": jax.random.normal(k[0], (NZ, 4 * 4 * 2 * NGF)) * 0.02,
        "bn0": {"g": jnp.ones(2 * NGF), "b": jnp.zeros(2 * NGF)},
        "up1": jax.random.normal(k[1], (4, 4, 2 * NGF, NGF)) * 0.02,
        "bn1": {"g": jnp.ones(NGF), "b": jnp.zeros(NGF)},
        "up2": jax.random.normal(k[2], (4, 4, NGF, 1)) * 0.02,
    }


def init_discriminator(key):
    k = jax.random.split(key, 3)
    return {
        "c1": jax.random.normal(k[0], (4, 4, 1, NDF)) * 0.02,
        "c2": jax.random.normal(k[1], (4, 4, NDF, 2 * NDF)) * 0.02,
        "bn2": {"g": jnp.ones(2 * NDF), "b": jnp.zeros(2 * NDF)},
        "fc": jax.random.normal(k[2], (4 * 4 * 2 * NDF, 1)) * 0.02,
    }


def batch_norm(p, x, eps=1e-5):
    # DCGAN trains with batch statistics throughout.
    mu = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return p["g"] * (x - mu) / jnp.sqrt(var + eps) + p["b"]


def generator(g, z):
    x = (z @ g["fc"]).reshape(-1, 4, 4, 2 * NGF)
    x = jax.nn.relu(batch_norm(g["bn0"], x))
    x = lax.conv_transpose(x, g["up1"], (2, 2), "SAME", dimension_numbers=DN)  # 8x8
    x = jax.nn.relu(batch_norm(g["bn1"], x))
    x = lax.conv_transpose(x, g["up2"], (2, 2), "SAME", dimension_numbers=DN)  # 16x16
    return jnp.tanh(x)


def discriminator(d, x):
    x = jax.nn.leaky_relu(lax.conv_general_dilated(x, d["c1"], (2, 2), "SAME", dimension_numbers=DN), 0.2)
    x = lax.conv_general_dilated(x, d["c2"], (2, 2), "SAME", dimension_numbers=DN)
    x = jax.nn.leaky_relu(batch_norm(d["bn2"], x), 0.2)
    return (x.reshape(x.shape[0], -1) @ d["fc"])[:, 0]


def bce_with_logits(logits, targets):
    return jnp.mean(jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def adam(params, grads, state, lr=2e-4, b1=0.5, b2=0.999, eps=1e-8):
    m, v, t = state
    t = t + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    update = lambda p, m, v: p - lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    return jax.tree_util.tree_map(update, params, m, v), (m, v, t)


def d_loss_fn(d, g, real, z, real_labels, fake_labels):
    fake = jax.lax.stop_gradient(generator(g, z))
    return bce_with_logits(discriminator(d, real), real_labels) + \
        bce_with_logits(discriminator(d, fake), fake_labels)


def g_loss_fn(g, d, z):
    return bce_with_logits(discriminator(d, generator(g, z)), jnp.ones(z.shape[0]))


def d_step(d, d_opt, g, real, z, real_labels, fake_labels):
    loss, grads = jax.value_and_grad(d_loss_fn)(d, g, real, z, real_labels, fake_labels)
    d, d_opt = adam(d, grads, d_opt)
    return d, d_opt, loss


def g_step(g, g_opt, d, z):
    loss, grads = jax.value_and_grad(g_loss_fn)(g, d, z)
    g, g_opt = adam(g, grads, g_opt)
    return g, g_opt, loss


def real_batch(rng, n):
    """Gaussian blobs at random places, scaled to [-1, 1] like normalised images."""
    yy, xx = np.mgrid[0:16, 0:16]
    cy, cx = rng.uniform(4, 12, size=(2, n, 1, 1))
    img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    return (img * 2 - 1)[..., None].astype(np.float32)


def noisy_labels(rng, n, real):
    """One-sided label smoothing plus 5% flipped labels, drawn with NumPy."""
    labels = rng.uniform(0.8, 1.0, n) if real else np.zeros(n)
    flip = rng.random(n) < 0.05
    labels[flip] = 1.0 - labels[flip]
    return labels.astype(np.float32)


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    kg, kd = jax.random.split(jax.random.PRNGKey(args.seed))
    g, d = init_generator(kg), init_discriminator(kd)
    g0, d0 = g, d
    zeros = lambda p: jax.tree_util.tree_map(jnp.zeros_like, p)
    g_opt, d_opt = (zeros(g), zeros(g), 0), (zeros(d), zeros(d), 0)
    d_step_fn, g_step_fn = (jax.jit(d_step), jax.jit(g_step)) if args.jit else (d_step, g_step)

    d_losses, g_losses, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        real = real_batch(rng, BATCH)
        z = rng.standard_normal((BATCH, NZ)).astype(np.float32)
        # (1) Update D: maximise log(D(x)) + log(1 - D(G(z)))
        d, d_opt, d_loss = d_step_fn(d, d_opt, g, real, z, noisy_labels(rng, BATCH, True),
                                     noisy_labels(rng, BATCH, False))
        # (2) Update G: maximise log(D(G(z))) with a fresh latent batch
        z = rng.standard_normal((BATCH, NZ)).astype(np.float32)
        g, g_opt, g_loss = g_step_fn(g, g_opt, d, z)
        d_losses.append(float(d_loss))
        g_losses.append(float(g_loss))
        times.append(time.perf_counter() - t0)
        if step % 10 == 0:
            print(f"[{step}/{args.steps}] Loss_D: {d_losses[-1]:.4f} Loss_G: {g_losses[-1]:.4f}")

    report(times, checksum(param_change(g, g0), param_change(d, d0), d_losses, g_losses))


if __name__ == "__main__":
    main()
