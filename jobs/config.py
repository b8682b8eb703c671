"""The job's configuration: one frozen value grouped by concern (io, model, sampling, cluster, resume).

Field names follow the command-line options (``--max-tokens`` is
``sampling.max_tokens``); ``JobConfig.validate`` reports a bad value by its option.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from griffin_batch.actors import columns, output
from griffin_batch.cluster import faults, hardware, scaling
from griffin_batch.model import dtypes, requests
from griffin_batch.model.engine_config import EngineConfig


class JobInputError(ValueError):
    """Bad job input (options, input files, output location), reported before any worker starts."""


PARQUET = "parquet"
OPENAI_BATCH = "openai-batch"
INPUT_FORMATS = (PARQUET, OPENAI_BATCH)
"""``--input-format``: Parquet prompts, or OpenAI Batch API request files (JSONL)."""
OUTPUT_FORMATS = (PARQUET, OPENAI_BATCH)
"""``--output-format``: Parquet parts only, or also ``output.jsonl`` and ``errors.jsonl``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IOConfig:
    """Where prompts come from and results go."""

    inputs: tuple[str, ...] = ()
    """Parquet files, directories of them, or globs; any fsspec URL (local, gs://, s3://, memory://)."""

    output: str = ""
    """Output directory URL; receives ``part-<shard>.parquet`` files, the manifest and the summary."""

    prompt_column: str = "prompt"
    """Input column holding the prompt text."""

    id_column: str | None = None
    """Input column holding row ids, required in every file. None: ``id`` where a
    file has one; rows without an id get ``<file name>#<row index>``."""

    allow_duplicate_ids: bool = False
    """Run a job whose row ids repeat (as text); by default the plan refuses it."""

    sampling_columns: tuple[str, ...] = ()
    """Input columns that set sampling fields per row: ``FIELD`` or ``FIELD=COLUMN``
    (fields: ``columns.SAMPLING_FIELDS``). Unnamed columns never change sampling."""

    sampling_params_column: str | None = None
    """A struct column whose fields set sampling fields per row (Ray Data LLM's
    ``sampling_params``)."""

    keep_columns: tuple[str, ...] = ()
    """Input columns copied to the output unchanged."""

    shard_rows: int = 1024
    """Most rows per shard (one output file each; the unit of retry and resume)."""

    input_format: str = PARQUET
    """``parquet``, or ``openai-batch``: the inputs are OpenAI Batch API request files
    (JSONL), converted to Parquet under the output's ``_manifest/`` when the job is planned
    (``jobs.openai_staging``); the column options then do not apply."""

    output_format: str = PARQUET
    """``parquet``, or ``openai-batch``: once every shard is committed the driver also
    writes ``output.jsonl`` and ``errors.jsonl`` in the OpenAI Batch API's output format
    (``jobs.openai_results``)."""

    def sampling_overrides(self) -> columns.SamplingColumns:
        """The per-row sampling columns.

        Raises:
          JobInputError: An entry names no sampling field, or a field or column twice.
        """
        try:
            return columns.SamplingColumns.parse(self.sampling_columns,
                                                 self.sampling_params_column)
        except ValueError as e:
            raise JobInputError(str(e)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every worker loads and how it sizes its engine."""

    checkpoint: str | None = None
    """Checkpoint path or URL; None runs the bundled demo model."""

    tokenizer: str | None = None
    """SentencePiece model path or URL; required with ``checkpoint``."""

    preset: str | None = None
    """Config preset for checkpoints that carry no config (e.g. ``recurrentgemma-2b``)."""

    dtype: str | None = None
    """Parameter and compute dtype (``bfloat16``, ``float32``); None: bfloat16 on TPU and GPU,
    the stored one on CPU (``griffin_batch.model.dtypes``)."""

    chat: bool = False
    """Wrap each prompt in the instruction-tuned chat format."""

    engine: EngineConfig = EngineConfig()
    """Each worker's engine sizing (``--slots``, ``--decode-steps``, ``--chunk-size``,
    ``--max-prompt-tokens``); longer prompts than ``max_prompt_tokens`` become error rows."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Job-wide sampling parameters; the columns ``IOConfig.sampling_columns`` names override them per row."""

    max_tokens: int = 256
    """Most tokens generated per sample."""

    temperature: float = 0.0
    """0 is greedy."""

    top_k: int | None = None
    """Keep the k most likely tokens (None: all)."""

    top_p: float | None = None
    """Nucleus mass in (0, 1] (None: 1)."""

    seed: int = 0
    """Job seed: a row's stream is seeded by a hash of (this, its id), unless the
    row sets its own seed (streams never depend on batch mates or workers)."""

    stop: tuple[str, ...] = ()
    """Strings that end a completion (cut before the string)."""

    n: int = 1
    """Samples per row; above 1 the output gains a ``sample_index`` column."""

    def params(self) -> requests.SamplingParams:
        """As the engine's ``SamplingParams``."""
        return requests.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            n=self.n,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where workers run and how faults are absorbed."""

    address: str | None = None
    """Ray cluster address; None joins a reachable cluster or starts a local one; ``local`` always starts one."""

    workers: int | None = None
    """Exact worker count (exclusive with min/max_workers): min and max at once."""

    min_workers: int | None = None
    """Workers that must be ready before any shard is sent (default 1, at most one
    per shard); the job fails when fewer are after ``wait_for_workers_s``."""

    max_workers: int | None = None
    """Most workers at once. None: one per accelerator host the cluster holds at
    the moment (growing as nodes join). On a cluster that autoscales, the bound
    to ask for: workers Ray cannot place yet are the autoscaler's demand."""

    wait_for_workers_s: float = faults.DEFAULT_WAIT_FOR_WORKERS_S
    """How long to wait for ``min_workers`` (nodes being created, models loading)."""

    tpu_chips_per_worker: int | None = None
    """TPU chips one worker reserves (one TPU host's chips). None: those of the
    smallest TPU host present, else 4 (a v5e, v6e or v5p host of a multi-host slice)."""

    accelerator: str = "auto"
    """``auto``, ``tpu``, ``gpu`` or ``cpu``."""

    gpus_per_worker: float = 1.0
    """GPUs per GPU worker (1: one worker per GPU; the host's count: one per host)."""

    cpus_per_worker: float = 1.0
    """CPUs a CPU worker reserves."""

    tpu_slice: str | None = None
    """Reserve whole multi-host TPU slices of this type (``v5p-16``, ``v5litepod-32``) with
    Ray's ``SlicePlacementGroup`` and run one worker per host of each: the pool grows
    and shrinks by slices. None: TPU hosts are taken one by one."""

    forward_credentials: bool = False
    """Send this process's storage credentials (``AWS_*`` keys, ``GOOGLE_APPLICATION_CREDENTIALS``,
    fsspec options holding keys or tokens) to workers in Ray's runtime environment.
    Off: workers use their node's own (metadata server, workload identity)."""

    max_in_flight: int | None = None
    """Shards held by one worker at once. None: enough to fill its engine's slots
    (``JobConfig.shards_in_flight``), so small shards do not leave slots idle
    beside a long row."""

    max_preemptions: int = faults.DEFAULT_MAX_PREEMPTIONS
    """Re-runs of a shard whose worker died."""

    max_failures: int = faults.DEFAULT_MAX_FAILURES
    """Re-runs of a shard that raised on a live worker."""

    start_timeout_s: float = faults.WORKER_START_TIMEOUT_S
    """A worker that has not loaded by then is dropped."""

    stall_timeout_s: float = faults.DEFAULT_STALL_TIMEOUT_S
    """A worker that holds shards and makes no progress (no decode round, no
    prefill chunk) for this long is declared hung, killed and replaced; its
    shards run again elsewhere, charged to the preemption budget."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResumeConfig:
    """What to do with an existing output directory."""

    resume: bool = False
    """Continue the job recorded there: committed shards are kept, the rest redone."""

    overwrite: bool = False
    """Delete what is there and start over."""

    checkpoint_every_s: float = 60.0
    """Seconds between a running shard's progress checkpoints (``actors.progress``):
    finished rows, and each decoding sample's fixed-size state and output so far.
    A retried or resumed shard continues from its newest one. 0 disables them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole batch-generation job."""

    io: IOConfig
    """Inputs and output."""

    model: ModelConfig = ModelConfig()
    """Checkpoint, tokenizer and engine sizing."""

    sampling: SamplingConfig = SamplingConfig()
    """Default sampling parameters."""

    cluster: ClusterConfig = ClusterConfig()
    """Workers and fault budgets."""

    resume: ResumeConfig = ResumeConfig()
    """Resume or overwrite."""

    def validate(self) -> None:
        """Raises ``JobInputError`` naming the first inconsistent option."""
        _validate_io(self.io)
        _validate_model(self.model)
        _validate_cluster(self.cluster)
        try:
            self.sampling.params().validate()
        except requests.RequestError as e:  # "max_tokens must be ...": name the option typed
            field, _, rest = str(e).partition(" ")
            raise JobInputError(f"--{field.replace('_', '-')} {rest}") from None
        if self.resume.resume and self.resume.overwrite:
            raise JobInputError("--resume and --overwrite exclude each other")
        if not self.resume.checkpoint_every_s >= 0:
            raise JobInputError(
                f"--checkpoint-every must be >= 0 seconds, got {self.resume.checkpoint_every_s}"
            )

    def scaling(self) -> scaling.ScalingPolicy:
        """The worker pool's bounds (``--workers`` is min and max at once)."""
        c = self.cluster
        low = c.workers or c.min_workers or 1
        high = c.workers or c.max_workers
        return scaling.ScalingPolicy(min_workers=low, max_workers=high,
                                     wait_for_workers_s=c.wait_for_workers_s)

    def shards_in_flight(self) -> int:
        """Shards a worker holds at once (``--max-in-flight``, else enough to fill its slots).

        One more than the slots' worth, and at least two, so the next shard is
        queued in the engine before the slots it will fill free up.
        """
        if self.cluster.max_in_flight is not None:
            return self.cluster.max_in_flight
        samples_per_shard = self.io.shard_rows * self.sampling.n
        return max(2, -(-self.model.engine.num_slots // samples_per_shard) + 1)

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide output contents; a resumed job must keep them."""
        io, m = self.io, self.model
        return {
            "prompt_column": io.prompt_column,
            "id_column": io.id_column,
            "sampling_columns": io.sampling_overrides().to_json(),
            "keep_columns": list(io.keep_columns),
            "shard_rows": io.shard_rows,
            "checkpoint": m.checkpoint or "<demo>",
            "tokenizer": m.tokenizer or "<demo>",
            "preset": m.preset,
            "dtype": m.dtype,
            "chat": m.chat,
            "max_prompt_tokens": m.engine.max_prompt_tokens,
            "sampling": {**dataclasses.asdict(self.sampling), "stop": list(self.sampling.stop)},
            # Only when set: a job planned before the option existed still resumes.
            **({"input_format": io.input_format} if io.input_format != PARQUET else {}),
        }


def _positive(value: Any, option: str) -> None:
    if value is not None and value <= 0:
        raise JobInputError(f"{option} must be positive, got {value}")


def _validate_io(io: IOConfig) -> None:
    if not io.inputs:
        raise JobInputError("--input is required (Parquet files, directories or globs)")
    if not io.output:
        raise JobInputError("--output is required")
    _positive(io.shard_rows, "--shard-rows")
    if not io.prompt_column:
        raise JobInputError("--prompt-column must not be empty")
    clash = sorted(set(io.keep_columns) & output.RESERVED_COLUMNS)
    if clash:
        raise JobInputError(
            f"--keep-columns {clash} collide with output columns {sorted(output.RESERVED_COLUMNS)}"
        )
    if len(set(io.keep_columns)) != len(io.keep_columns):
        raise JobInputError(f"--keep-columns lists a column twice: {list(io.keep_columns)}")
    if io.id_column is not None and not io.id_column:
        raise JobInputError("--id-column must not be empty")
    io.sampling_overrides()
    for option, value, choices in (("--input-format", io.input_format, INPUT_FORMATS),
                                   ("--output-format", io.output_format, OUTPUT_FORMATS)):
        if value not in choices:
            raise JobInputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    if io.input_format == OPENAI_BATCH:
        given = [option for option, value in (
            ("--prompt-column", io.prompt_column != "prompt"), ("--id-column", io.id_column),
            ("--sampling-columns", io.sampling_columns),
            ("--sampling-params-column", io.sampling_params_column),
            ("--keep-columns", io.keep_columns)) if value]
        if given:
            raise JobInputError(
                f"{', '.join(given)} do(es) not apply to --input-format openai-batch: each "
                "request's custom_id is its id, its messages the prompt, its body the sampling")


def _validate_model(m: ModelConfig) -> None:
    # Checked here, not where a worker casts its parameters: there it cost a cluster start.
    if m.dtype is not None and m.dtype not in dtypes.DTYPES:
        raise JobInputError(f"--dtype must be one of {', '.join(dtypes.DTYPES)}, got {m.dtype!r}")
    if m.checkpoint and not m.tokenizer:
        raise JobInputError("--checkpoint needs --tokenizer (the SentencePiece model to use)")
    if m.tokenizer and not m.checkpoint:
        raise JobInputError("--tokenizer needs --checkpoint (without both, the demo model runs)")


def _validate_cluster(c: ClusterConfig) -> None:
    try:
        hardware.Accelerator.parse(c.accelerator)
    except ValueError as e:
        raise JobInputError(f"--accelerator: {e}") from None
    for option, value in (
        ("--workers", c.workers),
        ("--min-workers", c.min_workers),
        ("--max-workers", c.max_workers),
        ("--max-in-flight", c.max_in_flight),
        ("--gpus-per-worker", c.gpus_per_worker),
        ("--cpus-per-worker", c.cpus_per_worker),
        ("--stall-timeout", c.stall_timeout_s),
        ("--tpu-chips-per-worker", c.tpu_chips_per_worker),
    ):
        _positive(value, option)
    if c.workers is not None and (c.min_workers is not None or c.max_workers is not None):
        raise JobInputError("--workers excludes --min-workers/--max-workers")
    if c.min_workers is not None and c.max_workers is not None and c.min_workers > c.max_workers:
        raise JobInputError(
            f"--min-workers ({c.min_workers}) is larger than --max-workers ({c.max_workers})"
        )
    if c.max_preemptions < 0 or c.max_failures < 0:
        raise JobInputError("retry budgets must be >= 0")
    if c.tpu_slice is not None:
        try:
            shape = hardware.tpu_slice(c.tpu_slice)
        except ValueError as e:
            raise JobInputError(f"--tpu-slice: {e}") from None
        if c.accelerator not in ("auto", "tpu"):
            raise JobInputError(f"--tpu-slice needs TPU workers, not --accelerator {c.accelerator}")
        if c.tpu_chips_per_worker not in (None, shape.chips_per_host):
            raise JobInputError(f"--tpu-chips-per-worker {c.tpu_chips_per_worker}: a {shape.pod_type} "
                                f"host has {shape.chips_per_host} chips")
    if not c.wait_for_workers_s >= 0:
        raise JobInputError(f"--wait-for-workers must be >= 0 seconds, got {c.wait_for_workers_s}")
