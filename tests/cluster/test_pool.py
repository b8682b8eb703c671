"""The worker pool on a real local Ray cluster: readiness, replacement, start failures."""

import os
import signal
import sys

import pytest
import ray
import ray.cloudpickle

from griffin_batch.cluster import connect, faults, hardware, pool

# Workers cannot import test modules; ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.ray

CPU_SPEC = hardware.WorkerSpec(
    accelerator=hardware.Accelerator.CPU,
    num_cpus=0.0,
    num_gpus=0.0,
    resources={},
    capacity=2,
    hosts=1,
    description="test",
)


class Loader:
    """Stands in for a model worker: ``ready`` answers once ``__init__`` has run.

    ``fail``: "init" raises from the constructor (a module the class needs is
    missing); "permanent" reports a start error from ``ready`` (the model's own
    guard caught it); "transient" raises from ``ready`` (might start elsewhere).
    """

    def __init__(self, fail: str | None = None):
        if fail == "init":
            raise ModuleNotFoundError("No module named 'griffin_batch'")
        self.fail = fail

    def ready(self) -> dict:
        if self.fail == "permanent":
            return {"hostname": "host-a", "start_error": "CheckpointError: gs://nowhere/ckpt"}
        if self.fail == "transient":
            raise faults.WorkerLost("could not start: TimeoutError: gs://slow/ckpt")
        return {"pid": os.getpid()}


def _wait_ready(p: pool.WorkerPool, timeout: float = 60.0) -> None:
    while p.starting():
        refs = list(p.starting())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        assert done, "workers did not start"
        starting = p.starting()
        for ref in done:
            p.on_ready(starting[ref])


def test_pool_starts_and_replaces_a_killed_worker(ray_address):
    p = pool.WorkerPool(Loader, (), CPU_SPEC, size=2, max_replacements=1)
    p.start()
    try:
        _wait_ready(p)
        assert len(p.in_service) == 2
        victim = p.in_service[0]
        os.kill(victim.info["pid"], signal.SIGKILL)
        replacement = p.lose(victim, "killed by test")
        assert replacement is not None and replacement.index == 2
        assert victim.lost == "killed by test" and not victim.ready
        _wait_ready(p)
        assert len(p.in_service) == 2 and p.replaced == 1
        assert p.lose(p.in_service[0], "again") is None  # replacement budget spent
        assert len(p.in_service) == 1 and not p.exhausted
    finally:
        p.shutdown()
    assert p.exhausted


def _outcomes(p: pool.WorkerPool) -> list[faults.Outcome]:
    outcomes = []
    while p.starting():
        ref, worker = next(iter(p.starting().items()))
        ray.wait([ref], timeout=60)
        outcomes.append(p.on_ready(worker))
    return outcomes


def test_transient_start_failures_are_replaced_until_the_budget_ends(ray_address):
    p = pool.WorkerPool(Loader, ("transient",), CPU_SPEC, size=1, max_replacements=1)
    p.start()
    try:
        assert [type(o) for o in _outcomes(p)] == [faults.Preempted, faults.Preempted]
        assert p.exhausted and p.fatal is None
        assert "TimeoutError: gs://slow/ckpt" in p.last_error
    finally:
        p.shutdown()


@pytest.mark.parametrize(
    ("fail", "cause"),
    [
        ("permanent", "on host-a could not start: CheckpointError: gs://nowhere/ckpt"),
        ("init", "could not start: ModuleNotFoundError: No module named 'griffin_batch'"),
    ],
)
def test_permanent_start_failures_stop_at_the_first_attempt(ray_address, fail, cause):
    p = pool.WorkerPool(Loader, (fail,), CPU_SPEC, size=1, max_replacements=3)
    p.start()
    try:
        assert [type(o) for o in _outcomes(p)] == [faults.Failed]
        assert p.replaced == 0 and p.exhausted
        assert cause in p.fatal, p.fatal
        if fail == "init":  # the host comes from Ray's error
            assert " on unknown " not in p.fatal, p.fatal
    finally:
        p.shutdown()


def test_a_worker_waits_for_room_without_a_deadline_then_loads_within_one(ray_address):
    """Unplaced, a worker is the autoscaler's demand and never expires; once Ray places it,
    the start timeout runs."""
    now, placed = [0.0], [False]
    spec = hardware.WorkerSpec(
        accelerator=hardware.Accelerator.TPU,
        num_cpus=0.0,
        num_gpus=0.0,
        resources={"TPU": 4.0},
        capacity=1,
        hosts=1,
        description="test",
    )
    p = pool.WorkerPool(Loader, (), spec, size=1, max_replacements=0, start_timeout_s=30.0,
                        clock=lambda: now[0], placed=lambda w: placed[0])
    p.start()
    try:
        (waiting,) = p.workers
        now[0] = 3600.0  # an hour with no node: still waiting
        assert p.expire_starting() == [] and p.waiting_for_room == [waiting]
        placed[0], now[0] = True, 3610.0  # placements are read every faults.CLUSTER_POLL_S
        assert p.expire_starting() == [] and waiting.placed_at == 3610.0
        now[0] = 3641.0
        (expired,) = p.expire_starting()
        assert "not ready 30s after Ray placed it" in expired.lost
        assert p.exhausted
    finally:
        p.shutdown()


def test_a_worker_ray_cannot_place_has_no_address(ray_address):
    spec = hardware.WorkerSpec(accelerator=hardware.Accelerator.TPU, num_cpus=0.0, num_gpus=0.0,
                               resources={"TPU": 4.0}, capacity=1, hosts=1, description="test")
    p = pool.WorkerPool(Loader, (), spec, size=1)
    p.start()
    try:
        (w,) = p.workers
        assert not connect.actor_placed(w.handle)
    finally:
        p.shutdown()


def test_resize_grows_and_release_shrinks_without_a_loss(ray_address):
    p = pool.WorkerPool(Loader, (), CPU_SPEC, size=1, max_replacements=0)
    p.start()
    try:
        assert len(p.resize(3)) == 2 and len(p.live) == 3
        _wait_ready(p)
        first = p.in_service[0]
        p.release(first, "no work left for it")
        assert first.released and first.lost == "released: no work left for it"
        assert len(p.live) == 2 and p.size == 2 and p.last_error is None
    finally:
        p.shutdown()
