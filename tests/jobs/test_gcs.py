"""Input from and output to ``gs://`` on a real GCS protocol server (gcp-storage-emulator)."""

import json

import pytest
from job_helpers import assert_exactly_once, read_output

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver, manifest


@pytest.fixture
def bucket(gcs_server) -> str:
    return gcs_server.bucket("griffin-batch-test")


def test_unreachable_bucket_fails_before_workers(gcs_server, bucket, write_parquet, prompts):
    path = write_parquet(f"{bucket}/in/a.parquet", {"prompt": prompts[:2]})
    config = config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=(path,), output="gs://no-such-bucket/out"),
        cluster=config_lib.ClusterConfig(address="127.0.0.1:9"),
    )  # never contacted
    with pytest.raises(config_lib.JobInputError, match="gs://no-such-bucket/out is not writable"):
        driver.run(config, say=lambda _: None)


@pytest.mark.ray
@pytest.mark.slow
def test_job_reads_and_writes_gcs(gcs_server, bucket, write_parquet, prompts, job_config):
    for name, rows in (("a", prompts[:5]), ("b", prompts[5:])):
        write_parquet(f"{bucket}/in/{name}.parquet", {"prompt": rows})
    out = f"{bucket}/jobs/run1"
    result = driver.run(job_config([f"{bucket}/in/*.parquet"], out), say=lambda _: None)
    assert result.succeeded and result.output == out

    table = read_output(out)
    assert_exactly_once(
        table, [f"a.parquet#{i}" for i in range(5)] + [f"b.parquet#{i}" for i in range(3)]
    )
    assert all(table.column("completion").to_pylist())
    fs = gcs_server.fs()
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("gs://")))
    assert names == [
        "_SUCCESS",
        "_manifest",
        "_summary.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    summary = json.loads(fs.cat_file(f"{out}/{manifest.SUMMARY_FILE}"))
    assert summary["rows"] == 8 and summary["status"] == "completed"


@pytest.mark.ray
@pytest.mark.slow
def test_openai_batch_file_in_and_out_on_gcs(gcs_server, bucket, ray_address, capsys):
    """The README's OpenAI batch example from ``gs://``, its records back to ``gs://``."""
    import pathlib

    from griffin_batch.jobs import generate

    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "openai_batch"
    lines = (example / "requests.jsonl").read_text().splitlines()
    fs = gcs_server.fs()
    fs.pipe_file(f"{bucket}/batches/requests.jsonl", "\n".join(lines).encode() + b"\n")
    out = f"{bucket}/completions/batch-1"
    argv = ["--input", f"{bucket}/batches/requests.jsonl", "--output", out, "--address",
            ray_address, "--workers", "1", "--accelerator", "cpu", "--slots", "4",
            "--decode-steps", "8", "--max-tokens", "4", "--input-format", "openai-batch",
            "--output-format", "openai-batch"]
    assert generate.main(argv) == 0, capsys.readouterr().err[-3000:]
    fs.invalidate_cache()
    records = [json.loads(t) for t in fs.cat_file(f"{out}/{manifest.BATCH_OUTPUT_FILE}")
               .decode().splitlines()]
    print("output.jsonl on gs://:", json.dumps(records[0])[:300])
    assert [r["custom_id"] for r in records] == [json.loads(t)["custom_id"] for t in lines]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
    assert fs.cat_file(f"{out}/{manifest.BATCH_ERRORS_FILE}") == b""
