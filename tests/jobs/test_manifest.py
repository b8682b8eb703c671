"""The output directory: refusal, overwrite, resume, commit records, the lease (local disk).

The same protocol on object stores, late writers and tampered parts: test_exactly_once.py.
"""

import json
import socket
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pytest

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import manifest, planner

FINGERPRINT = {"sampling": {"max_tokens": 8}, "prompt_column": "prompt"}


def _attempt(out: manifest.OutputDir, shard_id: str, rows: int = 2) -> shards.ShardResult:
    """What a worker does: writes an attempt file, reports it."""
    data = output.encode(pa.table({"id": [f"{shard_id}#{i}" for i in range(rows)]}))
    name = output.attempt_name(shard_id, 0)
    path = output.write_attempt(out.fs, out.path, name, data)
    return shards.ShardResult(
        shard_id=shard_id,
        attempt=0,
        output_path=output.url_of(out.fs, f"{out.path}/{output.part_name(shard_id)}"),
        rows=rows,
        samples=rows,
        error_rows=0,
        prompt_tokens=4,
        completion_tokens=8,
        seconds=0.1,
        worker="w0",
        attempt_path=output.url_of(out.fs, path),
        size=len(data),
        sha256=output.digest(data),
    )


def _commit(out: manifest.OutputDir, shard_id: str) -> None:
    assert out.commit(_attempt(out, shard_id)) is not None


