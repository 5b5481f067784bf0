"""Control flow and dynamic values (issue 4): eager JAX vs ``terra_bc.function``.

Eager is the plain Python function; terra_bc is the same function wrapped with
``terra_bc.function`` (each call an iteration of a unit).  All modes run side by side in one
process, interleaved repeat by repeat so machine noise hits them alike; times are medians
over repeats in steady state (each mode first runs max(10, steps/5) untimed steps).  Each
mode draws from its own fresh ``random.Random(seed)`` / ``np.random.default_rng(seed)``, so
all see the same draws.  Sizes are small (widths 64-256, batch 32-64, 50-150 jnp ops a step)
so eager time is dominated by per-op dispatch, as in real small models.  Where shapes vary
(c, d), an untimed eager pass over the same draws first fills JAX's per-shape compile caches,
so no mode profits from compilations paid by the mode that ran before it.

(a) paths          value_and_grad + SGD on a params dict of a 3-block token-MLP (batch 32 x 16
                   tokens x 64); each step Python draws ``choice = rng.choice([0, 1, 2])``,
                   the block before which the tokens are average-pooled 2x (SDPoint-like):
                   3 paths, different shapes.  The loss is never fetched.
                   Aim >= 3x eager, with ~3 traces and bounded compiles.
(b) adaptive_lr    MLP 64-256-256-256-10, batch 64, fresh data each step: fetches float(loss)
                   every step, halves a Python-float learning rate when the loss jumps above
                   1.2x its running mean (else x1.01) and feeds it to ``p - lr * g``; clips
                   when ``float(global_norm(grads)) > clip`` (about 2/3 of steps).
                   Aim >= 3x eager.
(c) dynamic_shapes a detector-like head, 256 anchors x 64 features (fresh NumPy features each
                   step): scores, decoded boxes, ``boxes[scores > thr]`` (jnp boolean indexing,
                   ~30 rows, a data-dependent shape), greedy NMS in NumPy, then jnp IoU
                   statistics on the kept boxes (another new shape).
                   Aim >= 0.95x eager with a bounded number of compiles.
(d) greedy_decode  2-layer transformer decoder (d=64, 4 heads, vocab 100): greedy decoding of
                   16 prompts in turn; each token step appends k, v to Python lists (a
                   growing KV cache), attends over ``jnp.stack(list)`` and fetches
                   ``int(jnp.argmax(logits))``; stops at EOS (13-34 tokens) or 48.  One
                   benchmark step = one prompt (steps/4 per repeat).  Units: the token step
                   (terra_bc) or the whole decode of a prompt (terra_bc_prompt).
                   Aim >= 1x eager.

Harder variants (issue 12: the four above are too kind to whole runs):

(e) tree           a TreeRNN over 6 fixed random binary trees (depth <= 5, width 64), one
                   drawn at random each step: value_and_grad + SGD, float(loss) every step.
                   Each tree is a path of its own structure; eager reuses one set of per-op
                   executables for all of them.  Aim >= 1x eager.
(f) greedy_decode_long  (d) with 40 distinct prompts, 3 layers of width 96, up to 64 new
                   tokens: more cache lengths, each seen fewer times.  Aim >= 0.95x eager.
(g) dynamic_shapes_hard  (c) with 1,024 anchors and a threshold Python draws each step from
                   [0.55, 0.75]: far wider spread of kept-box counts.  Aim >= 0.95x eager.
(h) tables         a small denoising-diffusion training step that reads arrays made before
                   it: the noise schedule indexed by NumPy-drawn timesteps
                   (``alphas_bar[t]``), a sinusoidal time-embedding table, a class-embedding
                   row looked up by a label the step computes (``E[argmax]``), pairwise
                   distances of fixed anchor points (``A[:, None] - A[None]``); Adam in
                   plain jnp, ``float(loss)`` every step.  Aim >= 3x eager.

Checks, at the end of the race (every mode ran the same steps from the same seeds): values
(parameters, outputs) must agree with eager's to max |got - want| / max |want| <= 1e-4 per
array, and Python side effects (chosen paths; logged losses, norms, rates to rtol 1e-4; kept
boxes; decoded tokens) must be identical.  terra_bc.stats() deltas are printed per mode, so
an engine that ran eagerly (or wrongly) shows as such.  If terra_bc raises, the error goes
in the table instead of a number; the baselines still run.

    python benchmarks/control.py [--steps 200] [--repeats 5] [--json out.json] [--only a,b]
"""
import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp
import jaxlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# terra_bc's import (or why it failed) and the shared helpers come from the engine benchmark.
from benchmarks.coexec import (TERRA_IMPORT_ERROR, emit, err, sync, terra_bc,  # noqa: E402
                              terra_function, terra_stats)

