"""Whole-slice reservations in the background: shapes from Ray's TPU tables, hand-over, drops."""

import threading

import pytest

from griffin_batch.cluster import hardware, slices
from griffin_batch.jobs import config as config_lib


class Handle:
    def __init__(self):
        self.placement_group = object()
        self.released = False

    def shutdown(self):
        self.released = True


def test_slice_shapes_come_from_rays_tables():
    assert hardware.tpu_slice("v5p-16") == hardware.TpuSlice(
        pod_type="v5p-16", version="v5p", topology="2x2x2", hosts=2, chips_per_host=4)
    assert hardware.tpu_slice("v5litepod-16").topology == "4x4"  # not 2x8: the squarer one
    with pytest.raises(ValueError, match="v5p-8 is a single-host slice"):
        hardware.tpu_slice("v5p-8")


def test_reservations_are_handed_over_once_ready_and_dropped_ones_released():
    gates = [threading.Event() for _ in range(3)]
    made = []

    def reserve():
        gate = gates[len(made)]
        made.append(Handle())
        handle = made[-1]
        gate.wait(10)
        return handle

    r = slices.SliceReservations(hardware.tpu_slice("v5p-16"), reserve=reserve)
    r.request(1)
    assert r.pending == 1 and r.ready() == []  # the driver's loop never waits on one
    gates[0].set()
    for _ in range(100):
        got = r.ready()
        if got:
            break
        threading.Event().wait(0.01)
    assert got == [made[0]] and r.pending == 0
    r.request(1)
    r.drop()  # no work left for it: released when it arrives
    gates[1].set()
    for _ in range(100):
        if made[1:] and made[1].released:
            break
        threading.Event().wait(0.01)
    assert made[1].released and r.pending == 0


def test_failed_reservation_is_reported_not_raised():
    def reserve():
        raise TimeoutError("no slice")

    r = slices.SliceReservations(hardware.tpu_slice("v5p-16"), reserve=reserve)
    r.request(1)
    for _ in range(100):
        if not r.ready() and r.last_error:
            break
        threading.Event().wait(0.01)
    assert "TimeoutError('no slice')" in r.last_error and r.pending == 0


@pytest.mark.parametrize(("cluster", "message"), [
    (config_lib.ClusterConfig(tpu_slice="v5p-8"), "--tpu-slice: v5p-8 is a single-host slice"),
    (config_lib.ClusterConfig(tpu_slice="v9-16"), "--tpu-slice: unknown TPU type"),
    (config_lib.ClusterConfig(tpu_slice="v5p-16", accelerator="gpu"), "needs TPU workers"),
    (config_lib.ClusterConfig(tpu_slice="v5p-16", tpu_chips_per_worker=8),
     "a v5p-16 host has 4 chips"),
])
def test_slice_options_are_checked(cluster, message):
    job = config_lib.JobConfig(io=config_lib.IOConfig(inputs=("x",), output="y"), cluster=cluster)
    with pytest.raises(config_lib.JobInputError, match=message):
        job.validate()
