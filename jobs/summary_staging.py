"""The staged inputs of each ``summarize`` stage, and the stages as ``driver.Variant``s.

Every stage is an ordinary job on the one driver: its requests are rendered
into Parquet in a local scratch directory at plan time, reach the stage's
output under ``_manifest/inputs/`` once ``OutputDir.prepare`` has checked it
(``staging.Staged``), and run with ``generate``'s guarantees (exactly
once, progress checkpoints, ``--resume``). Staged files are rebuilt
identically on a resume, from the same inputs or the same committed parts.

* ``DocumentsStage`` (``--mode single``): one request per document, into the
  job's output.
* ``SectionsStage`` (map-reduce, level 1): one request per section of each
  document over ``--section-tokens``; the documents themselves (id, token
  count, the prompt of those that need no split, errors) are staged beside,
  as ``documents.parquet``, for the last stage.
* ``ReduceStage`` (level k > 1): a document whose summaries from level k - 1
  together exceed the budget gets its summaries summarized again, in groups of
  at least two (so every level shrinks them).
* ``FinalStage``: one request per document, into the job's output: a short
  document's own prompt, or its last level's summaries to combine.

Rows in every staged file: ``id``, ``prompt``, and ``request_error`` (a row
rejected before the engine: an unreadable document, a failed section). The
final rows keep ``document_tokens`` (and ``sections``, the level-1 summaries,
with ``--keep-sections``) to the output, whose text column is ``summary``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import output, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import (
    lifecycle,
    manifest,
    planner,
    staging,
    summary_inputs,
    summary_sections,
)
from griffin_batch.model import tokenizer as tokenizer_lib

Say = Callable[[str], None]

ID, PROMPT, ERROR = "id", "prompt", "request_error"
DOCUMENT, DOCUMENT_TOKENS, SECTIONS = "document", "document_tokens", "sections"
SUMMARY = "summary"
"""The job's output column of each document's summary (the stages before write ``completion``)."""
DOCUMENTS_FILE, SECTIONS_FILE, REDUCE_FILE, FINAL_FILE = (
    "documents.parquet", "sections.parquet", "summaries.parquet", "final.parquet")

DEFAULT_INSTRUCTION = "Summarize the following text in a few sentences."
"""``--instruction`` when none is given."""
REDUCE_LEAD = "The text below is made of summaries of consecutive parts of one document."
"""Opens the instruction of a request that combines summaries."""
PLAIN_ANSWER = "Summary:"
"""Ends a prompt in the plain layout: the text a model that follows no instructions continues."""

GROUP_ROWS = 64
GROUP_BYTES = 32 * 2**20
"""A staged file's row group ends at this many rows or bytes of text: workers read a
row group at a time, so long documents make short groups."""

_PART_COLUMNS = [DOCUMENT, "completion", "finish_reason", "error"]


@dataclasses.dataclass(frozen=True)
class Prompts:
    """How requests are worded.

    Attributes:
      instruction: What the model is asked (``--instruction``).
      chat: The model is instruction-tuned (``--chat``): one user turn in its chat
        format. Otherwise the plain layout: instruction, text, then ``Summary:``.
    """

    instruction: str = DEFAULT_INSTRUCTION
    chat: bool = False

    def summarize(self, text: str) -> str:
        """The prompt that summarizes ``text`` (a document or a section)."""
        return self._render(self.instruction, text)

    def combine(self, summaries: Sequence[str]) -> str:
        """The prompt that summarizes the summaries of consecutive parts of one document."""
        return self._render(f"{REDUCE_LEAD} {self.instruction}",
                            summary_sections.PARAGRAPH_JOIN.join(s.strip() for s in summaries))

    def _render(self, instruction: str, text: str) -> str:
        if self.chat:
            return tokenizer_lib.chat_transcript([("user", f"{instruction}\n\n{text}")])
        return f"{instruction}\n\n{text}\n\n{PLAIN_ANSWER}"


class _Rows:
    """Rows appended to a local Parquet file, one row group per ``GROUP_ROWS`` rows or ``GROUP_BYTES``."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema = path, schema
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0
        self.count = 0

    def add(self, **row: Any) -> None:
        self._rows.append(row)
        self._bytes += len(row.get(PROMPT) or "")
        self.count += 1
        if len(self._rows) >= GROUP_ROWS or self._bytes >= GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
        self._rows, self._bytes = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _schema(*extra: pa.Field) -> pa.Schema:
    return pa.schema([pa.field(ID, pa.string(), nullable=False), pa.field(PROMPT, pa.string()),
                      pa.field(ERROR, pa.string()), *extra])


