"""The job driver: validate, plan, prepare the output, run workers, summarise.

Each step is a named function; ``run`` strings them together. Everything that
can be wrong with the job's input (options, files, columns, output location,
cluster too small) is found before the first worker starts. The driver holds
only metadata: workers read their own rows and write their own files.

Run the driver on a node that is not preempted (a TPU/GPU cluster's head
node): it holds the manifest's only writer, and losing it costs a ``--resume``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import fsspec

from griffin_batch.actors import shards, worker
from griffin_batch.cluster import connect, faults, hardware, pool, slices
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import (
    lifecycle,
    manifest,
    openai_requests,
    openai_results,
    openai_staging,
    planner,
    progress,
    scheduler,
    staging,
)
from griffin_batch.model import requests

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What a finished run reports.

    Attributes:
      output: Output directory URL.
      summary: Contents of ``_summary.json``.
      succeeded: Every shard is committed.
      fatal: Why the job stopped early (a worker that cannot start, e.g. a
        missing package or checkpoint on its host; the cluster lost), or None.
      cluster_lost: The job stopped because its Ray cluster stopped answering.
      cancelled: Why it was cancelled (``griffin-batch cancel``), or None.
    """

    output: str
    summary: Mapping[str, Any]
    succeeded: bool
    fatal: str | None = None
    cluster_lost: bool = False
    cancelled: str | None = None


class Variant(Protocol):
    """A job that makes its requests and its rows its own way on this driver (``jobs.synth_job``).

    It runs as any job does: ``stage`` replaces planning (its inputs are converted
    to Parquet and reach the output only once ``OutputDir.prepare`` has checked it,
    as OpenAI batch files do), ``fingerprint`` joins the options a ``--resume`` must
    keep, every shard runs with ``shard_options``, and ``finish`` runs once every
    shard is committed (on every run that gets there, a resumed one included); what
    it returns joins ``_summary.json``.
    """

    def stage(self, config: config_lib.JobConfig, say: Say
              ) -> tuple[config_lib.JobConfig, planner.JobPlan, staging.Staged]: ...

    def fingerprint(self) -> Mapping[str, Any]: ...

    def shard_options(self, options: shards.ShardOptions) -> shards.ShardOptions: ...

    def finish(self, out: manifest.OutputDir, plan: planner.JobPlan,
               say: Say) -> Mapping[str, Any]: ...


