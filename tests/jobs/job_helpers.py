"""Helpers of the job tests: reading a job's output, checking exactly-once, polling."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from griffin_batch.jobs import manifest

POLL_S = 0.05


def read_output(url: str) -> pa.Table:
    """Every committed part file of a job's output, concatenated in shard order."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    parts = sorted(fs.glob(f"{path.rstrip('/')}/part-*.parquet"))
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def assert_exactly_once(table: pa.Table, expected_ids) -> None:
    """Each expected id appears exactly once (one sample per row)."""
    counts = collections.Counter(table.column("id").to_pylist())
    assert sorted(counts) == sorted(expected_ids), "ids differ from the input's"
    twice = {k: v for k, v in counts.items() if v != 1}
    assert not twice, f"ids not exactly once: {twice}"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls ``predicate`` until true; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_S)


def committed_shards(url: str) -> list[str]:
    """Shard ids with a commit record in a job's output."""
    return sorted(manifest.OutputDir(url).committed())


def a_live_worker_pid() -> int:
    """The process id of a generation worker that is alive now."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("griffin-worker-"):
            with contextlib.suppress(ValueError, ray.exceptions.RayError):
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                return ray.get(actor.pid.remote(), timeout=30)
    raise AssertionError("no live worker")