DOCUMENT_FIELD = pa.field(DOCUMENT, pa.string(), nullable=False)
TOKENS_FIELD = pa.field(DOCUMENT_TOKENS, pa.int64(), nullable=False)
SECTIONS_FIELD = pa.field(SECTIONS, pa.list_(pa.string()))


def _stage_files(config: config_lib.JobConfig, scratch: str, planned: str,
                 keep: tuple[str, ...], sources: tuple[planner.SourceFile, ...], say: Say
                 ) -> tuple[config_lib.JobConfig, planner.JobPlan, staging.Staged]:
    """Plans the job over ``scratch/planned`` and names every scratch file by its place in the output."""
    staged_dir = staging.staged_dir(config.io.output)
    local = {f"{scratch}/{p.name}": f"{staged_dir}/{p.name}"
             for p in sorted(_local_files(scratch))}
    io = dataclasses.replace(config.io, prompt_column=PROMPT, id_column=ID, keep_columns=keep,
                             sampling_columns=(), sampling_params_column=None)
    config = dataclasses.replace(config, io=io)
    plan = planner.plan(dataclasses.replace(io, inputs=(f"{scratch}/{planned}",)),
                        config.sampling, say)
    target = local[f"{scratch}/{planned}"]
    sources = tuple(dataclasses.replace(s, staged=target) for s in sources)
    plan = staging.relocate(plan, local, sources, ())
    return config, plan, staging.Staged(plan=plan, local={v: k for k, v in local.items()},
                                               _scratch=scratch)


def _local_files(scratch: str) -> list[pathlib.Path]:
    return [p for p in pathlib.Path(scratch).iterdir() if p.is_file()]


class _Stage:
    """What every stage shares as a ``driver.Variant``: a scratch directory, error rows, fingerprint."""

    name = ""
    text_column = output.TEXT_COLUMN

    def __init__(self, options: Mapping[str, Any]):
        self.options = dict(options)

    def stage(self, config: config_lib.JobConfig, say: Say
              ) -> tuple[config_lib.JobConfig, planner.JobPlan, staging.Staged]:
        """Writes the stage's requests to Parquet and plans the job over them (``driver.Variant``)."""
        scratch = tempfile.mkdtemp(prefix=f"griffin-summarize-{self.name}-")
        try:
            planned, keep, sources = self.write(scratch)
            return _stage_files(config, scratch, planned, keep, sources, say)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def write(self, scratch: str) -> tuple[str, tuple[str, ...], tuple[planner.SourceFile, ...]]:
        """Writes the staged files; returns the one planned, the columns kept and the sources."""
        raise NotImplementedError

    def fingerprint(self) -> Mapping[str, Any]:
        """The summarize options and the stage: a ``--resume`` must keep them."""
        return {"summarize": {**self.options, "stage": self.name,
                              "text_column": self.text_column}}

    def shard_options(self, options: shards.ShardOptions) -> shards.ShardOptions:
        """Rows rejected at staging become error rows (``request_error``); texts go to ``text_column``."""
        return dataclasses.replace(options, error_column=ERROR, text_column=self.text_column)

    def finish(self, out: manifest.OutputDir, plan: planner.JobPlan, say: Say
               ) -> Mapping[str, Any]:
        """Nothing to add: a stage's output is its parts."""
        return {}


class DocumentsStage(_Stage):
    """``--mode single``: one request per document, the whole document in its prompt.

    Args:
      sources: The inputs' readers.
      prompts: How requests are worded.
      tokenizer: Counts each document's tokens.
      options: The summarize options (fingerprint).
    """

    name = "documents"
    text_column = SUMMARY

    def __init__(self, sources: Sequence[summary_inputs.Source], prompts: Prompts, tokenizer,
                 options: Mapping[str, Any]):
        super().__init__(options)
        self.sources, self.prompts, self.tokenizer = sources, prompts, tokenizer

    def write(self, scratch):
        rows = _Rows(f"{scratch}/{DOCUMENTS_FILE}", _schema(TOKENS_FIELD))
        try:
            for source in self.sources:
                for doc in source.documents():
                    if doc.error is not None:
                        rows.add(id=doc.id, prompt=None, request_error=doc.error,
                                 document_tokens=0)
                        continue
                    rows.add(id=doc.id, prompt=self.prompts.summarize(doc.text),
                             request_error=None,
                             document_tokens=summary_sections.count_tokens(self.tokenizer,
                                                                           doc.text))
        finally:
            rows.close()
        return DOCUMENTS_FILE, (DOCUMENT_TOKENS,), tuple(s.record() for s in self.sources)