def run(
    config: config_lib.JobConfig,
    *,
    say: Say = print,
    on_cluster_lost: Callable[[JobResult], None] | None = None,
    variant: Variant | None = None,
) -> JobResult:
    """Runs a whole job.

    Args:
      config: The job.
      say: Where one-line status messages go.
      on_cluster_lost: Called, on another thread, with the result when the cluster
        is lost while this thread waits inside Ray for it (Ray ends such a process
        with exit status 1 once its own GCS timeout passes); the summary is written
        and the output's lease given back first. The command line exits there.
      variant: Makes the job's requests and rows (None: ``generate``'s).

    Returns:
      The result; ``succeeded`` is False when some shard ran out of retries.

    Raises:
      JobInputError: Bad input, found before any worker starts; or another driver
        holds the output (``manifest.LeaseLost`` when it took it over mid-run).
      ConnectionError: No Ray cluster answers at ``config.cluster.address``.
    """
    start = time.monotonic()
    config.validate()
    model_spec = resolve_model(config.model, say)
    config, plan, staged = _plan(config, say, variant)
    say(
        f"planned {len(plan.shards)} shard(s) over {plan.total_rows} row(s) "
        f"in {len(plan.files)} file(s)"
    )
    try:
        out = manifest.OutputDir(config.io.output)
        fingerprint = {**config.fingerprint(), **(variant.fingerprint() if variant else {})}
        # Read before prepare removes it; kept below if this run generates nothing.
        on_record = _speed_on_record(out) if config.resume.resume else {}
        committed = out.prepare(plan, fingerprint, resume=config.resume.resume,
                                overwrite=config.resume.overwrite)
    except BaseException:
        if staged is not None:
            staged.cleanup()
        raise
    try:  # prepare took the output's lease: give it back however the run ends
        if staged is not None:  # only now: prepare has checked the directory and holds it
            try:
                staged.upload(out)
            finally:
                staged.cleanup()
        todo = [s for s in plan.shards if s.shard_id not in committed]
        if committed:
            say(
                f"resuming: {len(committed)} of {len(plan.shards)} shard(s) already committed, "
                f"{len(todo)} to do"
            )
        run_state = _RunState(committed_before=dict(committed), started=start,
                              started_at=time.time())
        out.put_summary(build_summary(config, plan, run_state, time.monotonic() - start,
                                      lifecycle.VALIDATING))
        if todo:
            _generate(config, model_spec, plan, out, todo, run_state, say, on_cluster_lost,
                      variant)
        out.put_summary(build_summary(config, plan, run_state, time.monotonic() - start,
                                      lifecycle.FINALIZING))
        if config.io.output_format == config_lib.OPENAI_BATCH:
            _write_batch_output(config, plan, out, run_state, say)
        finished = _finish(variant, plan, out, run_state, say) if variant else {}
        summary = {**build_summary(config, plan, run_state, time.monotonic() - start),
                   # A resume that only finishes: the speed is the last generating run's.
                   **({} if todo else on_record), **finished}
        succeeded = summary["status"] == lifecycle.COMPLETED
        out.write_summary(summary, success=succeeded)
        if succeeded:
            _remove_progress(out)  # also what late writers added after their shard committed
    finally:
        out.release()
    return JobResult(
        output=out.url,
        summary=summary,
        succeeded=succeeded,
        fatal=run_state.report.fatal,
        cluster_lost=run_state.report.cluster_lost,
        cancelled=run_state.report.cancelled,
    )


_SPEED_FIGURES = ("tokens_per_s", "rows_per_s", "generation_s")


def _speed_on_record(out: manifest.OutputDir) -> dict[str, float]:
    """``_SPEED_FIGURES`` of the summary in ``out`` that are numbers (none if it cannot be read)."""
    try:
        previous = manifest.read_summary(out.fs, out.path)
    except (OSError, ValueError):
        return {}
    return {k: previous[k] for k in _SPEED_FIGURES if requests.is_number(previous.get(k))}


def _plan(config: config_lib.JobConfig, say: Say, variant: Variant | None = None
          ) -> tuple[config_lib.JobConfig, planner.JobPlan, staging.Staged | None]:
    """The job as it runs, its plan, and its staged inputs (``--input-format openai-batch``,
    a ``variant``'s), if any.

    OpenAI batch files are converted to Parquet in a local scratch directory
    here; they reach the output only once ``OutputDir.prepare`` has checked it.
    """
    if variant is not None:
        return variant.stage(config, say)
    if config.io.input_format != config_lib.OPENAI_BATCH:
        return config, planner.plan(config.io, config.sampling, say), None
    config = openai_staging.job_config(config)
    staged = openai_staging.stage(config.io, config.sampling, say)
    return config, staged.plan, staged


def _write_batch_output(config: config_lib.JobConfig, plan: planner.JobPlan,
                        out: manifest.OutputDir, state: _RunState, say: Say) -> None:
    """Writes ``output.jsonl`` and ``errors.jsonl`` when every shard is committed."""
    missing = state.uncommitted(plan)
    if missing:
        say(f"not writing {manifest.BATCH_OUTPUT_FILE}: {missing} shard(s) are not committed; "
            "rerun with --resume to finish the job and write it")
        return
    model = config.model.checkpoint.rstrip("/").rsplit("/", 1)[-1] if config.model.checkpoint \
        else "griffin-batch-demo"
    ok, failed = openai_results.write(out, plan, default_model=model)
    say(f"wrote {manifest.BATCH_OUTPUT_FILE} ({ok} request(s)) and "
        f"{manifest.BATCH_ERRORS_FILE} ({failed}) to {out.url}")


