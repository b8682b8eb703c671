"""Whole jobs on a real local Ray cluster with the real engine on the demo model."""

import contextlib
import json
import os
import pathlib
import signal
import threading

import pandas as pd
import pytest
from job_helpers import (
    a_live_worker_pid,
    assert_exactly_once,
    committed_shards,
    read_output,
    wait_for,
)

from griffin_batch import model
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver, generate
from griffin_batch.jobs import manifest as manifest_lib

pytestmark = [pytest.mark.ray, pytest.mark.slow]

START_TIMEOUT_S = 240.0  # a worker's first JAX compile on a busy 2-core machine


def test_job_writes_every_row_once(tmp_path, write_parquet, prompts, job_config, demo_model):
    write_parquet(
        str(tmp_path / "in" / "a.parquet"),
        {
            "prompt": [*prompts[:5], None, ""],
            "id": [f"a{i}" for i in range(7)],
            "topic": [f"t{i}" for i in range(7)],
        },
        row_group_size=3,
    )
    write_parquet(
        str(tmp_path / "in" / "b.parquet"),
        {"prompt": prompts[3:], "topic": ["b"] * 5, "max_tokens": [2, None, None, None, 1]},
    )
    out = str(tmp_path / "out")
    result = driver.run(
        job_config([str(tmp_path / "in")], out, workers=2, keep_columns=("topic",),
                   sampling_columns=("max_tokens",)),
        say=lambda _: None,
    )

    assert result.succeeded and result.output == out
    table = read_output(out)
    assert_exactly_once(table, [f"a{i}" for i in range(7)] + [f"b.parquet#{i}" for i in range(5)])
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["a5"]["error"] == "prompt is null" and rows["a6"]["error"] == "prompt is empty"
    assert rows["a1"]["topic"] == "t1" and rows["b.parquet#4"]["topic"] == "b"
    assert len(rows["b.parquet#0"]["completion_tokens"]) <= 2  # per-row override

    config, params, tokenizer = demo_model
    expected = model.sample(
        config, params, tokenizer, prompts[:5], max_tokens=8, num_slots=4, decode_steps=8
    )
    for i, want in enumerate(expected):
        assert rows[f"a{i}"]["completion_tokens"] == want.tokens
        assert rows[f"a{i}"]["completion"] == want.text != ""

    summary = json.loads(pathlib.Path(f"{out}/_summary.json").read_text())
    assert summary == result.summary
    assert (summary["rows"], summary["error_rows"], summary["status"]) == (12, 2, "completed")
    assert summary["shards"] == {"total": 4, "committed": 4, "resumed": 0, "run": 4, "failed": 0}
    assert summary["completion_tokens"] == sum(r["num_completion_tokens"] for r in rows.values())
    assert len(summary["workers"]) == 2
    assert sum(w["shards"] for w in summary["workers"]) == 4
    assert os.path.exists(f"{out}/{manifest_lib.SUCCESS_FILE}")
    # The directory itself reads as the table of its rows: everything beside the parts starts
    # with "_", which Parquet readers skip (a "summary.json" once made pandas refuse it).
    names = os.listdir(out)
    assert "_summary.json" in names and all(n.startswith(("_", "part-")) for n in names), names
    frame = pd.read_parquet(out)
    assert sorted(frame["id"]) == sorted(rows)

    # A resume with nothing left to run finishes again and keeps the speed on record (it wrote
    # 0 tok/s over the figures of the run that generated).
    again = driver.run(job_config([str(tmp_path / "in")], out, workers=2, keep_columns=("topic",),
                                  sampling_columns=("max_tokens",),
                                  resume=config_lib.ResumeConfig(resume=True)),
                       say=lambda _: None)
    assert again.succeeded and again.summary["shards"]["resumed"] == 4
    speed = ("tokens_per_s", "rows_per_s", "generation_s")
    assert [again.summary[k] for k in speed] == [summary[k] for k in speed]
    assert summary["tokens_per_s"] > 0


def _start_job(tmp_path, write_parquet, prompts, job_config, num_rows, **cluster):
    """Runs a 3-row-shard job in a thread; returns (ids, out, join) once a shard has committed.

    ``join()`` waits for the job and returns its ``JobResult``.
    """
    ids = [f"r{i:03d}" for i in range(num_rows)]
    path = write_parquet(
        str(tmp_path / "in.parquet"),
        {"prompt": [prompts[i % len(prompts)] for i in range(num_rows)], "id": ids},
        row_group_size=3,
    )
    out = str(tmp_path / "out")
    outcome = {}

    def run():
        outcome["result"] = driver.run(
            job_config([path], out, shard_rows=3, **cluster), say=lambda _: None
        )

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(
        lambda: os.path.isdir(f"{out}/{manifest_lib.COMMITS_DIR}") and committed_shards(out),
        START_TIMEOUT_S,
        "the first committed shard",
    )

    def join():
        thread.join(timeout=600)
        assert not thread.is_alive()
        return outcome["result"]

    return ids, out, join


