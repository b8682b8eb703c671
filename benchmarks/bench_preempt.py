"""A worker killed with SIGKILL at about 60% of a long generation: what does it cost?

Prints ONE JSON line:
    {"bench": "preempt", "tokens": 5000, "checkpoint_every_s": 2.0, "identical": true,
     "uninterrupted_s": ..., "interrupted_s": ..., "ratio": ...,
     "generated_before_kill": ..., "checkpointed_before_kill": ..., "restored_tokens": ...,
     "recomputed_tokens": ..., "tokens_since_last_checkpoint": ...,
     "tokens_per_interval": ..., "target_met": ..., ...}

Workload (the fault-tolerance issue's): the bundled demo model, greedy, one CPU
worker (the engine's default sizing), one row of ``--tokens`` new tokens, a
progress checkpoint every ``--checkpoint-every`` seconds. Two jobs on one local
Ray cluster, after an untimed warm-up job that fills a shared JAX compilation
cache (so no timed worker compiles):

* A, uninterrupted.
* B, the same job; once the row has generated ``--kill-at`` of its tokens the
  worker process is sent SIGKILL. The driver starts a replacement, which
  continues the row from the newest checkpoint.

Figures:

* ``identical``: B's row equals A's token for token.
* ``ratio``: B's job time over A's (each ``generation_s - startup_s`` of its
  ``_summary.json``: first ready worker to last commit), so B's includes
  starting the replacement worker; ``replacement_ready_s``: from the kill
  until the replacement answers its heartbeat (model loaded).
* ``generated_before_kill``: estimated from the worker's heartbeat (engine
  rounds: one prefill chunk, then ``decode_steps`` tokens per decode round)
  read just before the kill; exact to within one round.
* ``checkpointed_before_kill``: the row's tokens in the newest checkpoint
  (its delta's ``tokens_before`` plus its tokens), read after the kill.
* ``restored_tokens``: from the committed shard's record (what the
  replacement took from the checkpoint); ``recomputed_tokens`` =
  generated_before_kill - restored_tokens.
* ``tokens_since_last_checkpoint`` = generated_before_kill -
  checkpointed_before_kill; ``tokens_per_interval``: the decode rate over the
  last two intervals before the kill (heartbeat) x the interval.

Target: recomputed_tokens <= tokens_since_last_checkpoint (the replacement
loses nothing that was checkpointed), and so about tokens_per_interval or less.

Usage (from the repository root): python benchmarks/bench_preempt.py [--small]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

PROMPT = "Write a very long story about the sea."
WORKER_PREFIX = "griffin-worker-"  # cluster/pool.py names its actors so
POLL_S = 0.1
START_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 1800.0
WARM_UP_TOKENS = 300  # past the demo model's attention window: every decode shape
PREFILL_CHUNKS = 1  # the prompt fits one prefill chunk


def write_input(path: str, tokens: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [PROMPT], "id": ["row"], "max_tokens": [tokens]}), path)


def job_config(inputs: str, out: str, checkpoint_every_s: float):
    from griffin_batch.jobs import config as config_lib

    return config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=(inputs,), output=out, sampling_columns=("max_tokens",)),
        sampling=config_lib.SamplingConfig(temperature=0.0),
        cluster=config_lib.ClusterConfig(workers=1, accelerator="cpu"),
        resume=config_lib.ResumeConfig(overwrite=True, checkpoint_every_s=checkpoint_every_s),
    )


def run_job(config) -> dict:
    """Runs one job to the end; returns its summary."""
    from griffin_batch.jobs import driver

    result = driver.run(config, say=common.log)
    if not result.succeeded:
        raise RuntimeError(f"job failed: {result.summary}")
    return result.summary


def the_row(out: str) -> list[int]:
    (row,) = common.job_output(out)
    return list(row["completion_tokens"])


# Watching job B --------------------------------------------------------------


def live_worker(other_than: int | None = None):
    """(actor, process id) of a generation worker that answers, or None.

    Its heartbeat answers once it has loaded the model; ``other_than``
    skips the worker with that process id.
    """
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(WORKER_PREFIX):
            with contextlib.suppress(ValueError, ray.exceptions.RayError):
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                ray.get(actor.heartbeat.remote(), timeout=30)
                pid = ray.get(actor.pid.remote(), timeout=30)
                if pid != other_than:
                    return actor, pid
    return None


def wait_for_worker(alive: threading.Thread, other_than: int | None = None):
    """``live_worker(other_than)`` once one answers; fails if the job ends first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (found := live_worker(other_than)) is None:
        if time.monotonic() > deadline or not alive.is_alive():
            raise RuntimeError("no worker answered")
        time.sleep(POLL_S)
    return found


def generated(rounds: int, decode_steps: int, tokens: int) -> int:
    """Tokens the row has after ``rounds`` engine rounds (prefill emits the first)."""
    if rounds < PREFILL_CHUNKS:
        return 0
    return min(tokens, 1 + (rounds - PREFILL_CHUNKS) * decode_steps)


