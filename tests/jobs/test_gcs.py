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
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
        "summary.json",
    ]
    summary = json.loads(fs.cat_file(f"{out}/{manifest.SUMMARY_FILE}"))
    assert summary["rows"] == 8 and summary["status"] == "completed"
