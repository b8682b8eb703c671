"""Times every RG-LRU scan implementation that runs compiled on this backend.

Prints ONE JSON line:
    {"bench": "rglru_scan", "backend": "cpu", "auto": "sequential", "dtype": "float32",
     "repeats": 7, "results": {"reference": {"b8_t1_e2560_ms": ..., ...}, ...}}

Each time is the median over ``--repeats`` calls after one warm-up (compile) call,
each call ended by ``block_until_ready``. Calls go through ``griffin_batch.kernels.rglru_scan`` under
``jax.jit``, as the model makes them; at t = 1 that is the fused single-step path for
every implementation, so ``*_direct_ms`` also times the implementation's own scan at
t = 1 to show what the fast path saves. Pallas kernels are timed only on their own
backend (on CPU they only run interpreted, which says nothing about speed).

Usage (from the repository root): PYTHONPATH=. python benchmarks/bench_scan.py [--repeats 7]
    [--dtype float32]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from griffin_batch.kernels.rglru_scan import api

SHAPES = ((8, 1, 2560), (8, 2048, 512), (1, 16384, 512))
PORTABLE = ("reference", "sequential", "associative")
PALLAS_BY_BACKEND = {"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)}


def make_inputs(shape: tuple[int, int, int], dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    b, _, e = shape
    x = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    a = jnp.asarray(rng.uniform(0.9, 1.0, size=shape).astype(np.float32), dtype)
    h0 = jnp.asarray(rng.standard_normal((b, e), np.float32))
    return x, a, h0


def median_ms(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in ms, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4)


def bench_implementation(name: str, dtype, repeats: int) -> dict[str, float]:
    through_api = jax.jit(functools.partial(api.rglru_scan, implementation=name))
    module = importlib.import_module(f"griffin_batch.kernels.rglru_scan.{name}")
    results = {}
    for shape in SHAPES:
        key = "b{}_t{}_e{}".format(*shape)
        args = make_inputs(shape, dtype)
        results[f"{key}_ms"] = median_ms(through_api, args, repeats)
        if shape[1] == 1:
            results[f"{key}_direct_ms"] = median_ms(module.scan, args, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    backend = jax.default_backend()
    names = PORTABLE + PALLAS_BY_BACKEND.get(backend, ())
    dtype = jnp.dtype(args.dtype)
    results = {name: bench_implementation(name, dtype, args.repeats) for name in names}
    line = {
        "bench": "rglru_scan",
        "backend": backend,
        "auto": api.resolve_implementation(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
