"""The fixed output schema and atomic publication of one shard's Parquet file.

A shard's file appears under its final name only when complete:

* On file systems with an atomic rename (local disks), the file is written to
  ``<output>/_temporary/`` and renamed over ``part-<shard id>.parquet``.
* On object stores (``gs://``, ``s3://``, ...), which have no atomic rename
  (and whose emulators may lack the copy/move API), the encoded file goes up
  in one upload: an object becomes visible only when its upload completes.

Because the name depends only on the shard, a re-run of a shard replaces its
file instead of adding rows: a shard's rows appear once however often it runs.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

TEMP_DIR = "_temporary"

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("completion_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("num_prompt_tokens", pa.int32(), nullable=False),
    pa.field("num_completion_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string(), nullable=True),
)
SAMPLE_INDEX_FIELD = pa.field("sample_index", pa.int32(), nullable=False)
RESERVED_COLUMNS = frozenset(f.name for f in (*BASE_FIELDS, SAMPLE_INDEX_FIELD))


def output_schema(with_sample_index: bool, kept: Sequence[pa.Field] = ()) -> pa.Schema:
    """The schema of every output file of a job.

    Args:
      with_sample_index: Include ``sample_index`` (jobs with more than one sample per row).
      kept: Input columns copied through, in order.
    """
    fields = list(BASE_FIELDS)
    if with_sample_index:
        fields.append(SAMPLE_INDEX_FIELD)
    return pa.schema([*fields, *kept])


def part_name(shard_id: str) -> str:
    """File name of a shard's output."""
    return f"part-{shard_id}.parquet"


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
    """Makes ``data`` visible as ``directory/name`` all at once.

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
