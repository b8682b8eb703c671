"""The documents of ``griffin-batch summarize``: text files, or a text column of Parquet files.

* **Text files** (``--input`` a file, a directory of ``.txt``/``.md`` files or a
  glob; any fsspec URL): one document per file, its id the file's URL. A file
  that is not UTF-8, is empty or cannot be read is that document's error (the
  message names the file); the other files go on. A Parquet file (by its magic
  bytes) stops the job before it starts: it needs ``--text-column``.
* **Parquet** (``--text-column``): one document per row; its id is the
  ``--id-column`` value (default: ``id`` where a file has one, else
  ``<file name>#<row>``, as ``generate`` names rows). A null, empty or non-UTF-8
  value is that row's error, naming the file, row and column. A file without the
  column, or whose column is not text, stops the job before it starts.

Documents are read one file (text) or one ``BATCH_ROWS`` batch (Parquet) at a
time: the driver never holds more than that. Each input's bytes are hashed as
they are read (``planner.SourceFile``), so ``--resume`` refuses a changed input.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import columns, output
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import planner
from griffin_batch.model import requests

TEXT_SUFFIXES = (".txt", ".md")
"""Files taken from a directory given as ``--input`` (a glob or a file name takes any file)."""

BATCH_ROWS = 64
"""Parquet rows read at a time: bounds the driver's memory with long documents."""

PARQUET_MAGIC = b"PAR1"
"""The first 4 bytes of a Parquet file; its last are these too, or ``PARE`` (encrypted footer)."""

PARQUET_SUFFIXES = (".parquet", ".pq")
"""Names whose first bytes are checked before any document is read (others' when read)."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document to summarize.

    Attributes:
      id: The output row's id.
      text: The document's text; None when ``error`` is set.
      error: Why it cannot be summarized (names the file, and row and column for
        Parquet); None when it can.
    """

    id: str
    text: str | None
    error: str | None = None


def expand(inputs: Sequence[str], text_column: str | None) -> list[str]:
    """The input files, in order.

    Raises:
      JobInputError: A pattern matches nothing, or without ``text_column`` a
        file named ``.parquet`` is a Parquet file.
    """
    if text_column is not None:
        return planner.expand_inputs(inputs)
    # str.endswith takes a tuple: a directory gives its .txt and .md files.
    urls = planner.expand_inputs(inputs, suffix=TEXT_SUFFIXES, kind="text (.txt, .md)")  # type: ignore[arg-type]
    for url in urls:  # refused before any file is read; _text checks every other file's bytes
        if url.lower().endswith(PARQUET_SUFFIXES) and _starts_as_parquet(url):
            raise _parquet_not_text(url)
    return urls


def _starts_as_parquet(url: str) -> bool:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    except OSError:
        return False  # _text makes it the document's error


def _is_parquet(data: bytes) -> bool:
    return (len(data) >= 2 * len(PARQUET_MAGIC) and data.startswith(PARQUET_MAGIC)
            and data[-len(PARQUET_MAGIC):] in (PARQUET_MAGIC, b"PARE"))


def _parquet_not_text(url: str) -> config_lib.JobInputError:
    return config_lib.JobInputError(
        f"input {url} is a Parquet file, not a text document: pass --text-column COLUMN to "
        "summarize the documents in its column COLUMN")