def test_fresh_output_gets_a_plan(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    assert out.prepare(plan, FINGERPRINT, resume=False, overwrite=False) == {}
    saved = json.loads((tmp_path / "out" / manifest.PLAN_FILE).read_text())
    assert saved["plan"] == plan.to_dict() and saved["options"] == FINGERPRINT


def test_non_empty_output_is_refused_without_resume_or_overwrite(tmp_path, plan):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    out = manifest.OutputDir(str(tmp_path / "out"))
    with pytest.raises(
        config_lib.JobInputError,
        match=r"is not empty \(it holds notes.txt\); pass --resume .* --overwrite",
    ):
        out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    with pytest.raises(config_lib.JobInputError, match="no job manifest"):
        out.prepare(plan, FINGERPRINT, resume=True, overwrite=False)
    assert out.prepare(plan, FINGERPRINT, resume=False, overwrite=True) == {}
    assert "notes.txt" not in out.entries() and manifest.MANIFEST_DIR in out.entries()
    out.release()
    assert not (tmp_path / "out" / manifest.LEASE_FILE).exists()


def test_resume_keeps_commits_and_clears_partial_work(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    _commit(out, "00002")
    (tmp_path / "out" / "part-00002.parquet").unlink()  # record without file: redo
    (tmp_path / "out" / "part-00001.parquet").write_bytes(b"partial")  # file without record
    (tmp_path / "out" / output.TEMP_DIR / "part-00001.parquet.x").write_bytes(b"half")
    out.write_summary({"status": "failed"}, success=False)
    _attempt(out, "00001")  # an attempt that never reported
    (tmp_path / "out" / "_progress").mkdir()  # the running shards' progress: kept
    (tmp_path / "out" / "_progress" / "00001.json").write_text("{}")
    out.release()

    committed = manifest.OutputDir(out.url).prepare(plan, FINGERPRINT, resume=True, overwrite=False)
    assert sorted(committed) == ["00000"]
    assert committed["00000"].completion_tokens == 8
    assert out.entries() == [manifest.MANIFEST_DIR, "_progress", "part-00000.parquet"]
    assert (tmp_path / "out" / "_progress" / "00001.json").exists()


def test_commit_records_the_final_file(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    result = _attempt(out, "00001", rows=3)
    record = out.commit(result)
    data = (tmp_path / "out" / "part-00001.parquet").read_bytes()
    saved = json.loads((tmp_path / "out" / manifest.COMMITS_DIR / "00001.json").read_text())
    assert saved == {**record.record(), "version": manifest.MANIFEST_VERSION}
    assert (saved["size"], saved["sha256"]) == (len(data), output.digest(data))
    assert saved["samples"] == 3 and saved["attempt_path"] == result.attempt_path
    assert saved["output_path"] == str(tmp_path / "out" / "part-00001.parquet")
    assert not fsspec.filesystem("file").exists(result.attempt_path)  # renamed, not copied


def test_version_1_records_are_verified_by_row_count(tmp_path, plan):
    """Records written before attempt files (no size, no checksum) keep parts whose rows match."""
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    (tmp_path / "out" / manifest.COMMITS_DIR).mkdir()
    for shard_id, rows in (("00000", 2), ("00001", 5)):
        path = output.publish(
            out.fs,
            out.path,
            output.part_name(shard_id),
            output.encode(pa.table({"id": ["a"] * rows})),
        )
        old = _attempt(out, shard_id).record()
        for field in ("attempt_path", "size", "sha256"):
            del old[field]
        old["output_path"] = path
        (tmp_path / "out" / manifest.COMMITS_DIR / f"{shard_id}.json").write_text(json.dumps(old))
    out.release()

    committed = manifest.OutputDir(out.url).prepare(plan, FINGERPRINT, resume=True, overwrite=False)
    assert sorted(committed) == ["00000"]  # 00001's part holds 5 rows, its record says 2
    assert committed["00000"].sha256 is None
    assert not (tmp_path / "out" / "part-00001.parquet").exists()


def test_overwrite_keeps_only_the_new_lease(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    out.release()
    again = manifest.OutputDir(out.url)
    assert again.prepare(plan, FINGERPRINT, resume=False, overwrite=True) == {}
    assert not (tmp_path / "out" / "part-00000.parquet").exists()
    kept = sorted(p.name for p in (tmp_path / "out" / manifest.MANIFEST_DIR).iterdir())
    assert kept == ["lease.json", "plan.json"]
    lease = json.loads((tmp_path / "out" / manifest.LEASE_FILE).read_text())
    assert lease["holder"] == again.holder
    again.release()
    assert not (tmp_path / "out" / manifest.LEASE_FILE).exists()


def test_resume_refuses_other_options_or_changed_inputs(tmp_path, plan, write_parquet):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    out.release()
    other = {**FINGERPRINT, "sampling": {"max_tokens": 16}}
    with pytest.raises(
        config_lib.JobInputError, match=r"options that decide the output changed \(sampling: was"
    ):
        out.prepare(plan, other, resume=True, overwrite=False)
    write_parquet(plan.files[0].url, {"prompt": ["x"] * 7}, row_group_size=2)
    io = config_lib.IOConfig(inputs=(plan.files[0].url,), output="unused", shard_rows=2)
    changed = planner.plan(io, config_lib.SamplingConfig())
    with pytest.raises(config_lib.JobInputError, match="the inputs changed"):
        out.prepare(changed, FINGERPRINT, resume=True, overwrite=False)


def test_unwritable_output_is_named(tmp_path, plan):
    (tmp_path / "file").write_text("not a directory")
    out = manifest.OutputDir(str(tmp_path / "file" / "out"))
    with pytest.raises(config_lib.JobInputError, match="is not writable"):
        out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)


def test_summary_and_success_marker(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    out.write_summary({"rows": 6}, success=True)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"rows": 6}
    assert (tmp_path / "out" / manifest.SUCCESS_FILE).exists()


def test_a_crashed_drivers_lease_on_this_host_is_taken_over_at_once(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    exited = subprocess.Popen([sys.executable, "-c", ""])
    exited.wait()  # reaped: its pid names no process
    lease = {
        "holder": "crashed",
        "host": socket.gethostname(),
        "pid": exited.pid,
        "acquired": time.time(),
        "expires": time.time() + 3600,
    }
    (tmp_path / "out" / manifest.LEASE_FILE).write_text(json.dumps(lease))
    again = manifest.OutputDir(out.url)
    assert again.prepare(plan, FINGERPRINT, resume=True, overwrite=False) == {}
    assert (
        json.loads((tmp_path / "out" / manifest.LEASE_FILE).read_text())["holder"] == again.holder
    )
    again.release()

    lease["pid"] = 1  # alive: the lease runs out its time
    (tmp_path / "out" / manifest.LEASE_FILE).write_text(json.dumps(lease))
    with pytest.raises(config_lib.JobInputError, match=r"in use by another driver .* pid 1,"):
        manifest.OutputDir(out.url).prepare(plan, FINGERPRINT, resume=True, overwrite=False)
