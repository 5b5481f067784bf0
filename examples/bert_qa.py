"""BERT extractive question answering (SQuAD-style), after HuggingFace run_squad.

A two-layer BERT encoder predicts start/end logits over
``[CLS] question [SEP] context [SEP]``. Each training step also extracts the
predicted answers in Python, the way SQuAD post-processing does:
``int(argmax)`` of the start and end logits, a validity check, and the answer
text joined from the context tokens. ``int()`` of a traced value is exactly
what ``jax.jit`` rejects.

    python examples/bert_qa.py --steps 30 [--jit] [--seed 0]
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import checksum, param_change, parse_args, report

VOCAB = ["[PAD]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(61)]
HIDDEN, HEADS, FFN, LAYERS, Q_LEN, C_LEN = 32, 2, 64, 2, 4, 20
SEQ = Q_LEN + C_LEN + 3
MAX_ANSWER_LEN = 5


def dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) * 0.02, "b": jnp.zeros(n_out)}


def init_params(key):
    keys = iter(jax.random.split(key, 8 + 6 * LAYERS))
    params = {
        "tok": jax.random.normal(next(keys), (len(VOCAB), HIDDEN)) * 0.02,
        "pos": jax.random.normal(next(keys), (SEQ, HIDDEN)) * 0.02,
        "seg": jax.random.normal(next(keys), (2, HIDDEN)) * 0.02,
        "ln": {"g": jnp.ones(HIDDEN), "b": jnp.zeros(HIDDEN)},
        "layers": [],
        "qa": dense(next(keys), HIDDEN, 2),
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


def bert(params, ids, segments):
    mask = ids != 0
    x = params["tok"][ids] + params["pos"][None] + params["seg"][segments]
    x = layer_norm(params["ln"], x)
    for layer in params["layers"]:
        x = layer_norm(layer["ln1"], x + attention(layer, x, mask))
        x = layer_norm(layer["ln2"], x + linear(layer["ff2"], jax.nn.gelu(linear(layer["ff1"], x))))
    return x


def loss_fn(params, ids, segments, starts, ends):
    logits = linear(params["qa"], bert(params, ids, segments))
    start_logits, end_logits = logits[..., 0], logits[..., 1]
    ce = lambda lg, y: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None], 1))
    return (ce(start_logits, starts) + ce(end_logits, ends)) / 2, (start_logits, end_logits)


def adam(params, grads, state, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    m, v, t = state
    t = t + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    update = lambda p, m, v: p - lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    return jax.tree_util.tree_map(update, params, m, v), (m, v, t)


def extract_answers(start_logits, end_logits, ids):
    """SQuAD post-processing: best start/end per example, text assembled in Python."""
    answers = []
    for i in range(len(ids)):
        start = int(jnp.argmax(start_logits[i]))
        end = int(jnp.argmax(end_logits[i]))
        if start < Q_LEN + 2 or end < start or end - start + 1 > MAX_ANSWER_LEN:
            answers.append("")  # not a span of the context: no answer
        else:
            answers.append(" ".join(VOCAB[t] for t in ids[i, start:end + 1]))
    return answers


def update(params, opt_state, ids, segments, starts, ends):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, segments, starts, ends)
    params, opt_state = adam(params, grads, opt_state)
    return params, opt_state, loss, logits


def train_step(params, opt_state, batch, update=update):
    params, opt_state, loss, (start_logits, end_logits) = update(params, opt_state, *batch)
    return params, opt_state, loss, extract_answers(start_logits, end_logits, batch[0])


def make_batch(rng, n):
    """Question = a copy of the answer span (plus filler); the model must find it."""
    ids = np.zeros((n, SEQ), np.int32)
    segments = np.zeros((n, SEQ), np.int32)
    starts, ends, gold = [], [], []
    for i in range(n):
        context = list(rng.integers(3, len(VOCAB), size=C_LEN))
        length = int(rng.integers(1, 4))
        s = int(rng.integers(0, C_LEN - length + 1))
        question = context[s:s + length] + [3] * (Q_LEN - length)
        row = [1] + question + [2] + context + [2]
        ids[i] = row
        segments[i, Q_LEN + 2:] = 1
        starts.append(Q_LEN + 2 + s)
        ends.append(Q_LEN + 2 + s + length - 1)
        gold.append(" ".join(VOCAB[t] for t in context[s:s + length]))
    return (ids, segments, np.array(starts), np.array(ends)), gold


def main():
    args = parse_args(__doc__, split=True)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt_state = (zeros, zeros, 0)
    step_fn = jax.jit(train_step) if args.jit else train_step
    if args.jit_split:  # jit only the pure update; post-processing stays in Python
        step_fn = functools.partial(train_step, update=jax.jit(update))

    losses, exact, answer_chars, times = [], 0, 0, []
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch, gold = make_batch(rng, 8)
        params, opt_state, loss, answers = step_fn(params, opt_state, batch)
        losses.append(float(loss))
        exact += sum(a == g for a, g in zip(answers, gold))
        answer_chars += sum(len(a) for a in answers)
        times.append(time.perf_counter() - t0)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}  pred {answers[0]!r} gold {gold[0]!r}")

    print(f"exact match {exact}/{8 * args.steps}")
    report(times, checksum(param_change(params, params0), losses, exact, answer_chars))


if __name__ == "__main__":
    main()
