"""Chunked prefill of long prompts: speed and peak memory at 4k, 16k and 64k tokens.

Prints ONE JSON line:
    {"bench": "prefill", "chunk": 512,
     "runs": [{"prompt_tokens": 4096, "tokens_per_s": ..., "peak_rss_delta_mb": ...}, ...],
     "peak_delta_max_minus_min_mb": ..., ...}

Workload: the reference model (``benchmarks/common.py``), one request whose
prompt is ``N`` random token ids, ``max_tokens=1``: the engine prefills it in
``--chunk``-token chunks and samples one token. Each length runs in a fresh
process: it first prefills a short prompt to compile every program, then
samples its resident memory (process and children) every 10 ms during the
long prefill. ``peak_rss_delta_mb`` is the peak during the prefill minus the
resident memory just before it; with a fixed-size state and chunking it does
not grow with ``N``. ``device_memory`` is JAX's allocator report where the
backend has one (None on CPU).

Usage (from the repository root): python benchmarks/bench_prefill.py [--tokens 65536]
    [--chunk 512] [--lengths 4096,16384]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402


def child(tokens: int, chunk: int) -> dict:
    config = common.workload_config()
    params = common.workload_params(config)
    warm = 2 * chunk + 17
    engine = common.make_engine(
        config,
        params,
        num_slots=1,
        prefill_batch=1,
        chunk_size=chunk,
        max_prompt_tokens=max(tokens, warm),
    )
    # Compiles the full-chunk program, a tail bucket and sampling.
    common.run_engine(engine, common.requests(common.token_prompts(1, warm, config.vocab_size), 1))
    compiled = engine.compile_counts()
    prompt = common.token_prompts(1, tokens, config.vocab_size, seed=1)
    before = common.rss_mb()
    with common.RssPeak() as watch:
        _, seconds = common.run_engine(engine, common.requests(prompt, 1))
    stats = jax.local_devices()[0].memory_stats()
    return {
        "prompt_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "rss_before_mb": before,
        "peak_rss_mb": watch.peak,
        "peak_rss_delta_mb": watch.peak - before,
        "compiled_during_timing": sum(engine.compile_counts().values()) - sum(compiled.values()),
        "device_memory": stats
        and {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use") if k in stats},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--lengths", default="4096,16384", help="shorter prompts to compare")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.emit(child(args.child, args.chunk))
        return

    lengths = sorted({int(n) for n in args.lengths.split(",") if n} | {args.tokens})
    runs = []
    for n in lengths:
        common.log(f"prefill {n} ...")
        runs.append(common.run_child(__file__, [f"--child={n}", f"--chunk={args.chunk}"]))
    deltas = [r["peak_rss_delta_mb"] for r in runs]
    common.emit(
        {
            "bench": "prefill",
            "chunk": args.chunk,
            "runs": runs,
            "peak_delta_max_minus_min_mb": max(deltas) - min(deltas),
            **common.environment(),
        }
    )


if __name__ == "__main__":
    main()
