"""Planning a job from Parquet metadata alone: which files, which columns, which shards.

The driver never loads the data set: it reads each file's footer (row-group
sizes and schema), checks the columns the job needs, and cuts every file into
shards of at most ``shard_rows`` rows by (file, row-group range). A row group
larger than a shard is split by row offset; workers read only their groups.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import columns, output, rows, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import ids

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_METADATA_THREADS = 16  # footers come from object stores; latency, not bandwidth, bounds this


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
class SourceFile:
    """An input in another format, converted to the Parquet file the plan reads.

    Attributes:
      url: The file as given (e.g. an OpenAI batch JSONL file).
      staged: URL of the Parquet file made from it (a ``files`` entry).
      size: Bytes read from ``url``.
      sha256: Hex SHA-256 of those bytes: a resumed job refuses a changed input.
      lines: Requests (non-blank lines) in it.
    """

    url: str
    staged: str
    size: int
    sha256: str
    lines: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceFile:
        return cls(**d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobPlan:
    """Files and shards of a job.

    Attributes:
      files: Input files in a fixed order.
      shards: Every shard, ids in order.
      with_sample_index: Outputs carry ``sample_index``.
      keep_types: Arrow type (as text) of each kept column.
      unreadable: (URL, error) of each input whose footer cannot be read: its rows
        are not run, the job reports it as failed, and the other files go on.
      sources: Inputs of another format that ``files`` were converted from, if any.
    """

    files: tuple[InputFile, ...]
    shards: tuple[shards.ShardSpec, ...]
    with_sample_index: bool
    keep_types: dict[str, str]
    unreadable: tuple[tuple[str, str], ...] = ()
    sources: tuple[SourceFile, ...] = ()

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [f.to_dict() for f in self.files],
            "shards": [s.to_dict() for s in self.shards],
            "with_sample_index": self.with_sample_index,
            "keep_types": self.keep_types,
            "unreadable": [list(u) for u in self.unreadable],
            # Only when there are any: plans saved before sources existed still compare equal.
            **({"sources": [f.to_dict() for f in self.sources]} if self.sources else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobPlan:
        return cls(
            files=tuple(InputFile.from_dict(f) for f in d["files"]),
            shards=tuple(shards.ShardSpec.from_dict(s) for s in d["shards"]),
            with_sample_index=d["with_sample_index"],
            keep_types=dict(d["keep_types"]),
            unreadable=tuple(tuple(u) for u in d.get("unreadable", ())),
            sources=tuple(SourceFile.from_dict(f) for f in d.get("sources", ())),
        )


def plan(io: config_lib.IOConfig, sampling: config_lib.SamplingConfig,
         say: Callable[[str], None] | None = None, *, lookalike_note: bool = True) -> JobPlan:
    """Plans a job from file metadata, checking the columns it needs and that row ids are unique.

    Args:
      io: Inputs and the columns' roles.
      sampling: Job-wide sampling (``n`` decides the ``sample_index`` column).
      say: Where warnings go (input columns named like sampling fields that the
        job does not use, unreadable inputs); None: the log.
      lookalike_note: Whether to say that such columns are data and advise
        ``--sampling-columns`` (False for a command without it, which says its own).

    Raises:
      JobInputError: An input is missing, or a needed column is missing or of a
        type that cannot serve (the message names the file and column); row ids
        repeat (unless ``io.allow_duplicate_ids``); no input is readable.
    """
    say = say or log.warning
    urls = expand_inputs(io.inputs, say=say)
    with concurrent.futures.ThreadPoolExecutor(min(_METADATA_THREADS, len(urls))) as pool:
        footers = list(pool.map(_read_footer, urls))
    overrides = io.sampling_overrides()
    keys = file_keys(urls)
    files, keep_types, unreadable, schemas = [], {}, [], []
    for url, key, footer in zip(urls, keys, footers, strict=True):
        if isinstance(footer, str):
            unreadable.append((url, footer))
            continue
        schema, group_rows = footer
        try:
            columns.check_schema(url, schema, io.prompt_column, io.id_column, overrides)
        except columns.ColumnTypeError as e:
            raise config_lib.JobInputError(str(e)) from None
        _check_keep_columns(url, schema, io, keep_types)
        schemas.append(schema)
        files.append(
            InputFile(
                url=url,
                key=key,
                num_rows=sum(group_rows),
                row_group_rows=tuple(group_rows),
                columns=tuple(schema.names),
            )
        )
    if unreadable and not files:
        raise config_lib.JobInputError("; ".join(e for _, e in unreadable[:3]))
    for _, error in unreadable:
        say(f"warning: {error.rstrip('.')}; its rows are not run, the other inputs go on")
    if not io.allow_duplicate_ids:
        ids.check_unique(files, io.id_column)
    _check_sampling_columns_present(schemas, overrides, len(unreadable), say)
    if lookalike_note:
        _warn_unused_sampling_columns(schemas, overrides, say)
    specs: list[shards.ShardSpec] = []
    for f in files:
        specs.extend(split_file(f, io.shard_rows))
    width = max(5, len(str(len(specs) - 1)))
    specs = [dataclasses.replace(s, shard_id=f"{i:0{width}d}") for i, s in enumerate(specs)]
    with_index = sampling.n > 1 or overrides.may_set("n", schemas)
    return JobPlan(files=tuple(files), shards=tuple(specs), with_sample_index=with_index,
                   keep_types=keep_types, unreadable=tuple(unreadable))


def _check_sampling_columns_present(schemas: Sequence[pa.Schema],
                                    overrides: columns.SamplingColumns, unread: int,
                                    say: Callable[[str], None]) -> None:
    """A named override column must be in some input (else it is a typo); says which lack it."""
    for column, lacking in columns.missing_sampling_columns(schemas, overrides).items():
        if lacking == len(schemas) and not unread:
            raise config_lib.JobInputError(
                f"no input has the column {column!r} named in --sampling-columns or "
                f"--sampling-params-column; their columns are {sorted(schemas[0].names)}")
        say(f"note: {lacking} of {len(schemas)} input(s) have no column {column!r}; their rows "
            "use the job's sampling options")


def _warn_unused_sampling_columns(schemas: Sequence[pa.Schema],
                                  overrides: columns.SamplingColumns,
                                  say: Callable[[str], None]) -> None:
    """Says which input columns look like sampling fields but do not set them (they used to)."""
    used = set(overrides.columns())
    lookalikes = sorted({n for s in schemas for n in s.names
                         if n in columns.SAMPLING_FIELDS and n not in used})
    if lookalikes:
        say(f"note: input columns {lookalikes} are data, not sampling parameters; to set "
            f"sampling per row pass --sampling-columns {','.join(lookalikes)}")


def expand_inputs(patterns: Sequence[str], suffix: str = ".parquet",
                  kind: str = "Parquet", say: Callable[[str], None] | None = None) -> list[str]:
    """Input URLs of files matching ``patterns`` (files, directories, globs), deduplicated, sorted per pattern.

    Args:
      patterns: Files, directories or globs (fsspec URLs).
      suffix: Name ending of the files taken from a directory.
      kind: What the files are, for errors.
      say: Where a note goes that files matched by more than one pattern are read once.

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
            found, skipped = _list(fs, path, suffix)
        except OSError as e:
            raise config_lib.JobInputError(f"--input {pattern}: cannot list: {e}") from None
        if not found:
            raise config_lib.JobInputError(
                f"--input {pattern} matches no {kind} files"
                + (f" (it holds {first_few([output.url_of(fs, p) for p in skipped])})"
                   if skipped else ""))
        if skipped and say is not None:
            names = suffix if isinstance(suffix, str) else " or ".join(suffix)
            say(f"note: --input {pattern}: {len(skipped)} file(s) not named *{names} are "
                f"skipped ({first_few([output.url_of(fs, p) for p in skipped])})")
        urls.extend(output.url_of(fs, p) for p in sorted(found))
    unique = list(dict.fromkeys(urls))
    if say is not None and len(unique) < len(urls):  # e.g. a file and its directory, or twice
        repeated = [u for u in unique if urls.count(u) > 1]
        say(f"note: {first_few(repeated)} matched more than one --input and are read once "
            f"({len(urls) - len(unique)} repeat(s) dropped)")
    return unique


