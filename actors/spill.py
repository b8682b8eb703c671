"""A shard's finished samples on the worker's local disk, and its output file written from them.

A shard of long outputs would otherwise sit in the worker's memory until its
last row ends: 1,024 rows of 100k tokens is gigabytes of Python objects. Each
finished sample is appended instead to an Arrow IPC file in a local temporary
directory (``CompletionSpill``), a few at a time, and leaves memory. When the
shard ends, ``write_output`` memory-maps that file and writes the shard's
Parquet file in input order, one row group per window of input rows
(``rows.iter_windows``, read again for the columns kept). The worker's heap then grows with its slots and the
rows of the group it is writing, not with its shard.

The rows written are exactly those of ``rows.assemble`` (tested side by side),
with the same exactly-once check.

A worker killed outright (SIGKILL, the kernel's OOM killer) cannot delete its
spill file, and a long shard's can be gigabytes. Each spill therefore holds an
exclusive ``flock`` on its file for as long as its process lives (the kernel
drops it when the process dies, however it dies), and every new spill first
deletes the files of its own name pattern in its directory whose lock it can
take: their writers are gone. Nothing else there is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from griffin_batch.actors import output, rows, shards
from griffin_batch.model import requests

SPILL_EVERY = 32
"""Finished samples kept in memory before they are appended to the spill file."""

PREFIX, SUFFIX = "griffin-spill-", ".arrow"
ORPHAN_AGE_S = 60.0
"""A spill file this recently changed is never swept: its writer may be between
creating it and taking its lock."""

_log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    pa.field("row", pa.int64(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("num_prompt_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string()),
])


class CompletionSpill:
    """Finished samples of one shard attempt, appended to a local Arrow IPC file.

    Args:
      directory: Where the file goes (None: the system's temporary directory).
    """

    def __init__(self, directory: str | None = None):
        directory = directory or tempfile.gettempdir()
        remove_orphans(directory)
        fd, self.path = tempfile.mkstemp(prefix=PREFIX, suffix=SUFFIX, dir=directory)
        # Without flock on this file system the file is still removed normally, just
        # never swept (remove_orphans cannot take a lock there either).
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd  # the lock lives as long as this descriptor
        self._sink = pa.OSFile(self.path, "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self.count = 0

    def add(self, completions: Iterable[requests.Completion]) -> None:
        """Appends finished samples (their request ids carry the row, see ``rows.row_of``)."""
        done = list(completions)
        if not done:
            return
        self._writer.write_batch(pa.record_batch([
            pa.array([rows.row_of(c.request_id) for c in done], pa.int64()),
            pa.array([c.sample_index for c in done], pa.int32()),
            pa.array([c.tokens for c in done], pa.list_(pa.int32())),
            pa.array([c.text for c in done], pa.string()),
            pa.array([c.finish_reason for c in done], pa.string()),
            pa.array([int(c.num_prompt_tokens) for c in done], pa.int32()),
            pa.array([c.error for c in done], pa.string()),
        ], schema=SCHEMA))
        self.count += len(done)

    def close(self) -> pa.Table:
        """Ends appending; returns the samples as a memory-mapped table (no heap copy)."""
        self._writer.close()
        self._sink.close()
        return pa.ipc.open_file(pa.memory_map(self.path)).read_all()

    def remove(self) -> None:
        """Deletes the file."""
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _is_orphan(fd: int, now: float, min_age_s: float) -> bool:
    """Old enough, and its lock free; takes the lock (until ``fd`` closes) when so."""
    if now - os.fstat(fd).st_mtime < min_age_s:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live spill, or no flock on this file system
        return False
    return True


def remove_orphans(directory: str, min_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Deletes the spill files in ``directory`` whose writer is gone; returns their paths.

    A file qualifies when its name is ``PREFIX...SUFFIX``, it is at least
    ``min_age_s`` old and its lock is free (a live spill holds it).
    """
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(PREFIX) and n.endswith(SUFFIX)]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            if _is_orphan(fd, now, min_age_s):
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:  # another sweeper was first
            pass
        except OSError as err:
            _log.warning("spill: could not remove the orphaned %s: %s", path, err)
        finally:
            os.close(fd)
    if removed:
        _log.info("spill: removed %d file(s) left by killed workers in %s", len(removed),
                  directory)
    return removed


