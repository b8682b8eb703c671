"""The command line as a user runs it: interrupted, resumed, every row exactly once."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from job_helpers import assert_exactly_once, committed_shards, read_output, wait_for

from griffin_batch import model
from griffin_batch.jobs import manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 240.0
NUM_ROWS, SHARD_ROWS = 80, 4


def _command(inputs: str, out: str, address: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "griffin_batch.jobs.generate",
        "--input",
        inputs,
        "--output",
        out,
        "--address",
        address,
        "--workers",
        "1",
        "--accelerator",
        "cpu",
        "--shard-rows",
        str(SHARD_ROWS),
        "--slots",
        "4",
        "--decode-steps",
        "8",
        "--max-tokens",
        "8",
        *extra,
    ]


def _snapshot(out: str) -> dict[str, tuple[bytes, int]]:
    """Commit record bytes and part-file mtime of every committed shard."""
    snap = {}
    for shard_id in committed_shards(out):
        record = pathlib.Path(f"{out}/{manifest.COMMITS_DIR}/{shard_id}.json").read_bytes()
        snap[shard_id] = (record, os.stat(f"{out}/part-{shard_id}.parquet").st_mtime_ns)
    return snap


def test_interrupted_job_resumes_without_redoing_committed_shards(
    tmp_path, write_parquet, prompts, ray_address, demo_model
):
    ids = [f"q{i:03d}" for i in range(NUM_ROWS)]
    texts = [prompts[i % len(prompts)] for i in range(NUM_ROWS)]
    inputs = write_parquet(str(tmp_path / "prompts.parquet"), {"id": ids, "prompt": texts})
    out = str(tmp_path / "out")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            _command(inputs, out, ray_address), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: (
                    first.poll() is not None
                    or (os.path.isdir(f"{out}/{manifest.COMMITS_DIR}") and committed_shards(out))
                ),
                START_TIMEOUT_S,
                "the first committed shard",
            )
        finally:
            first.send_signal(signal.SIGKILL)  # the driver dies mid-job
            first.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert "running the bundled demo model" in first_log
    before = _snapshot(out)
    assert 0 < len(before) < NUM_ROWS // SHARD_ROWS, first_log[-2000:]
    assert not os.path.exists(f"{out}/{manifest.SUCCESS_FILE}")

    refused = subprocess.run(
        _command(inputs, out, ray_address), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr

    second = subprocess.run(
        _command(inputs, out, ray_address, "--resume"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"to {out}" in second.stdout and f"{out}/_summary.json" in second.stdout
    assert f"resuming: {len(before)} of {NUM_ROWS // SHARD_ROWS} shard(s)" in second.stderr

    after = _snapshot(out)
    assert {k: after[k] for k in before} == before  # committed shards were not redone
    summary = json.loads(pathlib.Path(f"{out}/_summary.json").read_text())
    assert summary["shards"]["resumed"] == len(before)
    assert summary["shards"]["run"] == NUM_ROWS // SHARD_ROWS - len(before)
    assert summary["rows"] == NUM_ROWS

    table = read_output(out)
    assert_exactly_once(table, ids)
    config, params, tokenizer = demo_model
    unique = sorted(set(texts))
    want = dict(
        zip(
            unique,
            model.sample(
                config, params, tokenizer, unique, max_tokens=8, num_slots=4, decode_steps=8
            ),
            strict=True,
        )
    )
    for row in table.to_pylist():
        text = texts[ids.index(row["id"])]
        assert row["completion"] and row["completion_tokens"] == want[text].tokens, row["id"]
