"""Decode throughput of our engine against DeepMind's reference sampler and transformers.

Prints ONE JSON line:
    {"bench": "engine", "batch": 32, "prompt_tokens": 16, "new_tokens": 256,
     "engine_tokens_per_s": ..., "reference_tokens_per_s": ..., "hf_tokens_per_s": ...,
     "vs_reference": ..., "vs_hf": ..., "peak_matmul_gflops": ...,
     "engine_roofline_fraction": ..., "greedy_agreement": {...}, ...}

Workload: ``benchmarks/common.py`` (vocab 8000, width 512, 6 blocks, window 2048,
float32, random weights), ``--batch`` prompts of ``--prompt`` tokens, ``--tokens``
new tokens each, greedy, never stopping early. Every implementation runs the
workload once to compile and warm up, then ``--repeats`` times timed; tokens/s
is batch x new tokens over the fastest timed wall time, prefill included.

Roofline: the best float32 GFLOP/s of a 4096^3 ``jnp.dot`` in the same run;
the model costs about 2 x parameters FLOPs per token (the tied embedding
counted once, as the output projection; attention scores not counted).

Floor: ``matmul_floor_tokens_per_s`` runs only the model's dense weight
matmuls per step (JAX and torch, same batch), nothing else. It is the fastest
any decoder of this model can step here, so ``floor / hf`` is the most that
any implementation could gain over transformers on this machine
(``max_vs_hf``).

``greedy_agreement``: the fraction of sequences whose first 32 tokens equal ours
(random weights, different kernels: rare near-ties can flip a later token).

Usage (from the repository root): python benchmarks/bench_engine.py [--batch 32]
    [--tokens 256] [--prompt 16] [--skip-hf] [--skip-reference]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

AGREE_PREFIX = 32


def best_of(repeats: int, fn):
    """(result, seconds) of the fastest of ``repeats`` calls: other load only slows a run."""
    runs = [common.timed(fn) for _ in range(repeats)]
    return min(runs, key=lambda r: r[1])


def bench_ours(config, params, prompts, steps, repeats):
    engine = common.make_engine(
        config,
        params,
        num_slots=len(prompts),
        decode_steps=32,
        prefill_batch=len(prompts),
        chunk_size=256,
    )
    reqs = common.requests(prompts, steps)
    common.run_engine(engine, reqs)  # compiles every program the workload uses
    (out, _), seconds = best_of(repeats, lambda: common.run_engine(engine, reqs))
    tokens = np.array([out[str(i)] for i in range(len(prompts))])
    return tokens, seconds, engine.compile_counts()


def bench_reference(config, params, prompts, steps, repeats):
    sampler = common.reference_sampler(config, params)
    common.reference_generate(sampler, prompts, steps)
    return best_of(repeats, lambda: common.reference_generate(sampler, prompts, steps))


def bench_hf(config, params, prompts, steps, repeats):
    import torch

    model = common.hf_model(config, params)
    common.hf_generate(model, prompts, 8)
    tokens, seconds = best_of(repeats, lambda: common.hf_generate(model, prompts, steps))
    return tokens, seconds, torch.get_num_threads()


def agreement(ours: np.ndarray, theirs: np.ndarray) -> float:
    n = min(AGREE_PREFIX, ours.shape[1])
    return float(np.mean(np.all(ours[:, :n] == theirs[:, :n], axis=1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best counts")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    config = common.workload_config()
    params = common.workload_params(config)
    prompts = common.token_prompts(args.batch, args.prompt, config.vocab_size)
    generated = args.batch * args.tokens
    flops = common.flops_per_token(params)
    result = {
        "bench": "engine",
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "new_tokens": args.tokens,
        "params": common.param_count(params),
        **common.environment(),
    }

    common.log("peak matmul ...")
    peak = common.peak_matmul_gflops()
    common.log("our engine ...")
    ours, seconds, compiles = bench_ours(config, params, prompts, args.tokens, args.repeats)
    result.update(
        engine_s=seconds,
        engine_tokens_per_s=generated / seconds,
        engine_compiles=compiles,
        peak_matmul_gflops=peak,
        model_gflop_per_token=flops / 1e9,
        engine_roofline_fraction=generated / seconds * flops / 1e9 / peak,
    )
    common.log("matmul floor ...")
    floor = common.matmul_floor_tokens_per_s(params, args.batch)
    result.update(floor_jax_tokens_per_s=floor["jax"], floor_torch_tokens_per_s=floor["torch"],
                  engine_vs_floor=result["engine_tokens_per_s"] / max(floor.values()))
    agree = {}
    if not args.skip_reference:
        common.log("reference sampler ...")
        ref, seconds = bench_reference(config, params, prompts, args.tokens, args.repeats)
        result.update(
            reference_s=seconds,
            reference_tokens_per_s=generated / seconds,
            vs_reference=seconds / result["engine_s"],
        )
        agree["reference"] = agreement(ours, ref)
    if not args.skip_hf:
        common.log("transformers ...")
        hf, seconds, threads = bench_hf(config, params, prompts, args.tokens, args.repeats)
        result.update(
            hf_s=seconds,
            hf_tokens_per_s=generated / seconds,
            vs_hf=seconds / result["engine_s"],
            max_vs_hf=max(floor.values()) * seconds / generated,
            torch_threads=threads,
        )
        agree["hf"] = agreement(ours, hf)
    result["greedy_agreement"] = agree
    common.emit(result)


if __name__ == "__main__":
    main()
