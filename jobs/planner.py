"""Planning a job from Parquet metadata alone: which files, which columns, which shards.

The driver never loads the data set: it reads each file's footer (row-group
sizes and schema), checks the columns the job needs, and cuts every file into
shards of at most ``shard_rows`` rows by (file, row-group range). A row group
larger than a shard is split by row offset; workers read only their groups.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import posixpath
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import output, rows, shards
from griffin_batch.jobs import config as config_lib

_GLOB_CHARS = "*?["
_METADATA_THREADS = 16  # footers come from object stores; latency, not bandwidth, bounds this
_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputFile:
    """One input file's metadata.

    Attributes:
      url: fsspec URL (plain absolute path for local files).
      key: Name used in generated row ids.
      num_rows: Rows in the file.
      row_group_rows: Rows of each row group.
      columns: Column names.
    """

    url: str
    key: str
    num_rows: int
    row_group_rows: tuple[int, ...]
    columns: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "row_group_rows": list(self.row_group_rows),
            "columns": list(self.columns),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputFile:
        return cls(
            **{**d, "row_group_rows": tuple(d["row_group_rows"]), "columns": tuple(d["columns"])}
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobPlan:
    """Files and shards of a job.

    Attributes:
      files: Input files in a fixed order.
      shards: Every shard, ids in order.
      with_sample_index: Outputs carry ``sample_index``.
      keep_types: Arrow type (as text) of each kept column.
    """

    files: tuple[InputFile, ...]
    shards: tuple[shards.ShardSpec, ...]
    with_sample_index: bool
    keep_types: dict[str, str]

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [f.to_dict() for f in self.files],
            "shards": [s.to_dict() for s in self.shards],
            "with_sample_index": self.with_sample_index,
            "keep_types": self.keep_types,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobPlan:
        return cls(
            files=tuple(InputFile.from_dict(f) for f in d["files"]),
            shards=tuple(shards.ShardSpec.from_dict(s) for s in d["shards"]),
            with_sample_index=d["with_sample_index"],
            keep_types=dict(d["keep_types"]),
        )


def plan(io: config_lib.IOConfig, sampling: config_lib.SamplingConfig) -> JobPlan:
    """Plans a job from file metadata, checking the columns it needs.

    Raises:
      JobInputError: An input is missing, unreadable or not Parquet, or lacks a
        needed column (the message names the file and column).
    """
    urls = expand_inputs(io.inputs)
    with concurrent.futures.ThreadPoolExecutor(min(_METADATA_THREADS, len(urls))) as pool:
        footers = list(pool.map(_read_footer, urls))
    keys = _file_keys(urls)
    files, keep_types = [], {}
    for url, key, (schema, group_rows) in zip(urls, keys, footers, strict=True):
        _check_columns(url, schema, io, keep_types)
        files.append(
            InputFile(
                url=url,
                key=key,
                num_rows=sum(group_rows),
                row_group_rows=tuple(group_rows),
                columns=tuple(schema.names),
            )
        )
    specs: list[shards.ShardSpec] = []
    for f in files:
        specs.extend(split_file(f, io.shard_rows))
    width = max(5, len(str(len(specs) - 1)))
    specs = [dataclasses.replace(s, shard_id=f"{i:0{width}d}") for i, s in enumerate(specs)]
    with_index = sampling.n > 1 or any("n" in f.columns for f in files)
    return JobPlan(
        files=tuple(files), shards=tuple(specs), with_sample_index=with_index, keep_types=keep_types
    )


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Input URLs of files matching ``patterns`` (files, directories, globs), deduplicated, sorted per pattern.

    Raises:
      JobInputError: A pattern names nothing.
    """
    urls: list[str] = []
    for pattern in patterns:
        try:
            fs, path = fsspec.core.url_to_fs(pattern)
        except (ValueError, ImportError) as e:
            raise config_lib.JobInputError(f"--input {pattern}: {e}") from None
        try:
            found = _list(fs, path)
        except OSError as e:
            raise config_lib.JobInputError(f"--input {pattern}: cannot list: {e}") from None
        if not found:
            raise config_lib.JobInputError(f"--input {pattern} matches no Parquet files")
        urls.extend(output.url_of(fs, p) for p in sorted(found))
    return list(dict.fromkeys(urls))


