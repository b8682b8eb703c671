"""A worker lost mid-sequence: its shard continues from its progress checkpoint on another worker.

Real Ray, the demo model, one shard holding a long row and two shorter ones,
checkpoints every half second. The worker is killed with SIGKILL (local
storage) or sent SIGTERM (output on the GCS emulator: the worker drains,
writing a checkpoint, and exits). Either way the job ends with every row
once and each row equal, token for token, to an uninterrupted run; the
attempt that finished took tokens from the checkpoint instead of computing
them again, and the progress files are gone once the shard committed.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import fsspec
import pytest
from job_helpers import a_live_worker_pid, assert_exactly_once, read_output, wait_for

from griffin_batch.actors import columns, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver
from griffin_batch.jobs import manifest as manifest_lib
from griffin_batch.model import engine, requests
from griffin_batch.model.engine_config import EngineConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

START_TIMEOUT_S = 240.0
# A long greedy row (the demo model samples its end-of-sequence token now and then,
# so a sampled row may end early) beside shorter seeded ones.
MAX_TOKENS = (4000, 300, 150)
TEMPERATURE = (0.0, 1.0, 0.8)
SAMPLING = config_lib.SamplingConfig(max_tokens=max(MAX_TOKENS), seed=5)
CHECKPOINT_EVERY_S = 0.25


def _reference(demo_model, prompts, sizing: EngineConfig) -> dict[str, tuple[list[int], str]]:
    """Each row's tokens and text from one uninterrupted in-process run."""
    config, params, tokenizer = demo_model
    eng = engine.Engine(config, params, tokenizer, sizing)
    base = SAMPLING.params()
    reqs = [requests.Request(request_id=f"r{i}", prompt=prompts[i],
                             params=requests.SamplingParams(
                                 max_tokens=m, temperature=temp,
                                 seed=columns.row_seed(base.seed, f"r{i}")))
            for i, (m, temp) in enumerate(zip(MAX_TOKENS, TEMPERATURE, strict=True))]
    return {c.request_id: (c.tokens, c.text) for c in eng.generate(reqs)}


def _run_interrupted(tmp_path, out, write_parquet, prompts, job_config, sig):
    path = write_parquet(str(tmp_path / "in.parquet"), {
        "prompt": prompts[: len(MAX_TOKENS)], "id": [f"r{i}" for i in range(len(MAX_TOKENS))],
        "max_tokens": list(MAX_TOKENS), "temperature": list(TEMPERATURE)})
    config = job_config([path], out, shard_rows=4, sampling=SAMPLING,
                        sampling_columns=("max_tokens", "temperature"),
                        resume=config_lib.ResumeConfig(checkpoint_every_s=CHECKPOINT_EVERY_S))
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault("result", driver.run(config, say=lambda _: None)))
    thread.start()
    fs, root = fsspec.core.url_to_fs(out)

    def checkpoints() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{root}/{shards.PROGRESS_DIR}/*/*.delta.safetensors"))

    # Interrupt once several checkpoints exist: the long row is mid-sequence.
    wait_for(lambda: checkpoints() >= 4, START_TIMEOUT_S, "progress checkpoints")
    os.kill(a_live_worker_pid(), sig)
    thread.join(timeout=600)
    assert not thread.is_alive()
    return outcome["result"], fs, root, config.model.engine


def _check(result, fs, root, sizing, out, demo_model, prompts):
    assert result.succeeded
    table = read_output(out)
    assert_exactly_once(table, [f"r{i}" for i in range(len(MAX_TOKENS))])
    want = _reference(demo_model, prompts, sizing)
    for row in table.to_pylist():
        assert (row["completion_tokens"], row["completion"]) == want[row["id"]], row["id"]
    (record,) = [json.loads(b) for b in fs.cat(fs.glob(
        f"{root}/{manifest_lib.COMMITS_DIR}/*.json")).values()]
    total = sum(len(t) for t, _ in want.values())
    print(f"committed attempt {record['attempt']} restored {record['restored_tokens']} of "
          f"{total} tokens from its checkpoint")
    assert record["attempt"] >= 1 and 0 < record["restored_tokens"] < total
    assert not fs.exists(f"{root}/{shards.PROGRESS_DIR}"), "progress outlives the commit"
    return record


def test_killed_worker_continues_mid_sequence(tmp_path, write_parquet, prompts, job_config,
                                              demo_model):
    out = str(tmp_path / "out")
    result, *where = _run_interrupted(tmp_path, out, write_parquet, prompts, job_config,
                                      signal.SIGKILL)
    _check(result, *where, out, demo_model, prompts)
    assert result.summary["retries"]["preempted"] >= 1


def test_sigterm_drains_to_a_checkpoint(tmp_path, write_parquet, prompts, job_config, demo_model,
                                        gcs_server):
    out = f"{gcs_server.bucket('mid-sequence')}/out"
    result, *where = _run_interrupted(tmp_path, out, write_parquet, prompts, job_config,
                                      signal.SIGTERM)
    _check(result, *where, out, demo_model, prompts)
    retries = result.summary["retries"]
    assert retries["preempted"] >= 1 and retries["failed"] == 0  # a preemption, not a failure
    (lost,) = [w for w in result.summary["workers"] if w["lost"]]
    assert "drained" in lost["lost"], lost
