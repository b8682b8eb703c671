"""A driver whose Ray cluster disappears says so, exits 3 within a minute, and resumes.

The end-to-end test starts its own ``ray start --head --block`` (own ports, own
token, own temporary directory, own session), runs the command line against it,
and once a shard has committed kills every process of the head's session with
SIGKILL: the head's process group and the workers the raylet put in groups of
their own, as a machine that goes away. Ray alone would leave the driver blocked
until its own GCS timeout and then end it with status 1 and no word of the job.

The driver runs with Ray's GCS timeout at 15 s (``RAY_gcs_rpc_server_reconnect_timeout_s``),
so the watch gives up at 7.5 s instead of 30 s and the test stays short; exit
status 3 shows that the job, not Ray, ended the process.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest
from job_helpers import assert_exactly_once, committed_shards, read_output
from ray_head import kill_session, private_head

from griffin_batch.actors import shards
from griffin_batch.cluster import connect, faults, pool
from griffin_batch.jobs import generate, scheduler
from griffin_batch.jobs import manifest as manifest_lib

PROG = "python -m griffin_batch.jobs.generate"
START_TIMEOUT_S = 240.0  # the head, then a worker's first JAX compile on a busy 2-core machine
EXIT_WITHIN_S = 60.0
RAY_GCS_TIMEOUT_S = 15  # the driver's; the watch then gives up at 7.5 s and ends the job by 10 s
NUM_ROWS, SHARD_ROWS = 32, 2


# The watch on its own: a socket that closes. -------------------------------------------


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _address(s: socket.socket) -> str:
    host, port = s.getsockname()
    return f"{host}:{port}"


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_watch_names_the_endpoint_that_stops_answering():
    gcs, raylet = _listener(), _listener()
    endpoints = {
        "the Ray cluster": _address(gcs),
        "the Ray node on this machine": _address(raylet),
    }
    stuck = []
    watch = connect.ClusterWatch(
        endpoints, timeout_s=0.5, grace_s=0.3, interval_s=0.05, on_stuck=stuck.append
    ).start()
    try:
        time.sleep(0.8)
        assert watch.lost is None  # both answer
        raylet.close()
        assert _wait(lambda: watch.lost is not None, 5.0)
        address = endpoints["the Ray node on this machine"]
        assert re.fullmatch(
            rf"the Ray node on this machine at {address} stopped answering "
            r"\(no connection for \d+ s\)",
            watch.lost,
        ), watch.lost
        # Not stopped within the grace: the caller is stuck, on_stuck ends the job.
        assert _wait(lambda: stuck == [watch.lost], 5.0)
    finally:
        watch.stop()
        gcs.close()


def test_watch_stopped_in_time_leaves_the_job_to_its_thread():
    gone = _listener()
    address = _address(gone)
    gone.close()
    stuck = []
    watch = connect.ClusterWatch(
        {"the Ray cluster": address},
        timeout_s=0.2,
        grace_s=1.0,
        interval_s=0.05,
        on_stuck=stuck.append,
    ).start()
    assert _wait(lambda: watch.lost is not None, 5.0)
    watch.stop()
    time.sleep(1.5)
    assert not stuck


def test_watch_timing_stays_inside_rays_own_gcs_timeout():
    default = faults.cluster_lost_timing({})
    assert default == (faults.CLUSTER_LOST_TIMEOUT_S, faults.CLUSTER_LOST_GRACE_S)
    for ray_s in (10, 30, 60, 600):
        timeout_s, grace_s = faults.cluster_lost_timing({faults.RAY_GCS_RECONNECT_ENV: str(ray_s)})
        # Worst case: the last answer just before the loss, two probes' time to notice it.
        worst = timeout_s + 2 * faults.CLUSTER_PROBE_INTERVAL_S + grace_s
        assert worst < min(ray_s, EXIT_WITHIN_S), (ray_s, timeout_s, grace_s)
    assert faults.cluster_lost_timing({faults.RAY_GCS_RECONNECT_ENV: "x"}) == default


# The scheduler's loop: a lost cluster stops it like a fatal start failure. ---------------


class _OneWorker:
    """A pool with one ready worker that is never lost."""

    fatal = None
    last_error = None

    def __init__(self):
        worker = pool.Worker(index=0, name="w-0", handle=None, ready_ref=None, started_at=0.0)
        worker.info = {}
        self.in_service = [worker]

    waiting_for_room = ()
    pending_slots = 0

    def starting(self):
        return {}

    def expire_starting(self):
        return []


@pytest.mark.ray
def test_scheduler_gives_up_every_shard_not_committed_when_the_cluster_is_lost(ray_address):
    import ray

    @ray.remote(num_cpus=0)
    def never_done():
        time.sleep(120)

    refs = []

    def submit(worker, shard, attempt):
        refs.append(never_done.remote())
        return refs[-1]

    todo = [
        shards.ShardSpec(
            shard_id=f"{i:05d}",
            path="in.parquet",
            file_key="in.parquet",
            row_groups=(i,),
            offset=0,
            num_rows=2,
            first_row=2 * i,
        )
        for i in range(3)
    ]
    lost = "the Ray cluster at 10.0.0.1:6379 stopped answering (no connection for 30 s)"
    answers = iter([None, lost])
    loop = scheduler.Scheduler(
        _OneWorker(),
        submit,
        on_commit=lambda result: pytest.fail("nothing commits"),
        budget=faults.RetryBudget(),
        max_in_flight=1,
        cluster_lost=lambda: next(answers),
    )
    try:
        report = loop.run(todo)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
    assert loop.finished and report.cluster_lost and report.fatal == lost
    assert report.failed == {s.shard_id: lost for s in todo}
    assert len(refs) == 1  # one in flight, two still queued


# The command line against a head that disappears. -----------------------------------------


@pytest.fixture
def ray_head(jax_cache):
    """A Ray head in a session of its own; yields (address, env, session id).

    Its workers share the session's JAX compilation cache (``jax_cache`` sets it in
    the environment that the head and the driver inherit).
    """
    with private_head() as head:
        yield head


def _command(inputs: str, out: str, address: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "griffin_batch.jobs.generate", "--input", inputs,
        "--output", out, "--address", address, "--workers", "1", "--accelerator", "cpu",
        "--shard-rows", str(SHARD_ROWS), "--slots", "4", "--decode-steps", "8",
        "--max-tokens", "32", *extra,
    ]  # fmt: skip


def _wait_for_a_commit(driver: subprocess.Popen, out: str, log: pathlib.Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (os.path.isdir(f"{out}/{manifest_lib.COMMITS_DIR}") and committed_shards(out)):
        if driver.poll() is not None:
            pytest.fail(f"the driver exited with {driver.returncode}:\n{log.read_text()}")
        assert time.monotonic() < deadline, "no shard committed"
        time.sleep(0.05)


@pytest.mark.ray
@pytest.mark.slow
def test_driver_whose_cluster_disappears_exits_3_and_resumes(
    tmp_path, write_parquet, prompts, ray_head
):
    address, env, head_session = ray_head
    ids = [f"r{i:03d}" for i in range(NUM_ROWS)]
    inputs = write_parquet(
        str(tmp_path / "in.parquet"),
        {"prompt": [prompts[i % len(prompts)] for i in range(NUM_ROWS)], "id": ids},
        row_group_size=SHARD_ROWS,
    )
    out = str(tmp_path / "out")
    log = tmp_path / "driver.err"
    with open(log, "w") as err:
        driver = subprocess.Popen(
            _command(inputs, out, address),
            env={**env, faults.RAY_GCS_RECONNECT_ENV: str(RAY_GCS_TIMEOUT_S)},
            stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=tmp_path,
        )  # fmt: skip
    try:
        _wait_for_a_commit(driver, out, log)
        kill_session(head_session)
        killed = time.monotonic()
        code = driver.wait(timeout=EXIT_WITHIN_S + 30)
        exited_s = time.monotonic() - killed
    finally:
        if driver.poll() is None:
            driver.kill()
    stderr = log.read_text()
    print(f"the driver exited {code} {exited_s:.1f}s after the cluster was killed\n", stderr)
    assert code == generate.EXIT_CLUSTER_LOST
    assert exited_s < EXIT_WITHIN_S

    # One line says what happened, what is kept, and what to do.
    committed = committed_shards(out)
    num_shards = NUM_ROWS // SHARD_ROWS
    assert 1 <= len(committed) < num_shards
    (error,) = [ln for ln in stderr.splitlines() if ln.startswith(f"{PROG}: error:")]
    assert "the Ray cluster at " in error and "stopped answering" in error, error
    assert f"{len(committed)} of {num_shards} shard(s) committed are kept" in error, error
    assert "rerun with --resume" in error, error
    assert "Traceback" not in stderr

    # The committed parts are intact, and the summary says why the rest is missing.
    table = read_output(out)
    assert table.num_rows == len(committed) * SHARD_ROWS
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    assert set(table.column("id").to_pylist()) <= set(ids)
    summary = json.loads(pathlib.Path(f"{out}/{manifest_lib.SUMMARY_FILE}").read_text())
    assert summary["status"] == "failed" and "stopped answering" in summary["fatal"]
    assert summary["shards"]["committed"] == len(committed)
    assert len(summary["failures"]) == num_shards - len(committed)
    assert not os.path.exists(f"{out}/{manifest_lib.SUCCESS_FILE}")

    # --resume on a fresh local cluster (the lease was given back) finishes the job.
    resumed = subprocess.run(
        _command(inputs, out, "local", "--resume"),
        env={**os.environ, "RAY_ADDRESS": ""},
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(committed)} of {num_shards} shard(s) already committed" in (
        resumed.stderr
    )
    assert_exactly_once(read_output(out), ids)


@pytest.mark.ray
@pytest.mark.slow
def test_driver_that_cannot_join_a_cluster_says_so_and_exits(
    tmp_path, write_parquet, prompts, ray_head
):
    # A cluster that accepts connections but asks for a token this machine lacks (another
    # user's `ray start` on a shared machine): Ray's join retries forever, printing only its
    # own C++ errors, so before the join had a deadline the job hung with no word of its own.
    address, env, _ = ray_head
    foreign = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    foreign[faults.RAY_GCS_RECONNECT_ENV] = str(RAY_GCS_TIMEOUT_S)
    inputs = write_parquet(str(tmp_path / "in.parquet"), {"prompt": prompts[:2], "id": ["a", "b"]})
    out = str(tmp_path / "out")
    started = time.monotonic()
    proc = subprocess.run(_command(inputs, out, address), env=foreign, capture_output=True,
                          text=True, timeout=EXIT_WITHIN_S + 30, cwd=tmp_path)
    exited_s = time.monotonic() - started
    print(f"exited {proc.returncode} after {exited_s:.1f}s\n", proc.stderr[-3000:])
    limit_s = sum(faults.cluster_lost_timing(foreign))
    assert proc.returncode == generate.EXIT_CLUSTER_LOST
    assert exited_s < EXIT_WITHIN_S
    (error,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{PROG}: error:")]
    assert f"could not join the Ray cluster at {address} within {limit_s:.0f} s" in error, error
    assert "pass --address local" in error and "rerun with --resume" in error, error
    summary = json.loads(pathlib.Path(f"{out}/{manifest_lib.SUMMARY_FILE}").read_text())
    assert summary["status"] == "failed" and "could not join" in summary["fatal"]
    assert summary["shards"]["committed"] == 0