def _finish(variant: Variant, plan: planner.JobPlan, out: manifest.OutputDir,
            state: _RunState, say: Say) -> Mapping[str, Any]:
    """The variant's last step, once every shard is committed; its figures for the summary."""
    missing = state.uncommitted(plan)
    if missing:
        say(f"{missing} shard(s) are not committed: the job's last step waits for them; "
            "rerun with --resume to finish it")
        return {}
    return variant.finish(out, plan, say)


@dataclasses.dataclass
class _RunState:
    committed_before: dict[str, shards.ShardResult]
    committed_now: dict[str, shards.ShardResult] = dataclasses.field(default_factory=dict)
    report: scheduler.Report = dataclasses.field(
        default_factory=lambda: scheduler.Report(failed={}, stats={}, retries={})
    )
    workers: list[pool.Worker] = dataclasses.field(default_factory=list)
    generation_s: float = 0.0
    startup_s: float | None = None
    cluster: str = ""
    started: float = 0.0
    started_at: float = 0.0  # wall clock, for readers on other machines
    status: str = lifecycle.VALIDATING
    loop: scheduler.Scheduler | None = None

    def uncommitted(self, plan: planner.JobPlan) -> int:
        """Shards of ``plan`` committed neither before this run nor during it."""
        return len(plan.shards) - len(self.committed_before) - len(self.committed_now)


def resolve_model(m: config_lib.ModelConfig, say: Say) -> worker.ModelSpec:
    """The worker's model spec; checks that given checkpoint and tokenizer paths exist.

    With no checkpoint the bundled demo model runs (workers resolve its files).
    """
    if m.checkpoint is None:
        say("no --checkpoint given: running the bundled demo model and tokenizer")
    else:
        for option, url in (("--checkpoint", m.checkpoint), ("--tokenizer", m.tokenizer)):
            try:
                fs, path = fsspec.core.url_to_fs(url)
                found = fs.exists(path)
            except (OSError, ValueError, ImportError) as e:
                raise config_lib.JobInputError(f"{option} {url}: {e}") from None
            if not found:
                raise config_lib.JobInputError(f"{option} {url} does not exist")
    return worker.ModelSpec(
        checkpoint=m.checkpoint,
        tokenizer=m.tokenizer,
        preset=m.preset,
        dtype=m.dtype,
        engine=m.engine,
    )


def shard_options(
    config: config_lib.JobConfig, plan: planner.JobPlan, out: manifest.OutputDir
) -> shards.ShardOptions:
    """The options every shard of this job runs with."""
    return shards.ShardOptions(
        prompt_column=config.io.prompt_column,
        id_column=config.io.id_column,
        keep_columns=config.io.keep_columns,
        chat=config.model.chat,
        sampling=config.sampling.params(),
        sampling_columns=config.io.sampling_overrides(),
        with_sample_index=plan.with_sample_index,
        output_dir=out.url,
        commit_on_driver=out.process_local,
        checkpoint_every_s=config.resume.checkpoint_every_s or None,
        error_column=openai_requests.ERROR_COLUMN
        if config.io.input_format == config_lib.OPENAI_BATCH else None,
    )


def _worker_spec(config: config_lib.JobConfig, like: hardware.WorkerSpec | None = None
                 ) -> hardware.WorkerSpec:
    """One worker's placement and the room for such workers in the live nodes.

    ``like``: keep that spec's accelerator and TPU share (the nodes of the
    moment only change the room).
    """
    c = config.cluster
    shape = hardware.tpu_slice(c.tpu_slice) if c.tpu_slice else None
    return hardware.worker_spec(
        connect.nodes(),
        like.accelerator if like else "tpu" if shape else c.accelerator,
        gpus_per_worker=c.gpus_per_worker,
        cpus_per_worker=c.cpus_per_worker,
        tpu_chips=int(like.resources.get(hardware.TPU_RESOURCE, 0)) if like else
        shape.chips_per_host if shape else c.tpu_chips_per_worker,
    )


