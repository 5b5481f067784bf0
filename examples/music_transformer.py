"""Music Transformer (Huang et al., 2018): relative self-attention + Python sampling.

A two-layer decoder over MIDI-like events (note-on / time-shift tokens) uses
relative position attention with the memory-efficient "skewing" trick. Every
``SAMPLE_EVERY`` steps the training loop samples a continuation in Python:
softmax with temperature, ``np.random`` draws the next event from the
probabilities on the host, and the event list grows token by token.

    python examples/music_transformer.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import checksum, param_change, parse_args, report

N_PITCH, N_SHIFT = 24, 8
VOCAB = N_PITCH + N_SHIFT  # events: note-on(pitch) and time-shift(ticks)
D_MODEL, HEADS, LAYERS, SEQ, BATCH = 32, 2, 2, 24, 4
SAMPLE_EVERY, SAMPLE_EVENTS, TEMPERATURE = 4, 6, 1.0


def init_params(key):
    keys = iter(jax.random.split(key, 3 + 6 * LAYERS))
    normal = lambda shape, std=0.05: jax.random.normal(next(keys), shape) * std
    ln = lambda: {"g": jnp.ones(D_MODEL), "b": jnp.zeros(D_MODEL)}
    params = {"emb": normal((VOCAB, D_MODEL)), "out": normal((D_MODEL, VOCAB)), "ln": ln(), "layers": []}
    for _ in range(LAYERS):
        params["layers"].append({
            "wqkv": normal((D_MODEL, 3 * D_MODEL)), "wo": normal((D_MODEL, D_MODEL)),
            # One embedding per relative distance -(SEQ-1)..0, shared by the heads.
            "er": normal((SEQ, D_MODEL // HEADS)),
            "w1": normal((D_MODEL, 2 * D_MODEL)), "w2": normal((2 * D_MODEL, D_MODEL)),
            "ln1": ln(), "ln2": ln(),
        })
    return params


def layer_norm(p, x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return p["g"] * (x - mu) / jnp.sqrt(x.var(-1, keepdims=True) + eps) + p["b"]


def skew(qe):
    """Huang et al.'s skewing: (B,H,L,L) logits against distances -> against keys."""
    b, h, l, _ = qe.shape
    padded = jnp.pad(qe, ((0, 0), (0, 0), (0, 0), (1, 0)))
    return padded.reshape(b, h, l + 1, l)[:, :, 1:, :]


def relative_attention(p, x):
    b, l, d = x.shape
    dh = d // HEADS
    q, k, v = jnp.split(x @ p["wqkv"], 3, axis=-1)
    heads = lambda z: z.reshape(b, l, HEADS, dh).transpose(0, 2, 1, 3)
    q, k, v = heads(q), heads(k), heads(v)
    srel = skew(q @ p["er"][SEQ - l:].T)  # relative logits, O(L*D) memory
    logits = (q @ k.transpose(0, 1, 3, 2) + srel) / np.sqrt(dh)
    logits = jnp.where(np.tril(np.ones((l, l), bool)), logits, -1e9)
    y = (jax.nn.softmax(logits, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, l, d)
    return y @ p["wo"]


def model(params, events):
    x = params["emb"][events] * np.sqrt(D_MODEL)
    for layer in params["layers"]:
        x = layer_norm(layer["ln1"], x + relative_attention(layer, x))
        x = layer_norm(layer["ln2"], x + jax.nn.relu(x @ layer["w1"]) @ layer["w2"])
    return layer_norm(params["ln"], x) @ params["out"]


def loss_fn(params, x, y):
    logp = jax.nn.log_softmax(model(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))


def train_step(params, opt_state, x, y, lr=2e-3, b1=0.9, b2=0.98, eps=1e-9):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    m, v, t = opt_state
    t = t + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    update = lambda p, m, v: p - lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    return jax.tree_util.tree_map(update, params, m, v), (m, v, t), loss


def sample(params, primer, n_events, rng):
    """Temperature sampling, one event per Python iteration, drawn on the host."""
    events = list(primer)
    for _ in range(n_events):
        logits = model(params, jnp.asarray(events[-SEQ:])[None])[0, -1]
        probs = np.asarray(jax.nn.softmax(logits / TEMPERATURE), dtype=np.float64)
        events.append(int(rng.choice(VOCAB, p=probs / probs.sum())))
    return events[len(primer):]


def make_piece(rng, length):
    """Arpeggios in a random key: note, shift, note, shift, ..."""
    root = int(rng.integers(0, N_PITCH - 12))
    chord = [root, root + 4, root + 7, root + 12]
    events = []
    while len(events) < length:
        events += [chord[len(events) // 2 % 4], N_PITCH + int(rng.integers(1, 3))]
    return np.array(events[:length], np.int32)


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt_state = (zeros, zeros, 0)
    step_fn = jax.jit(train_step) if args.jit else train_step

    losses, sampled, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        pieces = np.stack([make_piece(rng, SEQ + 1) for _ in range(BATCH)])
        params, opt_state, loss = step_fn(params, opt_state, pieces[:, :-1], pieces[:, 1:])
        losses.append(float(loss))
        if (step + 1) % SAMPLE_EVERY == 0:
            events = sample(params, make_piece(rng, SEQ), SAMPLE_EVENTS, rng)
            sampled.extend(events)
            notes = [e for e in events if e < N_PITCH]
            print(f"step {step + 1:3d}  loss {losses[-1]:.4f}  sampled notes {notes}")
        times.append(time.perf_counter() - t0)

    report(times, checksum(param_change(params, params0), losses, sampled))


if __name__ == "__main__":
    main()
