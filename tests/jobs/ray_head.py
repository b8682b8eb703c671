"""A Ray head of a test's own, beside the session's cluster: own ports, token, temp dir, session.

``ray start --head --block`` runs in a session of its own, so every process it
starts (its raylet, GCS, workers, and the nodes a fake autoscaler adds) can be
found and killed by session id. Ray's own ``AutoscalingCluster.start`` and
``shutdown`` run ``ray stop --force``, which would kill the session's shared
cluster too; this starts the same kind of head without touching anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

from griffin_batch.cluster import connect

BIN = pathlib.Path(sys.executable).parent
START_TIMEOUT_S = 120.0


@contextlib.contextmanager
def private_head(
    *, num_cpus: int = 2, port: int | None = None, dashboard_port: int | None = None,
    extra_args: Sequence[str] = (), extra_env: Mapping[str, str] = (),
) -> Iterator[tuple[str, dict[str, str], int]]:
    """Starts a head (on ``port``, default a free one; with a dashboard on ``dashboard_port``
    if given); yields (address, environment to reach it with, session id)."""
    # Short: Ray's socket paths live under it and must fit in 107 bytes.
    temp = tempfile.mkdtemp(prefix="gb-head-", dir="/tmp")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        **dict(extra_env),
    }
    env.pop("RAY_ADDRESS", None)
    port = port or free_port()
    # Ports of its own: the session's cluster holds the defaults.
    own_ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", *own_ports,
         *(["--include-dashboard=false"] if dashboard_port is None else
           ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]),
         f"--num-cpus={num_cpus}", f"--temp-dir={temp}",
         "--disable-usage-stats", *extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not connect.answers(address, 1.0):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, f"no Ray head at {address}"
            time.sleep(0.2)
        yield address, env, head.pid
    finally:
        kill_session(head.pid)
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def fake_autoscaler(port: int, worker_types: Mapping[str, Mapping], directory: pathlib.Path,
                    *, head_cpus: int = 2, idle_timeout_minutes: float = 0.05,
                    ) -> tuple[list[str], dict[str, str]]:
    """``ray start`` arguments and environment for a head on ``port`` whose autoscaler adds
    real raylet processes as nodes (Ray's fake multi-node provider).

    The config is what ``ray.cluster_utils.AutoscalingCluster`` generates, written
    here because that class reads an example file Ray 2.60's wheel does not ship,
    and starts and stops with ``ray stop --force``.
    """
    config = {
        "cluster_name": "fake_multinode",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in worker_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                 "max_workers": 0},
            **{name: {"node_config": {}, **dict(t)} for name, t in worker_types.items()},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }
    path = directory / "autoscaler.json"
    path.write_text(json.dumps(config))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    return [f"--autoscaling-config={path}"], env


def kill_session(sid: int) -> None:
    """SIGKILLs every process of session ``sid`` (Ray puts each worker in a group of its own)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:  # gone already
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(address: str, env: Mapping[str, str]) -> list[dict]:
    """The cluster's live nodes (id, resources), read by a process of its own.

    The test process is the session cluster's driver and cannot join another.
    """
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', "
            "log_to_driver=False); print('NODES', json.dumps([{'id': n['NodeID'], "
            "'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", code, address], env=dict(env),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("NODES ")]  # not Ray's
    return json.loads(line.removeprefix("NODES "))
