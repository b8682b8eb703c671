"""A job on a cluster that autoscales: started with no TPU node, it gets nodes and gives them back.

The cluster is a head of its own running Ray's autoscaler with its fake
multi-node provider, which adds real raylet processes as nodes of a "TPU host"
type (4 units of the ``TPU`` resource each; JAX runs on CPU there). Nothing is
mocked but the cloud: the job's pending workers are the only demand the
autoscaler sees, and idle nodes go after its idle timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import ray_head
from job_helpers import assert_exactly_once, read_output

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_HOST = {"resources": {"CPU": 1, "TPU": 4}, "min_workers": 0, "max_workers": 2}
NUM_ROWS, SHARD_ROWS = 24, 2
RELEASE_TIMEOUT_S = 120.0


def _tpu_nodes(address, env) -> list[dict]:
    return [n for n in ray_head.alive_nodes(address, env) if n["resources"].get("TPU")]


def test_job_on_an_autoscaling_cluster_gets_nodes_and_gives_them_back(
    tmp_path, write_parquet, prompts, jax_cache
):
    port = ray_head.free_port()
    args, env = ray_head.fake_autoscaler(port, {"tpu_host": TPU_HOST}, tmp_path)
    with ray_head.private_head(port=port, extra_args=args, extra_env=env) as (address, env, _):
        assert _tpu_nodes(address, env) == []  # at rest: no TPU host
        ids = [f"a{i:02d}" for i in range(NUM_ROWS)]
        inputs = write_parquet(str(tmp_path / "in.parquet"), {
            "id": ids, "prompt": [prompts[i % len(prompts)] for i in range(NUM_ROWS)]},
            row_group_size=SHARD_ROWS)
        out = str(tmp_path / "out")
        started = time.monotonic()
        job = subprocess.run(
            [sys.executable, "-m", "griffin_batch.jobs.generate", "--input", inputs,
             "--output", out, "--address", address, "--accelerator", "tpu",
             "--max-workers", "2", "--wait-for-workers", "240", "--shard-rows", str(SHARD_ROWS),
             "--slots", "4", "--decode-steps", "8", "--max-tokens", "8"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        ended = time.monotonic()
        assert job.returncode == 0, job.stderr[-4000:]
        assert "starting 2 tpu worker(s)" in job.stderr
        assert "the cluster has room for 0 now" in job.stderr

        # Nodes go once idle: the job released its workers, nothing else holds them.
        while _tpu_nodes(address, env):
            assert time.monotonic() - ended < RELEASE_TIMEOUT_S, "TPU nodes still up"
            time.sleep(1.0)
        released_s = time.monotonic() - ended

    assert_exactly_once(read_output(out), ids)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["status"] == "completed"
    workers = [w for w in summary["workers"] if w["shards"]]
    assert workers and all(w["placed_at_s"] is not None for w in workers)
    assert len({w["node_id"] for w in workers}) == len(workers)  # one worker per TPU host
    assert summary["pool"][0]["waiting_for_room"] >= 1  # the demand the autoscaler answered
    first = min(w["placed_at_s"] for w in workers)
    to_first_shard = [round(w["first_shard_at_s"] - w["placed_at_s"], 1) for w in workers]
    print(f"job {ended - started:.1f}s; first worker placed {first:.1f}s after the job started "
          f"(the autoscaler adding its node); placed to first shard {to_first_shard}s; TPU "
          f"nodes gone {released_s:.1f}s after the job ended; pool: {summary['pool']}")
