"""The output directory: refusal, overwrite, resume, commit records, the lease.

Local disk, and memory:// where a test says so.

The same protocol on object stores, late writers and tampered parts: test_exactly_once.py.
"""

import json
import re
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import pyarrow as pa
import pytest

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import manifest, planner, status

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
    assert out.entries() == ["notes.txt"]


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


def _write(out: manifest.OutputDir, name: str, data: bytes = b"") -> None:
    path = f"{out.path}/{name}"
    out.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    out.fs.pipe_file(path, data)


def _previous_run(out: manifest.OutputDir, plan: planner.JobPlan) -> list[str]:
    """A finished run's directory, with every kind of entry a run writes; returns its entries."""
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    _attempt(out, "00001")  # a late writer's attempt
    _write(out, f"{shards.PROGRESS_DIR}/00002/state.json", b"{}")
    _write(out, f"{output.TEMP_DIR}/x.tmp", b"")
    _write(out, manifest.SUMMARY_FILE, b"{}")
    _write(out, manifest.SUCCESS_FILE)
    out.release()
    return out.entries()


def test_overwrite_deletes_the_previous_runs_files_and_keeps_only_the_new_lease(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    assert len(_previous_run(out, plan)) == 7
    again = manifest.OutputDir(out.url)
    assert again.prepare(plan, FINGERPRINT, resume=False, overwrite=True) == {}
    # _temporary/ staged the new lease and plan
    assert again.entries() == [manifest.MANIFEST_DIR, output.TEMP_DIR]
    kept = sorted(p.name for p in (tmp_path / "out" / manifest.MANIFEST_DIR).iterdir())
    assert kept == ["lease.json", "plan.json"]
    lease = json.loads((tmp_path / "out" / manifest.LEASE_FILE).read_text())
    assert lease["holder"] == again.holder
    again.release()
    assert not (tmp_path / "out" / manifest.LEASE_FILE).exists()


@pytest.mark.parametrize("then", ["resume", "overwrite"])
def test_a_summary_json_written_up_to_0_1_0_is_read_by_status_and_removed_as_ours(
    tmp_path, plan, then, capsys
):
    """Up to 0.1.0 the summary was ``summary.json``; such a directory still reads, resumes
    and overwrites, and loses that file (which made it unreadable as a Parquet dataset)."""
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    _write(out, manifest.LEGACY_SUMMARY_FILE, json.dumps({"status": "completed"}).encode())
    out.release()
    assert status.main([out.url, "--json"]) == status.EXIT_COMPLETED
    assert json.loads(capsys.readouterr().out) == {"status": "completed"}

    again = manifest.OutputDir(out.url)
    committed = again.prepare(plan, FINGERPRINT, resume=then == "resume", overwrite=then == "overwrite")
    assert sorted(committed) == (["00000"] if then == "resume" else [])
    assert manifest.LEGACY_SUMMARY_FILE not in again.entries()
    again.release()


def test_read_summary_names_a_file_that_is_not_a_json_object(tmp_path):
    (tmp_path / manifest.SUMMARY_FILE).write_text("[1, 2]")
    fs = fsspec.filesystem("file")
    with pytest.raises(ValueError, match=r"_summary\.json holds list, not a JSON object"):
        manifest.read_summary(fs, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        manifest.read_summary(fs, str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "foreign",
    ["notes.txt", "part-99999.parquet", "prompts.parquet", f"{manifest.MANIFEST_DIR}/mine.json"],
)
@pytest.mark.parametrize("where", ["local", "memory"])
def test_overwrite_refuses_a_run_directory_with_foreign_files_and_deletes_nothing(
    tmp_path, plan, foreign, where
):
    url = str(tmp_path / "out") if where == "local" else f"memory://ow-{uuid.uuid4().hex[:8]}/out"
    out = manifest.OutputDir(url)
    before = sorted([*_previous_run(out, plan), foreign.split("/")[0]])
    _write(out, foreign, b"not the tool's")
    before_manifest = out._names_in(manifest.MANIFEST_DIR)
    with pytest.raises(
        config_lib.JobInputError,
        match=rf"--overwrite refused: output {out.url} holds files this tool did not write: "
        rf"{foreign}; nothing was deleted. Remove them yourself or choose another --output",
    ):
        manifest.OutputDir(url).prepare(plan, FINGERPRINT, resume=False, overwrite=True)
    assert out.entries() == sorted(set(before))
    assert out._names_in(manifest.MANIFEST_DIR) == before_manifest
    assert out.fs.cat_file(f"{out.path}/{foreign}") == b"not the tool's"
    assert sorted(out.committed()) == ["00000"]
    if where == "memory":
        out.fs.rm(out.path, recursive=True)


def test_overwrite_refuses_a_directory_without_a_job_manifest(tmp_path, plan):
    (tmp_path / "out").mkdir()
    for name in ("data.parquet", manifest.SUCCESS_FILE, "part-00000.parquet"):
        (tmp_path / "out" / name).write_text("someone else's")
    out = manifest.OutputDir(str(tmp_path / "out"))
    with pytest.raises(
        config_lib.JobInputError,
        match=r"holds files this tool did not write: _SUCCESS, data.parquet, part-00000.parquet, "
        r"and no job manifest \(_manifest/plan.json\); nothing was deleted",
    ):
        out.prepare(plan, FINGERPRINT, resume=False, overwrite=True)
    assert out.entries() == [manifest.SUCCESS_FILE, "data.parquet", "part-00000.parquet"]
    assert not (tmp_path / "out" / manifest.MANIFEST_DIR).exists()  # no lease taken either


def test_overwrite_accepts_a_start_interrupted_before_its_plan(tmp_path, plan):
    (tmp_path / "out" / manifest.MANIFEST_DIR).mkdir(parents=True)
    (tmp_path / "out" / output.TEMP_DIR).mkdir()
    (tmp_path / "out" / manifest.LEASE_FILE).write_text("{}")  # unreadable: ignored
    out = manifest.OutputDir(str(tmp_path / "out"))
    assert out.prepare(plan, FINGERPRINT, resume=False, overwrite=True) == {}
    assert (tmp_path / "out" / manifest.PLAN_FILE).exists()
    out.release()


def test_an_empty_or_missing_output_with_overwrite_is_a_fresh_run(tmp_path, plan):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "missing"):
        out = manifest.OutputDir(str(tmp_path / name))
        assert out.prepare(plan, FINGERPRINT, resume=False, overwrite=True) == {}
        assert (tmp_path / name / manifest.PLAN_FILE).exists()
        out.release()


@pytest.mark.parametrize(
    "flags",
    [
        {"resume": False, "overwrite": False},
        {"resume": False, "overwrite": True},
        {"resume": True, "overwrite": False},
    ],
)
def test_an_output_holding_an_input_file_is_refused(tmp_path, plan, flags):
    inputs = tmp_path / "in"  # the plan's input: in/a.parquet
    (inputs / "notes.txt").write_text("mine")
    for url in (str(inputs), f"file://{inputs}/", str(tmp_path), str(inputs / "a.parquet")):
        with pytest.raises(
            config_lib.JobInputError,
            match=rf"holds the input file {plan.files[0].url}; a job never writes where it reads",
        ):
            manifest.OutputDir(url).prepare(plan, FINGERPRINT, **flags)
    assert sorted(p.name for p in inputs.iterdir()) == ["a.parquet", "notes.txt"]
    (tmp_path / "link").symlink_to(inputs)
    with pytest.raises(config_lib.JobInputError, match="holds the input file"):
        manifest.OutputDir(str(tmp_path / "link")).prepare(plan, FINGERPRINT, **flags)


def test_an_output_beside_the_inputs_is_accepted(tmp_path, plan):
    """Only an output that holds an input is refused: one inside an input's directory is fine."""
    memory = f"memory://beside-{uuid.uuid4().hex[:8]}"
    for url in (str(tmp_path / "in-out"), str(tmp_path / "in" / "out"), f"{memory}/in/out"):
        out = manifest.OutputDir(url)
        assert out.prepare(plan, FINGERPRINT, resume=False, overwrite=False) == {}
        out.release()
    out.fs.rm(memory.removeprefix("memory://"), recursive=True)


def test_an_output_holding_an_input_file_on_memory_is_refused(write_parquet):
    root = f"memory://overlap-{uuid.uuid4().hex[:8]}"
    write_parquet(f"{root}/data/a.parquet", {"prompt": ["x"] * 3})
    io = config_lib.IOConfig(inputs=(f"{root}/data",), output="unused", shard_rows=2)
    plan = planner.plan(io, config_lib.SamplingConfig())
    out = manifest.OutputDir(f"{root}/data/")
    with pytest.raises(config_lib.JobInputError, match=r"holds the input file memory://"):
        out.prepare(plan, FINGERPRINT, resume=False, overwrite=True)
    assert out.entries() == ["a.parquet"]
    out.fs.rm(out.path, recursive=True)


@pytest.mark.parametrize(
    "url",
    [
        "gs://bucket",
        "gs://bucket/",
        "s3://bucket/",
        "s3a://b",
        "gcs://b//",
        "/",
        "file:///",
        "memory://",
        "memory:///",
    ],
)
def test_a_bucket_or_file_system_root_is_refused_from_its_url(url):
    with pytest.raises(
        config_lib.JobInputError,
        match=rf"--output {url} is the root of a bucket or file system; .* e.g. .*/<job name>",
    ):
        manifest.OutputDir(url)


def test_resume_refuses_other_options_or_changed_inputs(tmp_path, plan, write_parquet):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    out.release()
    other = {**FINGERPRINT, "sampling": {**FINGERPRINT["sampling"], "max_tokens": 16}}
    # The one field that changed, not both whole sampling dicts.
    with pytest.raises(config_lib.JobInputError, match=re.escape(
            "options that decide the output changed (sampling.max_tokens: was 8, now 16); ")):
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
    assert json.loads((tmp_path / "out" / "_summary.json").read_text()) == {"rows": 6}
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
