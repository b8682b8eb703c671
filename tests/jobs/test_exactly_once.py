"""Exactly once, verified, on local disk, on the GCS emulator and on moto's S3 server.

Workers write attempt files only; the driver promotes one per shard and records
it; a late writer cannot change a committed part; ``--resume`` redoes parts that
no longer match their records; a second driver is refused while the first
holds the lease. The storage tests need no Ray; the last runs a real job on S3.
"""

import json
import logging
import time
import uuid

import fsspec
import pyarrow as pa
import pytest
from job_helpers import assert_exactly_once, read_output

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver, manifest

FINGERPRINT = {"sampling": {"max_tokens": 8}}
SHORT_TTL_S = 1.0  # long enough to be refused on a loaded 2-core machine, short to wait out


@pytest.fixture(params=["local", "gcs", "s3"])
def output_url(request, tmp_path) -> str:
    """A fresh output URL on each kind of storage."""
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue(f"{request.param}_server")
    return f"{server.bucket('exactly-once')}/{uuid.uuid4().hex[:8]}/out"


def _attempt(url: str, shard_id: str, attempt: int = 0, tag: str = "") -> shards.ShardResult:
    """What a worker does for a shard: writes its attempt's file and reports it."""
    data = output.encode(pa.table({"id": [f"{shard_id}#{i}{tag}" for i in range(2)]}))
    fs, directory = fsspec.core.url_to_fs(url)
    path = output.write_attempt(fs, directory, output.attempt_name(shard_id, attempt), data)
    return shards.ShardResult(
        shard_id=shard_id,
        attempt=attempt,
        output_path=output.url_of(fs, f"{directory}/{output.part_name(shard_id)}"),
        rows=2,
        samples=2,
        error_rows=0,
        prompt_tokens=2,
        completion_tokens=4,
        seconds=0.1,
        worker=f"w{attempt}",
        attempt_path=output.url_of(fs, path),
        size=len(data),
        sha256=output.digest(data),
    )


def _read(out: manifest.OutputDir, name: str) -> bytes:
    out.fs.invalidate_cache()
    return out.fs.cat_file(f"{out.path}/{name}")


def _names(out: manifest.OutputDir, sub: str = "") -> list[str]:
    out.fs.invalidate_cache()
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in out.fs.ls(f"{out.path}/{sub}"))
    except FileNotFoundError:
        return []


def test_a_late_writer_cannot_change_a_committed_part(output_url, plan, caplog):
    out = manifest.OutputDir(output_url)
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    first = _attempt(output_url, "00000")
    record = out.commit(first)
    part = _read(out, "part-00000.parquet")
    assert (record.size, record.sha256, record.samples) == (len(part), output.digest(part), 2)
    assert record.attempt_path == first.attempt_path and _names(out, output.ATTEMPTS_DIR) == []

    # A worker presumed dead finishes after the commit: its file goes to _attempts/ ...
    late = _attempt(output_url, "00000", attempt=1, tag="late")
    assert _read(out, "part-00000.parquet") == part
    # ... and its result, or the same result twice, is ignored.
    with caplog.at_level(logging.WARNING, logger=manifest.__name__):
        assert out.commit(late) is None
        assert out.commit(first) is None
    assert caplog.text.count("shard 00000 is already committed") == 2
    assert _read(out, "part-00000.parquet") == part
    assert _names(out, output.ATTEMPTS_DIR) == []  # the late file is removed
    saved = json.loads(_read(out, f"{manifest.COMMITS_DIR}/00000.json"))
    assert saved["sha256"] == output.digest(part)

    # A late writer that never reports leaves a file nobody promotes; the summary clears it.
    _attempt(output_url, "00000", attempt=2, tag="later")
    out.write_summary({}, success=True)
    assert output.ATTEMPTS_DIR not in _names(out)
    assert _read(out, "part-00000.parquet") == part
    out.release()

    # After a driver restart, the committed shard is still refused.
    again = manifest.OutputDir(output_url)
    assert sorted(again.prepare(plan, FINGERPRINT, resume=True, overwrite=False)) == ["00000"]
    assert again.commit(_attempt(output_url, "00000", attempt=0, tag="rerun")) is None
    assert _read(out, "part-00000.parquet") == part
    again.release()


