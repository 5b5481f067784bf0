"""BERT sequence classification (GLUE/SST-2 style fine-tuning) with per-step logging.

A two-layer BERT encoder with a tanh pooler over ``[CLS]`` classifies
synthetic "reviews" whose label is the majority of sentiment words. The
training loop is the usual fine-tuning loop: linear warm-up of the learning
rate computed in Python, and after every step ``float(loss)`` and accuracy
fetched into Python lists, running averages and periodic prints.

    python examples/bert_cls.py --steps 30 [--jit] [--seed 0]
"""
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from _common import checksum, param_change, parse_args, report

VOCAB_SIZE, HIDDEN, HEADS, FFN, LAYERS, SEQ, N_CLASSES = 64, 32, 2, 64, 2, 16, 2
POSITIVE, NEGATIVE = range(4, 14), range(14, 24)  # token ids of sentiment words


def dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) * 0.02, "b": jnp.zeros(n_out)}


def init_params(key):
    keys = iter(jax.random.split(key, 8 + 6 * LAYERS))
    params = {
        "tok": jax.random.normal(next(keys), (VOCAB_SIZE, HIDDEN)) * 0.02,
        "pos": jax.random.normal(next(keys), (SEQ, HIDDEN)) * 0.02,
        "ln": {"g": jnp.ones(HIDDEN), "b": jnp.zeros(HIDDEN)},
        "layers": [],
        "pooler": dense(next(keys), HIDDEN, HIDDEN),
        "cls": dense(next(keys), HIDDEN, N_CLASSES),
    }
    for _ in range(LAYERS):
        params["layers"].append({
            "qkv": dense(next(keys), HIDDEN, 3 * HIDDEN), "out": dense(next(keys), HIDDEN, HIDDEN),
            "ln1": {"g": jnp.ones(HIDDEN), "b": jnp.zeros(HIDDEN)},
            "ff1": dense(next(keys), HIDDEN, FFN), "ff2": dense(next(keys), FFN, HIDDEN),
            "ln2": {"g": jnp.ones(HIDDEN), "b": jnp.zeros(HIDDEN)},
        })
    return params


def layer_norm(p, x, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return p["g"] * (x - mu) / jnp.sqrt(var + eps) + p["b"]


def linear(p, x):
    return x @ p["w"] + p["b"]


def attention(p, x, mask):
    b, t, _ = x.shape
    q, k, v = jnp.split(linear(p["qkv"], x), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, HEADS, HIDDEN // HEADS).transpose(0, 2, 1, 3)
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HIDDEN // HEADS)
    scores = jnp.where(mask[:, None, None, :], scores, -1e9)
    ctx = jax.nn.softmax(scores, axis=-1) @ v
    return linear(p["out"], ctx.transpose(0, 2, 1, 3).reshape(b, t, HIDDEN))


def classify(params, ids):
    mask = ids != 0
    x = layer_norm(params["ln"], params["tok"][ids] + params["pos"][None])
    for layer in params["layers"]:
        x = layer_norm(layer["ln1"], x + attention(layer, x, mask))
        x = layer_norm(layer["ln2"], x + linear(layer["ff2"], jax.nn.gelu(linear(layer["ff1"], x))))
    pooled = jnp.tanh(linear(params["pooler"], x[:, 0]))
    return linear(params["cls"], pooled)


def loss_fn(params, ids, labels):
    logits = classify(params, ids)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
    return nll.mean(), logits


def train_step(params, opt_state, ids, labels, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, labels)
    m, v, t = opt_state
    t = t + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    # AdamW: decoupled weight decay, as in the BERT fine-tuning recipe.
    update = lambda p, m, v: p - lr * ((m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps) + wd * p)
    params = jax.tree_util.tree_map(update, params, m, v)
    return params, (m, v, t), loss, logits


def make_batch(rng, n):
    ids = rng.integers(24, VOCAB_SIZE, size=(n, SEQ))
    labels = rng.integers(0, N_CLASSES, size=n)
    for i, label in enumerate(labels):
        words = POSITIVE if label == 1 else NEGATIVE
        slots = rng.choice(np.arange(1, SEQ), size=int(rng.integers(3, 7)), replace=False)
        ids[i, slots] = rng.choice(list(words), size=len(slots))
    ids[:, 0] = 1  # [CLS]
    ids[:, SEQ - int(rng.integers(0, 4)):] = 0  # ragged padding
    return ids.astype(np.int32), labels.astype(np.int32)


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt_state = (zeros, zeros, 0)
    step_fn = jax.jit(train_step) if args.jit else train_step
    base_lr, warmup, log_every = 2e-3, 10, 5

    history, times = defaultdict(list), []
    for step in range(args.steps):
        t0 = time.perf_counter()
        lr = base_lr * min(1.0, (step + 1) / warmup)
        ids, labels = make_batch(rng, 8)
        params, opt_state, loss, logits = step_fn(params, opt_state, ids, labels, lr)
        # Per-step metric logging, fetched to Python every iteration.
        history["loss"].append(float(loss))
        history["acc"].append(float(jnp.mean(jnp.argmax(logits, -1) == labels)))
        history["lr"].append(lr)
        times.append(time.perf_counter() - t0)
        if (step + 1) % log_every == 0:
            recent = slice(-log_every, None)
            print(f"step {step + 1:3d}  loss {np.mean(history['loss'][recent]):.4f}  "
                  f"acc {np.mean(history['acc'][recent]):.3f}  lr {lr:.2e}")

    report(times, checksum(param_change(params, params0), history["loss"], history["acc"]))


if __name__ == "__main__":
    main()
