"""The generation worker: one per accelerator host, run as a Ray actor.

A plain callable class in the style of Ray Data's LLM stages: ``__init__``
loads the checkpoint, tokenizer and engine once; ``__call__`` turns a table of
rows into a table of output rows, carrying each row's index through the
engine and refusing to answer unless every row came back exactly once;
``process_shard`` wraps it with reading and writing. Per-row problems are
data (error rows); a dead engine is fatal (``WorkerLost``), and the driver
replaces the worker.

Who writes the output: the worker. It encodes the shard's file and publishes
it atomically under a name fixed by the shard (see ``griffin_batch.actors.output``), then
reports only statistics. The data never passes through the driver, so the
driver's memory and network stay flat however large the job, and a repeated
shard (retry, resume, or a worker presumed dead finishing late) replaces its
file rather than adding rows: exactly once follows from one file per shard
plus the driver's manifest, which counts a shard done only after its file is
in place. The exception is a process-local file system (``memory://``),
which a worker process cannot reach: then the encoded file is returned and
the driver publishes it the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from griffin_batch.actors import batching, output, rows, shards
from griffin_batch.cluster import faults
from griffin_batch.model.engine_config import EngineConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a worker loads and how it sizes its engine.

    Attributes:
      checkpoint: Checkpoint path or URL (``griffin_batch.model.load_checkpoint``); None: the
        bundled demo model (resolved where the worker runs).
      tokenizer: SentencePiece model path or URL (None with the demo model).
      preset: Config preset name when the checkpoint has no config.
      dtype: Parameter/compute dtype name (None: as stored).
      engine: The engine's sizing (longer prompts than its
        ``max_prompt_tokens`` become error rows).
    """

    checkpoint: str | None = None
    tokenizer: str | None = None
    preset: str | None = None
    dtype: str | None = None
    engine: EngineConfig = EngineConfig()