def test_resume_redoes_tampered_and_truncated_parts(output_url, plan, caplog):
    out = manifest.OutputDir(output_url)
    out.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    for shard_id in ("00000", "00001", "00002"):
        out.commit(_attempt(output_url, shard_id))
    tampered = bytearray(_read(out, "part-00000.parquet"))
    tampered[8] ^= 0xFF  # inside the first data page: same size, same footer
    out.fs.pipe_file(f"{out.path}/part-00000.parquet", bytes(tampered))
    out.fs.pipe_file(f"{out.path}/part-00001.parquet", _read(out, "part-00001.parquet")[:-5])
    out.fs.makedirs(f"{out.path}/_progress", exist_ok=True)
    out.fs.pipe_file(f"{out.path}/_progress/00000.json", b"{}")  # row-level progress: kept
    out.release()  # the first driver "crashes" after this

    with caplog.at_level(logging.WARNING, logger=manifest.__name__):
        committed = manifest.OutputDir(output_url).prepare(
            plan, FINGERPRINT, resume=True, overwrite=False
        )
    assert sorted(committed) == ["00002"]
    assert "shard 00000: committed part part-00000.parquet has SHA-256" in caplog.text
    assert "shard 00001: committed part part-00001.parquet has " in caplog.text
    assert "bytes, its record" in caplog.text
    assert _names(out) == [manifest.MANIFEST_DIR, "_progress", "part-00002.parquet"]
    assert _names(out, manifest.COMMITS_DIR) == ["00002.json"]


def test_a_second_driver_is_refused_while_the_lease_lives(output_url, plan):
    first = manifest.OutputDir(output_url, lease_ttl_s=SHORT_TTL_S, lease_renew_s=0.0)
    first.prepare(plan, FINGERPRINT, resume=False, overwrite=False)
    first.commit(_attempt(output_url, "00000"))
    lease = json.loads(_read(first, manifest.LEASE_FILE))
    assert set(lease) == {"holder", "host", "pid", "acquired", "expires"}

    second = manifest.OutputDir(output_url)
    for flags in ({"resume": True, "overwrite": False}, {"resume": False, "overwrite": True}):
        with pytest.raises(
            config_lib.JobInputError,
            match=rf"in use by another driver \(host {lease['host']}, pid {lease['pid']}, .* "
            r"expires in \d+ s .*wait for that job to finish",
        ):
            second.prepare(plan, FINGERPRINT, **flags)
    assert _names(first, manifest.COMMITS_DIR) == ["00000.json"]  # nothing deleted

    # The first driver stops renewing (it hangs or died): once its lease expires, a second one may go on.
    time.sleep(max(0.0, lease["expires"] - time.time()) + 0.05)
    assert sorted(second.prepare(plan, FINGERPRINT, resume=True, overwrite=False)) == ["00000"]
    with pytest.raises(manifest.LeaseLost, match="lost its lease .* holds it now"):
        first.commit(_attempt(output_url, "00001"))  # the first wakes up: it may not write
    assert _names(first, manifest.COMMITS_DIR) == ["00000.json"]
    first.release()  # leaves the second's lease alone
    assert json.loads(_read(first, manifest.LEASE_FILE))["holder"] == second.holder
    second.release()
    assert "lease.json" not in _names(first, manifest.MANIFEST_DIR)


def test_the_driver_gives_the_lease_back_when_the_job_fails(tmp_path, plan, monkeypatch):
    def lost_cluster(*args, **kwargs):
        raise ConnectionError("the cluster went away")

    monkeypatch.setattr(driver, "_generate", lost_cluster)
    config = config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=(plan.files[0].url,), output=str(tmp_path / "out"))
    )
    with pytest.raises(ConnectionError):
        driver.run(config, say=lambda _: None)
    assert (tmp_path / "out" / manifest.PLAN_FILE).exists()
    assert not (tmp_path / "out" / manifest.LEASE_FILE).exists()


@pytest.mark.ray
@pytest.mark.slow
def test_job_on_s3_commits_every_row_once(s3_server, write_parquet, prompts, job_config):
    bucket = s3_server.bucket("griffin-batch-job")
    ids = [f"r{i}" for i in range(10)]
    write_parquet(f"{bucket}/in/a.parquet", {"id": ids, "prompt": (prompts * 2)[:10]})
    out = f"{bucket}/jobs/run1"
    # moto's keys live in FSSPEC_S3 here; real workers would use their node's own.
    said = []
    result = driver.run(job_config([f"{bucket}/in"], out, forward_credentials=True),
                        say=said.append)
    assert result.succeeded and result.summary["shards"]["committed"] == 3
    assert "forwarding credentials to workers: FSSPEC_S3 (values not shown)" in said
    assert not any("testing" in line for line in said)  # the key itself is never printed

    assert_exactly_once(read_output(out), ids)
    done = manifest.OutputDir(out)
    assert _names(done) == [
        "_SUCCESS",
        manifest.MANIFEST_DIR,
        "_summary.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert "lease.json" not in _names(done, manifest.MANIFEST_DIR)
    for shard_id, record in done.committed().items():
        data = _read(done, output.part_name(shard_id))
        assert (record.size, record.sha256) == (len(data), output.digest(data))
        assert f"/{output.ATTEMPTS_DIR}/part-{shard_id}.a0-" in record.attempt_path
