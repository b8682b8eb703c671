"""Outcome classification of real Ray errors, and retry budgets."""

import os
import signal
import sys

import pytest
import ray
import ray.cloudpickle

from griffin_batch.cluster import faults

# Workers cannot import test modules; ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Flaky:
    """A small actor whose calls succeed, raise, or take the process down."""

    def pid(self) -> int:
        return os.getpid()

    def ok(self, x):
        return x

    def bad_input(self):
        raise ValueError("row group 7 is corrupt")

    def device_gone(self):
        raise faults.WorkerLost("TPU chip 3 stopped answering")

    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)


def test_retry_budget_counts_outcomes_separately():
    budget = faults.RetryBudget(max_preemptions=2, max_failures=1)
    pre, fail = faults.Preempted("node lost"), faults.Failed("bad row group")
    assert budget.charge("a", pre) and budget.charge("a", pre)
    assert not budget.charge("a", pre)
    assert budget.charge("a", fail)
    assert not budget.charge("a", fail)
    assert budget.charge("b", fail)  # budgets are per key
    assert budget.attempts("a") == 5
    assert budget.totals == {"preempted": 3, "failed": 3}
    with pytest.raises(ValueError):
        faults.RetryBudget(max_preemptions=-1)


@pytest.mark.ray
def test_classify_real_ray_errors(ray_address):
    actor = ray.remote(Flaky).options(num_cpus=0, max_restarts=0).remote()
    assert faults.resolve(actor.ok.remote(3)) == faults.Success(3)

    failed = faults.resolve(actor.bad_input.remote())
    assert isinstance(failed, faults.Failed)
    assert "ValueError" in failed.message and "row group 7 is corrupt" in failed.message

    lost = faults.resolve(actor.device_gone.remote())
    assert isinstance(lost, faults.Preempted)
    assert "TPU chip 3 stopped answering" in lost.message

    died = faults.resolve(actor.die.remote())
    assert isinstance(died, faults.Preempted), died
    assert isinstance(faults.resolve(actor.ok.remote(1)), faults.Preempted)  # stays dead
