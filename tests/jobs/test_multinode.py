"""Several Ray nodes on one machine standing in for TPU hosts: hosts join and leave mid-job."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from job_helpers import assert_exactly_once, committed_shards, read_output, wait_for

from griffin_batch.jobs import manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 300.0
CHIPS_PER_HOST = 4
SLICE_LABEL = "ray.io/tpu-slice-name"  # ray._raylet.RAY_NODE_TPU_SLICE_NAME_KEY


@pytest.fixture(scope="module")
def tpu_cluster(jax_cache):
    """A head node without accelerators plus two "TPU hosts" (a custom TPU resource each) of one
    two-host v5p-16 slice, labelled as Ray labels a real slice's hosts."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    # What Ray puts on the hosts of a v5p-16 slice: its name, pod type and worker ids as
    # labels, and the slice's head resource on worker 0 (ray.util.tpu reserves by these).
    hosts = [cluster.add_node(
        num_cpus=1,
        resources={"TPU": CHIPS_PER_HOST, **({"TPU-v5p-16-head": 1} if i == 0 else {})},
        labels={SLICE_LABEL: "slice-a", "ray.io/tpu-pod-type": "v5p-16",
                "ray.io/tpu-worker-id": str(i), "ray.io/accelerator-type": "TPU-V5P"},
        env_vars={"TPU_NAME": "slice-a"},  # where a TPU VM's runtime names its slice
    ) for i in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, hosts
    finally:
        cluster.shutdown()


def test_whole_slices_are_reserved_with_rays_slice_placement_group(
    tmp_path, write_parquet, prompts, tpu_cluster
):
    """--tpu-slice: the pool reserves the slice as a unit (Ray's SlicePlacementGroup: its head
    resource, then a bundle per host) and puts one worker on each of its hosts."""
    cluster, hosts = tpu_cluster
    ids = [f"s{i}" for i in range(8)]
    inputs = write_parquet(str(tmp_path / "in.parquet"), {"id": ids, "prompt": prompts[:8]})
    out = str(tmp_path / "out")
    job = subprocess.run(
        [sys.executable, "-m", "griffin_batch.jobs.generate", "--input", inputs, "--output", out,
         "--address", cluster.address, "--shard-rows", "2", "--tpu-slice", "v5p-16",
         "--slots", "4", "--decode-steps", "8", "--max-tokens", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "starting 2 tpu worker(s) in 1 v5p-16 slice(s) of 2 hosts (2x2x2)" in job.stderr
    assert_exactly_once(read_output(out), ids)
    summary = json.loads(pathlib.Path(f"{out}/_summary.json").read_text())
    placed = {w["node_id"] for w in summary["workers"] if w.get("node_id")}
    assert placed == {h.node_id for h in hosts}  # one worker per host of the slice


def test_a_joining_host_gets_a_worker_and_a_lost_one_loses_no_rows(
    tmp_path, write_parquet, prompts, tpu_cluster
):
    """The pool asks for a worker more than the two hosts hold; a host added mid-job gets it
    within seconds and takes shards. Then one host of the two-host slice is removed: the
    slice's other worker checkpoints and stops too (a slice is preempted whole), and every
    row still comes back once."""
    cluster, hosts = tpu_cluster
    ids = [f"h{i:03d}" for i in range(60)]
    inputs = write_parquet(
        str(tmp_path / "in.parquet"),
        {"id": ids, "prompt": [prompts[i % len(prompts)] for i in range(60)]},
    )
    out = str(tmp_path / "out")
    log_path = tmp_path / "job.log"
    command = [
        sys.executable, "-m", "griffin_batch.jobs.generate", "--input", inputs, "--output", out,
        "--address", cluster.address, "--shard-rows", "3", "--max-workers", "3",
        "--slots", "4", "--decode-steps", "8", "--max-tokens", "16",
    ]
    with open(log_path, "w") as log:
        job = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: job.poll() is not None or "starting 3" in log_path.read_text(),
                     START_TIMEOUT_S, "the pool to start")
            joined = cluster.add_node(num_cpus=1, resources={"TPU": CHIPS_PER_HOST})
            wait_for(
                lambda: (
                    job.poll() is not None
                    or (
                        os.path.isdir(f"{out}/{manifest.COMMITS_DIR}")
                        and len(committed_shards(out)) >= 4
                    )
                ),
                START_TIMEOUT_S,
                "committed shards",
            )
            cluster.remove_node(hosts[1])  # the host and its worker are gone
            assert job.wait(timeout=600) == 0, log_path.read_text()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
    text = log_path.read_text()
    assert "starting 3 tpu worker(s), 4 TPU chip(s) per worker (one per host)" in text
    assert "the cluster has room for 2 now" in text

    assert_exactly_once(read_output(out), ids)
    summary = json.loads(pathlib.Path(f"{out}/_summary.json").read_text())
    assert summary["shards"]["committed"] == 20 and summary["status"] == "completed"
    workers = summary["workers"]
    (newcomer,) = [w for w in workers if w.get("node_id") == joined.node_id]
    assert newcomer["shards"] >= 1, workers  # the joining host took work
    lost = [w for w in workers if w["lost"]]
    assert any(w["ready"] and "died" in w["lost"].lower() for w in lost), lost
    assert any("TPU slice slice-a lost host" in w["lost"] for w in lost), lost
    assert summary["retries"]["preempted"] >= 1  # its in-flight shards ran on another host
    print(f"joined host: placed {newcomer['placed_at_s']}s, ready {newcomer['ready_at_s']}s, "
          f"first shard {newcomer['first_shard_at_s']}s after the job started; "
          f"pool: {summary['pool']}")


def test_draining_nodes_hand_their_shards_on_mid_sequence(
    tmp_path, write_parquet, prompts, tpu_cluster
):
    """``ray drain-node`` (what a preemption notice or a SIGTERM'd ``ray start --block`` does):
    a worker on a draining node checkpoints its shards and stops; they finish on another node,
    mid-sequence. Drains every TPU host the job started on, so it runs last in this module."""
    import time

    import fsspec
    import ray
    from ray.core.generated import autoscaler_pb2

    from griffin_batch.actors import shards

    cluster, _ = tpu_cluster
    doomed = [n.node_id for n in cluster.worker_nodes]
    ids = [f"d{i}" for i in range(4)]
    inputs = write_parquet(
        str(tmp_path / "in.parquet"),
        {"id": ids, "prompt": prompts[:4], "max_tokens": [3000] * 4},  # greedy, long
    )
    out = str(tmp_path / "out")
    log_path = tmp_path / "job.log"
    command = [
        sys.executable, "-m", "griffin_batch.jobs.generate", "--input", inputs, "--output", out,
        "--address", cluster.address, "--shard-rows", "1", "--max-in-flight", "2",
        "--slots", "4", "--decode-steps", "8", "--max-tokens", "3000",
        "--checkpoint-every", "0.5",
    ]
    fs = fsspec.filesystem("file")

    def checkpointed_shards() -> int:
        deltas = fs.glob(f"{out}/{shards.PROGRESS_DIR}/*/*.delta.safetensors")
        return len({p.split("/")[-2] for p in deltas})

    with open(log_path, "w") as log:
        job = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: job.poll() is not None or checkpointed_shards() >= 2,
                     START_TIMEOUT_S, "checkpoints of running shards")
            cluster.add_node(num_cpus=1, resources={"TPU": CHIPS_PER_HOST})  # where they go on
            client = ray._raylet.GcsClient(address=cluster.address)
            for node_id in doomed:
                accepted, why = client.drain_node(
                    node_id,
                    autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                    "test: preemption notice",
                    int((time.time() + 120) * 1000),
                )
                assert accepted, why
            assert job.wait(timeout=600) == 0, log_path.read_text()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
    assert_exactly_once(read_output(out), ids)
    summary = json.loads(pathlib.Path(f"{out}/_summary.json").read_text())
    drained = [w for w in summary["workers"] if w["lost"] and "draining" in w["lost"]]
    assert drained and all(w["node_id"] in doomed for w in drained), summary["workers"]
    assert summary["retries"]["preempted"] >= 1 and summary["retries"]["failed"] == 0
    records = [json.loads(p.read_text())
               for p in pathlib.Path(out, manifest.COMMITS_DIR).glob("*.json")]
    assert any(r["attempt"] >= 1 and r["restored_tokens"] > 0 for r in records), records