def _start_pool(
    config: config_lib.JobConfig, model_spec: worker.ModelSpec, todo: int, say: Say
) -> tuple[pool.WorkerPool, Callable[[], int]]:
    """Starts the pool at the size the work and the live nodes call for.

    Returns:
      The pool, and a function giving the room for more workers in the live
      nodes (the scheduler's default bound as nodes join or leave).
    """
    spec = _worker_spec(config)

    def room() -> int:
        return _worker_spec(config, like=spec).default_workers()

    policy = config.scaling()
    size = max(min(policy.min_workers, todo), policy.target(
        capacity=spec.default_workers(), busy=0, queued=todo))
    shape = hardware.tpu_slice(config.cluster.tpu_slice) if config.cluster.tpu_slice else None
    if shape is not None:
        size = -(-size // shape.hosts) * shape.hosts  # whole slices
        say(f"starting {size} tpu worker(s) in {size // shape.hosts} {shape.pod_type} slice(s) "
            f"of {shape.hosts} hosts ({shape.topology}), reserved with Ray's "
            f"SlicePlacementGroup; {spec.description}")
    else:
        say(f"starting {size} {spec.accelerator.value} worker(s), {spec.description}")
    withheld = connect.withheld_credentials()
    if withheld and config.cluster.forward_credentials:
        say(f"forwarding credentials to workers: {', '.join(withheld)} (values not shown)")
    elif withheld:
        say(f"not sent to workers: {', '.join(withheld)}; they use their node's own "
            "credentials (--forward-credentials sends these)")
    if size > spec.default_workers():
        say(f"the cluster has room for {spec.default_workers()} now; Ray places the others as "
            f"nodes join (an autoscaler adds them for these workers); waiting up to "
            f"{policy.wait_for_workers_s:.0f}s for {min(policy.min_workers, todo)} to be ready "
            "(--min-workers, --wait-for-workers)")
    workers = pool.WorkerPool(
        worker.GenerationWorker,
        (model_spec,),
        spec,
        size=size,
        env_vars=connect.forwarded_env(credentials=config.cluster.forward_credentials),
        max_concurrency=config.shards_in_flight() + 2,
        max_replacements=2 * max(size, policy.max_workers or 0),
        start_timeout_s=config.cluster.start_timeout_s,
        slices=slices.SliceReservations(shape) if shape else None,
    )
    workers.start()
    return workers, room


def _generate(
    config: config_lib.JobConfig,
    model_spec: worker.ModelSpec,
    plan: planner.JobPlan,
    out: manifest.OutputDir,
    todo: list[shards.ShardSpec],
    state: _RunState,
    say: Say,
    on_cluster_lost: Callable[[JobResult], None] | None,
    variant: Variant | None = None,
) -> None:
    def abandon(lost: str) -> None:  # on a watch's thread: the main one waits inside Ray
        _abandon(config, plan, out, state, lost, on_cluster_lost)

    connection = connect.connect(config.cluster.address, on_stuck=abandon)
    cluster = connect.watch(connection, abandon)  # Ray would end this process, saying nothing
    state.cluster = connection.address
    say(connection.describe())
    say(f"worker logs (and Ray's own): {connect.log_dir()} on each node")
    try:
        workers, room = _start_pool(config, model_spec, len(todo), say)
        state.workers = workers.workers
        options = shard_options(config, plan, out)
        if variant is not None:
            options = variant.shard_options(options)
        done_rows = sum(r.rows for r in state.committed_before.values())
        bar = progress.Progress(plan.total_rows, done_rows)
        started = time.monotonic()

        def submit(w: pool.Worker, shard: shards.ShardSpec, attempt: int):
            return w.handle.process_shard.remote(
                shard, options, attempt, planner.read_inline(shard, options)
            )

        def on_commit(result: shards.ShardResult) -> None:
            record = out.commit(result)
            if record is not None:  # None: the shard was already committed
                state.committed_now[result.shard_id] = record
                bar.advance(result.rows, result.completion_tokens)
                _remove_progress(out, result.shard_id)

        checked = {"summary": time.monotonic(), "cancel": 0.0}

        def on_tick() -> None:
            out.renew()  # raises LeaseLost when another driver took the output over
            now = time.monotonic()
            if state.startup_s is None and any(w.ready for w in workers.workers):
                state.startup_s = now - started
                state.status = lifecycle.IN_PROGRESS
                checked["summary"] = 0.0  # say so now
            if now - checked["cancel"] >= faults.CLUSTER_POLL_S:
                checked["cancel"] = now
                request = out.cancel_requested()
                if request is not None and state.loop is not None:
                    state.loop.cancel(f"cancelled from {request.get('host', '?')} (pid "
                                      f"{request.get('pid', '?')}): committed shards are kept, "
                                      "running ones checkpointed; --resume finishes the job")
            if now - checked["summary"] >= lifecycle.SUMMARY_EVERY_S:
                checked["summary"] = now
                state.generation_s = now - started
                out.put_summary(build_summary(config, plan, state, now - state.started))
            bar.workers(len(workers.in_service), len(workers.starting()))
            bar.refresh()

        budget = faults.RetryBudget(config.cluster.max_preemptions, config.cluster.max_failures)
        loop = scheduler.Scheduler(
            workers,
            submit,
            on_commit,
            budget,
            max_in_flight=config.shards_in_flight(),
            heartbeat=lambda w: w.handle.heartbeat.remote(),
            draining_nodes=connect.draining_nodes,
            drain=lambda w, reason: w.handle.drain.remote(reason),
            stall_timeout_s=config.cluster.stall_timeout_s,
            cluster_lost=lambda: cluster.lost,
            on_tick=on_tick,
            elastic=config.scaling(),
            capacity=room,
            tpu_slices=connect.tpu_slices,
        )
        state.loop = loop
        try:
            state.report = loop.run(todo)
        finally:
            workers.shutdown()
            bar.close()
        state.generation_s = time.monotonic() - started
    finally:
        connect.disconnect(connection)
        cluster.stop()  # from here on, this thread writes the summary


def _abandon(
    config: config_lib.JobConfig,
    plan: planner.JobPlan,
    out: manifest.OutputDir,
    state: _RunState,
    lost: str,
    then: Callable[[JobResult], None] | None,
) -> None:
    """Ends a job whose cluster is lost while the driver's thread waits inside Ray for it.

    Runs on the cluster watch's thread. Writes what ``run`` would have written: every
    shard not committed is reported with ``lost``, unless the loop had already ended
    (only Ray's shutdown was left). Gives the output's lease back so that
    ``--resume`` can start at once, and hands the result to ``then``.
    """
    loop = state.loop
    if loop is not None and loop.finished:
        state.report = loop.report()
    else:
        records = {**state.committed_before, **state.committed_now}
        state.report = dataclasses.replace(
            loop.report() if loop is not None else state.report,
            failed={s.shard_id: lost for s in plan.shards if s.shard_id not in records},
            fatal=lost,
            cluster_lost=True,
        )
    status = None if loop is not None and loop.finished else lifecycle.FAILED
    summary = build_summary(config, plan, state, time.monotonic() - state.started, status)
    succeeded = summary["status"] == lifecycle.COMPLETED
    try:
        out.write_summary(summary, success=succeeded)
        out.release()
    except Exception as e:  # noqa: BLE001 - the job still says how it ended
        log.warning("could not write the summary of %s: %s", out.url, e)
    if then is not None:
        report = state.report
        then(JobResult(out.url, summary, succeeded, report.fatal, report.cluster_lost))


def _remove_progress(out: manifest.OutputDir, shard_id: str | None = None) -> None:
    """Deletes a committed shard's progress checkpoints (all shards' when ``shard_id`` is None)."""
    path = (shards.progress_url(out.path, shard_id) if shard_id
            else f"{out.path}/{shards.PROGRESS_DIR}")
    try:
        out.fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except OSError as e:  # leftovers cost storage, not correctness
        log.warning("could not remove progress checkpoints %s: %s", path, e)


def build_summary(
    config: config_lib.JobConfig, plan: planner.JobPlan, state: _RunState, wall_s: float,
    status: str | None = None,
) -> dict[str, Any]:
    """The contents of ``_summary.json``, rewritten while the job runs (``jobs.lifecycle``).

    ``status`` names a moment the driver passes through (``validating``,
    ``finalizing``); None: the run's own state, or its final one once its loop
    has finished (or never had to start).
    """
    report = state.report
    if status is None and state.loop is not None and not state.loop.finished:
        status, report = state.status, state.loop.report()  # so far
    elif status is None:
        status = lifecycle.final_status(
            cancelled=report.cancelled is not None, stopped_early=report.fatal is not None,
            failed_shards=len(report.failed), unreadable_inputs=len(plan.unreadable))
    records = {**state.committed_before, **state.committed_now}
    total = {
        k: sum(getattr(r, k) for r in records.values())
        for k in ("rows", "samples", "error_rows", "prompt_tokens", "completion_tokens")
    }
    new_tokens = sum(r.completion_tokens for r in state.committed_now.values())
    new_rows = sum(r.rows for r in state.committed_now.values())
    by_id = {s.shard_id: s for s in plan.shards}
    failures = [
        {
            "shard_id": sid,
            "path": by_id[sid].path,
            "first_row": by_id[sid].first_row,
            "num_rows": by_id[sid].num_rows,
            "error": msg,
        }
        for sid, msg in sorted(report.failed.items())
    ]
    # A file whose footer cannot be read has no shards (nor a known row count); it fails alone.
    failures += [{"shard_id": None, "path": url, "first_row": 0, "num_rows": None, "error": msg}
                 for url, msg in plan.unreadable]
    per_s = (lambda n: round(n / state.generation_s, 2)) if state.generation_s else (lambda n: 0.0)
    return {
        "status": status,
        "request_counts": lifecycle.request_counts(
            total=plan.total_rows, committed_rows=total["rows"], error_rows=total["error_rows"],
            failed_shard_rows=sum(f["num_rows"] or 0 for f in failures)),
        "started_at": round(state.started_at, 3),
        "updated_at": round(time.time(), 3),
        "cancelled": report.cancelled,
        "fatal": report.fatal,
        "output": config.io.output,
        **total,
        "input_rows": plan.total_rows,
        "tokens_per_s": per_s(new_tokens),
        "rows_per_s": per_s(new_rows),
        "wall_time_s": round(wall_s, 3),
        "generation_s": round(state.generation_s, 3),
        "startup_s": None if state.startup_s is None else round(state.startup_s, 3),
        "shards": {
            "total": len(plan.shards),
            "committed": len(records),
            "resumed": len(state.committed_before),
            "run": len(state.committed_now),
            "failed": len(report.failed),
        },
        "unreadable_inputs": len(plan.unreadable),
        "failures": failures,
        "retries": dict(report.retries),
        "workers": _worker_figures(state, report),
        "pool": report.timeline,
        "cluster": state.cluster,
    }


def _worker_figures(state: _RunState, report: scheduler.Report) -> list[dict[str, Any]]:
    figures = []
    for w in state.workers:
        stats = report.stats.get(w.name, scheduler.WorkerStats())
        busy = stats.busy_s()
        figures.append(
            {
                "name": w.name,
                "ready": w.info is not None,
                **{k: v for k, v in (w.info or {}).items() if k != "name"},
                "shards": stats.shards,
                "rows": stats.rows,
                "samples": stats.samples,
                "completion_tokens": stats.completion_tokens,
                "busy_s": round(busy, 3),
                "tokens_per_s": round(stats.completion_tokens / busy, 2) if busy else 0.0,
                # Seconds since the job started: asked for, placed on a node, ready, first shard.
                **{f"{k}_at_s": None if t is None else round(t - state.started, 3) for k, t in (
                    ("requested", w.started_at), ("placed", w.placed_at),
                    ("ready", w.ready_at), ("first_shard", stats.first_dispatch))},
                "released": w.released,
                "lost": w.lost if w.lost != "shut down" and not w.released else None,
            }
        )
    return figures
