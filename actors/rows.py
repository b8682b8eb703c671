"""Rows in, rows out: reading a shard, turning rows into requests, assembling output rows.

Every input row carries its index within the shard through the engine (in the
request id), and ``assemble`` refuses to build output unless each
(row, sample) came back exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import columns, output, shards
from griffin_batch.model import requests


class InputChangedError(RuntimeError):
    """The shard's rows are not what the plan recorded (file replaced or truncated)."""


class RowAccountingError(RuntimeError):
    """A row came back missing, duplicated or unexpected from the engine."""


def wanted_columns(options: shards.ShardOptions) -> list[str]:
    """Input columns a worker reads (those a file lacks are skipped)."""
    names = [options.prompt_column, options.id_column or "id", *options.keep_columns,
             *options.sampling_columns.columns(),
             *([options.error_column] if options.error_column else [])]
    return list(dict.fromkeys(names))


WINDOW_ROWS = 256
"""Input rows a worker reads, turns into requests and writes out at a time."""


def read_rows(spec: shards.ShardSpec, options: shards.ShardOptions) -> pa.Table:
    """Reads only the shard's row groups and columns, all at once (see ``iter_windows``).

    Raises:
      InputChangedError: The file no longer holds the planned rows or columns.
    """
    windows = list(iter_windows(spec, options))
    return pa.concat_tables(windows) if windows else pa.table({options.prompt_column: []})


def iter_windows(spec: shards.ShardSpec, options: shards.ShardOptions,
                 table: pa.Table | None = None,
                 window_rows: int | None = None) -> Iterator[pa.Table]:
    """The shard's rows in order, at most ``window_rows`` at a time, read as they are needed.

    Args:
      spec: The shard.
      options: Job options (which columns to read).
      table: The shard's rows when already read (the driver's, for process-local
        inputs): sliced instead of read.
      window_rows: Most rows per window (default ``WINDOW_ROWS``; a window may be
        shorter at a row group's end).

    Raises:
      InputChangedError: The file no longer holds the planned rows or columns.
    """
    window_rows = window_rows or WINDOW_ROWS
    if table is not None:
        for start in range(0, table.num_rows, window_rows):
            yield table.slice(start, window_rows)
        return
    fs, path = fsspec.core.url_to_fs(spec.path)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _read_error(spec.path, e) from None
        names = set(pf.schema_arrow.names)
        if options.prompt_column not in names:
            raise InputChangedError(f"{spec.path}: column {options.prompt_column!r} is gone")
        if max(spec.row_groups, default=-1) >= pf.num_row_groups:
            raise InputChangedError(
                f"{spec.path}: has {pf.num_row_groups} row groups, the plan reads "
                f"{list(spec.row_groups)}; the file changed since the job was planned"
            )
        wanted = [c for c in wanted_columns(options) if c in names]
        skip, left = spec.offset, spec.num_rows
        batches = pf.iter_batches(batch_size=window_rows, row_groups=list(spec.row_groups),
                                  columns=wanted)
        for batch in _named_errors(spec.path, batches):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch = batch.slice(skip, left)
            skip, left = 0, left - batch.num_rows
            yield pa.Table.from_batches([batch])
            if not left:
                return
    if left:
        raise InputChangedError(
            f"{spec.path}: read {spec.num_rows - left} rows where the plan has {spec.num_rows}; "
            "the file changed since the job was planned"
        )


class InputReadError(RuntimeError):
    """The shard's rows cannot be read (a corrupt page, a truncated file); names the file."""


