"""One long row among many short ones, through the whole job: does the long row idle the rest?

Prints ONE JSON line:
    {"bench": "mixed_job", "long_tokens": 6000, "short_rows": 64, "short_tokens": 300,
     "long_alone_s": ..., "mixed_8_row_shards_s": ..., "mixed_1_row_shards_s": ...,
     "ratio_8_row_shards": ..., "ratio_1_row_shards": ..., ...}

Workload (the long-output issue's): the bundled demo model, greedy, one CPU
worker with 32 slots; one row of ``--long-tokens`` new tokens plus
``--short-rows`` rows of ``--short-tokens`` each (a per-row ``max_tokens``
column), in one Parquet file. Three jobs on one local Ray cluster, side by
side: the long row alone, then everything with 8-row shards, then with 1-row
shards. Each figure is the job's generation time from its first ready worker
to its last commit (``_summary.json``: ``generation_s - startup_s``), so Ray's
start-up is left out. Each job starts a fresh worker, which would compile the
engine's programs again inside that window (more prefill shapes for the mixed
jobs than for the long row alone): the workers share a JAX persistent
compilation cache, warmed by a small mixed job first, so the figures measure
scheduling, not compilation (``--cold`` turns this off). With continuous batching across shard boundaries the
short rows fit in the slots beside the long row and the mixed jobs take about
as long as the long row alone (target: ratio <= 1.2).

This machine's timings vary by +-20% from run to run, so each job runs
``--repeats`` times (rotated order) and the medians are compared.

Usage (from the repository root): python benchmarks/bench_mixed_job.py [--small]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time


def write_input(path: str, long_tokens: int, short_rows: int, short_tokens: int,
                with_short: bool) -> int:
    """Writes the prompts; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts, limits = ["Write a very long story about the sea."], [long_tokens]
    if with_short:
        prompts += [f"Short answer number {i}:" for i in range(short_rows)]
        limits += [short_tokens] * short_rows
    pq.write_table(pa.table({"prompt": prompts, "max_tokens": limits}), path)
    return len(prompts)


def time_job(inputs: str, out: str, shard_rows: int, slots: int) -> dict:
    """Runs one job on the Ray cluster this process joined; returns its figures."""
    from griffin_batch.jobs import config as config_lib
    from griffin_batch.jobs import driver
    from griffin_batch.model.engine_config import EngineConfig

    config = config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=(inputs,), output=out, shard_rows=shard_rows,
                               sampling_columns=("max_tokens",)),
        model=config_lib.ModelConfig(engine=EngineConfig(num_slots=slots)),
        cluster=config_lib.ClusterConfig(workers=1, accelerator="cpu"),
        resume=config_lib.ResumeConfig(overwrite=True),
    )
    start = time.perf_counter()
    result = driver.run(config, say=lambda m: print(m, file=sys.stderr))
    s = result.summary
    assert result.succeeded, s
    return {
        "generation_s": round(s["generation_s"] - (s["startup_s"] or 0.0), 2),
        "wall_s": round(time.perf_counter() - start, 2),
        "tokens": s["completion_tokens"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="1,000 + 16 x 100 tokens (a quick check)")
    p.add_argument("--long-tokens", type=int)
    p.add_argument("--short-rows", type=int)
    p.add_argument("--short-tokens", type=int)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--cold", action="store_true", help="no shared compilation cache, no warm-up")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the three jobs, in rotated order; medians are reported")
    a = p.parse_args(argv)
    long_tokens = a.long_tokens or (1000 if a.small else 6000)
    short_rows = a.short_rows or (16 if a.small else 64)
    short_tokens = a.short_tokens or (100 if a.small else 300)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        if not a.cold:  # inherited by the workers Ray starts (before ray.init)
            os.environ["JAX_COMPILATION_CACHE_DIR"] = f"{tmp}/jax-cache"
            os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
            os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        figures: dict = {}
        try:
            alone, mixed = f"{tmp}/alone.parquet", f"{tmp}/mixed.parquet"
            write_input(alone, long_tokens, short_rows, short_tokens, with_short=False)
            write_input(mixed, long_tokens, short_rows, short_tokens, with_short=True)
            if not a.cold:
                warm = f"{tmp}/warm.parquet"
                write_input(warm, 200, short_rows, 20, with_short=True)
                time_job(warm, f"{tmp}/o0", 8, a.slots)
                time_job(warm, f"{tmp}/o0", 1, a.slots)
            jobs = [("long_alone", alone, 8), ("mixed_8_row_shards", mixed, 8),
                    ("mixed_1_row_shards", mixed, 1)]
            runs: dict[str, list[dict]] = {name: [] for name, *_ in jobs}
            for r in range(a.repeats):  # rotated so no job always runs first or last
                for name, path, shard_rows in jobs[r % 3:] + jobs[: r % 3]:
                    runs[name].append(time_job(path, f"{tmp}/{name}", shard_rows, a.slots))
            for name, results in runs.items():
                times = sorted(x["generation_s"] for x in results)
                figures[name] = {"generation_s": times[len(times) // 2], "all_s": times,
                                 "tokens": results[0]["tokens"],
                                 "wall_s": [x["wall_s"] for x in results]}
        finally:
            ray.shutdown()
    base = figures["long_alone"]["generation_s"]
    line = {
        "bench": "mixed_job",
        "long_tokens": long_tokens,
        "short_rows": short_rows,
        "short_tokens": short_tokens,
        "slots": a.slots,
        "compilation_cache": not a.cold,
        **{f"{k}_s": v["generation_s"] for k, v in figures.items()},
        "ratio_8_row_shards": round(figures["mixed_8_row_shards"]["generation_s"] / base, 3),
        "ratio_1_row_shards": round(figures["mixed_1_row_shards"]["generation_s"] / base, 3),
        "repeats": a.repeats,
        "all_s": {k: v["all_s"] for k, v in figures.items()},
        "tokens": {k: v["tokens"] for k, v in figures.items()},
        "wall_s": {k: v["wall_s"] for k, v in figures.items()},
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