RTOL = 1e-4
JUMP, NOISE = 1.2, 1.0       # adaptive_lr: ~11 halvings, clipping in ~2/3 of 1000 steps
EOS_GAIN, CLOCK0 = 2.0, -6.0   # greedy_decode: decoded lengths 13-34
STAT_KEYS = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
             "compiles", "segments_launched", "fetches", "feeds", "ops_skipped", "ops_traced",
             "ops_eager")


# ------------------------------------------------------------------ helpers

def normal(r, shape, scale=1.0):
    return jnp.asarray((r.standard_normal(shape) * scale).astype(np.float32))


def glorot(r, m, n):
    return normal(r, (m, n), 1 / math.sqrt(m))


def layer_norm(h):
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean((h - mu) ** 2, axis=-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + 1e-5)


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


# make_*(wrap) builds one mode: run(i) runs step i, last() gives arrays to sync on, values()
# the arrays to compare, log the Python side effects; wrap is the identity or terra_function.

# ------------------------------------------------------------------ (a) paths

def make_paths(wrap, seed=0, lr=0.05, B=32, T=16, D=64, H=128, C=10):
    r = np.random.default_rng(100)
    params = {"W_in": glorot(r, D, D), "b_in": jnp.zeros((D,)), "W_out": glorot(r, D, C),
              "b_out": jnp.zeros((C,))}
    for k in range(3):
        params.update({f"W1_{k}": glorot(r, D, H), f"b1_{k}": jnp.zeros((H,)),
                       f"W2_{k}": glorot(r, H, D), f"b2_{k}": jnp.zeros((D,))})
    batches = [(normal(r, (B, T, D)), jnp.asarray(r.integers(0, C, B))) for _ in range(8)]
    rng, log = random.Random(seed), []

    def loss_fn(p, x, y, choice):
        h = jnp.tanh(x @ p["W_in"] + p["b_in"])
        for k in range(3):
            if k == choice:                       # SDPoint: downsample the tokens here
                h = h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2]).mean(axis=2)
            u = jax.nn.gelu(layer_norm(h) @ p[f"W1_{k}"] + p[f"b1_{k}"])
            h = h + u @ p[f"W2_{k}"] + p[f"b2_{k}"]
        return xent(layer_norm(h).mean(axis=1) @ p["W_out"] + p["b_out"], y)

    def step(p, x, y):
        choice = rng.choice([0, 1, 2])
        log.append(choice)
        loss, g = jax.value_and_grad(loss_fn)(p, x, y, choice)
        return {k: p[k] - lr * g[k] for k in p}, loss

    st = {"p": params, "loss": None}

    def run(i, f=wrap(step)):
        st["p"], st["loss"] = f(st["p"], *batches[i % len(batches)])
    return run, lambda: (st["p"], st["loss"]), lambda: (st["p"], st["loss"]), log


# ------------------------------------------------------------------ (b) adaptive_lr