def _list(fs: fsspec.AbstractFileSystem, path: str, suffix: str) -> tuple[list[str], list[str]]:
    """(matching files, a directory's other files) of one ``--input``; hidden ones in neither."""
    if any(c in path for c in _GLOB_CHARS):
        return [p for p in fs.glob(path) if fs.isfile(p)], []
    if fs.isdir(path):
        files = [p for p in fs.find(path) if not posixpath.basename(p).startswith(("_", "."))]
        return ([p for p in files if p.endswith(suffix)],
                [p for p in files if not p.endswith(suffix)])
    if fs.isfile(path):
        return [path], []
    raise config_lib.JobInputError(f"--input {path}: no such file or directory")


def first_few(names: Sequence[str], shown: int = 3) -> str:
    """``"a, b, c, ..."``: the first ``shown`` of ``names``, for messages."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _read_footer(url: str) -> tuple[pa.Schema, list[int]] | str:
    """The file's schema and row-group sizes, or what makes it unreadable."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            return pf.schema_arrow, [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    except (pa.ArrowException, ValueError) as e:
        return f"input {url} is not a readable Parquet file: {e}"
    except OSError as e:
        return f"cannot read input {url}: {e}"


def file_keys(urls: Sequence[str]) -> list[str]:
    """File names for row ids; the full path where two inputs share a name."""
    names = [posixpath.basename(u) for u in urls]
    clashing = {n for n in names if names.count(n) > 1}
    return [u if n in clashing else n for u, n in zip(urls, names, strict=True)]


def _check_keep_columns(
    url: str, schema: pa.Schema, io: config_lib.IOConfig, keep_types: dict[str, str]
) -> None:
    """Kept columns exist, with one type across inputs (the output files share one schema)."""
    names = schema.names
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
