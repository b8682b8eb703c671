"""Shared fixtures: a local Ray cluster, GCS and S3 protocol servers, the demo model, Parquet inputs.

Ray and the storage servers start once per session (each costs seconds); the
servers listen on a free loopback port only. Worker processes share a JAX
compilation cache so that only the first one of the session pays for
compiling the engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

STARTUP_TIMEOUT_S = 60.0
RAY_NUM_CPUS = 4  # logical: two or three CPU workers plus replacements on a 2-core machine


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def session_env() -> Iterator[pytest.MonkeyPatch]:
    """Environment changes that last the session and are undone after it."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory, session_env) -> str:
    """A JAX compilation cache that every worker process started from this session uses."""
    import jax

    path = str(tmp_path_factory.mktemp("jax-cache"))
    settings = {
        "jax_compilation_cache_dir": path,
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
    }
    for name, value in settings.items():
        session_env.setenv(name.upper(), str(value))  # worker processes
        jax.config.update(name, value)  # this process (in-process workers)
    return path


@pytest.fixture(scope="session")
def ray_address(jax_cache) -> Iterator[str]:
    """A single-node local Ray cluster shared by the session; yields its address."""
    import ray

    ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@dataclasses.dataclass
class GcsServer:
    """A running ``gcp-storage-emulator``.

    Attributes:
      endpoint: ``http://127.0.0.1:<port>``.
    """

    endpoint: str

    def fs(self):
        """A gcsfs file system talking to the emulator."""
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", project="test")

    def bucket(self, name: str) -> str:
        """Creates bucket ``name`` if needed; returns ``gs://name``."""
        fs = self.fs()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_server(session_env) -> Iterator[GcsServer]:
    """The GCS emulator on a free loopback port, with gcsfs (here and in workers) pointed at it."""
    import fsspec

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(endpoint, proc)
        session_env.setenv("STORAGE_EMULATOR_HOST", endpoint)
        # The emulator speaks neither gRPC (bucket-type probes) nor auth.
        session_env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        session_env.setenv("FSSPEC_GCS_TOKEN", "anon")
        session_env.setenv("FSSPEC_GCS_PROJECT", "test")
        session_env.setitem(fsspec.config.conf, "gcs", {"token": "anon", "project": "test"})
        yield GcsServer(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_http(endpoint: str, proc: subprocess.Popen, probe: str = "/storage/v1/b") -> None:
    name = proc.args[2] if isinstance(proc.args, list) else proc.args
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}{probe}", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer at {endpoint}")


@dataclasses.dataclass
class S3Server:
    """A running moto server (S3 protocol).

    Attributes:
      endpoint: ``http://127.0.0.1:<port>``.
      options: The s3fs keyword arguments that reach it.
    """

    endpoint: str
    options: dict[str, Any]

    def fs(self):
        """An s3fs file system talking to the server."""
        import s3fs

        return s3fs.S3FileSystem(**self.options)

    def bucket(self, name: str) -> str:
        """Creates bucket ``name`` if needed; returns ``s3://name``."""
        fs = self.fs()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(session_env) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with s3fs (here and in workers) pointed at it.

    s3fs reads its defaults from fsspec's config: ``FSSPEC_S3`` holds them as
    JSON for worker processes (``cluster.connect.forwarded_env`` passes
    ``FSSPEC_*`` on), and this process's already-loaded config gets them too.
    """
    import fsspec

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # No region: s3fs would send it as a bucket location, which us-east-1 refuses.
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    try:
        _wait_http(endpoint, proc, probe="/moto-api/")
        session_env.setenv("FSSPEC_S3", json.dumps(options))
        session_env.setitem(fsspec.config.conf, "s3", options)
        yield S3Server(endpoint, options)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def demo_model() -> tuple[Any, Any, Any]:
    """``(config, params, tokenizer)`` of the bundled demo model, loaded in this process."""
    from griffin_batch import model
    from griffin_batch.model import demo

    config, params = model.load_checkpoint(demo.demo_checkpoint_path())
    return config, params, model.load_tokenizer(demo.demo_tokenizer_path())


PROMPTS = (
    "The lighthouse keeper climbed",
    "Mathematics is the art of",
    "Q: What is the capital of France?\nA:",
    "In the morning the harbour was",
    "def greet(name):",
    "A curious student explained",
    "The small robot repaired",
    "Every programmer remembered",
)


@pytest.fixture
def write_parquet() -> Callable[..., str]:
    """``write(url, columns, row_group_size=None)``: writes a Parquet file to any fsspec URL."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    def write(
        url: str, columns: dict[str, Sequence[Any]], row_group_size: int | None = None, **kwargs
    ) -> str:
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(pa.table(columns), f, row_group_size=row_group_size, **kwargs)
        return url

    return write


@pytest.fixture
def prompts() -> list[str]:
    """The shared prompt texts."""
    return list(PROMPTS)