class SectionsStage(_Stage):
    """Map-reduce level 1: a request per section of each document over the budget.

    Args:
      sources: The inputs' readers.
      prompts: How requests are worded.
      tokenizer: Counts tokens and splits.
      section_tokens: Most tokens per section.
      options: The summarize options (fingerprint).

    Attributes:
      records: The inputs' records (size, SHA-256) once staged; the final stage
        names them as its sources.
      split: Documents split into sections.
    """

    name = "level-1"

    def __init__(self, sources: Sequence[summary_inputs.Source], prompts: Prompts, tokenizer,
                 section_tokens: int, options: Mapping[str, Any]):
        super().__init__(options)
        self.sources, self.prompts, self.tokenizer = sources, prompts, tokenizer
        self.section_tokens = section_tokens
        self.records: tuple[planner.SourceFile, ...] = ()
        self.split = 0

    def write(self, scratch):
        docs = _Rows(f"{scratch}/{DOCUMENTS_FILE}", _schema(TOKENS_FIELD))
        parts = _Rows(f"{scratch}/{SECTIONS_FILE}", _schema(DOCUMENT_FIELD))
        try:
            for source in self.sources:
                for doc in source.documents():
                    self._add(doc, docs, parts)
        finally:
            docs.close()
            parts.close()
        self.records = tuple(s.record() for s in self.sources)
        return SECTIONS_FILE, (DOCUMENT,), self.records

    def _add(self, doc: summary_inputs.Document, docs: _Rows, parts: _Rows) -> None:
        if doc.error is not None:
            docs.add(id=doc.id, prompt=None, request_error=doc.error, document_tokens=0)
            return
        tokens = summary_sections.count_tokens(self.tokenizer, doc.text)
        if tokens <= self.section_tokens:  # the final stage summarizes it whole
            docs.add(id=doc.id, prompt=self.prompts.summarize(doc.text), request_error=None,
                     document_tokens=tokens)
            return
        self.split += 1
        docs.add(id=doc.id, prompt=None, request_error=None, document_tokens=tokens)
        for k, section in enumerate(summary_sections.split(doc.text, self.section_tokens,
                                                           self.tokenizer)):
            # "<k>:<id>" cannot repeat: k holds no colon.
            parts.add(id=f"{k}:{doc.id}", prompt=self.prompts.summarize(section),
                      request_error=None, document=doc.id)


@dataclasses.dataclass(frozen=True)
class Summaries:
    """One document's rows of a level's committed output, in order.

    Attributes:
      document: The document's id.
      texts: Each row's summary.
      error: The first row's error, naming which (None: all summarized).
    """

    document: str
    texts: tuple[str, ...]
    error: str | None


def level_summaries(url: str) -> Iterator[Summaries]:
    """Each document's summaries in a finished level's output (``url``), in input order.

    Reads the committed parts in shard order, a batch at a time.
    """
    out = manifest.OutputDir(url)
    pending: list[dict[str, Any]] = []
    for spec in out.plan_record()["plan"]["shards"]:
        path = f"{out.path}/{output.part_name(spec['shard_id'])}"
        with out.fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(1024, columns=_PART_COLUMNS):
                for row in batch.to_pylist():
                    if pending and pending[0][DOCUMENT] != row[DOCUMENT]:
                        yield _summaries(pending)
                        pending = []
                    pending.append(row)
    if pending:
        yield _summaries(pending)


def _summaries(rows: list[dict[str, Any]]) -> Summaries:
    error = next((f"{i + 1} of {len(rows)}: {r['error'] or 'unknown error'}"
                  for i, r in enumerate(rows) if r["finish_reason"] == "error"), None)
    return Summaries(rows[0][DOCUMENT], tuple(r["completion"] for r in rows), error)


def reduce_groups(summaries: Summaries, budget: int, tokenizer) -> list[list[str]]:
    """The groups a level's summaries of one document are combined in at the next level.

    None (an empty list) when they are combined by the final request: they fit
    ``budget`` together, there is only one, or one failed. Otherwise groups of
    consecutive summaries, each of at least two (every level shrinks the count)
    and otherwise of at most ``budget`` tokens together.
    """
    texts = summaries.texts
    if summaries.error is not None or len(texts) < 2:
        return []
    counts = [summary_sections.count_tokens(tokenizer, t) for t in texts]
    if sum(counts) <= budget:
        return []
    groups: list[list[str]] = []
    used = 0
    for text, n in zip(texts, counts, strict=True):
        if groups and (len(groups[-1]) < 2 or used + n <= budget):
            groups[-1].append(text)
            used += n
        else:
            groups.append([text])
            used = n
    if len(groups) > 1 and len(groups[-1]) < 2:  # a lone last summary joins the group before
        last = groups.pop()
        groups[-1] += last
    return groups


