"""The fixed output schema, attempt files and the one-way promotion of a shard's file.

A worker never writes a shard's final name. Each attempt writes its own file,
``<output>/_attempts/part-<shard id>.a<attempt>-<8 hex>.parquet`` (the random
suffix makes two runs of the same attempt number distinct; Parquet dataset
readers skip ``_``-prefixed directories), and reports the file's URL, size and
SHA-256 with its statistics. The driver, and only the driver, then promotes the
file it accepts to ``part-<shard id>.parquet`` (``promote``):

* on file systems with an atomic rename (local disks, ``memory://``), a rename;
* on object stores (``gs://``, ``s3://``, ...), a server-side copy and a delete
  of the attempt file: the final object appears all at once when the copy
  completes, and the data never passes through the driver.

A worker presumed dead that finishes late therefore writes only a file of its
own under ``_attempts/``, which nobody promotes; ``griffin_batch.jobs.manifest``
records each promotion and removes what is left of ``_attempts/``.

``publish`` makes small files (commit records, the plan) visible all at once.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import uuid
from collections.abc import Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

TEMP_DIR = "_temporary"
ATTEMPTS_DIR = "_attempts"

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("completion_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("num_prompt_tokens", pa.int32(), nullable=False),
    pa.field("num_completion_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string(), nullable=True),
)
TEXT_COLUMN = "completion"
"""The output column of each sample's text, unless a job names another (``ShardOptions``)."""
SAMPLE_INDEX_FIELD = pa.field("sample_index", pa.int32(), nullable=False)
RESERVED_COLUMNS = frozenset(f.name for f in (*BASE_FIELDS, SAMPLE_INDEX_FIELD))
VALIDATION_FIELDS: tuple[pa.Field, ...] = (
    pa.field("seed", pa.uint64(), nullable=True),  # null: rejected before it reached the engine
    pa.field("attempts", pa.int32(), nullable=False),
    pa.field("valid", pa.bool_(), nullable=True),  # null: not checked
    pa.field("validation_error", pa.string(), nullable=True),
)
"""Columns of jobs whose samples are checked and redrawn (``actors.validation``)."""


def output_schema(with_sample_index: bool, kept: Sequence[pa.Field] = (),
                  validated: bool = False, text_column: str = TEXT_COLUMN) -> pa.Schema:
    """The schema of every output file of a job.

    Args:
      with_sample_index: Include ``sample_index`` (jobs with more than one sample per row).
      kept: Input columns copied through, in order.
      validated: Include ``VALIDATION_FIELDS`` (``ShardOptions.validation`` is set).
      text_column: The name of the samples' text column (``TEXT_COLUMN``'s place).

    Raises:
      ValueError: ``text_column`` is the name of another output column.
    """
    fields = [f.with_name(text_column) if f.name == TEXT_COLUMN else f for f in BASE_FIELDS]
    names = [f.name for f in (*fields, SAMPLE_INDEX_FIELD, *VALIDATION_FIELDS, *kept)]
    if text_column != TEXT_COLUMN and names.count(text_column) > 1:
        raise ValueError(f"the output's text column {text_column!r} is another column's name")
    if with_sample_index:
        fields.append(SAMPLE_INDEX_FIELD)
    if validated:
        fields.extend(VALIDATION_FIELDS)
    return pa.schema([*fields, *kept])


def part_name(shard_id: str) -> str:
    """File name of a shard's output."""
    return f"part-{shard_id}.parquet"


def attempt_name(shard_id: str, attempt: int) -> str:
    """A fresh, unique file name for one attempt at a shard (random on every call)."""
    return f"part-{shard_id}.a{attempt}-{secrets.token_hex(4)}.parquet"


def is_attempt_of(name: str, shard_id: str) -> bool:
    """Whether file name ``name`` is one of ``attempt_name(shard_id, ...)``."""
    return name.startswith(f"part-{shard_id}.a") and name.endswith(".parquet")


def digest(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the checksum commit records carry)."""
    return hashlib.sha256(data).hexdigest()


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex SHA-256 of a whole file, read in blocks (memory stays flat)."""
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def num_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Rows of a Parquet file, from its footer alone."""
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def write_attempt(fs: fsspec.AbstractFileSystem, directory: str, name: str, data: bytes) -> str:
    """Writes one attempt's file as ``directory/_attempts/name``; returns its path.

    No staging is needed: the name is unique to this attempt, and the driver
    reads it only after the worker has reported the write complete.
    """
    path = _attempt_path(fs, directory, name)
    fs.pipe_file(path, data)
    return path


def write_attempt_file(fs: fsspec.AbstractFileSystem, directory: str, name: str,
                       local_path: str) -> str:
    """``write_attempt`` from a local file, streamed from disk (``fs.put_file``)."""
    path = _attempt_path(fs, directory, name)
    fs.put_file(local_path, path)
    return path


def _attempt_path(fs: fsspec.AbstractFileSystem, directory: str, name: str) -> str:
    attempts = f"{directory.rstrip('/')}/{ATTEMPTS_DIR}"
    if has_atomic_rename(fs):
        fs.makedirs(attempts, exist_ok=True)
    return f"{attempts}/{name}"


def promote(fs: fsspec.AbstractFileSystem, source: str, final: str) -> None:
    """Moves attempt file ``source`` to its final name ``final`` (same file system).

    A rename where the file system has one; on object stores a server-side
    copy (the new object appears complete or not at all) then a delete.
    """
    if has_atomic_rename(fs) or is_process_local(fs):
        fs.mv(source, final)
    else:
        fs.cp_file(source, final)
        fs.rm_file(source)


def encode(table: pa.Table) -> bytes:
    """The table as a Parquet file in memory."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def has_atomic_rename(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs.mv`` replaces a file atomically (true of local POSIX file systems)."""
    return isinstance(fs, LocalFileSystem)


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether only this process can see ``fs`` (``memory://``)."""
    return isinstance(fs, MemoryFileSystem)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL any process can open: plain paths for local files, ``proto://...`` otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def publish(
    fs: fsspec.AbstractFileSystem,
    directory: str,
    name: str,
    data: bytes,
    *,
    temp_dir: str | None = None,
) -> str:
    """Makes ``data`` visible as ``directory/name`` all at once (small driver-written files).

    Args:
      fs: File system of ``directory``.
      directory: Output directory path (without protocol).
      name: Final file name.
      data: Complete file contents.
      temp_dir: Where the file is staged before its rename (same file system;
        default ``directory/_temporary``).

    Returns:
      The final path.
    """
    final = f"{directory.rstrip('/')}/{name}"
    if has_atomic_rename(fs):
        temp_dir = temp_dir or f"{directory.rstrip('/')}/{TEMP_DIR}"
        fs.makedirs(temp_dir, exist_ok=True)
        temp = f"{temp_dir}/{name}.{uuid.uuid4().hex}"
        fs.pipe_file(temp, data)
        fs.mv(temp, final)
    else:
        fs.pipe_file(final, data)
    return final