def make_adaptive_lr(wrap, seed=0, B=64, sizes=(64, 256, 256, 256, 10), clip=1.45):
    r = np.random.default_rng(200)
    params = {k: v for j, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
              for k, v in ((f"W{j}", glorot(r, m, n)), (f"b{j}", jnp.zeros((n,))))}
    teacher = np.asarray(glorot(r, sizes[0], sizes[-1]))
    data_rng, log, hyper = np.random.default_rng(seed), [], {"lr": 0.05, "ema": None}

    def loss_fn(p, x, y):
        for j in range(len(sizes) - 1):
            x = x @ p[f"W{j}"] + p[f"b{j}"]
            x = jnp.tanh(x) if j < len(sizes) - 2 else x
        return xent(x, y)

    def global_norm(g):
        return jnp.sqrt(sum(jnp.sum(v * v) for v in g.values()))

    def step(p, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        l = float(loss)
        ema = l if hyper["ema"] is None else hyper["ema"]  # bold driver on a smoothed loss
        hyper["lr"] *= 0.5 if l > JUMP * ema else 1.01
        hyper["ema"] = 0.9 * ema + 0.1 * l
        gn = float(global_norm(g))
        if gn > clip:
            g = {k: v * (clip / gn) for k, v in g.items()}
        lr = hyper["lr"]
        log.append((l, gn, gn > clip, lr))
        return {k: p[k] - lr * g[k] for k in p}, loss

    st = {"p": params, "loss": None}

    def run(i, f=wrap(step)):  # fresh data every step, labels from a noisy teacher
        x = data_rng.standard_normal((B, sizes[0])).astype(np.float32)
        y = np.argmax(x @ teacher + NOISE * data_rng.standard_normal((B, sizes[-1])), 1)
        st["p"], st["loss"] = f(st["p"], jnp.asarray(x), jnp.asarray(y))
    return run, lambda: (st["p"], st["loss"]), lambda: (st["p"], st["loss"]), log


# ------------------------------------------------------------------ (c) dynamic_shapes

def nms(boxes, scores, iou_thr=0.3):
    order, keep = np.argsort(-scores, kind="stable"), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        order = rest[inter / (area[i] + area[rest] - inter) <= iou_thr]
    return np.asarray(keep, np.int32)


def make_dynamic_shapes(wrap, seed=0, grid=16, F=64, H=128, thr=0.65):
    """``thr=None``: a threshold drawn each step from [0.55, 0.75] (see the hard variant)."""
    N, fixed_thr = grid * grid, thr
    r = np.random.default_rng(300)
    params = {"W1": glorot(r, F, H), "b1": jnp.zeros((H,)), "W2": glorot(r, H, H),
              "b2": jnp.zeros((H,)), "Ws": glorot(r, H, 1), "Wb": normal(r, (H, 4), 0.02)}
    cx, cy = np.meshgrid(*[(np.arange(grid) + 0.5) / grid] * 2)  # a grid x grid of anchors
    anchors = jnp.asarray(np.stack([cx.ravel(), cy.ravel(), np.full(N, 0.15),
                                    np.full(N, 0.15)], 1).astype(np.float32))
    gt = jnp.asarray(np.sort(r.uniform(0, 1, (8, 2, 2)), axis=1).reshape(8, 4)[:, [0, 2, 1, 3]]
                     .astype(np.float32))
    data_rng, log, outs = np.random.default_rng(seed), [], []
    thr_rng = random.Random(seed)

    def detect(p, x, thr):
        h = jax.nn.relu(x @ p["W1"] + p["b1"])
        h = jax.nn.relu(layer_norm(h @ p["W2"] + p["b2"]))
        scores = jax.nn.sigmoid(h @ p["Ws"])[:, 0]
        d = jnp.tanh(h @ p["Wb"])
        ctr = anchors[:, :2] + d[:, :2] * anchors[:, 2:]
        wh = anchors[:, 2:] * jnp.exp(d[:, 2:])
        boxes = jnp.clip(jnp.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1), 0.0, 1.0)
        mask = scores > thr
        sel_boxes, sel_scores = boxes[mask], scores[mask]        # data-dependent shape
        nb, ns = np.asarray(sel_boxes), np.asarray(sel_scores)
        keep = nms(nb, ns)
        log.append(keep.tolist())
        kb, ks = jnp.asarray(nb[keep]), jnp.asarray(ns[keep])   # another new shape
        area = (kb[:, 2] - kb[:, 0]) * (kb[:, 3] - kb[:, 1])
        lt = jnp.maximum(kb[:, None, :2], gt[None, :, :2])
        rb = jnp.minimum(kb[:, None, 2:], gt[None, :, 2:])
        inter = jnp.prod(jnp.clip(rb - lt, 0.0), axis=-1)
        gt_area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        iou = inter / (area[:, None] + gt_area[None, :] - inter + 1e-6)
        best = jnp.max(iou, axis=1)
        summary = jnp.stack([jnp.mean(best), jnp.mean(jnp.log(area + 1e-6)),
                             jnp.sum(ks), jnp.max(iou)])
        return kb, summary

    def run(i, f=wrap(detect)):
        t = thr_rng.uniform(0.55, 0.75) if fixed_thr is None else fixed_thr
        outs.append(f(params, data_rng.standard_normal((N, F)).astype(np.float32), t))
    return run, lambda: outs[-1], lambda: outs, log


