"""Joining or starting a Ray cluster, and the environment workers must share with the driver."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Mapping

import ray

from griffin_batch.cluster import faults, hardware

# Storage and compilation-cache settings a worker needs to see the same files
# as the driver: cloud-storage endpoints and credentials, fsspec defaults
# (``FSSPEC_GCS_TOKEN=anon``) and JAX's persistent compilation cache.
FORWARDED_ENV_NAMES = (
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "JAX_COMPILATION_CACHE_DIR",
)
FORWARDED_ENV_PREFIXES = ("GCSFS_", "FSSPEC_", "AWS_", "JAX_PERSISTENT_CACHE_")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subset of ``environ`` (default: this process's) that workers inherit.

    Ray only passes a driver's environment to workers of a cluster it starts
    itself; on a cluster it joins, these travel as ``runtime_env`` env_vars.
    """
    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in environ.items()
        if k in FORWARDED_ENV_NAMES or k.startswith(FORWARDED_ENV_PREFIXES)
    }


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
        how = "started a local Ray cluster" if self.started_local else "joined Ray cluster"
        return f"{how} at {self.address}"


def connect(address: str | None = None) -> Connection:
    """Joins the cluster at ``address``; by default joins a reachable one or starts a local one.

    Args:
      address: ``host:port`` or ``ray://...`` of a cluster, ``"auto"`` to require
        a running one, ``"local"`` to always start a fresh local cluster, or
        None: use ``RAY_ADDRESS`` (set by ``ray job submit``), else the cluster
        ``ray start`` left on this machine if it answers, else start a local one.

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
        ray.init(**kwargs)  # inside a submitted job: Ray also applies the job's runtime env
        return Connection(_gcs_address(), started_local=False, owned=True)
    if address is None:
        address = _started_cluster_address() or "local"
    if address == "local":
        ray.init(address="local", include_dashboard=False, **kwargs)
        return Connection(_gcs_address(), started_local=True, owned=True)
    check_reachable(address)
    ray.init(address=address, **kwargs)
    return Connection(_gcs_address(), started_local=False, owned=True)


def check_reachable(address: str, timeout_s: float = faults.CONNECT_TIMEOUT_S) -> None:
    """Fails fast, naming the address, when nothing listens at a ``host:port`` address.

    ``ray.init`` would otherwise retry for minutes. Other address forms
    (``ray://``, ``auto``) are left to Ray.

    Raises:
      ConnectionError: Nothing answers at ``address``.
    """
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address}: {e}") from None


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


def disconnect(connection: Connection) -> None:
    """Shuts down Ray if ``connect`` opened the connection."""
    if connection.owned and ray.is_initialized():
        ray.shutdown()


def nodes() -> list[hardware.Node]:
    """The cluster's live nodes."""
    return hardware.live_nodes(ray.nodes())
