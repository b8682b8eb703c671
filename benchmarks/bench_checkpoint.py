"""Progress checkpoints' cost: the same job with ``--checkpoint-every 10`` against none.

Prints ONE JSON line:
    {"bench": "checkpoint", "rows": 16, "tokens": ..., "checkpoint_every_s": 10.0,
     "none_s": [...], "every_s": [...], "none_median_s": ..., "every_median_s": ...,
     "ratio": ..., "checkpoints": [...], "expected_checkpoints": [...], ...}

Workload: the bundled demo model, greedy, one CPU worker with ``--slots`` 16
slots; ``--rows`` 16 distinct prompts of ``--tokens`` 12,000 new tokens each
(a ``max_tokens`` column), in 8-row shards, so two shards decode side by side
and each writes its own checkpoints. Sized so one job takes 30-60 s on two
CPU cores (about 330 decode steps a second there).

An untimed warm-up job (checkpoints every half second) fills a shared JAX
compilation cache, so no timed worker compiles. Then the two settings run on
one local Ray cluster, ``--repeats`` 3 times each, alternately in ABBA order
(none, every, every, none, none, every) so a drift in the machine's load weighs on
both alike. Each figure is the job's generation time (``_summary.json``:
``generation_s - startup_s``, first ready worker to last commit). The ratio
is the median with checkpoints over the median without. Target: <= 1.05.

Checkpoints are counted by watching the output's ``_progress`` directory
(polled every ``POLL_S`` in both settings, so both pay the same): per shard,
the highest checkpoint sequence number seen (sequence numbers rise by one per
checkpoint, and a shard's progress is deleted when it commits, so one written
in the last poll interval before a commit can be missed).
``expected_checkpoints`` is each job's generation time / interval x shards
decoding at once, for comparison.

Usage (from the repository root): python benchmarks/bench_checkpoint.py [--small]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

POLL_S = 1.0
SHARD_ROWS = 8
WARM_UP_TOKENS = 300  # past the demo model's attention window: every decode shape
WARM_UP_EVERY_S = 0.5  # checkpoints during the warm-up too: their programs compile there
_DELTA = re.compile(r"/([^/]+)/(\d{8})-[0-9a-f]{8}\.delta\.safetensors$")


def write_input(path: str, rows: int, tokens: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "prompt": [f"Story number {i}: write a very long story about the sea." for i in range(rows)],
        "id": [f"r{i}" for i in range(rows)],
        "max_tokens": [tokens] * rows,
    }), path)


def job_config(inputs: str, out: str, slots: int, every_s: float):
    from griffin_batch.jobs import config as config_lib
    from griffin_batch.model.engine_config import EngineConfig

    return config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=(inputs,), output=out, shard_rows=SHARD_ROWS,
                               sampling_columns=("max_tokens",)),
        model=config_lib.ModelConfig(engine=EngineConfig(num_slots=slots)),
        sampling=config_lib.SamplingConfig(temperature=0.0),
        cluster=config_lib.ClusterConfig(workers=1, accelerator="cpu"),
        resume=config_lib.ResumeConfig(overwrite=True, checkpoint_every_s=every_s),
    )


class CheckpointCounter:
    """Polls a job's ``_progress`` directory; ``count`` sums each shard's highest sequence seen."""

    def __init__(self, output: str):
        import fsspec

        from griffin_batch.actors import shards

        self.fs, root = fsspec.core.url_to_fs(output)
        self.pattern = f"{root.rstrip('/')}/{shards.PROGRESS_DIR}/*/*.delta.safetensors"
        self.highest: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.fs.invalidate_cache()
            for path in self.fs.glob(self.pattern):
                if m := _DELTA.search(path):
                    shard, seq = m.group(1), int(m.group(2))
                    self.highest[shard] = max(seq, self.highest.get(shard, 0))

    @property
    def count(self) -> int:
        return sum(self.highest.values())

    def __enter__(self) -> CheckpointCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def time_job(config) -> tuple[float, int, dict]:
    """Runs one job; returns (generation seconds, checkpoints counted, summary)."""
    from griffin_batch.jobs import driver

    with CheckpointCounter(config.io.output) as counter:
        result = driver.run(config, say=lambda m: None)
    if not result.succeeded:
        raise RuntimeError(f"job failed: {result.summary}")
    return common.job_seconds(result.summary), counter.count, result.summary


def measure(tmp: str, rows: int, tokens: int, slots: int, every_s: float, repeats: int) -> dict:
    warm, inputs = f"{tmp}/warm.parquet", f"{tmp}/in.parquet"
    write_input(warm, rows, WARM_UP_TOKENS)
    write_input(inputs, rows, tokens)
    common.log("warm-up job (fills the compilation cache)")
    time_job(job_config(warm, f"{tmp}/warm", slots, WARM_UP_EVERY_S))
    times: dict[float, list[float]] = {0.0: [], every_s: []}
    counts, completion_tokens = [], set()
    for rep in range(repeats):
        order = (0.0, every_s) if rep % 2 == 0 else (every_s, 0.0)
        for every in order:
            seconds, count, summary = time_job(
                job_config(inputs, f"{tmp}/out-{rep}-{every}", slots, every))
            times[every].append(seconds)
            completion_tokens.add(summary["completion_tokens"])
            if every:
                counts.append(count)
            common.log(f"repetition {rep}: checkpoint every {every or 'never'}: {seconds:.2f}s, "
                       f"{count} checkpoints seen, {summary['completion_tokens']} tokens")
    none_median, every_median = statistics.median(times[0.0]), statistics.median(times[every_s])
    in_flight = min(-(-rows // SHARD_ROWS), max(1, slots // SHARD_ROWS))
    return {
        "none_s": times[0.0],
        "every_s": times[every_s],
        "none_median_s": none_median,
        "every_median_s": every_median,
        "ratio": every_median / none_median,
        "target_met": every_median / none_median <= 1.05,
        "checkpoints": counts,
        "expected_checkpoints": [int(t / every_s) * in_flight for t in times[every_s]],
        "completion_tokens": sorted(completion_tokens),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="16 rows x 300 tokens, checkpoints every 2 s (a quick check)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, help="new tokens per row (default 12,000)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--checkpoint-every", type=float,
                   help="seconds between checkpoints (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed jobs per setting")
    a = p.parse_args(argv)
    tokens = a.tokens or (300 if a.small else 12000)
    every_s = a.checkpoint_every or (2.0 if a.small else 10.0)

    import logging

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        common.share_compilation_cache(f"{tmp}/jax-cache")
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        try:
            figures = measure(tmp, a.rows, tokens, a.slots, every_s, a.repeats)
        finally:
            ray.shutdown()
    line = {"bench": "checkpoint", "rows": a.rows, "tokens": tokens, "slots": a.slots,
            "shard_rows": SHARD_ROWS, "checkpoint_every_s": every_s, "repeats": a.repeats,
            **figures}
    common.emit(line)
    return line


if __name__ == "__main__":
    main()
