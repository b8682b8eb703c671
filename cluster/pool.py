"""A pool of long-lived worker actors: start, watch readiness, replace the lost, grow and shrink.

The pool is generic: it starts ``actor_cls(*init_args)`` with the placement of
a ``hardware.WorkerSpec`` and a ``ready()`` method it calls to learn when a
worker has loaded. Scheduling work onto ready workers is the caller's job, and
so is its size (``resize``, ``release``; see ``cluster.scaling``).

A worker Ray has not placed yet waits without a deadline: it is demand that an
autoscaler answers with a node. Its start timeout runs from the moment Ray
places it (loading a checkpoint), so a slow autoscaler never costs a worker.

The start contract: a constructor that raises, or a ``ready()`` that returns
``{"start_error": ...}``, is a failure no retry fixes (``faults.StartFailure``)
and sets ``fatal``: the caller stops instead of burning the replacement
budget on it. A ``ready()`` that raises is a worker that might start elsewhere:
it is replaced while budget lasts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray

from griffin_batch.cluster import connect, faults, hardware
from griffin_batch.cluster import slices as tpu_slices

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Worker:
    """One actor of the pool.

    Attributes:
      index: Position in start order (replacements get new indices).
      name: Ray actor name, unique per job.
      handle: Actor handle.
      ready_ref: Result of ``ready()``; resolved once the worker has loaded.
      started_at: Monotonic time the actor was requested.
      info: What ``ready()`` returned (host, devices, ...), None until ready.
      ready_at: Monotonic time it became ready.
      placed_at: Monotonic time the pool saw Ray place it on a node.
      lost: Why it was removed, None while in service.
      released: Removed because there was no work left for it (not a loss).
      tpu_slice: The reserved slice it runs in (``slices``), or None.
    """

    index: int
    name: str
    handle: Any
    ready_ref: ray.ObjectRef
    started_at: float
    info: Mapping[str, Any] | None = None
    ready_at: float | None = None
    placed_at: float | None = None
    lost: str | None = None
    released: bool = False
    tpu_slice: Any = None

    @property
    def ready(self) -> bool:
        return self.info is not None and self.lost is None


class WorkerPool:
    """Keeps ``size`` workers live (ready or starting), replacing the lost while budget lasts.

    Args:
      actor_cls: Plain class to run as an actor; must have ``ready()``.
      init_args: Constructor arguments.
      spec: Placement (resources) of one worker.
      size: Workers to keep in service.
      env_vars: Environment variables for the actors (``runtime_env``).
      max_concurrency: Concurrent calls per actor (in-flight work + control calls).
      max_replacements: Lost workers replaced over the pool's life.
      start_timeout_s: A worker not ready this long after Ray placed it is dropped.
      name_prefix: Prefix of actor names (``<prefix>-<index>``).
      clock: Monotonic clock (seconds).
      placed: Whether Ray has placed a worker's actor on a node (default:
        ``connect.actor_placed``; asked at most every ``faults.CLUSTER_POLL_S``).
      slices: Reserve whole multi-host TPU slices and run one worker per host in
        each; the pool then grows by slices, and a lost worker is replaced with
        the next slice.
    """

    def __init__(
        self,
        actor_cls: type,
        init_args: Sequence[Any],
        spec: hardware.WorkerSpec,
        *,
        size: int,
        env_vars: Mapping[str, str] | None = None,
        max_concurrency: int = 4,
        max_replacements: int | None = None,
        start_timeout_s: float = faults.WORKER_START_TIMEOUT_S,
        name_prefix: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        placed: Callable[[Worker], bool] | None = None,
        slices: tpu_slices.SliceReservations | None = None,
    ):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self._placed = placed or (lambda w: connect.actor_placed(w.handle))
        self._placements_checked = float("-inf")
        self.slices = slices
        options = dict(
            spec.ray_options(), max_concurrency=max_concurrency, max_restarts=0, max_task_retries=0
        )
        if env_vars:
            options["runtime_env"] = {"env_vars": dict(env_vars)}
        self._remote = ray.remote(actor_cls)
        self._options = options
        self._init_args = tuple(init_args)
        self.size = size
        self.max_replacements = 2 * size if max_replacements is None else max_replacements
        self.start_timeout_s = start_timeout_s
        self.name_prefix = name_prefix or f"griffin-worker-{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self.workers: list[Worker] = []
        self.replaced = 0
        self.last_error: str | None = None
        self.fatal: str | None = None

    # Lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Requests the initial workers (returns at once; see ``on_ready``)."""
        if self.slices is not None:
            self.resize(self.size)
            return
        for _ in range(self.size):
            self._spawn()

    def _spawn(self, options: Mapping[str, Any] | None = None) -> Worker:
        index = len(self.workers)
        name = f"{self.name_prefix}-{index}"
        handle = self._remote.options(name=name, **{**self._options, **(options or {})}).remote(
            *self._init_args)
        worker = Worker(
            index=index,
            name=name,
            handle=handle,
            ready_ref=handle.ready.remote(),
            started_at=self._clock(),
        )
        self.workers.append(worker)
        return worker

    def lose(self, worker: Worker, reason: str) -> Worker | None:
        """Removes ``worker`` (killing its process) and starts a replacement if budget allows.

        Returns:
          The replacement, or None.
        """
        if worker.lost is not None:
            return None
        self._retire(worker, reason)
        if (self.slices is not None or self.replaced >= self.max_replacements
                or len(self.live) >= self.size):
            return None  # a slice pool replaces by whole slices, on its next resize
        self.replaced += 1
        return self._spawn()

    def resize(self, size: int) -> list[Worker]:
        """Keeps ``size`` workers live from now on; starts the missing ones (shrinking is ``release``).

        Returns:
          The workers started.
        """
        self.size = max(size, 0)
        if self.slices is not None:
            hosts = self.slices.shape.hosts
            missing = self.size - len(self.live) - self.slices.pending * hosts
            self.slices.request(-(-missing // hosts))
            return []
        return [self._spawn() for _ in range(self.size - len(self.live))]

    @property
    def pending_slots(self) -> int:
        """Workers to come from slices still being reserved."""
        return 0 if self.slices is None else self.slices.pending * self.slices.shape.hosts

    def drop_pending(self) -> None:
        """Gives up slices still being reserved (no work is left for them)."""
        if self.slices is not None:
            self.slices.drop()

    def _adopt_slices(self) -> None:
        """Starts one worker per host of each slice reserved since the last call."""
        if self.slices is None:
            return
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        now = self._clock()
        for handle in self.slices.ready():
            for bundle in range(self.slices.shape.hosts):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=handle.placement_group, placement_group_bundle_index=bundle)
                worker = self._spawn({"scheduling_strategy": strategy})
                worker.tpu_slice, worker.placed_at = handle, now  # the bundle holds its host

    def release(self, worker: Worker, reason: str) -> None:
        """Removes ``worker`` because there is no work for it (its node may scale down); not a loss."""
        if worker.lost is not None:
            return
        worker.released = True
        self._retire(worker, f"released: {reason}", level=logging.INFO)
        self.size = max(0, self.size - 1)

    def shutdown(self) -> None:
        """Kills every worker still in service or starting; gives back every slice."""
        for w in self.workers:
            if w.lost is None:
                w.lost = "shut down"
                with contextlib.suppress(Exception):
                    ray.kill(w.handle, no_restart=True)
        self.drop_pending()
        for handle in {id(w.tpu_slice): w.tpu_slice for w in self.workers if w.tpu_slice}.values():
            with contextlib.suppress(Exception):
                handle.shutdown()

    # Readiness --------------------------------------------------------------
    def starting(self) -> dict[ray.ObjectRef, Worker]:
        """Workers still loading, by their ``ready()`` reference."""
        return {w.ready_ref: w for w in self.workers if w.info is None and w.lost is None}

    def on_ready(self, worker: Worker) -> faults.Outcome:
        """Resolves a finished ``ready()``: marks the worker ready, replaces it, or sets ``fatal``.

        Returns:
          ``Success`` (ready), ``Preempted`` (replaced while budget lasts) or
          ``Failed`` (a permanent start failure; ``fatal`` names it).
        """
        try:
            info = dict(ray.get(worker.ready_ref))
        except Exception as error:  # noqa: BLE001 - every remote error becomes an outcome
            failure = faults.start_failure(error)
            if failure is None:
                outcome = faults.classify(error)
                self.lose(worker, f"failed to start: {outcome.message}")
                return outcome
        else:
            if "start_error" not in info:
                worker.info, worker.ready_at = info, self._clock()
                return faults.Success(info)
            failure = faults.StartFailure(str(info["start_error"]), str(info.get("hostname")))
        self.fatal = failure.describe(worker.name)
        self._retire(worker, self.fatal, level=logging.INFO)  # the caller reports it
        return faults.Failed(self.fatal)

    def _retire(self, worker: Worker, reason: str, level: int = logging.WARNING) -> None:
        """Removes ``worker`` for good, without a replacement."""
        worker.lost = reason
        if not worker.released:
            self.last_error = reason
        log.log(level, "worker %s lost: %s", worker.name, reason)
        with contextlib.suppress(Exception):  # already gone is fine
            ray.kill(worker.handle, no_restart=True)
        handle = worker.tpu_slice
        if handle is not None and all(w.lost for w in self.workers if w.tpu_slice is handle):
            with contextlib.suppress(Exception):  # its last worker: the slice can go
                handle.shutdown()

    def note_placements(self) -> None:
        """Records which starting workers Ray has placed (at most every ``faults.CLUSTER_POLL_S``)."""
        now = self._clock()
        if now - self._placements_checked < faults.CLUSTER_POLL_S:
            return
        self._placements_checked = now
        for w in self.starting().values():
            if w.placed_at is None and self._placed(w):
                w.placed_at = now

    def expire_starting(self) -> list[Worker]:
        """Starts the workers of newly reserved slices; drops placed workers that have not
        become ready within the start timeout."""
        self._adopt_slices()
        self.note_placements()
        now, expired = self._clock(), []
        for w in list(self.starting().values()):
            if w.placed_at is not None and now - w.placed_at > self.start_timeout_s:
                expired.append(w)
                self.lose(w, f"not ready {self.start_timeout_s:.0f}s after Ray placed it "
                             "(loading hangs)")
        return expired

    @property
    def in_service(self) -> list[Worker]:
        """Ready workers."""
        return [w for w in self.workers if w.ready]

    @property
    def live(self) -> list[Worker]:
        """Workers ready or starting."""
        return [w for w in self.workers if w.lost is None]

    @property
    def waiting_for_room(self) -> list[Worker]:
        """Starting workers Ray has not placed yet (demand for the autoscaler)."""
        return [w for w in self.starting().values() if w.placed_at is None]

    @property
    def exhausted(self) -> bool:
        """No worker is ready or starting, and none will be started."""
        return not any(w.lost is None for w in self.workers) and not self.pending_slots