class ReduceStage(_Stage):
    """Map-reduce level k > 1: summaries of level k - 1 that do not fit, summarized in groups.

    Args:
      level: k.
      previous: The output URL of level k - 1 (finished).
      prompts, tokenizer, section_tokens, options: As ``SectionsStage``.
    """

    def __init__(self, level: int, previous: str, prompts: Prompts, tokenizer,
                 section_tokens: int, options: Mapping[str, Any]):
        super().__init__(options)
        self.name = f"level-{level}"
        self.previous, self.prompts, self.tokenizer = previous, prompts, tokenizer
        self.section_tokens = section_tokens

    def count(self) -> int:
        """Requests this level has (0: the documents are ready for the final stage)."""
        return sum(len(reduce_groups(s, self.section_tokens, self.tokenizer))
                   for s in level_summaries(self.previous))

    def write(self, scratch):
        rows = _Rows(f"{scratch}/{REDUCE_FILE}", _schema(DOCUMENT_FIELD))
        try:
            for s in level_summaries(self.previous):
                for k, group in enumerate(reduce_groups(s, self.section_tokens, self.tokenizer)):
                    rows.add(id=f"{k}:{s.document}", prompt=self.prompts.combine(group),
                             request_error=None, document=s.document)
        finally:
            rows.close()
        return REDUCE_FILE, (DOCUMENT,), ()


class _Peekable:
    """A level's ``level_summaries``, taken one document at a time when its turn comes."""

    def __init__(self, url: str):
        self._it = level_summaries(url)
        self._head = next(self._it, None)

    def take(self, document: str) -> Summaries | None:
        if self._head is None or self._head.document != document:
            return None
        head, self._head = self._head, next(self._it, None)
        return head


class FinalStage(_Stage):
    """One request per document into the job's output: its own prompt, or its summaries combined.

    Args:
      first: The ``SectionsStage`` that ran level 1 (its staged documents and records).
      levels: The output URLs of levels 1..L, all finished.
      prompts: How requests are worded.
      keep_sections: Keep each document's level-1 summaries (``sections``).
      options: The summarize options (fingerprint).
    """

    name = "final"
    text_column = SUMMARY

    def __init__(self, first: SectionsStage, levels: Sequence[str], prompts: Prompts,
                 keep_sections: bool, options: Mapping[str, Any]):
        super().__init__(options)
        self.first, self.levels, self.prompts = first, list(levels), prompts
        self.keep_sections = keep_sections

    def write(self, scratch):
        extra = (TOKENS_FIELD, SECTIONS_FIELD) if self.keep_sections else (TOKENS_FIELD,)
        rows = _Rows(f"{scratch}/{FINAL_FILE}", _schema(*extra))
        streams = [_Peekable(url) for url in self.levels]
        documents = f"{staging.staged_dir(self.levels[0])}/{DOCUMENTS_FILE}"
        try:
            with fsspec.open(documents, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(GROUP_ROWS):
                    for doc in batch.to_pylist():
                        rows.add(**self._row(doc, [s.take(doc[ID]) for s in streams]))
        finally:
            rows.close()
        keep = (DOCUMENT_TOKENS, SECTIONS) if self.keep_sections else (DOCUMENT_TOKENS,)
        return FINAL_FILE, keep, self.first.records

    def finish(self, out: manifest.OutputDir, plan: planner.JobPlan, say: Say
               ) -> Mapping[str, Any]:
        """The earlier stages' figures (``lifecycle.EARLIER_STAGES``); this stage's are the summary's."""
        figures = []
        for url in self.levels:
            fs, path = fsspec.core.url_to_fs(url)
            try:
                summary = manifest.read_summary(fs, path)
            except (OSError, ValueError):
                summary = {}
            figures.append({"stage": url.rstrip("/").rsplit("/", 1)[-1],
                            **{k: summary.get(k) for k in lifecycle.STAGE_FIGURES}})
        return {lifecycle.EARLIER_STAGES: figures}

    def _row(self, doc: Mapping[str, Any], levels: list[Summaries | None]) -> dict[str, Any]:
        row = {ID: doc[ID], PROMPT: doc[PROMPT], ERROR: doc[ERROR],
               DOCUMENT_TOKENS: doc[DOCUMENT_TOKENS]}
        if self.keep_sections:
            row[SECTIONS] = list(levels[0].texts) if levels[0] is not None else []
        found = [(k, s) for k, s in enumerate(levels, start=1) if s is not None]
        if doc[PROMPT] is not None or doc[ERROR] is not None:
            return row  # summarized whole, or rejected
        failed = next(((k, s) for k, s in found if s.error is not None), None)
        if failed is not None:
            what = "section" if failed[0] == 1 else f"level {failed[0]} summary"
            row[ERROR] = f"{what} {failed[1].error}"
        elif not found:  # cannot happen when level 1 committed every shard
            row[ERROR] = "no section summaries were found for this document"
        else:
            row[PROMPT] = self.prompts.combine(found[-1][1].texts)
        return row
