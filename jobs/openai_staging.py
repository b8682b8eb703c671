"""OpenAI batch input files become the Parquet inputs of an ordinary job.

At plan time the driver converts each JSONL file (``--input-format openai-batch``)
line by line (``jobs.openai_requests``) into a Parquet file in a local scratch
directory, and plans the job from those files as from any Parquet input. The
plan names each staged file by its place in the output,
``<output>/_manifest/inputs/<nnnnn>-<name>.parquet``, and records where it came
from (``JobPlan.sources``: URL, size, SHA-256), so that

* nothing is written to the output before ``OutputDir.prepare`` has checked it
  and taken its lease (``Staged.upload`` runs after), and ``--overwrite``
  deletes the staged files with the rest of ``_manifest/``;
* a ``--resume`` converts the files again, finds the same plan (a changed input
  is refused like a changed Parquet file) and keeps the staged files already
  uploaded when their bytes are the same;
* workers, shards, exactly-once commits, progress checkpoints and the progress
  bar work unchanged: every request is a Parquet row, and a line that is not a
  request is a row whose ``request_error`` the worker turns into an error row.

Stored state stays data: Parquet and JSON, nothing pickled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import fsspec
import pyarrow.parquet as pq

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import ids, openai_requests, planner
from griffin_batch.jobs.staging import Staged, relocate, staged_dir

log = logging.getLogger(__name__)

BATCH_LINES = 65536
"""Lines converted and written as one row group at a time (memory stays flat per file)."""

_THREADS = 8  # inputs come from object stores; latency bounds this


def job_config(config: config_lib.JobConfig) -> config_lib.JobConfig:
    """The job as the pipeline runs it on staged files: their columns, prompts already in chat format."""
    io = dataclasses.replace(
        config.io,
        prompt_column="prompt",
        id_column="id",
        sampling_columns=(),
        sampling_params_column=openai_requests.BODY_COLUMN,
        keep_columns=openai_requests.KEPT_COLUMNS,
    )
    # Messages are rendered when staged; a completions prompt is text to continue as it is.
    model = dataclasses.replace(config.model, chat=False)
    return dataclasses.replace(config, io=io, model=model)


def stage(io: config_lib.IOConfig, sampling: config_lib.SamplingConfig,
          say: Callable[[str], None]) -> Staged:
    """Converts the OpenAI batch inputs ``io.inputs`` and plans the job over them.

    Args:
      io: The job's (``job_config``) inputs and output.
      sampling: Job-wide sampling (fields a request leaves out keep these).
      say: Where warnings go (an unreadable input).

    Returns:
      The staged files (local until ``Staged.upload``) and the plan.

    Raises:
      JobInputError: An input names nothing; no input is readable; request ids
        repeat (``custom_id``, unless ``io.allow_duplicate_ids``; the message
        names the JSONL files and lines).
    """
    urls = planner.expand_inputs(io.inputs, suffix=".jsonl", kind="JSONL", say=say)
    scratch = tempfile.mkdtemp(prefix="griffin-batch-staging-")
    try:
        names = _staged_names(urls)
        keys = planner.file_keys(urls)
        with concurrent.futures.ThreadPoolExecutor(min(_THREADS, len(urls))) as pool:
            converted = list(pool.map(
                lambda args: convert(args[0], f"{scratch}/{args[1]}", args[2]),
                zip(urls, names, keys, strict=True)))
        unreadable = [(u, c) for u, c in zip(urls, converted, strict=True) if isinstance(c, str)]
        done = [(u, n, c) for u, n, c in zip(urls, names, converted, strict=True)
                if not isinstance(c, str)]
        if not done:
            raise config_lib.JobInputError("; ".join(e for _, e in unreadable[:3]))
        for _, error in unreadable:
            say(f"warning: {error}; its requests are not run, the other inputs go on")
        local = {f"{scratch}/{n}": f"{staged_dir(io.output)}/{n}" for _, n, _ in done}
        # The ids are checked here, not by the planner, whose message names staged rows.
        plan = planner.plan(dataclasses.replace(io, inputs=tuple(local), allow_duplicate_ids=True),
                            sampling, say)
        if not io.allow_duplicate_ids:
            _refuse_repeated_custom_ids(plan.files, io.id_column,
                                        {f"{scratch}/{n}": u for u, n, _ in done})
        sources = tuple(dataclasses.replace(c, staged=local[f"{scratch}/{n}"])
                        for _, n, c in done)
        plan = relocate(plan, local, sources, tuple(unreadable))
        return Staged(plan=plan, local={v: k for k, v in local.items()}, _scratch=scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def convert(url: str, path: str, file_key: str) -> planner.SourceFile | str:
    """Writes the requests of JSONL file ``url`` to Parquet file ``path`` (local).

    Returns:
      What was read (``staged`` left blank), or why the whole file is unusable:
      it cannot be read, or no line of it is a JSON object (not JSONL at all).
    """
    reader = _Lines(file_key)
    try:
        with fsspec.open(url, "rb") as f, pq.ParquetWriter(
                path, openai_requests.STAGED_SCHEMA, compression="zstd") as writer:
            for rows in reader.batches(f):
                writer.write_table(openai_requests.rows_table(rows))
    except OSError as e:
        return f"cannot read input {url}: {e}"
    if reader.lines and not reader.objects:
        return (f"input {url} is not OpenAI batch JSONL: no line is a JSON object "
                f"({reader.first_error})")
    return planner.SourceFile(url=url, staged="", size=reader.size,
                              sha256=reader.digest.hexdigest(), lines=reader.lines)


def _refuse_repeated_custom_ids(files: Sequence[planner.InputFile], id_column: str,
                                inputs: Mapping[str, str]) -> None:
    """Raises ``JobInputError`` naming each ``custom_id`` that repeats, by JSONL file and line.

    Args:
      files: The staged files, as planned.
      id_column: Their id column.
      inputs: Staged file URL -> the JSONL file it was converted from.
    """
    found = ids.repeats(files, id_column)
    if not found:
        return
    lines: dict[str, list[int]] = {}  # staged file -> each row's line, read only on a repeat
    for _, at in found.items():
        for url, _ in at:
            if url not in lines:
                lines[url] = pq.read_table(url, columns=["line"]).column(0).to_pylist()
    named = [(text, [(inputs[url], lines[url][row]) for url, row in at])
             for text, at in found.items()]
    shown = "; ".join(_repeat(text, at) for text, at in named[:ids.SHOWN])
    raise config_lib.JobInputError(
        f"{shown}{'; ...' if len(named) > ids.SHOWN else ''}. Each request's custom_id must "
        "be unique; pass --allow-duplicate-ids to run anyway (requests with one custom_id "
        "share a random stream)")


def _repeat(text: str, at: list[tuple[str, int]]) -> str:
    """``custom_id 'a' repeats in f.jsonl: line 1, line 4`` (the files named where two differ)."""
    if len({url for url, _ in at}) == 1:
        return (f"custom_id {text!r} repeats in {at[0][0]}: "
                + planner.first_few([f"line {line}" for _, line in at]))
    return f"custom_id {text!r} repeats: " + planner.first_few([f"{u} line {n}" for u, n in at])


class _Lines:
    """Parses a JSONL file's lines into staged rows, counting and hashing what it reads."""

    def __init__(self, file_key: str):
        self.file_key = file_key
        self.digest = hashlib.sha256()
        self.size = 0
        self.lines = 0  # non-blank lines: requests
        self.objects = 0  # lines that are JSON objects
        self.first_error: str | None = None

    def batches(self, f) -> Iterator[list[openai_requests.StagedRow]]:
        """Rows of the non-blank lines, ``BATCH_LINES`` at a time."""
        batch: list[openai_requests.StagedRow] = []
        for number, raw in enumerate(f, start=1):
            self.digest.update(raw)
            self.size += len(raw)
            text = raw.rstrip(b"\r\n")
            if not text.strip():
                continue  # a blank line (a trailing one, most often) is no request
            row = openai_requests.parse_line(text, number, self.file_key)
            self.lines += 1
            if row.error is None or not openai_requests.is_unparsed(row.error):
                self.objects += 1
            else:
                self.first_error = self.first_error or row.error
            batch.append(row)
            if len(batch) >= BATCH_LINES:
                yield batch
                batch = []
        if batch:
            yield batch


def _staged_names(urls: list[str]) -> list[str]:
    """Staged file names: numbered in input order (two inputs may share a name)."""
    width = max(5, len(str(len(urls) - 1)))
    return [f"{i:0{width}d}-{posixpath.basename(u)}.parquet" for i, u in enumerate(urls)]
