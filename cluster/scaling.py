"""How many workers a job wants at each moment: the elastic pool's policy, without Ray.

A worker that Ray cannot place yet is not a failure: it is demand, and
pending actors are exactly what Ray's autoscaler (and KubeRay's) reacts to
by adding nodes. So the pool asks for as many workers as there is work for
(up to ``max_workers``), Ray places each as soon as a node with room joins,
and a worker with nothing left to do is released so its node can go.
"""

from __future__ import annotations

import dataclasses

from griffin_batch.cluster import faults


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingPolicy:
    """The bounds of an elastic pool.

    Attributes:
      min_workers: Workers that must be ready before any shard is sent; the job
        fails when fewer are ready after ``wait_for_workers_s``.
      max_workers: Most workers at once. None: one per accelerator host the
        cluster holds at the moment (it grows as nodes join; a cluster that
        autoscales needs a bound to scale toward).
      wait_for_workers_s: How long the job waits for ``min_workers``.
    """

    min_workers: int = 1
    max_workers: int | None = None
    wait_for_workers_s: float = faults.DEFAULT_WAIT_FOR_WORKERS_S

    def __post_init__(self):
        if self.min_workers < 1:
            raise ValueError(f"min_workers must be >= 1, got {self.min_workers}")
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) < min_workers ({self.min_workers})")

    def bound(self, capacity: int) -> int:
        """Most workers wanted now, with room for ``capacity`` in the live nodes."""
        if self.max_workers is not None:
            return self.max_workers
        return max(capacity, self.min_workers)

    def target(self, *, capacity: int, busy: int, queued: int) -> int:
        """Workers to keep: every busy one, plus one per queued shard while the bound allows.

        Args:
          capacity: Workers the live nodes can hold now.
          busy: Workers holding shards.
          queued: Shards waiting for a worker (all ready workers are full).
        """
        if not queued:
            return busy  # idle workers go, so their nodes can scale down
        return max(busy, min(self.bound(capacity), busy + queued))
