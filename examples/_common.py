"""Helpers shared by the example programs.

Kept deliberately tiny so that every example still reads like a standalone
community script. Each example accepts ``--steps N``, ``--jit`` and
``--seed S`` (the six whose naive ``--jit`` fails also ``--jit-split``),
prints one ``timing: {json}`` line with its per-step wall times and ends with ``checksum: <float>``; the benchmark runner (``python -m
benchmarks``) and ``tests/test_examples.py`` parse exactly those two lines.
"""
import argparse
import json
import random

import numpy as np


def parse_args(description, steps=30, split=False):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help="training iterations")
    p.add_argument("--jit", action="store_true",
                   help="wrap the step function in jax.jit, as a user would try it")
    if split:
        # Only where the naive --jit is wrong or raises: the same computation,
        # restructured by hand so that the Python/NumPy work stays outside the
        # jitted functions. The jax.jit upper bound for the benchmark.
        p.add_argument("--jit-split", action="store_true",
                       help="run a hand-restructured step whose pure parts are jitted")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # Every source of randomness the examples use is seeded, so the same seed
    # gives the same checksum in every eager run.
    random.seed(args.seed)
    np.random.seed(args.seed)
    return args


def checksum(*values):
    """Sum of |x| over every leaf of the given pytrees, in float64.

    Absolute values keep the sum away from zero, so a relative tolerance is
    meaningful; float64 on the host keeps the reduction itself exact enough.
    """
    import jax
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(values):
        total += float(np.abs(np.asarray(leaf, dtype=np.float64)).sum())
    return total


def param_change(params, params0):
    """params - params0 leaf by leaf: what training did, for the checksum.

    The checksum sums this rather than the raw weights because the raw sum is
    dominated by the random initialisation and would hide a frozen mask or a
    wrong gradient behind a 1e-5 relative change.
    """
    import jax
    return jax.tree_util.tree_map(lambda a, b: a - b, params, params0)


def report(step_times, value):
    """Print the two machine-readable lines every example ends with."""
    print("timing: " + json.dumps({"step_times": [round(t, 6) for t in step_times]}))
    print(f"checksum: {float(value)!r}", flush=True)


def mnist_like_batch(rng, n):
    """MNIST-shaped stand-in: ten classes of noisy oriented stripes, 28x28x1, in [0, 1]."""
    label = rng.integers(0, 10, size=n)
    yy, xx = np.mgrid[0:28, 0:28]
    angle = label[:, None, None] * np.pi / 10
    image = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.7)
    image = np.clip(image + 0.5 * rng.standard_normal((n, 28, 28)), 0.0, 1.0)
    return {"image": image[..., None].astype(np.float32), "label": label.astype(np.int32)}