@dataclasses.dataclass(frozen=True)
class OutputStats:
    """What a written shard file holds."""

    samples: int
    error_rows: int
    prompt_tokens: int
    completion_tokens: int


def write_output(ids: Sequence[str], samples_per_row: Sequence[int], samples: pa.Table,
                 windows: Iterable[pa.Table], options: shards.ShardOptions,
                 path: str) -> OutputStats:
    """Writes the shard's Parquet file to local ``path`` in input order, window by window.

    Args:
      ids: Each input row's output id.
      samples_per_row: Samples each input row has (``rows.Prepared.samples``).
      samples: ``CompletionSpill.close()``: every finished sample, rejected rows included.
      windows: The shard's input rows again, in order (``rows.iter_windows``):
        the ``keep_columns`` come from them, one row group per window.
      options: Job options.
      path: Local file to write.

    Raises:
      RowAccountingError: A (row, sample) is missing, duplicated or unexpected.
    """
    position = rows.index_samples(samples_per_row, zip(
        samples["row"].to_pylist(), samples["sample_index"].to_pylist(), strict=True))
    totals = [0, 0, 0, 0]
    writer, first = None, 0
    try:
        for window in windows:
            if writer is None:
                kept = [window.schema.field(c) for c in options.keep_columns
                        if c in window.column_names]
                schema = output.output_schema(options.with_sample_index, kept,
                                              validated=options.validation is not None,
                                              text_column=options.text_column)
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            keys = [(r, i) for r in range(first, first + window.num_rows)
                    for i in range(samples_per_row[r])]
            part = samples.take(pa.array([position[k] for k in keys], pa.int64()))
            group = _group(ids, part, [r for r, _ in keys], first, window, schema,
                           {f.name for f in kept}, options.text_column)
            writer.write_table(group)
            first += window.num_rows
            totals[0] += group.num_rows
            totals[1] += int(pc.sum(pc.equal(group["finish_reason"], "error")).as_py() or 0)
            totals[2] += int(pc.sum(group["num_prompt_tokens"]).as_py() or 0)
            totals[3] += int(pc.sum(group["num_completion_tokens"]).as_py() or 0)
        if writer is None:  # no rows at all
            pq.write_table(output.output_schema(
                options.with_sample_index, text_column=options.text_column).empty_table(), path)
    finally:
        if writer is not None:
            writer.close()
    if first != len(samples_per_row):
        raise rows.RowAccountingError(f"the input gave {first} rows, {len(samples_per_row)} "
                                      "were prepared")
    return OutputStats(*totals)


def row_windows(num_rows: int, window_rows: int | None = None) -> Iterator[pa.Table]:
    """Windows of ``num_rows`` rows and no columns: ``write_output``'s input when none is kept."""
    window_rows = window_rows or rows.WINDOW_ROWS
    for start in range(0, num_rows, window_rows):
        yield pa.table({"_": pa.nulls(min(window_rows, num_rows - start))}).select([])


def _group(ids: Sequence[str], part: pa.Table, row_numbers: list[int], first: int,
           window: pa.Table, schema: pa.Schema, kept: set[str], text_column: str
           ) -> pa.Table:
    is_error = pc.equal(part["finish_reason"], "error")
    columns = {
        "id": pa.array([ids[r] for r in row_numbers], pa.string()),
        text_column: pc.if_else(is_error, "", part["text"]),
        "completion_tokens": part["tokens"],
        "finish_reason": part["finish_reason"],
        "num_prompt_tokens": part["num_prompt_tokens"],
        "num_completion_tokens": pc.list_value_length(part["tokens"]).cast(pa.int32()),
        "error": pc.if_else(is_error, pc.coalesce(part["error"], "unknown error"),
                            pa.scalar(None, pa.string())),
        "sample_index": part["sample_index"],
    }
    indices = pa.array([r - first for r in row_numbers], pa.int64())
    # A kept column is the input's (a staged ``sample_index``, say); columns beyond the
    # base ones (``output.VALIDATION_FIELDS``) come with the samples.
    arrays = [window.column(f.name).take(indices) if f.name in kept
              else columns[f.name] if f.name in columns else part[f.name] for f in schema]
    return pa.Table.from_arrays([_plain(a, f.type) for a, f in zip(arrays, schema, strict=True)],
                                schema=schema)


def _plain(array, type_: pa.DataType) -> pa.ChunkedArray:
    array = array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])
    return array.cast(type_) if array.type != type_ else array