class Source:
    """Reads one input's documents, hashing its bytes as they go by.

    Args:
      url: The input file.
      key: Its name in generated row ids (``planner.file_keys``).
      text_column: The Parquet column of documents; None: ``url`` is a text file.
      id_column: The Parquet id column (None: ``id`` where the file has one).

    Attributes:
      count: Documents read so far.
    """

    def __init__(self, url: str, key: str, text_column: str | None, id_column: str | None):
        self.url, self.key = url, key
        self.text_column, self.id_column = text_column, id_column
        self.count = 0
        self._digest = hashlib.sha256()
        self._sha256: str | None = None  # a Parquet file's, hashed whole before it is read
        self._size = 0

    def documents(self) -> Iterator[Document]:
        """The input's documents, in order.

        Raises:
          JobInputError: A Parquet input cannot be read, or lacks the text or id
            column, or its text column is not text; or a text input is a Parquet file.
        """
        reader = self._text() if self.text_column is None else self._parquet()
        for document in reader:
            self.count += 1
            yield document

    def record(self) -> planner.SourceFile:
        """The plan's record of this input (``staged`` blank): size, SHA-256, documents."""
        return planner.SourceFile(url=self.url, staged="", size=self._size,
                                  sha256=self._sha256 or self._digest.hexdigest(), lines=self.count)

    def _text(self) -> Iterator[Document]:
        try:
            with fsspec.open(self.url, "rb") as f:
                data = f.read()
        except OSError as e:
            yield Document(self.url, None, f"cannot read input {self.url}: {e}")
            return
        if _is_parquet(data):  # a whole job of error rows helps no one: stop before it runs
            raise _parquet_not_text(self.url)
        self._digest.update(data)
        self._size = len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Document(self.url, None, f"input {self.url} is not UTF-8 text "
                                           f"(byte {e.start}: {data[e.start:e.start + 1]!r})")
            return
        if not text.strip():
            yield Document(self.url, None, f"input {self.url} is empty")
            return
        yield Document(self.url, text)

    def _parquet(self) -> Iterator[Document]:
        fs, path = fsspec.core.url_to_fs(self.url)
        try:
            self._size = fs.info(path)["size"]
            self._sha256 = output.file_digest(fs, path)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                id_column = self._check_schema(pf.schema_arrow)
                wanted = [self.text_column] + ([id_column] if id_column else [])
                row = 0
                for batch in pf.iter_batches(BATCH_ROWS, columns=wanted):
                    yield from self._batch(batch, id_column, row)
                    row += batch.num_rows
        except config_lib.JobInputError:
            raise  # the file is readable; _check_schema's message says what it lacks
        except (pa.ArrowException, OSError, ValueError) as e:
            raise config_lib.JobInputError(
                f"input {self.url} is not a readable Parquet file: {e}") from None

    def _check_schema(self, schema: pa.Schema) -> str | None:
        """The id column to read (None: ids are generated); refuses a missing or non-text column."""
        names = schema.names
        if self.text_column not in names:
            raise config_lib.JobInputError(
                f"input {self.url} has no column {self.text_column!r} (--text-column); "
                f"its columns are {names}")
        if not columns.is_text_type(schema.field(self.text_column).type):
            raise config_lib.JobInputError(
                f"input {self.url}: --text-column {self.text_column!r} is "
                f"{schema.field(self.text_column).type}, not text")
        if self.id_column is not None and self.id_column not in names:
            raise config_lib.JobInputError(
                f"input {self.url} has no column {self.id_column!r} (--id-column); "
                f"its columns are {names}")
        return self.id_column or ("id" if "id" in names else None)

    def _batch(self, batch: pa.RecordBatch, id_column: str | None, first: int
               ) -> Iterator[Document]:
        texts = columns.values(batch.column(self.text_column))
        ids = (columns.id_texts(batch.column(id_column)) if id_column
               else [None] * batch.num_rows)
        for i, (value, row_id) in enumerate(zip(texts, ids, strict=True)):
            row_id = row_id if row_id is not None else f"{self.key}#{first + i}"
            try:
                yield Document(row_id, columns.text_of(self.text_column, value))
            except requests.RequestError as e:
                yield Document(row_id, None, f"input {self.url} row {first + i}: {e}")


def sources(inputs: Sequence[str], text_column: str | None, id_column: str | None
            ) -> list[Source]:
    """A reader for each input file, in order.

    Raises:
      JobInputError: A pattern matches nothing.
    """
    urls = expand(inputs, text_column)
    return [Source(u, k, text_column, id_column)
            for u, k in zip(urls, planner.file_keys(urls), strict=True)]
