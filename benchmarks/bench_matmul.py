"""One decode matmul at a time: XLA:CPU (what JAX runs) against torch (oneDNN/MKL), in GFLOP/s.

Prints ONE JSON line:
    {"bench": "matmul", "shapes": {"32x512x1536": {"jax_gflops": ..., "torch_gflops": ...,
     "jax_vs_torch": ...}, ...}, "min_jax_vs_torch": ..., ...}

The shapes are the reference workload's decode matmuls (``benchmarks/common.py``: width 512,
MLP 1536, vocabulary 8000) at ``--batch`` rows: [rows, in] x [in, out], float32. JAX runs 20
chained matmuls inside one compiled loop (no dispatch per matmul, the weight an argument as in a
decoder); torch runs them one call at a time. The best of 5 repeats counts.

What it is for: ``bench_engine``'s floor is the model's matmuls alone, in both frameworks. Where
XLA's matmul itself reaches only a fraction f of torch's, no JAX decoder can reach more than f of
torch's floor, whatever else it does; ``min_jax_vs_torch`` is that bound.

Usage (from the repository root): python benchmarks/bench_matmul.py [--batch 32 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

CHAIN = 20  # matmuls per compiled JAX call


def best_seconds(fn, calls: int, repeats: int = 5) -> float:
    """Seconds per call of ``fn``, the best of ``repeats`` timings of ``calls`` calls."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def jax_seconds(m: int, k: int, n: int) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)

    @jax.jit
    def chained(x, w):
        # Each matmul's input depends on the previous result, so none can be skipped or merged.
        body = lambda _, acc: acc + (x + acc[:, :1]) @ w  # noqa: E731
        return jax.lax.fori_loop(0, CHAIN, body, jnp.zeros((m, n), jnp.float32))

    return best_seconds(lambda: chained(x, w).block_until_ready(), 5) / CHAIN


def torch_seconds(m: int, k: int, n: int) -> float:
    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32))
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((k, n)).astype(np.float32))
    with torch.no_grad():
        return best_seconds(lambda: x @ w, 100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    config = common.workload_config()
    d, m_width, v = config.width, config.mlp_expanded_width, config.vocab_size
    shapes = {}
    for rows in args.batch:
        for k, n in ((d, d), (d, m_width), (m_width, d), (d, v)):
            flops = 2 * rows * k * n
            j, t = jax_seconds(rows, k, n), torch_seconds(rows, k, n)
            shapes[f"{rows}x{k}x{n}"] = {
                "jax_gflops": flops / j / 1e9,
                "torch_gflops": flops / t / 1e9,
                "jax_vs_torch": t / j,
            }
    common.emit({
        "bench": "matmul",
        "shapes": shapes,
        "min_jax_vs_torch": min(s["jax_vs_torch"] for s in shapes.values()),
        "max_jax_vs_torch": max(s["jax_vs_torch"] for s in shapes.values()),
        **common.environment(),
    })


if __name__ == "__main__":
    main()