# ------------------------------------------------------------------ (d) greedy_decode

def make_greedy_decode(wrap, seed=0, unit="step", n_prompts=16, V=100, D=64, L=2, NH=4,
                       max_len=48, eos=0):
    r, pr = np.random.default_rng(400), random.Random(1234 + seed)
    prompts = [[pr.randrange(1, V) for _ in range(pr.randint(3, 6))] for _ in range(n_prompts)]
    pos = r.standard_normal((max_len + 8, D)).astype(np.float32) * 0.3
    pos[:, 0] = np.linspace(CLOCK0, 5.0, max_len + 8)          # a clock in feature 0 ...
    out = r.standard_normal((D, V)).astype(np.float32) / math.sqrt(D)
    out[0, eos] = EOS_GAIN                                      # ... that EOS listens to
    P = {"emb": normal(r, (V, D)), "pos": jnp.asarray(pos), "out": jnp.asarray(out),
         "layers": [{k: glorot(r, m, n) for k, m, n in (("Wq", D, D), ("Wk", D, D), ("Wv", D, D),
                     ("Wo", D, D), ("W1", D, 2 * D), ("W2", 2 * D, D))} for _ in range(L)]}
    dh = D // NH

    def token_step(P, tok, t, cache):
        x = P["emb"][tok] + P["pos"][t]
        for lp, (ks, vs) in zip(P["layers"], cache):
            h = layer_norm(x)
            q, k, v = h @ lp["Wq"], h @ lp["Wk"], h @ lp["Wv"]
            ks.append(k)
            vs.append(v)
            K, Vv = jnp.stack(ks).reshape(-1, NH, dh), jnp.stack(vs).reshape(-1, NH, dh)
            att = jax.nn.softmax(jnp.einsum("hd,thd->ht", q.reshape(NH, dh), K)
                                 / math.sqrt(dh), axis=-1)
            x = x + jnp.einsum("ht,thd->hd", att, Vv).reshape(D) @ lp["Wo"]
            x = x + jax.nn.gelu(layer_norm(x) @ lp["W1"]) @ lp["W2"]
        logits = layer_norm(x) @ P["out"]
        return int(jnp.argmax(logits)), logits

    def decode(P, prompt, step):
        cache = [([], []) for _ in range(L)]
        for t, tok in enumerate(prompt):
            nxt, logits = step(P, tok, t, cache)
        out = []
        while nxt != eos and len(out) < max_len:
            out.append(nxt)
            nxt, logits = step(P, nxt, len(prompt) + len(out) - 1, cache)
        return out, logits

    log, last = [], {}
    if unit == "step":  # the unit is the token step, or the whole decode of a prompt
        step = wrap(token_step)
        dec = lambda P, prompt: decode(P, prompt, step)  # noqa: E731
    else:
        dec = wrap(lambda P, prompt: decode(P, prompt, token_step))

    def run(i):
        out, last["logits"] = dec(P, prompts[i % n_prompts])
        log.append(out)
    return run, lambda: last["logits"], lambda: last["logits"], log


# ------------------------------------------------------------------ harder variants

