"""``ProcessorConfig``: what a Ray Data processor loads, how it samples and how its pool scales.

The shape follows Ray Data LLM's processor configs (``batch_size``,
``concurrency`` as an int or ``(min, max)``, ``max_concurrent_batches``,
``accelerator_type``, ``runtime_env``), with the model, engine and sampling
fields of the ``generate`` job. Defaults the job also has come from the job's
own config values (``jobs.config``), never from copies of their literals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from griffin_batch.actors import columns, shards, worker
from griffin_batch.cluster import hardware
from griffin_batch.jobs import config as config_lib
from griffin_batch.model import requests
from griffin_batch.model.engine_config import EngineConfig

_MODEL = config_lib.ModelConfig()
_CLUSTER = config_lib.ClusterConfig()

SAMPLING_PARAMS_COLUMN = "sampling_params"
"""The struct column of per-row sampling fields, named as in Ray Data LLM."""


class ProcessorConfigError(ValueError):
    """A processor option is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    """A Griffin generation processor for Ray Data (see ``build_processor``).

    Attributes:
      checkpoint: Checkpoint path or URL; None runs the bundled demo model.
      tokenizer: SentencePiece model path or URL; required with ``checkpoint``.
      preset: Config preset for checkpoints that carry no config.
      dtype: Parameter and compute dtype (``bfloat16``, ``float32``); None: bfloat16 on TPU
        and GPU, the stored one on CPU (``griffin_batch.model.dtypes``).
      engine: Each actor's engine sizing (slots, decode steps, chunk size, prompt limit).
      chat: Wrap each prompt in the instruction-tuned chat format.
      prompt_column: The column holding the prompt text.
      id_column: A column whose value (as text) seeds each row's random stream, as
        the job's row id does; None: ``id`` where the dataset has one. Rows without
        an id get a fresh one per batch, so their sampled (temperature > 0) output is
        not reproducible: give an id column or a per-row ``seed`` for that.
      sampling: Default sampling parameters; rows override them.
      sampling_params_column: A struct column whose fields (``max_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ``n``) set that row's
        sampling, as Ray Data LLM's ``sampling_params``; a null field keeps the default.
        None: no such column.
      sampling_columns: Plain columns that set sampling fields per row: ``FIELD`` or
        ``FIELD=COLUMN``, as the job's ``--sampling-columns``.
      batch_size: Rows per batch handed to an actor. None: the engine's ``num_slots``,
        so one batch fills every slot.
      concurrency: Actors: ``n`` for an autoscaling pool of 1 to ``n`` (as Ray Data
        LLM's engine stage), or ``(min, max)``.
      max_concurrent_batches: Batches one actor runs at once. They share its one
        engine, so the next batch's rows take slots as the previous batch's finish
        instead of the slots draining at each batch's end.
      accelerator: ``auto``, ``tpu``, ``gpu`` or ``cpu``: what each actor reserves
        (``cluster.hardware.worker_spec``: a TPU host's chips, ``gpus_per_worker``
        GPUs, or ``cpus_per_worker`` CPUs).
      gpus_per_worker: GPUs one GPU actor reserves.
      cpus_per_worker: CPUs one CPU actor reserves.
      tpu_chips_per_worker: TPU chips one TPU actor reserves; None: the smallest TPU
        host's, else ``hardware.DEFAULT_TPU_CHIPS_PER_HOST``.
      accelerator_type: Ray's accelerator type label the actors must run on
        (``A100``, ``TPU-V5LITEPOD``); None: any.
      runtime_env: Ray runtime environment of the actors.
    """

    checkpoint: str | None = _MODEL.checkpoint
    tokenizer: str | None = _MODEL.tokenizer
    preset: str | None = _MODEL.preset
    dtype: str | None = _MODEL.dtype
    engine: EngineConfig = _MODEL.engine
    chat: bool = _MODEL.chat
    prompt_column: str = config_lib.IOConfig.prompt_column
    id_column: str | None = config_lib.IOConfig.id_column
    sampling: config_lib.SamplingConfig = config_lib.SamplingConfig()
    sampling_params_column: str | None = SAMPLING_PARAMS_COLUMN
    sampling_columns: tuple[str, ...] = ()
    batch_size: int | None = None
    concurrency: int | tuple[int, int] = 1
    max_concurrent_batches: int = 4
    accelerator: str = _CLUSTER.accelerator
    gpus_per_worker: float = _CLUSTER.gpus_per_worker
    cpus_per_worker: float = _CLUSTER.cpus_per_worker
    tpu_chips_per_worker: int | None = _CLUSTER.tpu_chips_per_worker
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None

    def validate(self) -> None:
        """Raises ``ProcessorConfigError`` naming the first invalid field."""
        self.pool_size()
        for name in ("batch_size", "max_concurrent_batches", "gpus_per_worker",
                     "cpus_per_worker", "tpu_chips_per_worker"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ProcessorConfigError(f"ProcessorConfig.{name} must be positive, got {value!r}")
        if not self.prompt_column:
            raise ProcessorConfigError("ProcessorConfig.prompt_column must not be empty")
        if self.checkpoint and not self.tokenizer:
            raise ProcessorConfigError(
                "ProcessorConfig.checkpoint needs a tokenizer (the SentencePiece model to use)")
        if self.tokenizer and not self.checkpoint:
            raise ProcessorConfigError(
                "ProcessorConfig.tokenizer needs a checkpoint (without both, the demo model runs)")
        try:
            hardware.Accelerator.parse(self.accelerator)
        except ValueError as e:
            raise ProcessorConfigError(f"ProcessorConfig.accelerator: {e}") from None
        try:
            self.sampling.params().validate()
        except requests.RequestError as e:
            raise ProcessorConfigError(f"ProcessorConfig.sampling: {e}") from None
        self.sampling_overrides()

    def pool_size(self) -> tuple[int, int]:
        """The actor pool's (min, max) size.

        Raises:
          ProcessorConfigError: ``concurrency`` is not a positive int or ``(min, max)``
            with ``1 <= min <= max``.
        """
        c = self.concurrency
        if _is_count(c):
            return 1, c
        if isinstance(c, tuple | list) and len(c) == 2 and all(map(_is_count, c)) and c[0] <= c[1]:
            return int(c[0]), int(c[1])
        raise ProcessorConfigError(
            "ProcessorConfig.concurrency must be a positive int n (1 to n actors) or "
            f"(min, max) with 1 <= min <= max, got {c!r}")

    def rows_per_batch(self) -> int:
        """``batch_size``, or the engine's slots when unset."""
        return self.batch_size or self.engine.num_slots

    def sampling_overrides(self) -> columns.SamplingColumns:
        """The per-row sampling columns.

        Raises:
          ProcessorConfigError: An entry names no sampling field, or a field or column twice.
        """
        try:
            return columns.SamplingColumns.parse(self.sampling_columns,
                                                 self.sampling_params_column)
        except ValueError as e:
            raise ProcessorConfigError(f"ProcessorConfig.sampling_columns: {e}") from None

    def model_spec(self) -> worker.ModelSpec:
        """What each actor loads (the job worker's own spec)."""
        return worker.ModelSpec(checkpoint=self.checkpoint, tokenizer=self.tokenizer,
                                preset=self.preset, dtype=self.dtype, engine=self.engine)

    def row_options(self) -> shards.ShardOptions:
        """How an actor turns rows into requests: the job's per-row parsing and checks.

        Every output row carries ``sample_index``, so a dataset's batches share one
        schema whatever ``n`` their rows ask for.
        """
        return shards.ShardOptions(
            prompt_column=self.prompt_column,
            id_column=self.id_column,
            chat=self.chat,
            sampling=self.sampling.params(),
            sampling_columns=self.sampling_overrides(),
            with_sample_index=True,
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
