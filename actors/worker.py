"""The generation worker: one per accelerator host, run as a Ray actor.

A plain callable class in the style of Ray Data's LLM stages: ``__init__``
loads the checkpoint, tokenizer and engine once; ``__call__`` turns a table of
rows into a table of output rows, carrying each row's index through the
engine and refusing to answer unless every row came back exactly once;
``process_shard`` does the same with reading and writing, keeping finished
samples on local disk rather than in memory (``griffin_batch.actors.spill``)
and, with ``--checkpoint-every``, continuing from the shard's newest progress
checkpoint (``griffin_batch.actors.progress``); with ``ShardOptions.validation``
it checks each finished sample and draws rejected ones again before writing
(``griffin_batch.actors.redraw``; ``__call__`` does not). Per-row problems are data
(error rows); a dead engine is fatal (``WorkerLost``), and the driver replaces
the worker. SIGTERM, or the driver's ``drain()`` for a node Ray is draining,
checkpoints every shard held and ends the worker's calls as lost.

Who writes the output: the worker writes its attempt's file, the driver
promotes it. The worker writes the shard's file under a name
unique to the attempt, ``<output>/_attempts/part-<shard>.a<attempt>-<random>.parquet``
(see ``griffin_batch.actors.output``), then reports its URL, size and SHA-256
with the statistics. The data never passes through the driver, so the
driver's memory and network stay flat however large the job. Only the driver
moves a file to the final ``part-<shard>.parquet``, once per shard, and
records the commit (``griffin_batch.jobs.manifest``): a repeated shard (retry,
resume) or a worker presumed dead that finishes late writes a file of its own
that is never promoted, so it cannot add rows or change a committed part. The
exception is a process-local file system (``memory://``), which a worker
process cannot reach: then the encoded file is returned with the same
name, size and checksum, and the driver writes it there before promoting it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import signal
import socket
import tempfile
import threading
import time
from typing import Any

import fsspec
import pyarrow as pa

from griffin_batch.actors import batching, output, redraw, rows, shards
from griffin_batch.actors import spill as spill_lib
from griffin_batch.cluster import faults
from griffin_batch.model import requests
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
      dtype: Parameter/compute dtype name; None: bfloat16 on TPU and GPU, the stored
        dtype on CPU (``griffin_batch.model.dtypes.compute_dtype``).
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
        self._active = 0  # process_shard calls running
        self._active_lock = threading.Lock()
        self._draining = False
        if self._start_error is None:
            self._handle_sigterm()

    def _handle_sigterm(self) -> None:
        """Turns SIGTERM (a preemption notice, a pod deletion, a node drain) into a drain.

        The first SIGTERM checkpoints every shard this worker holds (within
        ``faults.DRAIN_GRACE_S``), fails their calls with ``WorkerLost`` (the
        driver counts a preemption and runs them elsewhere, from those
        checkpoints), then hands the signal to Ray's own handler, which exits.
        """
        if threading.current_thread() is not threading.main_thread():
            log.warning("worker %s: not on the main thread, SIGTERM will not drain", self.name)
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            if not self._draining:
                self._start_drain("SIGTERM (preemption or shutdown)")
                return
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(1)

        signal.signal(signal.SIGTERM, on_sigterm)

    def drain(self, reason: str) -> None:
        """Checkpoints every shard this worker holds, fails their calls, then exits.

        What the driver calls for a worker on a node Ray is draining; returns at once.
        """
        if not self._draining and self._start_error is None:
            self._start_drain(reason)

    def _start_drain(self, reason: str) -> None:
        self._draining = True
        threading.Thread(target=self._drain_and_exit, args=(reason,), name="drain",
                         daemon=True).start()

    def _drain_and_exit(self, reason: str) -> None:
        start = time.monotonic()
        log.warning("worker %s: %s; writing checkpoints and stopping", self.name, reason)
        self._loop.drain(reason, faults.DRAIN_GRACE_S)
        # Let the failed calls' replies leave before the process goes.
        while self._active and time.monotonic() - start < faults.DRAIN_GRACE_S:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # the second one exits (see on_sigterm)

    def _load(self, spec: ModelSpec) -> None:
        import jax

        from griffin_batch import (
            model,  # heavy (JAX): imported where the worker runs, not where it is scheduled
        )
        from griffin_batch.model import dtypes, engine, snapshots

        checkpoint, tokenizer = spec.checkpoint, spec.tokenizer
        if checkpoint is None:
            from griffin_batch.model import demo

            checkpoint, tokenizer = demo.demo_checkpoint_path(), demo.demo_tokenizer_path()
        dtype = dtypes.compute_dtype(spec.dtype, jax.local_devices()[0].platform)
        config, params = model.load_checkpoint(str(checkpoint), preset=spec.preset, dtype=dtype)
        self.tokenizer = model.load_tokenizer(str(tokenizer))
        self.engine = engine.Engine(config, params, self.tokenizer, spec.engine)
        self._loop = batching.EngineLoop(self.engine)
        # What stored progress must match before this worker continues from it.
        self._fingerprint = snapshots.model_fingerprint(
            config, self.engine.dtype, self.tokenizer.model_proto)
        self._template = snapshots.cache_template(config, self.engine.dtype)

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
        batch = self._loop.submit(batching.Batch(prepared.requests))
        try:
            completions = batch.wait()
        finally:
            self._loop.release(batch)
        return rows.assemble(prepared, [*prepared.rejected, *completions], table, options)

    def _progress(self, spec: shards.ShardSpec, options: shards.ShardOptions, attempt: int,
                  spill: spill_lib.CompletionSpill):
        """The shard's checkpointer and what its newest checkpoint holds (None, None: off).

        Finished samples in the checkpoint go straight to ``spill`` as the
        checkpoint is read, under this attempt's request ids.
        """
        if not options.checkpoint_every_s or options.commit_on_driver:
            return None, None
        from griffin_batch.actors import progress

        store = progress.ProgressStore(shards.progress_url(options.output_dir, spec.shard_id),
                                       self._fingerprint, self._template)
        pending: list[requests.Completion] = []

        def to_spill(done: requests.Completion) -> None:
            rid = rows.request_id(spec, attempt, int(done.request_id))  # stored id: the row
            pending.append(dataclasses.replace(done, request_id=rid))
            if len(pending) >= spill_lib.SPILL_EVERY:
                spill.add(pending)
                pending.clear()

        restored = store.load(on_finished=to_spill)
        spill.add(pending)
        if restored.chain:
            log.info("shard %s: continuing from checkpoint %s (%d finished, %d decoding samples)",
                     spec.shard_id, restored.chain[-1], len(restored.finished_keys),
                     len(restored.decoding))
        checkpointer = progress.ShardCheckpointer(
            store, restored, stored_id=lambda rid: str(rows.row_of(rid)))
        return checkpointer, progress.ResumePlan(restored)

    def _stream_shard(self, spec: shards.ShardSpec, options: shards.ShardOptions, attempt: int,
                      table: pa.Table | None, spill: spill_lib.CompletionSpill
                      ) -> tuple[list[str], list[int], batching.Batch]:
        """Feeds the shard to the engine window by window; returns ids and samples per row.

        Prompts are read as the engine takes them (``EngineLoop.feed`` blocks
        while enough wait), rejected rows and restored finished samples go
        straight to the spill, and the engine's completions follow them there.
        """
        chat = self.tokenizer.chat_prompt if options.chat else None
        checkpointer, plan = self._progress(spec, options, attempt, spill)
        batch = batching.Batch(checkpointer=checkpointer,
                               checkpoint_every_s=options.checkpoint_every_s, spill=spill)
        ids: list[str] = []
        per_row: list[int] = []
        try:
            for window in rows.iter_windows(spec, options, table):
                prepared = rows.prepare(window, spec, options, attempt, chat, first=len(ids))
                ids += prepared.ids
                per_row += prepared.samples
                spill.add(prepared.rejected)
                if plan is None:
                    self._loop.feed(batch, prepared.requests)
                    continue
                work = plan.split(prepared.requests, rows.row_of)
                spill.add(work.finished)
                self._loop.feed(batch, work.requests, work.resumed)
            batch.restored_tokens = plan.restored_tokens if plan is not None else 0
            batch.close_input()
            batch.wait()
        finally:
            self._loop.release(batch)
        return ids, per_row, batch

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
        with self._active_lock:
            self._active += 1
        try:
            return self._process_shard(spec, options, attempt, table)
        finally:
            with self._active_lock:
                self._active -= 1

    def _process_shard(self, spec, options, attempt, table) -> shards.ShardResult:
        if self._loop.fatal is not None:
            raise faults.WorkerLost(f"engine stopped: {self._loop.fatal!r}")
        if self._draining:
            raise faults.WorkerLost("worker is draining (SIGTERM)")
        start = time.perf_counter()
        name = output.attempt_name(spec.shard_id, attempt)
        fs, directory = fsspec.core.url_to_fs(options.output_dir)
        directory = directory.rstrip("/")
        # Finished samples wait on local disk, not in memory, and the file is
        # written from there group by group (see actors.spill).
        spill = spill_lib.CompletionSpill()
        try:
            ids, per_row, batch = self._stream_shard(spec, options, attempt, table, spill)
            with tempfile.TemporaryDirectory(prefix="griffin-part-") as tmp:
                local = os.path.join(tmp, name)
                # The input again, window by window, for the columns kept.
                windows = (rows.iter_windows(spec, options, table) if options.keep_columns
                           else spill_lib.row_windows(len(ids)))
                samples = spill.close()
                if options.validation is not None:  # rejected samples are drawn again first
                    chat = self.tokenizer.chat_prompt if options.chat else None
                    samples = redraw.redraw(
                        self._loop, samples, options.validation,
                        redraw.requests_again(spec, options, attempt, table, chat),
                        tag=f"{spec.shard_id}:{attempt}", directory=tmp)
                stats = spill_lib.write_output(ids, per_row, samples, windows, options, local)
                size, sha256 = os.path.getsize(local), output.file_digest(_LOCAL, local)
                if options.commit_on_driver:  # the driver writes the attempt file
                    path = f"{directory}/{output.ATTEMPTS_DIR}/{name}"
                    payload = pathlib.Path(local).read_bytes()
                else:
                    path, payload = output.write_attempt_file(fs, directory, name, local), None
        finally:
            spill.remove()
        return shards.ShardResult(
            shard_id=spec.shard_id,
            attempt=attempt,
            output_path=output.url_of(fs, f"{directory}/{output.part_name(spec.shard_id)}"),
            attempt_path=output.url_of(fs, path),
            size=size,
            sha256=sha256,
            rows=len(ids),
            samples=stats.samples,
            error_rows=stats.error_rows,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            seconds=time.perf_counter() - start,
            worker=self.name,
            restored_tokens=batch.restored_tokens,
            payload=payload,
        )


_LOCAL = fsspec.filesystem("file")


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