def test_killed_worker_loses_nothing(tmp_path, write_parquet, prompts, job_config):
    ids, out, join = _start_job(tmp_path, write_parquet, prompts, job_config, 48, workers=2)
    os.kill(a_live_worker_pid(), signal.SIGKILL)
    result = join()
    assert result.succeeded
    assert_exactly_once(read_output(out), ids)
    summary = result.summary
    assert summary["retries"]["preempted"] >= 1  # the victim's in-flight shards ran again
    lost = [w for w in summary["workers"] if w["lost"]]
    assert len(lost) == 1 and "died" in lost[0]["lost"].lower()
    assert len(summary["workers"]) == 3  # a replacement was started
    assert summary["shards"]["committed"] == 16


def test_shard_that_keeps_failing_is_reported(
    tmp_path, write_parquet, prompts, ray_address, capsys
):
    import pyarrow.parquet as pq

    write_parquet(str(tmp_path / "in" / "good.parquet"), {"prompt": prompts[:4]})
    bad = write_parquet(
        str(tmp_path / "in" / "bad.parquet"),
        {"prompt": [f"row {i}" for i in range(8)]},
        row_group_size=4,
        compression="zstd",
    )
    # Garble the second row group's data; the footer (all the planner reads) stays intact.
    chunk = pq.ParquetFile(bad).metadata.row_group(1).column(0)
    with open(bad, "r+b") as f:
        f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
        f.write(b"\xff" * chunk.total_compressed_size)
    out = str(tmp_path / "out")
    code = generate.main(
        [
            "--input",
            str(tmp_path / "in"),
            "--output",
            out,
            "--address",
            ray_address,
            "--workers",
            "1",
            "--accelerator",
            "cpu",
            "--shard-rows",
            "4",
            "--slots",
            "4",
            "--decode-steps",
            "8",
            "--max-tokens",
            "8",
            "--max-failures",
            "1",
        ]
    )
    assert code == generate.EXIT_FAILED_SHARDS
    assert "1 shard(s) failed" in capsys.readouterr().err

    summary = json.loads(pathlib.Path(f"{out}/_summary.json").read_text())
    assert summary["status"] == "partially_completed"  # one shard failed, the rest committed
    assert summary["request_counts"]["failed"] >= 1
    (failure,) = summary["failures"]
    assert failure["path"] == bad and failure["first_row"] == 4
    assert "gave up after 2 attempts" in failure["error"]
    assert summary["retries"]["failed"] == 2
    assert summary["shards"]["committed"] == 2  # good.parquet and bad.parquet's first group
    assert_exactly_once(
        read_output(out),
        [f"bad.parquet#{i}" for i in range(4)] + [f"good.parquet#{i}" for i in range(4)],
    )
    assert not os.path.exists(f"{out}/{manifest_lib.SUCCESS_FILE}")


def test_process_local_storage(write_parquet, prompts, job_config):
    """memory:// lives in the driver's process: it ships rows out and commits files itself."""
    write_parquet("memory://driver-test/in/a.parquet", {"prompt": prompts[:6]})
    out = "memory://driver-test/out"
    result = driver.run(job_config(["memory://driver-test/in"], out), say=lambda _: None)
    assert result.succeeded
    table = read_output(out)
    assert_exactly_once(table, [f"a.parquet#{i}" for i in range(6)])
    assert all(table.column("completion").to_pylist())


def test_stopped_worker_is_declared_hung_and_replaced(tmp_path, write_parquet, prompts, job_config):
    """SIGSTOP: the worker is alive to Ray but makes no progress; the watchdog replaces it."""
    stall_s = 15.0
    ids, out, join = _start_job(
        tmp_path, write_parquet, prompts, job_config, 24, workers=1, stall_timeout_s=stall_s
    )
    victim = a_live_worker_pid()
    os.kill(victim, signal.SIGSTOP)
    try:
        result = join()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    assert result.succeeded
    assert_exactly_once(read_output(out), ids)
    summary = result.summary
    (hung,) = [w for w in summary["workers"] if w["lost"]]
    assert hung["lost"].startswith(f"hung: no progress for {stall_s:.0f}s"), hung
    assert summary["retries"]["preempted"] >= 1 and summary["retries"]["failed"] == 0
    assert len(summary["workers"]) == 2 and summary["shards"]["committed"] == 8
