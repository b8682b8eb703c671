"""The driver's dispatch loop: pull-based shard scheduling with bounded retries.

Each ready worker holds at most ``max_in_flight`` shards; when one finishes,
the worker gets the next queued shard, so fast and slow hosts balance
themselves. Outcomes follow ``griffin_batch.cluster.faults``: a preempted shard goes back to
the front of the queue and its worker is replaced; a failed shard is retried
within its budget; a shard out of budget is reported and the rest go on. A
worker that holds shards but whose heartbeat stops rising (or that stops
answering) for ``stall_timeout_s`` is hung: it is killed, which turns its
shards into preemptions, and replaced. A
worker that cannot start for good (``pool.WorkerPool.fatal``) stops the loop
at once: every shard not yet committed is reported with that cause. So does a
cluster that stops answering (``cluster_lost``): nothing can run on it.

With a ``scaling.ScalingPolicy`` the pool is elastic: no shard is sent until
``min_workers`` are ready (the job fails if they are not within
``wait_for_workers_s``); while shards wait, the pool asks for a worker per
waiting shard up to the policy's bound (Ray places each as a node with room
joins: the autoscaler's cue); a ready worker with nothing left to do is released
at once, so its node can scale down while the others finish.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import ray

from griffin_batch.actors import shards
from griffin_batch.cluster import faults, pool, scaling

log = logging.getLogger(__name__)

Submit = Callable[[pool.Worker, shards.ShardSpec, int], ray.ObjectRef]
Heartbeat = Callable[[pool.Worker], ray.ObjectRef]
OnCommit = Callable[[shards.ShardResult], None]


@dataclasses.dataclass
class WorkerStats:
    """What one worker did in this run."""

    shards: int = 0
    rows: int = 0
    samples: int = 0
    completion_tokens: int = 0
    first_dispatch: float | None = None
    last_result: float | None = None

    def busy_s(self) -> float:
        if self.first_dispatch is None or self.last_result is None:
            return 0.0
        return self.last_result - self.first_dispatch


@dataclasses.dataclass
class Report:
    """The loop's outcome.

    Attributes:
      failed: Shards out of retries, with their last error.
      stats: Per worker name.
      retries: Retries charged, by outcome.
      fatal: Why the loop stopped early (a worker that cannot start, the cluster
        lost), or None.
      cluster_lost: The loop stopped because the cluster stopped answering.
      timeline: The pool's size over time: one entry per change, with seconds
        since the loop started and its ``ready``, ``starting`` and
        ``waiting_for_room`` (not placed yet) workers.
      cancelled: Why the run was cancelled (``Scheduler.cancel``), or None.
    """

    failed: dict[str, str]
    stats: dict[str, WorkerStats]
    retries: dict[str, int]
    fatal: str | None = None
    cluster_lost: bool = False
    timeline: list[dict[str, float]] = dataclasses.field(default_factory=list)
    cancelled: str | None = None


@dataclasses.dataclass
class _Watch:
    """What the stall watchdog knows of one busy worker."""

    since: float  # when its heartbeat last rose (or it became busy)
    value: int | None = None  # the last heartbeat
    probe: ray.ObjectRef | None = None  # a heartbeat call not yet answered
    sent: float = float("-inf")  # when that call was made


@dataclasses.dataclass
class _Attempt:
    shard: shards.ShardSpec
    worker: pool.Worker
    number: int


class Scheduler:
    """Runs shards on a worker pool until each is committed or out of retries.

    Args:
      workers: The pool (started by the caller).
      submit: Starts one shard attempt on a worker; returns its result reference.
      on_commit: Records a successful result (called on the driver, in order of arrival).
      budget: Retry budgets per shard.
      max_in_flight: Shards queued per worker.
      on_tick: Called every loop iteration (progress display).
      heartbeat: Asks a worker for its progress counter (None: no stall watch).
      stall_timeout_s: How long a busy worker's counter may stay still.
      cluster_lost: Why the cluster counts as lost, or None (``connect.ClusterWatch.lost``).
      draining_nodes: Ids of the nodes Ray is draining (a preemption notice,
        ``ray drain-node``, a SIGTERM'd ``ray start --block``); None: not watched.
      drain: Tells a worker to checkpoint its shards and stop (``GenerationWorker.drain``).
      elastic: Bounds of an elastic pool; None keeps the pool at its size.
      capacity: Workers the live nodes can hold now (asked at most every
        ``faults.CLUSTER_POLL_S``; for ``scaling``'s default bound).
      tpu_slices: The multi-host TPU slice of each node in one
        (``connect.tpu_slices``); None: hosts are lost one by one.
    """

    def __init__(
        self,
        workers: pool.WorkerPool,
        submit: Submit,
        on_commit: OnCommit,
        budget: faults.RetryBudget,
        *,
        max_in_flight: int = 2,
        on_tick: Callable[[], None] = lambda: None,
        heartbeat: Heartbeat | None = None,
        stall_timeout_s: float = faults.DEFAULT_STALL_TIMEOUT_S,
        cluster_lost: Callable[[], str | None] = lambda: None,
        draining_nodes: Callable[[], Collection[str]] | None = None,
        drain: Callable[[pool.Worker, str], ray.ObjectRef] | None = None,
        elastic: scaling.ScalingPolicy | None = None,
        capacity: Callable[[], int] = lambda: 0,
        tpu_slices: Callable[[], Mapping[str, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.workers = workers
        self._submit = submit
        self._on_commit = on_commit
        self.budget = budget
        self.max_in_flight = max_in_flight
        self._on_tick = on_tick
        self._clock = clock
        self._queue: collections.deque[shards.ShardSpec] = collections.deque()
        self._in_flight: dict[ray.ObjectRef, _Attempt] = {}
        self._attempts: collections.Counter = collections.Counter()
        self._failed: dict[str, str] = {}
        self._stats: dict[str, WorkerStats] = collections.defaultdict(WorkerStats)
        self._heartbeat = heartbeat
        self.stall_timeout_s = stall_timeout_s
        self._watch: dict[str, _Watch] = {}
        self._cluster_lost = cluster_lost
        self._lost: str | None = None
        self._draining_nodes = draining_nodes
        self._drain = drain
        self._drains_checked = float("-inf")
        self._told_to_drain: dict[str, ray.ObjectRef] = {}  # worker name -> its drain call
        self._scaling = elastic
        self._tpu_slices = tpu_slices
        self._capacity = capacity
        self._room = (float("-inf"), 0)  # (when read, workers the live nodes hold)
        self._started = clock()
        self._min_ready = elastic is None  # min_workers were ready once: dispatch may start
        self._min_needed = 1
        self.timeline: list[dict[str, float]] = []
        self._cancelled: str | None = None
        self.finished = False  # run has returned: its report is final

    def run(self, todo: Sequence[shards.ShardSpec]) -> Report:
        """Processes ``todo``; returns when every shard is committed or given up."""
        self._queue.extend(todo)
        if self._scaling is not None:
            self._min_needed = min(self._scaling.min_workers, len(todo))
        while self._queue or self._in_flight:
            self._dispatch()
            self._scale()
            self._record_pool()
            if self.workers.fatal is not None:
                self._give_up_all(self.workers.fatal)
                break
            waitable = [*self._in_flight, *self.workers.starting()]
            if not waitable and not self.workers.pending_slots:
                self._give_up_queued()
                break
            if not waitable:  # only slices being reserved: nothing to wait on in Ray yet
                time.sleep(faults.POLL_INTERVAL_S)
                ready = []
            else:
                ready, _ = ray.wait(
                    waitable, num_returns=1, timeout=faults.POLL_INTERVAL_S, fetch_local=False
                )
            if ready:  # collect everything else that is already done
                ready, _ = ray.wait(
                    waitable, num_returns=len(waitable), timeout=0, fetch_local=False
                )
            starting = self.workers.starting()
            for ref in ready:
                if ref in self._in_flight:
                    self._finish(ref)
                elif ref in starting:
                    self.workers.on_ready(starting[ref])
            if self.workers.fatal is not None:
                self._give_up_all(self.workers.fatal)
                break
            self._lost = self._cluster_lost()
            if self._lost is not None:
                self._give_up_all(self._lost)
                break
            self.workers.expire_starting()
            self._watch_drains()
            self._watch_stalls()
            self._on_tick()
        self.finished = True
        return self.report()

    def report(self) -> Report:
        """The outcome so far (``run`` returns it when it ends)."""
        return Report(
            failed=dict(self._failed),
            stats=dict(self._stats),
            retries=self.budget.totals,
            fatal=self.workers.fatal or self._lost,
            cluster_lost=self._lost is not None,
            timeline=list(self.timeline),
            cancelled=self._cancelled,
        )

    def _load(self) -> collections.Counter:
        return collections.Counter(a.worker.name for a in self._in_flight.values())

    def _dispatch(self) -> None:
        if not self._min_ready:
            if len(self.workers.in_service) < self._min_needed:
                return
            self._min_ready = True
        load = self._load()
        # Least-loaded first, one shard per worker per pass, so work spreads evenly.
        while self._queue:
            free = [w for w in self.workers.in_service
                    if load[w.name] < self.max_in_flight and w.name not in self._told_to_drain]
            if not free:
                return
            for worker in sorted(free, key=lambda w: load[w.name]):
                if not self._queue:
                    return
                shard = self._queue.popleft()
                number = self._attempts[shard.shard_id]
                self._attempts[shard.shard_id] += 1
                ref = self._submit(worker, shard, number)
                self._in_flight[ref] = _Attempt(shard, worker, number)
                load[worker.name] += 1
                stats = self._stats[worker.name]
                if stats.first_dispatch is None:
                    stats.first_dispatch = self._clock()

    def cancel(self, reason: str) -> None:
        """Ends the run early and resumably: queued shards stay unrun, and each busy worker
        checkpoints its shards and stops (a shard that commits first is kept)."""
        if self._cancelled is not None:
            return
        self._cancelled = reason
        log.warning("cancelling: %s", reason)
        self._queue.clear()
        busy = {a.worker.name: a.worker for a in self._in_flight.values()}
        for name, worker in busy.items():
            if name not in self._told_to_drain and self._drain is not None:
                self._told_to_drain[name] = self._drain(worker, reason)

    def _scale(self) -> None:
        """Sizes an elastic pool to the work left (see ``scaling.ScalingPolicy.target``)."""
        if self._scaling is None:
            return
        now = self._clock()
        if not self._min_ready and now - self._started > self._scaling.wait_for_workers_s:
            self.workers.fatal = (
                f"{len(self.workers.in_service)} of the {self._min_needed} worker(s) that must "
                f"be ready (--min-workers) were after {self._scaling.wait_for_workers_s:.0f}s "
                f"(--wait-for-workers); the cluster has room for {self._room[1]}, and no "
                "autoscaler added more")
            return
        if now - self._room[0] >= faults.CLUSTER_POLL_S:
            self._room = (now, self._capacity())
        busy = {a.worker.name for a in self._in_flight.values()}
        if not self._queue:  # nothing more for idle workers: let their nodes go
            for w in self.workers.live:
                if w.name not in busy and w.name not in self._told_to_drain:
                    self.workers.release(w, "no work left for it")
            self.workers.drop_pending()
            return
        want = self._scaling.target(capacity=self._room[1], busy=len(busy),
                                    queued=len(self._queue))
        if not self._min_ready:
            want = max(want, self._min_needed)
        if want > len(self.workers.live) + self.workers.pending_slots:
            self.workers.resize(want)

    def _record_pool(self) -> None:
        entry = {"ready": len(self.workers.in_service), "starting": len(self.workers.starting()),
                 "waiting_for_room": len(self.workers.waiting_for_room)
                 + self.workers.pending_slots}
        if not self.timeline or any(self.timeline[-1][k] != v for k, v in entry.items()):
            self.timeline.append({"t": round(self._clock() - self._started, 2), **entry})

    def _finish(self, ref: ray.ObjectRef) -> None:
        attempt = self._in_flight.pop(ref)
        outcome = faults.resolve(ref)
        if isinstance(outcome, faults.Success):
            result: shards.ShardResult = outcome.value
            self._on_commit(result)
            stats = self._stats[attempt.worker.name]
            stats.shards += 1
            stats.rows += result.rows
            stats.samples += result.samples
            stats.completion_tokens += result.completion_tokens
            stats.last_result = self._clock()
            return
        shard_id = attempt.shard.shard_id
        if self._cancelled is not None:  # stopped on purpose: --resume runs it again
            return
        log.warning(
            "shard %s attempt %d on %s: %s",
            shard_id,
            attempt.number,
            attempt.worker.name,
            outcome.message,
        )
        if isinstance(outcome, faults.Preempted):
            self.workers.lose(attempt.worker, outcome.message)
            self._drain_slice_of(attempt.worker)
        if self.budget.charge(shard_id, outcome):
            self._queue.appendleft(attempt.shard)  # first in line: it is the oldest work
        else:
            self._failed[shard_id] = (
                f"gave up after {self._attempts[shard_id]} attempts: {outcome.message}"
            )

    def _watch_drains(self) -> None:
        """Drains the workers on nodes Ray is draining, so their shards go on elsewhere.

        A busy worker is told to checkpoint its shards and stop (its calls then
        fail as preemptions and the shards resume from those checkpoints); an
        idle one is released at once. Either way the pool replaces it, and Ray
        places no new worker on a draining node.
        """
        now = self._clock()
        if self._draining_nodes is None or now - self._drains_checked < faults.HEARTBEAT_INTERVAL_S:
            return
        self._drains_checked = now
        draining = set(self._draining_nodes())
        if not draining:
            return
        busy = {a.worker.name for a in self._in_flight.values()}
        for worker in self.workers.in_service:
            node = (worker.info or {}).get("node_id")
            if node not in draining or worker.name in self._told_to_drain:
                continue
            self._stop(worker, f"node {node[:12]} is draining (preemption or scale-down)", busy)

    def _drain_slice_of(self, lost: pool.Worker) -> None:
        """A lost host of a multi-host TPU slice is the slice's loss: its other hosts are
        preempted with it (or were already), so their workers checkpoint and stop now."""
        node = (lost.info or {}).get("node_id")
        if node is None or self._tpu_slices is None:
            return
        slices = self._tpu_slices()
        name = slices.get(node)
        if name is None:
            return
        busy = {a.worker.name for a in self._in_flight.values()}
        for worker in self.workers.in_service:
            other = (worker.info or {}).get("node_id")
            if other == node or slices.get(other) != name or worker.name in self._told_to_drain:
                continue
            self._stop(worker, f"TPU slice {name} lost host {node[:12]}; its other hosts go "
                               "with it", busy)

    def _stop(self, worker: pool.Worker, reason: str, busy: Collection[str]) -> None:
        """A busy worker checkpoints its shards and stops (they resume elsewhere); an idle one
        goes at once. Either way the pool replaces it."""
        log.warning("worker %s: %s", worker.name, reason)
        if worker.name in busy and self._drain is not None:
            self._told_to_drain[worker.name] = self._drain(worker, reason)
        else:
            self.workers.lose(worker, reason)

    def _watch_stalls(self) -> None:
        """Probes busy workers' heartbeats; kills one that has not advanced in time."""
        if self._heartbeat is None:
            return
        now = self._clock()
        busy = {a.worker.name: a.worker for a in self._in_flight.values() if a.worker.lost is None}
        self._watch = {n: w for n, w in self._watch.items() if n in busy}  # idle time is free
        for name, worker in busy.items():
            watch = self._watch.setdefault(name, _Watch(since=now))
            if watch.probe is not None and ray.wait([watch.probe], timeout=0)[0]:
                outcome = faults.resolve(watch.probe)
                watch.probe = None
                # A dead worker's shards report it themselves; only a rise counts here.
                if isinstance(outcome, faults.Success) and outcome.value != watch.value:
                    watch.value, watch.since = outcome.value, now
            if watch.probe is None and now - watch.sent >= faults.HEARTBEAT_INTERVAL_S:
                watch.probe, watch.sent = self._heartbeat(worker), now
            if now - watch.since > self.stall_timeout_s:
                del self._watch[name]
                # Killing it fails its in-flight shards as preemptions (see _finish).
                self.workers.lose(
                    worker, f"hung: no progress for {self.stall_timeout_s:.0f}s (--stall-timeout)"
                )

    def _give_up_all(self, reason: str) -> None:
        """Reports every queued and in-flight shard as failed with ``reason``."""
        for attempt in self._in_flight.values():
            self._failed[attempt.shard.shard_id] = reason
        self._in_flight.clear()
        for shard in self._queue:
            self._failed[shard.shard_id] = reason
        self._queue.clear()

    def _give_up_queued(self) -> None:
        reason = self.workers.last_error or "no worker could start"
        for shard in self._queue:
            self._failed[shard.shard_id] = f"no workers left: {reason}"
        self._queue.clear()
