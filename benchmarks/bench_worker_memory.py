"""Does a worker's memory grow with its shard? Python heap while one shard runs, two shard sizes.

Prints ONE JSON line:
    {"bench": "worker_memory", "tokens": 256, "small_rows": 32, "large_rows": 256,
     "spill": {"small_mib": ..., "large_mib": ..., "per_row_kib": ...},
     "in_memory": {...}, ...}

Workload: the bundled demo model in this process (a ``GenerationWorker``
without Ray), 16 slots, greedy, every row ``--tokens`` new tokens; a shard of
``--small-rows`` and one of ``--large-rows`` rows. Measured: the peak of
Python's heap (``tracemalloc``) above its level before the shard, for the
worker's ``process_shard`` (finished samples spilled to local disk, the file
written from there) and for ``__call__`` (the in-memory path: every
completion and the assembled table in memory). With the spill, and prompts
read a window at a time, the peak should grow by far less per row than
without: what remains per row is bookkeeping (its id, its request id, its
place in the exactly-once check), not its prompt or its output.

Usage (from the repository root): python benchmarks/bench_worker_memory.py [--small]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _shard(tmp: str, num_rows: int, tokens: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from griffin_batch.actors import shards
    from griffin_batch.model import requests

    path = f"{tmp}/in-{num_rows}.parquet"
    pq.write_table(pa.table({"prompt": [f"Row {i}: tell me a story." for i in range(num_rows)]}),
                   path)
    spec = shards.ShardSpec(shard_id=f"{num_rows:05d}", path=path, file_key="in", row_groups=(0,),
                            offset=0, num_rows=num_rows, first_row=0)
    options = shards.ShardOptions(output_dir=f"{tmp}/out",
                                  sampling=requests.SamplingParams(max_tokens=tokens))
    return spec, options


def _peak_mib(fn) -> float:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="16 and 64 rows of 64 tokens")
    p.add_argument("--tokens", type=int)
    p.add_argument("--small-rows", type=int)
    p.add_argument("--large-rows", type=int)
    a = p.parse_args(argv)
    tokens = a.tokens or (64 if a.small else 256)
    small = a.small_rows or (16 if a.small else 32)
    large = a.large_rows or (64 if a.small else 256)

    from griffin_batch.actors import rows, worker
    from griffin_batch.model.engine_config import EngineConfig

    w = worker.GenerationWorker(worker.ModelSpec(engine=EngineConfig(num_slots=16)))
    result: dict = {"bench": "worker_memory", "tokens": tokens, "small_rows": small,
                    "large_rows": large}
    with tempfile.TemporaryDirectory() as tmp:
        # Compile every program both sizes need outside the measurements (JAX's
        # tracing caches are Python objects too).
        for num_rows in (small, large):
            spec, options = _shard(tmp, num_rows, tokens)
            w.process_shard(spec, options)
        for name in ("spill", "in_memory"):
            peaks = {}
            for num_rows in (small, large):
                spec, options = _shard(tmp, num_rows, tokens)
                if name == "spill":
                    run = functools.partial(w.process_shard, spec, options)
                else:
                    run = functools.partial(w, rows.read_rows(spec, options), spec, options)
                peaks[num_rows] = _peak_mib(run)
                common.log(f"{name}: {num_rows} rows, peak {peaks[num_rows]:.2f} MiB")
            result[name] = {
                "small_mib": peaks[small],
                "large_mib": peaks[large],
                "per_row_kib": (peaks[large] - peaks[small]) / (large - small) * 1024,
            }
    result["output_kib_per_row"] = tokens * 4 / 1024  # the int32 tokens alone, as stored
    result["ratio_per_row"] = (result["spill"]["per_row_kib"]
                               / max(result["in_memory"]["per_row_kib"], 1e-9))
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
