"""The output directory: refusal, overwrite, resume, commit records."""

import json

import pytest

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import manifest, planner

FINGERPRINT = {"sampling": {"max_tokens": 8}, "prompt_column": "prompt"}


@pytest.fixture
def plan(tmp_path, write_parquet) -> planner.JobPlan:
    path = write_parquet(
        str(tmp_path / "in" / "a.parquet"), {"prompt": ["x"] * 6}, row_group_size=2
    )
    io = config_lib.IOConfig(inputs=(path,), output="unused", shard_rows=2)
    return planner.plan(io, config_lib.SamplingConfig())


def _result(shard_id: str, path: str) -> shards.ShardResult:
    return shards.ShardResult(
        shard_id=shard_id,
        attempt=0,
        output_path=path,
        rows=2,
        samples=2,
        error_rows=0,
        prompt_tokens=4,
        completion_tokens=8,
        seconds=0.1,
        worker="w0",
    )


def _commit(out: manifest.OutputDir, shard_id: str) -> None:
    path = output.publish(out.fs, out.path, output.part_name(shard_id), b"data")
    out.commit(_result(shard_id, path))


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


def test_resume_keeps_commits_and_clears_partial_work(tmp_path, plan):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
    _commit(out, "00002")
    (tmp_path / "out" / "part-00002.parquet").unlink()  # record without file: redo
    (tmp_path / "out" / "part-00001.parquet").write_bytes(b"partial")  # file without record
    (tmp_path / "out" / output.TEMP_DIR / "part-00001.parquet.x").write_bytes(b"half")
    out.write_summary({"status": "failed"}, success=False)

    committed = out.prepare(plan, FINGERPRINT, resume=True, overwrite=False)
    assert sorted(committed) == ["00000"]
    assert committed["00000"].completion_tokens == 8
    assert out.entries() == [manifest.MANIFEST_DIR, "part-00000.parquet"]


def test_resume_refuses_other_options_or_changed_inputs(tmp_path, plan, write_parquet):
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    _commit(out, "00000")
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
