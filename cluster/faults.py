"""Named outcomes of remote work, the one function that classifies Ray errors, retry budgets.

Every remote call the driver makes ends in one of three outcomes:

* ``Success``: the value came back.
* ``Preempted``: the worker is gone or unusable (process killed, node lost,
  device dead). The work itself is fine: run it elsewhere and replace the
  worker. Budgeted separately because preemptible fleets lose hosts often.
* ``Failed``: the work raised on a healthy worker (e.g. an input file changed
  under it). Retrying helps only for transient causes, so its budget is small.

Every timeout the cluster code uses is a named constant here.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Hashable, Mapping
from typing import Any

import ray
import ray.exceptions as rex

# Timeouts and intervals (seconds). ---------------------------------------
WORKER_START_TIMEOUT_S = 1800.0
"""A worker must load its checkpoint and become ready within this once Ray has
placed it on a node (large checkpoints from cloud storage onto a TPU host take
minutes). Time spent waiting for a node does not count: that is demand for the
autoscaler, bounded by ``DEFAULT_WAIT_FOR_WORKERS_S``."""

DEFAULT_WAIT_FOR_WORKERS_S = 900.0
"""How long a job waits for its minimum of ready workers: room for an autoscaler
to create TPU VMs (several minutes each) and for the workers to load."""

CLUSTER_POLL_S = 2.0
"""How often the driver reads the live nodes (room for more workers) and which
of its starting workers Ray has placed."""

POLL_INTERVAL_S = 0.5
"""How long the driver waits for any result before refreshing progress."""

KILL_GRACE_S = 5.0
"""How long shutdown waits for killed workers to go away."""

HEARTBEAT_INTERVAL_S = 2.0
"""How often the driver asks a worker that holds shards whether its engine advanced."""

DEFAULT_STALL_TIMEOUT_S = 600.0
"""A worker that holds shards and whose engine does not advance for this long is
hung (a stopped process, a wedged device) and is replaced. Generous: the first
compile of a large model on a TPU host can take minutes."""

DRAIN_GRACE_S = 25.0
"""A worker sent SIGTERM writes its shards' checkpoints within this, then exits
(GCE gives a preempted VM 30 s, Kubernetes a pod 30 s by default)."""

CONNECT_TIMEOUT_S = 10.0
"""How long the driver waits for a Ray cluster's address to accept a connection."""

RAY_GCS_RECONNECT_TIMEOUT_S = 60.0
"""Ray's default ``gcs_rpc_server_reconnect_timeout_s`` (``RAY_GCS_RECONNECT_ENV``
sets it): once a GCS call has waited this long for an unreachable GCS, Ray's core
worker ends the process with ``std::_Exit(1)``, leaving one line in Ray's log format
(``src/ray/gcs_rpc_client/rpc_client.h``). A driver's calls that need the GCS, such
as creating a named actor, block until then."""

RAY_GCS_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"

CLUSTER_LOST_TIMEOUT_S = 30.0
"""The driver gives up on a cluster whose GCS (or whose raylet on the driver's
machine) has accepted no connection for this long: half of Ray's reconnect
timeout, so that the job's own message, summary and exit status come first."""

CLUSTER_LOST_GRACE_S = 10.0
"""Once the cluster is lost, how long the driver's loop has to stop by itself
before the job is ended from the watching thread (the loop cannot stop while a
Ray call waits for the GCS)."""

CLUSTER_PROBE_INTERVAL_S = 1.0
"""How often the driver tries a connection to the GCS and its raylet; also how
long one try may take."""

# Retry budgets (attempts beyond the first). -----------------------------
DEFAULT_MAX_PREEMPTIONS = 6
DEFAULT_MAX_FAILURES = 2