def _list(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    if any(c in path for c in _GLOB_CHARS):
        return [p for p in fs.glob(path) if fs.isfile(p)]
    if fs.isdir(path):
        return [
            p
            for p in fs.find(path)
            if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
        ]
    if fs.isfile(path):
        return [path]
    raise config_lib.JobInputError(f"--input {path}: no such file or directory")


def _read_footer(url: str) -> tuple[pa.Schema, list[int]]:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            return pf.schema_arrow, [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise config_lib.JobInputError(f"input {url} is not a readable Parquet file: {e}") from None
    except OSError as e:
        raise config_lib.JobInputError(f"cannot read input {url}: {e}") from None


def _file_keys(urls: Sequence[str]) -> list[str]:
    """File names for row ids; the full path where two inputs share a name."""
    names = [posixpath.basename(u) for u in urls]
    clashing = {n for n in names if names.count(n) > 1}
    return [u if n in clashing else n for u, n in zip(urls, names, strict=True)]


def _check_columns(
    url: str, schema: pa.Schema, io: config_lib.IOConfig, keep_types: dict[str, str]
) -> None:
    names = schema.names
    if io.prompt_column not in names:
        raise config_lib.JobInputError(
            f"input {url} has no prompt column {io.prompt_column!r} (--prompt-column); "
            f"its columns are {names}"
        )
    prompt_type = schema.field(io.prompt_column).type
    if prompt_type not in _STRING_TYPES:
        raise config_lib.JobInputError(
            f"input {url}: prompt column {io.prompt_column!r} has type {prompt_type}, expected text"
        )
    for column in io.keep_columns:
        if column not in names:
            raise config_lib.JobInputError(
                f"input {url} has no column {column!r} named in --keep-columns; "
                f"its columns are {names}"
            )
        kind = str(schema.field(column).type)
        if keep_types.setdefault(column, kind) != kind:
            raise config_lib.JobInputError(
                f"input {url}: kept column {column!r} has type {kind}, other inputs have "
                f"{keep_types[column]}"
            )


def split_file(f: InputFile, shard_rows: int) -> list[shards.ShardSpec]:
    """Shards of one file (ids left blank): whole row groups packed up to ``shard_rows``,
    a larger row group cut into near-equal pieces."""
    out: list[shards.ShardSpec] = []
    group: list[int] = []
    group_rows, group_first, start = 0, 0, 0

    def emit(groups, offset, n, first):
        out.append(
            shards.ShardSpec(
                shard_id="",
                path=f.url,
                file_key=f.key,
                row_groups=tuple(groups),
                offset=offset,
                num_rows=n,
                first_row=first,
            )
        )

    for index, n in enumerate(f.row_group_rows):
        if n > shard_rows:
            if group:
                emit(group, 0, group_rows, group_first)
                group, group_rows = [], 0
            pieces = -(-n // shard_rows)
            bounds = [n * k // pieces for k in range(pieces + 1)]
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                emit([index], lo, hi - lo, start + lo)
        elif n > 0:
            if group_rows + n > shard_rows:
                emit(group, 0, group_rows, group_first)
                group, group_rows = [], 0
            if not group:
                group_first = start
            group.append(index)
            group_rows += n
        start += n
    if group:
        emit(group, 0, group_rows, group_first)
    return out


def read_inline(spec: shards.ShardSpec, options: shards.ShardOptions) -> pa.Table | None:
    """The shard's rows when its file is process-local (the driver ships them), else None."""
    fs, _ = fsspec.core.url_to_fs(spec.path)
    return rows.read_rows(spec, options) if output.is_process_local(fs) else None