def make_tree(wrap, seed=0, V=50, D=64, C=5, lr=0.05, n_trees=6, depth=5):
    """(e) A recursive model over binary trees (a TreeRNN): ``n_trees`` fixed trees, one
    drawn at random each step; the forward recurses in Python over the tree, so each tree is
    a path of a different structure (tens to ~60 nodes), while eager JAX reuses the same
    per-op executables for every tree (all node vectors have one shape).  value_and_grad +
    SGD, ``float(loss)`` every step."""
    r = np.random.default_rng(500)
    params = {"emb": normal(r, (V, D), 0.5), "Wl": glorot(r, D, D), "Wr": glorot(r, D, D),
              "b": jnp.zeros((D,)), "out": glorot(r, D, C)}

    def grow(d):
        if d == 0 or (d < depth - 1 and r.random() < 0.3):
            return int(r.integers(0, V))
        return (grow(d - 1), grow(d - 1))
    trees = [grow(depth) for _ in range(n_trees)]
    labels = [jnp.asarray([k % C]) for k in range(n_trees)]
    rng, log = random.Random(seed), []

    def encode(p, t):
        if isinstance(t, int):
            return p["emb"][t]
        left, right = encode(p, t[0]), encode(p, t[1])
        return jnp.tanh(left @ p["Wl"] + right @ p["Wr"] + p["b"])

    def loss_fn(p, tree, y):
        return xent((encode(p, tree) @ p["out"])[None], y)

    def step(p, tree, y):
        loss, g = jax.value_and_grad(loss_fn)(p, tree, y)
        log.append(float(loss))
        return {k: p[k] - lr * g[k] for k in p}, loss

    st = {"p": params, "loss": None}

    def run(i, f=wrap(step)):
        k = rng.randrange(n_trees)
        st["p"], st["loss"] = f(st["p"], trees[k], labels[k])
    return run, lambda: (st["p"], st["loss"]), lambda: (st["p"], st["loss"]), log


def make_tables(wrap, seed=0, T=100, B=64, D=2, H=128, E=16, K=8, lr=2e-3):
    """(h) Work on arrays made before the step, indexed by values of the step: what a
    diffusion model's training step does with its noise schedule and embedding tables."""
    r = np.random.default_rng(800)
    betas = jnp.linspace(1e-4, 0.02, T)
    alphas_bar = jnp.cumprod(1.0 - betas)
    freqs = jnp.exp(-jnp.arange(E // 2) * (math.log(1000.0) / (E // 2)))
    t_table = jnp.concatenate([jnp.sin(jnp.arange(T)[:, None] * freqs),
                               jnp.cos(jnp.arange(T)[:, None] * freqs)], axis=1)
    anchors = normal(r, (K, D))
    params = {"W1": glorot(r, D + E + K, H), "b1": jnp.zeros((H,)), "W2": glorot(r, H, H),
              "b2": jnp.zeros((H,)), "W3": glorot(r, H, D), "cls": normal(r, (K, E), 0.1)}
    data, log = np.random.default_rng(seed), []
    adam = {"m": jax.tree_util.tree_map(jnp.zeros_like, params),
            "v": jax.tree_util.tree_map(jnp.zeros_like, params), "n": 0}

    def model(p, xt, t, cls):
        d2 = jnp.sum((anchors[:, None] - anchors[None]) ** 2, -1)        # constants
        near = jnp.exp(-jnp.sum((xt[:, None] - anchors[None]) ** 2, -1) / d2.mean())
        h = jnp.concatenate([xt, t_table[t] + p["cls"][cls], near], 1)
        h = jax.nn.silu(h @ p["W1"] + p["b1"])
        h = jax.nn.silu(h @ p["W2"] + p["b2"])
        return h @ p["W3"]

    def step(p, m, v, n, x0, t, eps):
        ab = alphas_bar[t][:, None]
        xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
        cls = jnp.argmin(jnp.sum((x0[:, None] - anchors[None]) ** 2, -1), 1)
        loss, g = jax.value_and_grad(lambda p: jnp.mean((model(p, xt, t, cls) - eps) ** 2))(p)
        m = {k: 0.9 * m[k] + 0.1 * g[k] for k in p}
        v = {k: 0.999 * v[k] + 0.001 * g[k] ** 2 for k in p}
        c1, c2 = 1 - 0.9 ** n, 1 - 0.999 ** n
        p = {k: p[k] - lr * (m[k] / c1) / (jnp.sqrt(v[k] / c2) + 1e-8) for k in p}
        log.append(float(loss))
        return p, m, v, loss

    st = {"p": params, "loss": None}

    def run(i, f=wrap(step)):
        x0 = (data.standard_normal((B, D)) * np.array([1.0, 0.3])).astype(np.float32)
        t = data.integers(0, T, B)
        eps = data.standard_normal((B, D)).astype(np.float32)
        adam["n"] += 1
        st["p"], adam["m"], adam["v"], st["loss"] = f(st["p"], adam["m"], adam["v"], adam["n"],
                                                      x0, t, eps)
    return run, lambda: (st["p"], st["loss"]), lambda: (st["p"], st["loss"]), log


def make_greedy_decode_long(wrap, seed=0, unit="step"):
    """(f) greedy_decode, harder: 40 distinct prompts (no prompt repeats within 40 steps), a
    3-layer decoder of width 96, up to 64 new tokens: more KV-cache lengths, each seen
    fewer times, and bigger paths to compile."""
    return make_greedy_decode(wrap, seed, unit, n_prompts=40, D=96, L=3, max_len=64)


def make_dynamic_shapes_hard(wrap, seed=0):
    """(g) dynamic_shapes, harder: 1,024 anchors (a 32 x 32 grid) and a score threshold
    drawn by Python each step from [0.55, 0.75], so kept-box counts spread far wider (a
    Python number that changes every step, fed after one retrace)."""
    return make_dynamic_shapes(wrap, seed, grid=32, thr=None)


# ------------------------------------------------------------------ the race

class Mode:
    """One contender: a make_* run with its steps, times, stats delta and first error."""

    def __init__(self, name, make, terra=True):
        self.name, self.terra, self.times, self.error, self.done, self.stats = \
            name, terra, [], None, 0, {}
        try:
            self.step, self.last, self.values, self.log = make()
        except Exception as e:
            self.error = err(e)
            traceback.print_exc(file=sys.stderr)

    def run(self, n, timed=True):
        if self.error:
            return
        before = terra_stats() if self.terra else {}
        try:
            t0 = time.perf_counter()
            for i in range(self.done, self.done + n):
                self.step(i)
            sync(self.last())
            self.times += [time.perf_counter() - t0] if timed else []
            self.done += n
        except Exception as e:
            self.error = err(e)
            traceback.print_exc(file=sys.stderr)
        if self.terra:
            after = terra_stats()
            for k in STAT_KEYS + ("paths_recorded",) * ("paths_recorded" in after):
                self.stats[k] = self.stats.get(k, 0) + after.get(k, 0) - before.get(k, 0)


def max_rel_diff(got, want):
    """max |got - want| / max |want| over each pair of arrays (inf if the structure differs)."""
    a, b = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    worst = 0.0 if len(a) == len(b) else float("inf")
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return float("inf")
        if y.size:
            worst = max(worst, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)))
    return worst