def checkpointed(out: str) -> int | None:
    """The row's tokens in the newest readable progress checkpoint (None: none yet)."""
    import fsspec

    from griffin_batch.actors import progress, shards

    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    pattern = re.compile(r"(\d{8})-[0-9a-f]{8}\.delta\.safetensors$")
    deltas = sorted((int(m.group(1)), p) for p in fs.glob(
        f"{root}/{shards.PROGRESS_DIR}/*/*.delta.safetensors") if (m := pattern.search(p)))
    for _, path in reversed(deltas):  # the newest may be half written: then the one before
        with contextlib.suppress(progress.ProgressError, FileNotFoundError):
            arrays, meta = progress.decode_file(fs.cat_file(path))
            (sample,) = meta["samples"]
            return int(sample["tokens_before"]) + arrays["tokens/0"].size
    return None


def decode_rate(samples: list[tuple[float, int]], window_s: float) -> float:
    """Tokens per second over the last ``window_s`` seconds of (time, tokens) samples."""
    t_end, n_end = samples[-1]
    t0, n0 = next(((t, n) for t, n in samples if t >= t_end - window_s), samples[0])
    return (n_end - n0) / (t_end - t0) if t_end > t0 else 0.0


def run_interrupted(config, tokens: int, kill_at: float, decode_steps: int) -> dict:
    """Runs job B, killing its worker once ``kill_at`` of the row is generated."""
    outcome: dict = {}

    def target():
        try:
            outcome["summary"] = run_job(config)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    worker, pid = wait_for_worker(thread)
    samples: list[tuple[float, int]] = []
    while True:
        if not thread.is_alive():
            raise RuntimeError(f"the job ended before {kill_at:.0%} of the row: {outcome}")
        n = generated(_ray_get(worker.heartbeat.remote()), decode_steps, tokens)
        samples.append((time.monotonic(), n))
        if n >= kill_at * tokens:
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            break
        time.sleep(POLL_S)
    saved = checkpointed(config.io.output)  # the process is gone: nothing newer will appear
    common.log(f"killed worker {pid} at ~{n} tokens; newest checkpoint holds {saved}")
    wait_for_worker(thread, other_than=pid)
    replaced_s = time.monotonic() - killed
    thread.join(JOB_TIMEOUT_S)
    if "error" in outcome:
        raise outcome["error"]
    return {"summary": outcome["summary"], "generated_before_kill": n,
            "checkpointed_before_kill": saved or 0, "samples": samples,
            "replacement_ready_s": replaced_s}


def _ray_get(ref):
    import ray

    return ray.get(ref, timeout=30)


# Main ------------------------------------------------------------------------


def measure(tmp: str, tokens: int, every: float, kill_at: float) -> dict:
    from griffin_batch.model.engine_config import EngineConfig

    decode_steps = EngineConfig().decode_steps
    warm, inputs = f"{tmp}/warm.parquet", f"{tmp}/in.parquet"
    write_input(warm, WARM_UP_TOKENS)
    write_input(inputs, tokens)
    common.log("warm-up job (fills the compilation cache)")
    run_job(job_config(warm, f"{tmp}/warm", every))
    common.log("job A: uninterrupted")
    a = run_job(job_config(inputs, f"{tmp}/a", every))
    common.log("job B: the worker is killed mid-row")
    b = run_interrupted(job_config(inputs, f"{tmp}/b", every), tokens, kill_at, decode_steps)
    (record,) = common.job_commits(f"{tmp}/b").values()
    row_a, row_b = the_row(f"{tmp}/a"), the_row(f"{tmp}/b")
    rate = decode_rate(b["samples"], 2 * every)
    before, saved = b["generated_before_kill"], b["checkpointed_before_kill"]
    recomputed = before - record["restored_tokens"]
    return {
        "identical": row_a == row_b,
        "row_tokens": len(row_a),
        "uninterrupted_s": common.job_seconds(a),
        "interrupted_s": common.job_seconds(b["summary"]),
        "ratio": common.job_seconds(b["summary"]) / common.job_seconds(a),
        "replacement_ready_s": b["replacement_ready_s"],
        "generated_before_kill": before,
        "checkpointed_before_kill": saved,
        "restored_tokens": record["restored_tokens"],
        "attempt": record["attempt"],
        "recomputed_tokens": recomputed,
        "tokens_since_last_checkpoint": before - saved,
        "decode_tokens_per_s": rate,
        "tokens_per_interval": rate * every,
        "target_met": recomputed <= before - saved,
        "retries": b["summary"]["retries"],
        "wall_s": {"uninterrupted": a["wall_time_s"], "interrupted": b["summary"]["wall_time_s"]},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="1,500 tokens (a quick check)")
    p.add_argument("--tokens", type=int, help="new tokens of the row (default 5,000)")
    p.add_argument("--checkpoint-every", type=float, default=2.0,
                   help="seconds between progress checkpoints")
    p.add_argument("--kill-at", type=float, default=0.6,
                   help="fraction of the row generated when the worker is killed")
    a = p.parse_args(argv)
    tokens = a.tokens or (1500 if a.small else 5000)

    import logging

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        common.share_compilation_cache(f"{tmp}/jax-cache")
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        try:
            figures = measure(tmp, tokens, a.checkpoint_every, a.kill_at)
        finally:
            ray.shutdown()
    line = {"bench": "preempt", "tokens": tokens, "checkpoint_every_s": a.checkpoint_every,
            "kill_at": a.kill_at, **figures}
    common.emit(line)
    return line


if __name__ == "__main__":
    main()
