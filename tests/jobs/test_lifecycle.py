"""A job's lifecycle as users of hosted batch APIs know it: status while it runs, cancel, resume."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from job_helpers import assert_exactly_once, read_output, wait_for

from griffin_batch.actors import shards
from griffin_batch.jobs import cancel, lifecycle, manifest, status

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(("flags", "want"), [
    ({}, lifecycle.COMPLETED),
    ({"failed_shards": 1}, lifecycle.PARTIALLY_COMPLETED),
    ({"unreadable_inputs": 1}, lifecycle.PARTIALLY_COMPLETED),
    ({"stopped_early": True, "failed_shards": 3}, lifecycle.FAILED),
    ({"cancelled": True, "failed_shards": 1}, lifecycle.CANCELLED),
])
def test_final_status(flags, want):
    base = {"cancelled": False, "stopped_early": False, "failed_shards": 0, "unreadable_inputs": 0}
    assert lifecycle.final_status(**{**base, **flags}) == want


def test_describe_a_running_job_with_its_eta():
    summary = {"status": "in_progress", "request_counts": {"total": 1000, "completed": 390,
               "failed": 10}, "shards": {"total": 10, "committed": 4, "failed": 0},
               "completion_tokens": 51200, "tokens_per_s": 812.5, "rows_per_s": 2.0,
               "updated_at": 1000.0}
    assert lifecycle.describe(summary, now=1003.0) == [
        "status: in_progress",
        "rows: 390 completed, 10 failed, 1000 in all (40.0% done)",
        "shards: 4 of 10 committed, 0 failed",
        "tokens: 51200 at 812.5 tok/s",
        "updated 3s ago",
        "eta: 5m00s at 2.00 rows/s",
    ]
    stale = lifecycle.describe(summary, now=1000.0 + 7 * lifecycle.SUMMARY_EVERY_S)
    assert "it may have stopped" in stale[4]


def test_describe_adds_up_a_staged_jobs_stages():
    summary = {"status": "completed", "completion_tokens": 40, "wall_time_s": 2.5,
               lifecycle.EARLIER_STAGES: [
                   {"stage": "level-1", "completion_tokens": 100, "wall_time_s": 7.0},
                   {"stage": "level-2", "completion_tokens": "x", "wall_time_s": None}]}
    assert lifecycle.describe(summary)[-1] == (  # what is not a number counts 0
        "whole job: 140 tokens in 9.5s over 3 stages (before this last one: level-1, level-2)")


def test_describe_says_that_unreadable_inputs_are_in_no_count():
    # Their rows are unknown (no footer), so "100.0% done" alone read as if nothing was lost.
    summary = {"status": "partially_completed", "request_counts": {"total": 5, "completed": 5,
               "failed": 0}, "shards": {"total": 1, "committed": 1, "failed": 0},
               "unreadable_inputs": 1}
    assert lifecycle.describe(summary)[1:] == [
        "rows: 5 completed, 0 failed, 5 in all (100.0% done)",
        "shards: 1 of 1 committed, 0 failed",
        "tokens: 0 at 0.0 tok/s",
        "inputs: 1 file(s) could not be read and their rows are not counted above "
        "(see 'failures')",
    ]


def test_status_and_cancel_need_a_job(tmp_path, capsys):
    assert status.main([str(tmp_path)]) == status.EXIT_NOT_COMPLETED
    assert "no job in" in capsys.readouterr().err
    assert cancel.main([str(tmp_path)]) == 2
    assert "no job is running on" in capsys.readouterr().err
    assert not (tmp_path / manifest.CANCEL_FILE).exists()
    # What there is instead: nothing, a finished job, or one that stopped (which --resume ends).
    for state, says in ((None, ": there is no job there"),
                        (lifecycle.COMPLETED, "; its job is completed: nothing to cancel"),
                        (lifecycle.FAILED, "; its job stopped (failed) and needs no cancel: "
                                           "rerun with --resume to finish it")):
        if state is not None:
            (tmp_path / manifest.SUMMARY_FILE).write_text(json.dumps({"status": state}))
        assert cancel.main([str(tmp_path)]) == 2
        assert capsys.readouterr().err.rstrip().endswith(says)


@pytest.mark.ray
@pytest.mark.slow
def test_a_cancelled_job_stops_resumably_and_resume_finishes_it(
    tmp_path, write_parquet, prompts, ray_address, capsys
):
    ids = [f"c{i}" for i in range(4)]
    inputs = write_parquet(str(tmp_path / "in.parquet"), {"id": ids, "prompt": prompts[:4]})
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "griffin_batch.jobs.generate", "--input", inputs,
               "--output", out, "--address", ray_address, "--workers", "1", "--accelerator",
               "cpu", "--shard-rows", "1", "--slots", "4", "--decode-steps", "8",
               "--max-tokens", "1500", "--checkpoint-every", "0.5"]
    log = tmp_path / "job.log"
    with open(log, "w") as err:
        job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        progress = pathlib.Path(out, shards.PROGRESS_DIR)
        wait_for(lambda: job.poll() is not None or any(progress.glob("*/*.delta.safetensors")),
                 240, "a progress checkpoint")
        wait_for(lambda: json.loads(pathlib.Path(out, "_summary.json").read_text())["status"]
                 == lifecycle.IN_PROGRESS, 60, "status in_progress")
        assert status.main([out]) == status.EXIT_RUNNING
        assert "status: in_progress" in capsys.readouterr().out
        asked = time.monotonic()
        assert cancel.main([out]) == 0
        assert job.wait(timeout=120) == 130, log.read_text()[-3000:]
        stopped_s = time.monotonic() - asked
    finally:
        if job.poll() is None:
            job.kill()
    summary = json.loads(pathlib.Path(out, "_summary.json").read_text())
    assert summary["status"] == lifecycle.CANCELLED and summary["shards"]["failed"] == 0
    assert status.main([out]) == status.EXIT_NOT_COMPLETED
    assert "status: cancelled" in capsys.readouterr().out
    assert any(progress.glob("*/*.delta.safetensors"))  # what --resume continues from
    print(f"stopped {stopped_s:.1f}s after cancel; {summary['shards']['committed']} of 4 shards "
          "committed before")

    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_exactly_once(read_output(out), ids)
    final = json.loads(pathlib.Path(out, "_summary.json").read_text())
    assert final["status"] == lifecycle.COMPLETED
    assert final["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    records = [json.loads(p.read_text()) for p in pathlib.Path(out, manifest.COMMITS_DIR).glob("*")]
    assert any(r["restored_tokens"] > 0 for r in records)  # continued mid-sequence
    assert not pathlib.Path(out, manifest.CANCEL_FILE).exists()
