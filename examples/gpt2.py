"""GPT-2 language-model training with periodic greedy generation (nanoGPT style).

A two-layer pre-LayerNorm GPT-2 with tied embeddings trains on a synthetic
character corpus. Every ``--sample-every`` steps the loop generates text
greedily in Python: crop the context to the block size, run the model,
``int(argmax)`` of the last logits, append, repeat — then decode to a string.

    python examples/gpt2.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import checksum, param_change, parse_args, report

N_EMBD, N_HEAD, N_LAYER, BLOCK, BATCH = 32, 2, 2, 24, 4
SAMPLE_EVERY, SAMPLE_TOKENS = 4, 6


def make_corpus(rng, n_sentences=400):
    subjects = ["the cat", "a dog", "my friend", "the model", "an owl"]
    verbs = ["sees", "likes", "eats", "trains", "finds"]
    objects = ["the ball.", "a tree.", "some data.", "the moon.", "a fish."]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
                 for _ in range(n_sentences)]
    text = " ".join(sentences)
    chars = sorted(set(text))
    return text, chars


def init_params(key, vocab):
    keys = iter(jax.random.split(key, 4 + 4 * N_LAYER))
    normal = lambda shape, std=0.02: jax.random.normal(next(keys), shape) * std
    ln = lambda: {"g": jnp.ones(N_EMBD), "b": jnp.zeros(N_EMBD)}
    params = {"wte": normal((vocab, N_EMBD)), "wpe": normal((BLOCK, N_EMBD)), "ln_f": ln(), "h": []}
    for _ in range(N_LAYER):
        params["h"].append({
            "ln_1": ln(), "ln_2": ln(),
            "c_attn": {"w": normal((N_EMBD, 3 * N_EMBD)), "b": jnp.zeros(3 * N_EMBD)},
            "c_proj": {"w": normal((N_EMBD, N_EMBD)), "b": jnp.zeros(N_EMBD)},
            "c_fc": {"w": normal((N_EMBD, 4 * N_EMBD)), "b": jnp.zeros(4 * N_EMBD)},
            "mlp_proj": {"w": normal((4 * N_EMBD, N_EMBD)), "b": jnp.zeros(N_EMBD)},
        })
    return params


def layer_norm(p, x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return p["g"] * (x - mu) / jnp.sqrt(var + eps) + p["b"]


def causal_self_attention(p, x):
    b, t, c = x.shape
    qkv = x @ p["c_attn"]["w"] + p["c_attn"]["b"]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    heads = lambda z: z.reshape(b, t, N_HEAD, c // N_HEAD).transpose(0, 2, 1, 3)
    q, k, v = heads(q), heads(k), heads(v)
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(c // N_HEAD)
    att = jnp.where(np.tril(np.ones((t, t), bool)), att, -jnp.inf)
    y = jax.nn.softmax(att, axis=-1) @ v
    y = y.transpose(0, 2, 1, 3).reshape(b, t, c)
    return y @ p["c_proj"]["w"] + p["c_proj"]["b"]


def gpt(params, idx):
    t = idx.shape[1]
    x = params["wte"][idx] + params["wpe"][:t]
    for block in params["h"]:
        x = x + causal_self_attention(block, layer_norm(block["ln_1"], x))
        h = jax.nn.gelu(layer_norm(block["ln_2"], x) @ block["c_fc"]["w"] + block["c_fc"]["b"])
        x = x + h @ block["mlp_proj"]["w"] + block["mlp_proj"]["b"]
    return layer_norm(params["ln_f"], x) @ params["wte"].T  # tied LM head


def loss_fn(params, x, y):
    logp = jax.nn.log_softmax(gpt(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))


def train_step(params, opt_state, x, y, lr=3e-3, b1=0.9, b2=0.95, eps=1e-8):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    m, v, t = opt_state
    t = t + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    update = lambda p, m, v: p - lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    return jax.tree_util.tree_map(update, params, m, v), (m, v, t), loss


def generate(params, idx, max_new_tokens):
    """Greedy decoding, one Python iteration per token."""
    for _ in range(max_new_tokens):
        idx_cond = idx[-BLOCK:]  # crop the context to the block size
        logits = gpt(params, jnp.asarray(idx_cond)[None])
        idx = idx + [int(jnp.argmax(logits[0, -1]))]
    return idx


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    text, chars = make_corpus(rng)
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = np.array([stoi[ch] for ch in text], dtype=np.int32)
    params = params0 = init_params(jax.random.PRNGKey(args.seed), len(chars))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt_state = (zeros, zeros, 0)
    step_fn = jax.jit(train_step) if args.jit else train_step

    losses, generated, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ix = rng.integers(0, len(data) - BLOCK - 1, size=BATCH)
        x = np.stack([data[i:i + BLOCK] for i in ix])
        y = np.stack([data[i + 1:i + BLOCK + 1] for i in ix])
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        losses.append(float(loss))
        if (step + 1) % SAMPLE_EVERY == 0:
            prompt = list(data[:BLOCK])
            out = generate(params, prompt, SAMPLE_TOKENS)
            sample = "".join(chars[i] for i in out[BLOCK:])
            generated.extend(out[BLOCK:])
            print(f"step {step + 1:3d}  loss {losses[-1]:.4f}  sample {sample!r}")
        times.append(time.perf_counter() - t0)

    report(times, checksum(param_change(params, params0), losses, generated))


if __name__ == "__main__":
    main()
