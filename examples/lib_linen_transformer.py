"""A small GPT-style language model in Flax linen, the way Flax's own LM examples write it.

Token and position embeddings, pre-LayerNorm blocks of ``nn.MultiHeadDotProductAttention``
(causal mask from ``nn.make_causal_mask``, attention dropout) and an MLP with dropout, a
``TrainState`` with optax's AdamW on a warm-up-then-cosine schedule. Each step draws a
fresh batch of a synthetic language (each even token is followed by its successor), takes
``jax.value_and_grad`` of the next-token loss with a dropout key split in Python, and
fetches the loss with ``float()``; every few steps the accuracy too. At the end it
generates greedily, one ``int(argmax)`` per token. ``--jit`` is the tutorial's
``jax.jit`` of the step.

    python examples/lib_linen_transformer.py --steps 30 [--jit] [--seed 0]
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from _common import checksum, param_change, parse_args, report

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 48, 32, 4, 2, 16
BATCH, LOG_EVERY, DROPOUT = 8, 5, 0.1


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask, train):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=DROPOUT,
                                            deterministic=not train)(h, h, mask=mask)
        x = x + h
        h = nn.Dense(4 * WIDTH)(nn.LayerNorm()(x))
        h = nn.Dense(WIDTH)(nn.gelu(h))
        return x + nn.Dropout(DROPOUT, deterministic=not train)(h)


class GPT(nn.Module):
    @nn.compact
    def __call__(self, tokens, train=False):
        positions = self.param("positions", nn.initializers.normal(0.02), (CONTEXT, WIDTH))
        x = nn.Embed(VOCAB, WIDTH)(tokens) + positions[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(LAYERS):
            x = Block()(x, mask, train)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def make_batch(rng, n):
    tokens = rng.integers(0, VOCAB, size=(n, CONTEXT + 1))
    tokens[:, 1::2] = (tokens[:, 0:-1:2] + 1) % VOCAB  # the part a model can learn
    return tokens.astype(np.int32)


def train_step(state, tokens, dropout_key):
    def loss_fn(params):
        logits = state.apply_fn(params, tokens[:, :-1], True, rngs={"dropout": dropout_key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    learnable = tokens[:, 2::2]  # (the successors of even positions)
    accuracy = jnp.mean(jnp.argmax(logits[:, 1::2], -1) == learnable)
    return state, loss, accuracy


def generate(model, params, first, n):
    tokens = [first]
    for _ in range(n):
        logits = model.apply(params, jnp.asarray([tokens]))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    model = GPT()
    key, init_key = jax.random.split(jax.random.PRNGKey(args.seed))
    params = model.init(init_key, jnp.zeros((BATCH, CONTEXT), jnp.int32))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, args.steps // 10), max(2, args.steps))
    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=optax.adamw(schedule, weight_decay=0.01))
    params0 = state.params
    step_fn = jax.jit(train_step) if args.jit else train_step

    losses, accuracies, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        tokens = make_batch(rng, BATCH)
        key, dropout_key = jax.random.split(key)
        state, loss, accuracy = step_fn(state, tokens, dropout_key)
        losses.append(float(loss))
        if step % LOG_EVERY == 0:
            accuracies.append(float(accuracy))
            print(f"step {step:3d}  loss {losses[-1]:.4f}  accuracy {accuracies[-1]:.3f}")
        times.append(time.perf_counter() - t0)

    # (printed, not summed: a near-tie in an argmax of a barely trained model may fall
    # either way under float rounding, and a token is an integer)
    print("sample", generate(model, state.params, 2, 8))
    report(times, checksum(param_change(state.params, params0), losses, accuracies))


if __name__ == "__main__":
    main()