class GenerationWorker:
    """Loads a model once and generates shard after shard.

    Args:
      spec: What to load.

    Attributes:
      tokenizer: The loaded tokenizer.
      engine: The continuous-batching engine.
      name: Actor name (``"local"`` outside Ray).
      load_seconds: Time spent loading.
    """

    def __init__(self, spec: ModelSpec):
        start = time.perf_counter()
        self.name = _actor_name()
        # Never raise from here: Ray would print the traceback on the user's
        # terminal and the driver could not tell a missing package from a
        # flaky store. ``ready()`` reports the error instead (see cluster.pool).
        self._start_error: Exception | None = None
        try:
            self._load(spec)
        except Exception as error:  # noqa: BLE001 - reported by ready()
            log.exception("worker %s could not start", self.name)
            self._start_error = error
        self.load_seconds = time.perf_counter() - start

    def _load(self, spec: ModelSpec) -> None:
        from griffin_batch import (
            model,  # heavy (JAX): imported where the worker runs, not where it is scheduled
        )
        from griffin_batch.model import engine

        checkpoint, tokenizer = spec.checkpoint, spec.tokenizer
        if checkpoint is None:
            from griffin_batch.model import demo

            checkpoint, tokenizer = demo.demo_checkpoint_path(), demo.demo_tokenizer_path()
        config, params = model.load_checkpoint(
            str(checkpoint), preset=spec.preset, dtype=spec.dtype
        )
        self.tokenizer = model.load_tokenizer(str(tokenizer))
        self.engine = engine.Engine(config, params, self.tokenizer, spec.engine)
        self._loop = batching.EngineLoop(self.engine.generate)

    def ready(self) -> dict[str, Any]:
        """Where this worker runs and what it holds; returns once loading is done.

        A load that failed for good (``faults.is_permanent_start_error``: a
        missing module or checkpoint, an unreadable file, out of memory) comes
        back as ``{"start_error": "<Type>: <message>", "hostname": ...}``.

        Raises:
          WorkerLost: Loading failed for a reason another attempt may not meet.
        """
        where = {"name": self.name, "hostname": _host(), "pid": os.getpid()}
        error = self._start_error
        if error is not None:
            cause = f"{type(error).__name__}: {error}"
            if faults.is_permanent_start_error(error):
                return {**where, "start_error": cause}
            raise faults.WorkerLost(f"could not start: {cause}")
        import jax

        devices = jax.local_devices()
        return {
            **where,
            "node_id": _node_id(),
            "platform": devices[0].platform,
            "devices": len(devices),
            "load_seconds": round(self.load_seconds, 3),
            # Which copy of the code runs here: an install, or what a job shipped.
            "code": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        }

    def heartbeat(self) -> int:
        """Decode rounds and prefill chunks run so far; rises while the engine works.

        The driver polls it on workers that hold shards: a value that stops
        rising for ``--stall-timeout`` seconds (or no answer: a stopped
        process) marks the worker hung.
        """
        return self.engine.rounds_done if self._start_error is None else -1

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def __call__(
        self,
        table: pa.Table,
        spec: shards.ShardSpec,
        options: shards.ShardOptions,
        attempt: int = 0,
    ) -> pa.Table:
        """Generates the output rows of ``table`` (one shard's rows).

        Raises:
          WorkerLost: The engine has stopped.
          RowAccountingError: A row did not come back exactly once.
        """
        chat = self.tokenizer.chat_prompt if options.chat else None
        prepared = rows.prepare(table, spec, options, attempt, chat)
        batch = self._loop.submit(prepared.requests)
        try:
            completions = batch.wait()
        finally:
            self._loop.release(batch)
        return rows.assemble(prepared, [*prepared.rejected, *completions], table, options)

    def process_shard(
        self,
        spec: shards.ShardSpec,
        options: shards.ShardOptions,
        attempt: int = 0,
        table: pa.Table | None = None,
    ) -> shards.ShardResult:
        """Reads, generates and publishes one shard.

        Args:
          spec: The shard.
          options: Job options.
          attempt: The driver's attempt number.
          table: The shard's rows when the driver read them (process-local
            inputs); None: read them from ``spec.path``.

        Returns:
          Statistics, plus the encoded file when ``options.commit_on_driver``.
        """
        if self._loop.fatal is not None:
            raise faults.WorkerLost(f"engine stopped: {self._loop.fatal!r}")
        start = time.perf_counter()
        if table is None:
            table = rows.read_rows(spec, options)
        result = self(table, spec, options, attempt)
        data = output.encode(result)
        name = output.part_name(spec.shard_id)
        fs, directory = fsspec.core.url_to_fs(options.output_dir)
        if options.commit_on_driver:
            path, payload = f"{directory.rstrip('/')}/{name}", data
        else:
            path, payload = output.publish(fs, directory, name, data), None
        return shards.ShardResult(
            shard_id=spec.shard_id,
            attempt=attempt,
            output_path=output.url_of(fs, path),
            rows=table.num_rows,
            samples=result.num_rows,
            error_rows=_count(result, "finish_reason", "error"),
            prompt_tokens=_sum(result, "num_prompt_tokens"),
            completion_tokens=_sum(result, "num_completion_tokens"),
            seconds=time.perf_counter() - start,
            worker=self.name,
            payload=payload,
        )


def _count(table: pa.Table, column: str, value: str) -> int:
    return int(pc.sum(pc.equal(table.column(column), value)).as_py() or 0)


def _sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table.column(column)).as_py() or 0)


def _actor_name() -> str:
    import ray

    # Checked first: the runtime context would otherwise start a Ray instance.
    if not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_actor_name() or "local"


def _host() -> str:
    """This host's name and, inside Ray, its node address (what ``ray status`` shows)."""
    import ray

    name = socket.gethostname()
    return f"{name} ({ray.util.get_node_ip_address()})" if ray.is_initialized() else name


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