def first_mismatch(got, want):
    """Index of the first differing side effect (floats compared to RTOL), or None."""
    def eq(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-6)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if not eq(a, b)]
    return bad[0] if bad else None if len(got) == len(want) else min(len(got), len(want))


def bench(make, variants, args, scale=1, prewarm=False):
    steps = max(4, args.steps // scale)
    warmup = max(-(-10 // scale), steps // 5)
    eager_make = lambda: make(lambda f: f)  # noqa: E731
    if prewarm:  # fill JAX's per-shape eager caches with every shape the race will see
        Mode("prewarm", eager_make, False).run(warmup + args.repeats * steps)
    modes = [Mode("eager", eager_make, False)] + [
        Mode(name, lambda kw=kw: make(terra_function, **kw)) for name, kw in variants.items()]
    if terra_bc is not None:
        terra_bc.reset_stats()
    for m in modes:
        m.run(warmup, timed=False)
    for _ in range(args.repeats):
        for m in modes:
            m.run(steps)
    eager, out = modes[0], {"steps": steps, "warmup": warmup, "modes": {}}
    out["eager_log_head"] = repr(eager.log[:4])[:240]
    for m in modes:
        r = out["modes"][m.name] = {
            "per_s": steps / statistics.median(m.times) if m.times and not m.error else None,
            "error": m.error}
        if m is eager:
            continue
        r["stats"] = m.stats
        if not (m.error or eager.error):
            d, bad = max_rel_diff(m.values(), eager.values()), first_mismatch(m.log, eager.log)
            r["check"] = {"max_rel_diff": d, "first_side_effect_mismatch": bad,
                          "ok": d <= RTOL and bad is None}
            if bad is not None:
                r["check"]["got_want"] = [repr(m.log[bad:bad + 1])[:240],
                                          repr(eager.log[bad:bad + 1])[:240]]
    return out


PROGRAMS = {
    "a": ("paths", 3.0, lambda a: bench(make_paths, {"terra_bc": {}}, a)),
    "b": ("adaptive_lr", 3.0, lambda a: bench(make_adaptive_lr, {"terra_bc": {}}, a)),
    "c": ("dynamic_shapes", 0.95,
          lambda a: bench(make_dynamic_shapes, {"terra_bc": {}}, a, prewarm=True)),
    "d": ("greedy_decode", 1.0, lambda a: bench(
        make_greedy_decode, {"terra_bc": {"unit": "step"}, "terra_bc_prompt": {"unit": "prompt"}},
        a, scale=4, prewarm=True)),
    "e": ("tree", 1.0, lambda a: bench(make_tree, {"terra_bc": {}}, a)),
    "f": ("greedy_decode_long", 0.95, lambda a: bench(
        make_greedy_decode_long, {"terra_bc": {}}, a, scale=4, prewarm=True)),
    "g": ("dynamic_shapes_hard", 0.95,
          lambda a: bench(make_dynamic_shapes_hard, {"terra_bc": {}}, a, prewarm=True)),
    "h": ("tables", 3.0, lambda a: bench(make_tables, {"terra_bc": {}}, a)),
}


# ------------------------------------------------------------------ report

def fmt(v):
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def report(res):
    out, rows = [], []
    cell = lambda x: f"ERROR {x['error']}" if x["error"] else fmt(x["per_s"])  # noqa: E731
    for letter, (name, aim, _) in PROGRAMS.items():
        r = res["programs"].get(name)
        if r is None or "section_error" in r:
            out += [f"({letter}) {name}: ERROR {r['section_error']}"] if r else []
            rows += [f"| {name} | ERROR {r['section_error']} | | | {aim}x | | | |"] if r else []
            continue
        out.append(f"({letter}) {name}: {r['steps']} steps/repeat after {r['warmup']} warm-up;"
                   f" eager side effects {r['eager_log_head']} ...")
        e = r["modes"]["eager"]
        for m, t in list(r["modes"].items())[1:]:
            st, c = t["stats"], t.get("check", {})
            out.append(f"    {m} stats delta: {st}")
            out += [f"    {m} check: max rel diff {fmt(c['max_rel_diff'])}, first side-effect "
                    f"mismatch {c['first_side_effect_mismatch']}"
                    + (" got {} want {}".format(*c["got_want"]) if "got_want" in c else "")
                    ] if c else []
            ratio = f"{t['per_s'] / e['per_s']:.2f}x" if t["per_s"] and e["per_s"] else "—"
            check = "ok" if c.get("ok") else "FAIL" if c else "—"
            rows.append(f"| {name}{'' if m == 'terra_bc' else f' ({m})'} | {cell(e)} | {cell(t)}"
                        f" | {ratio} | {aim}x | {check} | {st.get('iterations_traced')}/"
                        f"{st.get('iterations_coexecuted')}/{st.get('eager_fallbacks')} | "
                        f"{st.get('compiles')} |")
    out += ["", "| program | eager steps/s | terra_bc steps/s | terra_bc/eager | aim | check | "
            "traced/coexecuted/fallbacks | compiles |", "|---|---:|---:|---:|---:|---|---|---:|"]
    out += rows + ["", f"{res['platform']}; CPython {res['python']}; jax {res['jax']}, jaxlib "
                   f"{res['jaxlib']}; {res['device']}; {res['cpus']} CPUs; --steps "
                   f"{res['args']['steps']} --repeats {res['args']['repeats']} (greedy_decode: "
                   f"1 step = 1 prompt, steps/4 per repeat)"]
    if res.get("terra_bc_import_error"):
        out.append(f"terra_bc import failed: {res['terra_bc_import_error']}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="abcdefg", help="programs to run, e.g. 'ab' or 'a,c'")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    res = {"platform": platform.platform(), "python": platform.python_version(),
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "device": str(jax.devices()[0]),
           "cpus": os.cpu_count(), "args": vars(args), "terra_bc_import_error": TERRA_IMPORT_ERROR,
           "programs": {}}
    for letter, (name, _, fn) in PROGRAMS.items():
        if letter in args.only:
            try:
                res["programs"][name] = fn(args)
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                res["programs"][name] = {"section_error": err(e)}
    return emit(res, report(res), args.json)


if __name__ == "__main__":
    main()
