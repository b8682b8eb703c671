"""The values exchanged between the driver and a worker: shard specs, options, results.

All are frozen, picklable and JSON-able (the plan in the manifest stores specs,
commit records store results).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from griffin_batch.actors import columns, output, validation
from griffin_batch.model import requests


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """One unit of work: a contiguous row range of one Parquet file.

    Attributes:
      shard_id: Zero-padded shard number; names the output ``part-<shard_id>.parquet``.
      path: fsspec URL of the input file.
      file_key: The file's name in generated row ids (``<file_key>#<row index>``).
      row_groups: Consecutive row groups to read.
      offset: Rows to skip at the start of those row groups (a large row group
        is split into several shards).
      num_rows: Rows in the shard.
      first_row: Index within the file of the shard's first row.
    """

    shard_id: str
    path: str
    file_key: str
    row_groups: tuple[int, ...]
    offset: int
    num_rows: int
    first_row: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["row_groups"] = list(self.row_groups)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardSpec:
        return cls(**{**d, "row_groups": tuple(d["row_groups"])})


PROGRESS_DIR = "_progress"
"""Where running shards keep their progress checkpoints, under the output directory."""


def progress_url(output_dir: str, shard_id: str) -> str:
    """The directory of one shard's progress checkpoints."""
    return f"{output_dir.rstrip('/')}/{PROGRESS_DIR}/{shard_id}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """How a worker turns input rows into output rows; the same for every shard of a job.

    Attributes:
      prompt_column: Input column holding the prompt text.
      id_column: Input column holding row ids; None: ``id`` where a file has
        one. Rows without an id get ``<file_key>#<row index>``.
      keep_columns: Input columns copied to the output.
      chat: Wrap prompts in the instruction-tuned chat format.
      sampling: Job-wide sampling parameters; ``sampling_columns`` override them per row.
      sampling_columns: The input columns that set sampling fields per row.
      with_sample_index: Add a ``sample_index`` column (more than one sample per row).
      output_dir: fsspec URL of the job's output directory.
      commit_on_driver: Return the encoded file instead of writing it (for
        process-local file systems such as ``memory://`` that a worker process
        cannot reach).
      checkpoint_every_s: Interval between a running shard's progress
        checkpoints (``actors.progress``); None: none (a retried shard starts over).
      error_column: An input column whose non-null text rejects its row with that
        message (errors found before the rows reached Parquet, e.g. a malformed
        line of an OpenAI batch file); None: no such column.
      validation: Check each finished sample and draw rejected ones again with new
        seeds before the shard's file is written; its rows then record their seed,
        attempts and validity (``actors.validation``). None: no check.
      text_column: The output column of each sample's text (``summary`` for
        ``summarize``).
    """

    prompt_column: str = "prompt"
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    chat: bool = False
    sampling: requests.SamplingParams = requests.SamplingParams()
    sampling_columns: columns.SamplingColumns = columns.SamplingColumns()
    with_sample_index: bool = False
    output_dir: str = ""
    commit_on_driver: bool = False
    checkpoint_every_s: float | None = None
    error_column: str | None = None
    validation: validation.Validation | None = None
    text_column: str = output.TEXT_COLUMN


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardResult:
    """What a worker reports for a finished shard.

    Attributes:
      shard_id: The shard.
      attempt: Driver's attempt number for this shard.
      output_path: URL of the shard's final ``part-<shard_id>.parquet`` (where the
        driver puts the file when it commits the shard).
      rows: Input rows.
      samples: Output rows (rows x samples).
      error_rows: Output rows with finish_reason "error".
      prompt_tokens: Prompt tokens over all samples.
      completion_tokens: Generated tokens over all samples.
      seconds: Wall time on the worker, read to write.
      worker: Name of the worker that ran it.
      restored_tokens: Generated tokens this attempt took from the shard's
        progress checkpoints instead of computing them.
      attempt_path: URL of the attempt's file under ``<output>/_attempts/``, which
        the driver promotes to ``output_path`` (empty in version-1 commit records).
      size: Bytes of that file (None in version-1 commit records).
      sha256: Hex SHA-256 of that file's bytes, computed by the worker from what
        it wrote (None in version-1 commit records).
      payload: The encoded Parquet file when ``commit_on_driver``, else None.
    """

    shard_id: str
    attempt: int
    output_path: str
    rows: int
    samples: int
    error_rows: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    worker: str
    restored_tokens: int = 0
    attempt_path: str = ""
    size: int | None = None
    sha256: str | None = None
    payload: bytes | None = None

    def record(self) -> dict[str, Any]:
        """JSON-able fields, without the payload."""
        d = dataclasses.asdict(self)
        d.pop("payload")
        return d

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> ShardResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})