def cluster_lost_timing(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """``(timeout_s, grace_s)`` of the driver's cluster watch, inside Ray's own GCS timeout.

    Both are ``CLUSTER_LOST_TIMEOUT_S`` and ``CLUSTER_LOST_GRACE_S``, shrunk in proportion
    where ``RAY_GCS_RECONNECT_ENV`` in ``environ`` (default: this process's) sets Ray's
    reconnect timeout below its default, so that Ray cannot end the driver first. A
    longer Ray timeout leaves them as they are.
    """
    environ = os.environ if environ is None else environ
    try:
        ray_s = float(environ.get(RAY_GCS_RECONNECT_ENV, RAY_GCS_RECONNECT_TIMEOUT_S))
    except ValueError:
        ray_s = RAY_GCS_RECONNECT_TIMEOUT_S
    scale = min(1.0, max(ray_s, 1.0) / RAY_GCS_RECONNECT_TIMEOUT_S)
    return CLUSTER_LOST_TIMEOUT_S * scale, CLUSTER_LOST_GRACE_S * scale


class WorkerLost(RuntimeError):
    """Raised by a worker whose host can no longer serve (e.g. a dead device).

    The driver treats it like a killed process: the work is re-queued without
    charging the failure budget, and the worker is replaced.
    """


@dataclasses.dataclass(frozen=True)
class Success:
    """The call returned ``value``."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Preempted:
    """The worker died or cannot serve; ``message`` says how."""

    message: str


@dataclasses.dataclass(frozen=True)
class Failed:
    """The work raised on a live worker; ``message`` is the error."""

    message: str


Outcome = Success | Preempted | Failed


@dataclasses.dataclass(frozen=True)
class StartFailure:
    """A worker could not start, for a reason no retry fixes.

    Attributes:
      cause: One line naming the cause (exception type and message).
      host: Where the worker ran (hostname or node address; "unknown" if Ray
        did not say).
    """

    cause: str
    host: str

    def describe(self, worker: str) -> str:
        return f"worker {worker} on {self.host} could not start: {self.cause}"


# Exceptions raised while loading (imports, checkpoint, tokenizer) that repeat
# on every attempt. ConnectionError and TimeoutError are OSErrors too but are
# left out: a flaky store is worth another worker.
_PERMANENT_START_ERRORS: tuple[type[BaseException], ...] = (
    ImportError,  # a package missing on the worker's host
    MemoryError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,  # unreadable checkpoint or tokenizer (CheckpointError is one)
    KeyError,
    TypeError,
)


def is_permanent_start_error(error: BaseException) -> bool:
    """Whether ``error``, raised while a worker loads, would recur on any retry."""
    return isinstance(error, _PERMANENT_START_ERRORS) and not isinstance(
        error, ConnectionError | TimeoutError
    )


# How Ray names the node in its errors: "ip=10.0.0.3" (actor errors) or
# "(IP: 10.0.0.3, ID: ...)" (memory monitor).
_RAY_NODE_IP = re.compile(r"\b(?:ip=|IP: )([0-9a-fA-F.:]*[0-9a-fA-F])")


def start_failure(error: BaseException) -> StartFailure | None:
    """The permanent start failure behind a Ray error from a starting worker, if it is one.

    Two Ray-level causes repeat on every attempt: Ray's memory monitor killing
    the worker while it loads (the model does not fit the host), and the actor's
    constructor raising before the worker's own guard runs (the worker's module
    cannot be imported: ``griffin-batch`` is not installed on that host). A
    worker process that just vanished is a preemption, not this.
    """
    host_match = _RAY_NODE_IP.search(_ANSI.sub("", str(error)))
    host = host_match.group(1) if host_match else "unknown"
    if isinstance(error, rex.OutOfMemoryError):
        return StartFailure(f"ran out of memory while loading: {describe(error)}", host)
    if isinstance(error, rex.ActorDiedError) and getattr(error, "_actor_init_failed", False):
        return StartFailure(describe(error), host)
    return None

# Errors that mean "the process or node running the call is gone".
_PREEMPTION_ERRORS: tuple[type[BaseException], ...] = (
    rex.RayActorError,  # ActorDiedError, ActorUnavailableError
    rex.WorkerCrashedError,
    rex.NodeDiedError,
    rex.LocalRayletDiedError,
    rex.OwnerDiedError,
    rex.ObjectLostError,
    rex.OutOfMemoryError,  # Ray's memory monitor killed the worker
    WorkerLost,
)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe(error: BaseException) -> str:
    """One line naming what went wrong, with the remote cause where Ray carries one."""
    text = _ANSI.sub("", str(error)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    # A remote traceback (task error, failed actor constructor) ends with its cause.
    if len(lines) > 1 and (
        isinstance(error, rex.RayTaskError) or getattr(error, "_actor_init_failed", False)
    ):
        return lines[-1][:500]
    return f"{type(error).__name__}: {lines[0]}"[:500]


def classify(error: BaseException) -> Preempted | Failed:
    """Names the outcome of a remote call that raised ``error``.

    Ray re-raises an application exception as a ``RayTaskError`` that is also
    an instance of the original class, so ``WorkerLost`` raised inside an actor
    is recognised here.
    """
    if isinstance(error, _PREEMPTION_ERRORS):
        return Preempted(describe(error))
    return Failed(describe(error))


def resolve(ref: ray.ObjectRef) -> Outcome:
    """Waits for ``ref`` (already known to be ready) and names its outcome."""
    try:
        return Success(ray.get(ref))
    except Exception as error:  # noqa: BLE001 - every remote error becomes an outcome
        return classify(error)


class RetryBudget:
    """Separate per-key budgets for preemptions and for failures.

    Args:
      max_preemptions: Re-runs allowed after ``Preempted`` outcomes, per key.
      max_failures: Re-runs allowed after ``Failed`` outcomes, per key.
    """

    def __init__(
        self,
        max_preemptions: int = DEFAULT_MAX_PREEMPTIONS,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ):
        if max_preemptions < 0 or max_failures < 0:
            raise ValueError("retry budgets must be >= 0")
        self.max_preemptions = max_preemptions
        self.max_failures = max_failures
        self._preempted: collections.Counter = collections.Counter()
        self._failed: collections.Counter = collections.Counter()

    def charge(self, key: Hashable, outcome: Preempted | Failed) -> bool:
        """Records ``outcome`` for ``key``; returns whether another attempt is allowed."""
        if isinstance(outcome, Preempted):
            self._preempted[key] += 1
            return self._preempted[key] <= self.max_preemptions
        self._failed[key] += 1
        return self._failed[key] <= self.max_failures

    def attempts(self, key: Hashable) -> int:
        """Attempts made so far for ``key`` that did not succeed."""
        return self._preempted[key] + self._failed[key]

    @property
    def totals(self) -> dict[str, int]:
        """Retries charged over all keys, by outcome."""
        return {"preempted": sum(self._preempted.values()), "failed": sum(self._failed.values())}