def _named_errors(path: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches``, with a decoding error raised as one that names the file."""
    try:
        yield from batches
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _read_error(path, e) from None


def _read_error(path: str, error: BaseException) -> InputReadError:
    # One line: Ray reports the last line of a remote traceback as the cause.
    return InputReadError(f"cannot read input {path}: {type(error).__name__}: "
                          f"{' '.join(str(error).split())}")


def request_id(spec: shards.ShardSpec, attempt: int, row: int) -> str:
    """Engine request id of a row: unique per shard attempt, carries the row index."""
    return f"{spec.shard_id}:{attempt}:{row}"


def row_of(request_id_: str) -> int:
    """The row index carried by a request id."""
    return int(request_id_.rsplit(":", 1)[1])


@dataclasses.dataclass
class Prepared:
    """A shard's rows as engine work.

    Attributes:
      ids: Output id of each row.
      requests: Valid rows, for the engine.
      rejected: Error completions of rows rejected before the engine.
      samples: Samples expected per row.
    """

    ids: list[str]
    requests: list[requests.Request]
    rejected: list[requests.Completion]
    samples: list[int]


def prepare(
    table: pa.Table,
    spec: shards.ShardSpec,
    options: shards.ShardOptions,
    attempt: int,
    chat_format: Callable[[str], Any] | None = None,
    first: int = 0,
) -> Prepared:
    """Builds one request per valid row; bad rows become error completions.

    Args:
      table: The shard's rows, or a window of them (see ``iter_windows``).
      spec: The shard.
      options: Job options.
      attempt: Attempt number (part of request ids).
      chat_format: Wraps prompt text in the chat format (``--chat``).
      first: Index within the shard of ``table``'s first row.
    """
    ids = row_ids(table, spec, options.id_column, first)
    prompts = columns.values(table.column(options.prompt_column))
    overrides = columns.row_overrides(table, options.sampling_columns)
    known_errors = _known_errors(table, options.error_column)
    out = Prepared(ids=ids, requests=[], rejected=[], samples=[])
    for i, prompt in enumerate(prompts):
        rid = request_id(spec, attempt, first + i)
        if known_errors[i] is not None:  # the row was rejected before it became Parquet
            _reject(out, rid, 1, known_errors[i])
            continue
        try:
            params = columns.apply_overrides(options.sampling, overrides[i])
        except requests.RequestError as e:
            _reject(out, rid, 1, str(e))  # n itself may be what is invalid
            continue
        if "seed" not in overrides[i]:  # a row's own seed pins it; else its id decides
            params = dataclasses.replace(
                params, seed=columns.row_seed(options.sampling.seed, ids[i]))
        try:
            text = columns.text_of(options.prompt_column, prompt)
        except requests.RequestError as e:
            _reject(out, rid, params.n, str(e))
            continue
        if chat_format is not None:
            text = chat_format(text)
        out.samples.append(params.n)
        out.requests.append(requests.Request(request_id=rid, prompt=text, params=params))
    return out


def _known_errors(table: pa.Table, error_column: str | None) -> list[str | None]:
    """Each row's error from ``error_column`` (None where it has none, or without the column)."""
    if error_column is None or error_column not in table.column_names:
        return [None] * table.num_rows
    return [None if v is None else columns.id_text(v)
            for v in columns.values(table.column(error_column))]


def _reject(out: Prepared, rid: str, n: int, message: str) -> None:
    out.samples.append(n)
    out.rejected.extend(
        requests.Completion(request_id=rid, sample_index=i, finish_reason="error", error=message)
        for i in range(n)
    )


def row_ids(table: pa.Table, spec: shards.ShardSpec, id_column: str | None,
            first: int = 0) -> list[str]:
    """Each row's id: the id column's value as text, else ``<file_key>#<row index in file>``.

    Args:
      table: The rows.
      spec: Their shard.
      id_column: The id column; None: ``id`` where the file has one.
      first: Index within the shard of ``table``'s first row.
    """
    fallback = [f"{spec.file_key}#{spec.first_row + first + i}" for i in range(table.num_rows)]
    column = id_column or "id"
    if column not in table.column_names:
        return fallback
    values = columns.id_texts(table.column(column))
    return [fb if v is None else v for v, fb in zip(values, fallback, strict=True)]


def index_samples(samples_per_row: Sequence[int],
                  keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """Where each (row, sample) stands in ``keys``, checking each expected one is there once.

    Args:
      samples_per_row: Samples each row has (``Prepared.samples``).
      keys: (row, sample index) of each finished sample, in any order.

    Raises:
      RowAccountingError: A (row, sample) is missing, duplicated or unexpected.
    """
    position: dict[tuple[int, int], int] = {}
    for i, (row, sample) in enumerate(keys):
        if not (0 <= row < len(samples_per_row) and 0 <= sample < samples_per_row[row]):
            raise RowAccountingError(f"unexpected completion for row {row} sample {sample}")
        if (row, sample) in position:
            raise RowAccountingError(f"row {row} sample {sample} came back twice")
        position[(row, sample)] = i
    missing = [(r, i) for r, n in enumerate(samples_per_row) for i in range(n)
               if (r, i) not in position]
    if missing:
        raise RowAccountingError(
            f"{len(missing)} (row, sample) pairs never came back, e.g. {missing[:5]}")
    return position


def assemble(
    prepared: Prepared,
    completions: Iterable[requests.Completion],
    table: pa.Table,
    options: shards.ShardOptions,
) -> pa.Table:
    """Output rows in input order (then sample order), checking each came back exactly once.

    Raises:
      RowAccountingError: A (row, sample) is missing, duplicated or unexpected.
    """
    done_list = list(completions)
    position = index_samples(prepared.samples,
                             [(row_of(c.request_id), c.sample_index) for c in done_list])
    order = [(r, i) for r, n in enumerate(prepared.samples) for i in range(n)]
    got = {k: done_list[i] for k, i in position.items()}
    done = [got[k] for k in order]
    return _table(prepared, done, [r for r, _ in order], table, options)


def _table(
    prepared: Prepared,
    done: Sequence[requests.Completion],
    rows: list[int],
    table: pa.Table,
    options: shards.ShardOptions,
) -> pa.Table:
    kept = [table.schema.field(c) for c in options.keep_columns if c in table.column_names]
    schema = output.output_schema(options.with_sample_index, kept,
                                  text_column=options.text_column)
    columns: dict[str, Any] = {
        "id": [prepared.ids[r] for r in rows],
        options.text_column: [c.text if c.finish_reason != "error" else "" for c in done],
        "completion_tokens": [list(c.tokens) for c in done],
        "finish_reason": [c.finish_reason for c in done],
        "num_prompt_tokens": [int(c.num_prompt_tokens) for c in done],
        "num_completion_tokens": [len(c.tokens) for c in done],
        "error": [
            (c.error or "unknown error") if c.finish_reason == "error" else None for c in done
        ],
    }
    if options.with_sample_index:
        columns["sample_index"] = [c.sample_index for c in done]
    arrays = [pa.array(columns[f.name], f.type) for f in schema if f.name in columns]
    indices = pa.array(rows, pa.int64())
    arrays += [table.column(f.name).take(indices) for f in kept]
    return pa.Table.from_arrays(arrays, schema=schema)
