"""Joining or starting a Ray cluster, and the environment workers must share with the driver."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ray

from griffin_batch.cluster import faults, hardware

# Storage and compilation-cache settings a worker needs to see the same files
# as the driver: cloud-storage endpoints, fsspec defaults
# (``FSSPEC_GCS_TOKEN=anon``) and JAX's persistent compilation cache.
FORWARDED_ENV_NAMES = (
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "JAX_COMPILATION_CACHE_DIR",
)
FORWARDED_ENV_PREFIXES = ("GCSFS_", "FSSPEC_", "AWS_", "JAX_PERSISTENT_CACHE_")

# Words that mark a setting as a credential: in its name (AWS_SECRET_ACCESS_KEY),
# or in an fsspec option set as JSON (FSSPEC_S3='{"key": ..., "secret": ...}').
_CREDENTIAL_WORDS = re.compile(r"key|secret|token|password|passwd|credential",
                               re.IGNORECASE)
# Values of gcsfs's ``token`` option that name a way to authenticate, not a secret.
_TOKEN_MODES = {"anon", "google_default", "cache", "cloud", "browser", "none"}


def is_credential(name: str, value: str) -> bool:
    """Whether an environment setting carries a secret (or points at one)."""
    if name == "GOOGLE_APPLICATION_CREDENTIALS":
        return True
    if _CREDENTIAL_WORDS.search(name):
        return value.strip().lower() not in _TOKEN_MODES
    if name.startswith(("FSSPEC_", "GCSFS_")):
        try:
            options = json.loads(value)
        except ValueError:
            return False
        return isinstance(options, dict) and _has_credential_key(options)
    return False


def _has_credential_key(options: Mapping[str, Any]) -> bool:
    return any(
        (_CREDENTIAL_WORDS.search(str(k)) and str(v).strip().lower() not in _TOKEN_MODES)
        or (isinstance(v, Mapping) and _has_credential_key(v))
        for k, v in options.items())


def forwarded_env(environ: Mapping[str, str] | None = None, *,
                  credentials: bool = False) -> dict[str, str]:
    """The subset of ``environ`` (default: this process's) that workers inherit.

    Ray only passes a driver's environment to workers of a cluster it starts
    itself; on a cluster it joins, these travel as ``runtime_env`` env_vars,
    which Ray stores in its GCS and shows in its dashboard. So credentials
    (``is_credential``) stay behind unless ``credentials``: workers use their
    node's own (metadata server, workload identity, instance roles).
    """
    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in environ.items()
        if (k in FORWARDED_ENV_NAMES or k.startswith(FORWARDED_ENV_PREFIXES))
        and (credentials or not is_credential(k, v))
    }


def withheld_credentials(environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of the credential settings ``forwarded_env`` keeps from workers by default."""
    environ = os.environ if environ is None else environ
    every = forwarded_env(environ, credentials=True)
    return sorted(set(every) - set(forwarded_env(environ)))


@dataclasses.dataclass(frozen=True)
class Connection:
    """How this process reached Ray.

    Attributes:
      address: GCS address of the cluster.
      started_local: Whether this call started a local single-node cluster.
      owned: Whether ``disconnect`` should shut the connection down (False when
        Ray was already initialised by the caller, e.g. a test fixture).
    """

    address: str
    started_local: bool
    owned: bool

    def describe(self) -> str:
        """One line: which cluster, how reached, how many nodes, whether it asks for a token."""
        how = "started a local Ray cluster" if self.started_local else "joined the Ray cluster"
        return (f"{how} at {self.address} ({_alive_nodes()} node(s), Ray {ray.__version__}, "
                f"token authentication {'on' if _token_auth() else 'OFF'})")


def _alive_nodes() -> int:
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001 - a description is advisory
        return 0


def _token_auth() -> bool:
    """Whether this Ray connection uses token authentication (Ray's default since 2.5x)."""
    from ray._private.authentication import authentication_utils

    return authentication_utils.is_token_auth_enabled()


def connect(address: str | None = None, on_stuck: Callable[[str], None] | None = None
            ) -> Connection:
    """Joins the cluster at ``address``; by default joins a reachable one or starts a local one.

    Args:
      address: ``host:port`` or ``ray://...`` of a cluster, ``"auto"`` to require
        a running one, ``"local"`` to always start a fresh local cluster, or
        None: use ``RAY_ADDRESS`` (set by ``ray job submit``), else the cluster
        ``ray start`` left on this machine if it answers, else start a local one.
      on_stuck: Called once, on a timer thread, with one line naming the cluster when
        joining it has not finished within ``faults.cluster_lost_timing``'s timeout and
        grace. A cluster that accepts connections but not this process (one that asks
        for a token this machine does not have) keeps ``ray.init`` retrying forever,
        printing Ray's C++ errors; nothing can interrupt it, so ``on_stuck`` may end
        the process. None: wait as long as Ray does.

    Returns:
      The connection.
    """
    if ray.is_initialized():
        return Connection(_gcs_address(), started_local=False, owned=False)
    # Workers' output stays in Ray's log files (``log_dir()``): a worker that
    # fails prints pages of Python and C++ stack traces, and the driver reports
    # what went wrong in one line instead. Ray's INFO chatter is dropped too.
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address is None and os.environ.get("RAY_ADDRESS"):
        with _deadline(f"the Ray cluster at {os.environ['RAY_ADDRESS']} (RAY_ADDRESS)", on_stuck):
            ray.init(**kwargs)  # inside a submitted job: Ray also applies the job's runtime env
        return Connection(_gcs_address(), started_local=False, owned=True)
    if address is None:
        started = _started_cluster_address()
        if started is None:
            address = "local"
        else:
            address, where = started, f"the Ray cluster `ray start` left at {started}"
    else:
        where = f"the Ray cluster at {address}"
    if address == "local":
        ray.init(address="local", include_dashboard=False, **kwargs)
        return Connection(_gcs_address(), started_local=True, owned=True)
    check_reachable(address)
    with _deadline(where, on_stuck):
        ray.init(address=address, **kwargs)
    return Connection(_gcs_address(), started_local=False, owned=True)


@contextlib.contextmanager
def _deadline(where: str, on_stuck: Callable[[str], None] | None) -> Iterator[None]:
    """Calls ``on_stuck`` (see ``connect``) if the block has not ended in time."""
    if on_stuck is None:
        yield
        return
    timeout_s, grace_s = faults.cluster_lost_timing()
    limit_s = timeout_s + grace_s
    timer = threading.Timer(limit_s, on_stuck, [
        f"could not join {where} within {limit_s:.0f} s (a cluster that asks for a token "
        f"this machine does not have keeps Ray retrying; Ray's own errors are above); pass "
        f"--address local to run on a cluster of the job's own"])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_reachable(address: str, timeout_s: float = faults.CONNECT_TIMEOUT_S) -> None:
    """Fails fast, naming the address, when nothing listens at a ``host:port`` address.

    ``ray.init`` would otherwise retry for minutes. Other address forms
    (``ray://``, ``auto``) are left to Ray.

    Raises:
      ConnectionError: Nothing answers at ``address``.
    """
    host_port = _host_port(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address}: {e}") from None


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` address; None for other forms."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def answers(address: str, timeout_s: float) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` within ``timeout_s``."""
    host_port = _host_port(address)
    if host_port is None:
        raise ValueError(f"not a host:port address: {address!r}")
    try:
        socket.create_connection(host_port, timeout=timeout_s).close()
    except OSError:
        return False
    return True


class ClusterWatch:
    """Tells, from a daemon thread, when a Ray cluster stops answering.

    Ray does not tell a driver that its cluster is gone: calls to actors on dead
    nodes fail one by one like preemptions, and a call that needs the GCS (such as
    creating a named actor, which replacing a lost worker does) blocks until Ray's
    own reconnect timeout, when Ray ends the process with exit status 1 and no word
    of ours (``faults.RAY_GCS_RECONNECT_TIMEOUT_S``). So the watch tries a TCP
    connection to each endpoint every ``interval_s``; one that accepts none for
    ``timeout_s`` makes the cluster lost (``lost``). A process that is alive but
    stopped still accepts connections: that is the stall watchdog's case.

    Args:
      endpoints: Name -> ``host:port`` of what to probe (the GCS; this machine's raylet).
      timeout_s: How long an endpoint may go unanswered.
      grace_s: Once lost, how long the caller has to ``stop`` the watch (having
        seen ``lost``) before ``on_stuck`` runs.
      on_stuck: Called once, on the watch's thread, with ``lost`` when the caller did
        not stop the watch in time: its thread is waiting inside Ray for the lost
        GCS. It may end the process; ``stop`` waits for it to return.
      interval_s: Between probes; also the time one probe may take.
      probe: ``probe(address, timeout_s)``: whether the endpoint answers.
    """

    def __init__(
        self,
        endpoints: Mapping[str, str],
        *,
        timeout_s: float = faults.CLUSTER_LOST_TIMEOUT_S,
        grace_s: float = faults.CLUSTER_LOST_GRACE_S,
        on_stuck: Callable[[str], None] | None = None,
        interval_s: float = faults.CLUSTER_PROBE_INTERVAL_S,
        probe: Callable[[str, float], bool] = answers,
    ):
        self.endpoints = dict(endpoints)
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.interval_s = interval_s
        self._on_stuck = on_stuck
        self._probe = probe
        self._lost: str | None = None
        self._stopping = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()  # held while on_stuck runs
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)

    def start(self) -> ClusterWatch:
        """Starts probing; returns self."""
        if self.endpoints:
            self._thread.start()
        return self

    @property
    def lost(self) -> str | None:
        """Why the cluster counts as lost (one line naming the endpoint), or None."""
        return self._lost

    def stop(self) -> None:
        """Ends the watch; after this ``on_stuck`` does not run (waits for it if it is running)."""
        self._stopping.set()
        with self._lock:
            self._stopped = True

    def _run(self) -> None:
        since = {name: time.monotonic() for name in self.endpoints}  # last answer
        while self._lost is None and not self._stopping.wait(self.interval_s):
            for name, address in self.endpoints.items():
                now = time.monotonic()
                if self._probe(address, self.interval_s):
                    since[name] = now
                elif now - since[name] >= self.timeout_s:
                    self._lost = (
                        f"{name} at {address} stopped answering "
                        f"(no connection for {now - since[name]:.0f} s)"
                    )
                    break
        if self._lost is None or self._stopping.wait(self.grace_s):
            return
        with self._lock:
            if not self._stopped and self._on_stuck is not None:
                self._on_stuck(self._lost)


def watch(connection: Connection, on_stuck: Callable[[str], None] | None = None) -> ClusterWatch:
    """A started ``ClusterWatch`` of ``connection``'s GCS and of this machine's raylet.

    Its timeouts stay inside Ray's own (``faults.cluster_lost_timing``).
    """
    endpoints = {}
    if _host_port(connection.address) is not None:
        endpoints["the Ray cluster"] = connection.address
    raylet = _local_raylet_address()
    if raylet is not None:
        endpoints["the Ray node on this machine"] = raylet
    timeout_s, grace_s = faults.cluster_lost_timing()
    return ClusterWatch(endpoints, timeout_s=timeout_s, grace_s=grace_s, on_stuck=on_stuck).start()


def _local_raylet_address() -> str | None:
    """``host:port`` of the raylet this process is connected to, if Ray says."""
    try:
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and node.get("Alive"):
                return f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    except Exception:  # noqa: BLE001 - the GCS probe alone is a fine watch
        return None
    return None


def _started_cluster_address() -> str | None:
    """The address ``ray start`` recorded on this machine, if that cluster still answers."""
    try:
        from ray._private.services import find_bootstrap_address

        address = find_bootstrap_address(None)
        if address:
            check_reachable(address)
        return address
    except (ConnectionError, ImportError, OSError, ValueError):
        return None


def _gcs_address() -> str:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only used in messages
        return "unknown"


def log_dir() -> str:
    """Where Ray keeps this session's logs (workers' stdout and stderr among them)."""
    try:
        from ray._private import worker as ray_worker

        return ray_worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private API; the default location is a fine answer
        return "/tmp/ray/session_latest/logs"


class _Held:
    """State of ``held_open``: how deep, and whether a connection it kept open is owned."""

    depth = 0
    owned = False


@contextlib.contextmanager
def held_open() -> Iterator[None]:
    """Keeps the cluster one driver run joined or started open for the next ones inside.

    A job in stages (``summarize --mode map-reduce``) runs the driver once per stage:
    without this, each run would start (and stop) a local Ray cluster of its own.
    Inside, ``disconnect`` leaves an owned connection open, the next ``connect``
    finds Ray initialised and joins it, and leaving shuts down what was kept.
    """
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if _Held.depth == 0 and _Held.owned:
            _Held.owned = False
            if ray.is_initialized():
                ray.shutdown()


def disconnect(connection: Connection) -> None:
    """Shuts down Ray if ``connect`` opened the connection (at the end of ``held_open``)."""
    if connection.owned and ray.is_initialized():
        if _Held.depth:
            _Held.owned = True
            return
        ray.shutdown()


def nodes() -> list[hardware.Node]:
    """The cluster's live nodes."""
    return hardware.live_nodes(ray.nodes())


def tpu_slices() -> dict[str, str]:
    """The multi-host TPU slice of each node that belongs to one, dead nodes included.

    Read with Ray's TPU utilities (the ``ray.io/tpu-slice-name`` label Ray puts
    on every host of a multi-host slice).
    """
    from ray.util import tpu

    return {n["NodeID"]: name for n in ray.nodes()
            if (name := tpu.get_tpu_slice_name_from_node(n))}


def draining_nodes() -> set[str]:
    """Ids (hex) of the nodes Ray is draining: a preemption notice, ``ray drain-node``,
    or a ``ray start --block`` that received SIGTERM (a Kubernetes pod deletion).

    Empty when Ray cannot say. The query is Ray's internal state API, the one
    Ray Train and Ray Data use for the same purpose.
    """
    try:
        from ray._private import state

        return set(state.state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - a private API: no answer means no drain seen
        return set()


def actor_placed(handle: Any) -> bool:
    """Whether Ray has placed the actor on a node (its address is known), from the GCS.

    An actor waiting for a node with room has no address yet; one being
    constructed has. Unknown (the GCS did not say) counts as placed, so a start
    timeout still applies.
    """
    try:
        info = ray._private.state.actors(handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - a state read is advisory
        return True
    return bool(((info or {}).get("Address") or {}).get("IPAddress"))
