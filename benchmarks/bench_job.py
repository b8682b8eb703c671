"""Job throughput against the engine alone on the same machine and workload.

Prints ONE JSON line:
    {"bench": "job", "rows": 128, "max_tokens": 256, "slots": 32, "completion_tokens": ...,
     "engine_tokens_per_s": ..., "job_tokens_per_s": ..., "overhead_pct": ...,
     "job_wall_tokens_per_s": ..., "overhead_wall_pct": ..., "startup_s": ..., ...}

Workload: the engine's reference model (``benchmarks/common.py``: random float32
parameters, vocabulary 8000, width 512, 6 blocks, 4 heads, attention window
2048), 32 slots, 256 new tokens per prompt, greedy, so the engine alone and the
job produce the same tokens. The job needs text prompts and a real
SentencePiece model, so both sides use an 8000-piece tokenizer trained here and
short text prompts (about 16 tokens, like the reference's 16-token prompts).

* ``engine_tokens_per_s``: ``Engine.generate`` over all prompts in this
  process, after a warm-up pass that compiles.
* ``job_tokens_per_s``: the whole job (a local Ray cluster, one CPU worker,
  Parquet in, Parquet out, manifest, summary) from the moment the worker has
  loaded to the last commit; ``overhead_pct`` compares it with the engine: the
  cost of the driver, scheduling and I/O.
* ``job_wall_tokens_per_s``: the same over the job's whole wall time, which
  adds starting Ray and the worker process (a fixed cost a real job amortises).

Both sides share a JAX compilation cache, so the job's worker does not
compile again what the warm-up compiled.

Usage (from the repository root): python benchmarks/bench_job.py [--small] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_workload(directory: str, rows: int, seed: int = 0) -> tuple[str, str, str]:
    """Writes the tokenizer, checkpoint and prompts; returns their paths."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks import common
    from griffin_batch.model import checkpoint, testing

    config = common.workload_config()
    rng = random.Random(seed)
    # A vocabulary of 8000 pieces needs more distinct text than the embedded corpus.
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        for _ in range(30_000)
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20_000)]
    tokenizer = os.path.join(directory, "tokenizer.model")
    testing.train_tiny_tokenizer(
        tokenizer, vocab_size=config.vocab_size, text=testing.corpus(2000) + "\n".join(lines)
    )
    ckpt = os.path.join(directory, "checkpoint")
    checkpoint.save_checkpoint(
        ckpt, config, testing.random_params(config, seed=seed, dtype=np.float32)
    )
    # About 16 tokens each, as the engine benchmark's prompts.
    prompts = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(rows)]
    inputs = os.path.join(directory, "prompts.parquet")
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(rows)], "prompt": prompts}), inputs)
    return ckpt, tokenizer, inputs


def time_engine(ckpt: str, tokenizer: str, inputs: str, slots: int, max_tokens: int) -> dict:
    """Engine alone: one warm-up pass (compiles), then a timed pass."""
    import pyarrow.parquet as pq

    from griffin_batch import model
    from griffin_batch.model import engine, requests

    config, params = model.load_checkpoint(ckpt)
    tok = model.load_tokenizer(tokenizer)
    eng = engine.Engine(config, params, tok, engine.EngineConfig(num_slots=slots))
    prompts = pq.read_table(inputs).column("prompt").to_pylist()
    params_ = requests.SamplingParams(max_tokens=max_tokens)
    reqs = [
        requests.Request(request_id=str(i), prompt=p, params=params_) for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    list(eng.generate(reqs))
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    tokens = sum(len(c.tokens) for c in eng.generate(reqs))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "warmup_s": warmup}


def time_job(
    ckpt: str, tokenizer: str, inputs: str, out: str, slots: int, max_tokens: int, shard_rows: int
) -> dict:
    """The whole job on a fresh local Ray cluster with one CPU worker."""
    from griffin_batch.jobs import config as config_lib
    from griffin_batch.jobs import driver
    from griffin_batch.model.engine_config import EngineConfig

    config = config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=(inputs,), output=out, shard_rows=shard_rows),
        model=config_lib.ModelConfig(
            checkpoint=ckpt, tokenizer=tokenizer, engine=EngineConfig(num_slots=slots)
        ),
        sampling=config_lib.SamplingConfig(max_tokens=max_tokens),
        cluster=config_lib.ClusterConfig(address="local", workers=1, accelerator="cpu"),
        resume=config_lib.ResumeConfig(overwrite=True),
    )
    start = time.perf_counter()
    result = driver.run(config, say=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - start
    s = result.summary
    processing = s["generation_s"] - (s["startup_s"] or 0.0)
    return {
        "tokens": s["completion_tokens"],
        "processing_s": processing,
        "wall_s": wall,
        "startup_s": s["startup_s"],
        "succeeded": result.succeeded,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="32 rows x 32 tokens (a quick check)")
    p.add_argument("--rows", type=int, help="prompts (default 128; --small: 32)")
    p.add_argument(
        "--max-tokens", type=int, help="new tokens per prompt (default 256; --small: 32)"
    )
    p.add_argument("--slots", type=int, default=32)
    p.add_argument(
        "--shard-rows",
        type=int,
        default=32,
        help="rows per shard; small shards exercise refilling slots across shards",
    )
    a = p.parse_args(argv)
    rows = a.rows or (32 if a.small else 128)
    max_tokens = a.max_tokens or (32 if a.small else 256)
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax-cache")
        for name, value in (
            ("JAX_COMPILATION_CACHE_DIR", cache),
            ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
            ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1"),
        ):
            os.environ[name] = value  # set before JAX loads: this process and the worker
        ckpt, tokenizer, inputs = build_workload(tmp, rows)
        eng = time_engine(ckpt, tokenizer, inputs, a.slots, max_tokens)
        job = time_job(
            ckpt, tokenizer, inputs, os.path.join(tmp, "out"), a.slots, max_tokens, a.shard_rows
        )
    engine_tps = eng["tokens"] / eng["seconds"]
    job_tps = job["tokens"] / job["processing_s"]
    wall_tps = job["tokens"] / job["wall_s"]
    report = {
        "bench": "job",
        "rows": rows,
        "max_tokens": max_tokens,
        "slots": a.slots,
        "shard_rows": a.shard_rows,
        "completion_tokens": job["tokens"],
        "engine_tokens": eng["tokens"],
        "engine_tokens_per_s": round(engine_tps, 1),
        "job_tokens_per_s": round(job_tps, 1),
        "overhead_pct": round(100.0 * (1.0 - job_tps / engine_tps), 1),
        "job_wall_tokens_per_s": round(wall_tps, 1),
        "overhead_wall_pct": round(100.0 * (1.0 - wall_tps / engine_tps), 1),
        "engine_s": round(eng["seconds"], 2),
        "engine_warmup_s": round(eng["warmup_s"], 2),
        "job_processing_s": round(job["processing_s"], 2),
        "job_wall_s": round(job["wall_s"], 2),
        "job_startup_s": job["startup_s"],
        "job_succeeded": job["succeeded"],
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
