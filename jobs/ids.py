"""Row ids must be unique across a job: checked at planning, from the id columns alone.

Outputs are joined back to inputs by id, and a row's random stream is seeded
from its id, so two rows with one id (in one file or in two, or ``1`` in an
integer column and ``"1"`` in a text one) would be indistinguishable. The
check compares ids as the output writes them (``columns.id_texts``), rows
without an id included (``<file>#<row>``).

Memory: 8 bytes per row (a 64-bit hash of each id), plus ``BATCH_ROWS`` ids
per reading thread; the rare hash collision is settled by comparing the ids
themselves in a second pass over the files that hold one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import columns
from griffin_batch.jobs import config as config_lib

SHOWN = 5
"""Duplicates an error lists."""

_READ_THREADS = 8  # id columns come from object stores; latency bounds this
BATCH_ROWS = 65536
"""Ids turned into text and hashed at a time, per thread."""


def check_unique(files: Sequence, id_column: str | None) -> None:
    """Raises ``JobInputError`` listing the first few ids that repeat, with where they occur.

    Args:
      files: The plan's ``InputFile``s (``url``, ``key``, ``num_rows``, ``columns``).
      id_column: The chosen id column; None: ``id`` where a file has one.
    """
    column = id_column or "id"
    found = repeats(files, id_column)
    if found:
        shown = "; ".join(
            f"{text!r} at " + ", ".join(f"{url} row {row}" for url, row in where[:3])
            for text, where in list(found.items())[:SHOWN])
        raise config_lib.JobInputError(
            f"{len(found)} row id(s) repeat in column {column!r} (compared as text): {shown}"
            f"{'; ...' if len(found) > SHOWN else ''}. Ids must be unique; pass "
            "--allow-duplicate-ids to run anyway (rows with one id share a random stream)")


def repeats(files: Sequence, id_column: str | None) -> dict[str, list[tuple[str, int]]]:
    """Each id that occurs more than once -> where ((file URL, row), in file and row order).

    Args: as ``check_unique``'s.
    """
    column = id_column or "id"
    if not any(column in f.columns for f in files):
        return {}  # every id is <file key>#<row>: unique by construction
    with concurrent.futures.ThreadPoolExecutor(max(1, min(_READ_THREADS, len(files)))) as pool:
        hashes = list(pool.map(lambda f: _file_hashes(f, column), files))
    every = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    values, counts = np.unique(every, return_counts=True)
    suspects = values[counts > 1]
    if not len(suspects):
        return {}
    seen: dict[str, tuple[str, int]] = {}
    found: dict[str, list[tuple[str, int]]] = {}
    for f, h in zip(files, hashes, strict=True):
        rows = set(np.flatnonzero(np.isin(h, suspects)).tolist())
        if not rows:
            continue
        for start, texts in _batches(f, column):
            for row in (r for r in range(start, start + len(texts)) if r in rows):
                text = texts[row - start]
                if text in seen:
                    found.setdefault(text, [seen[text]]).append((f.url, row))
                else:
                    seen[text] = (f.url, row)
    return found


def _file_hashes(f, column: str) -> np.ndarray:
    parts = [_hash(texts) for _, texts in _batches(f, column)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def _batches(f, column: str) -> Iterator[tuple[int, list[str]]]:
    """(first row, ids as the output writes them) of each batch of the file.

    A file whose id column cannot be read yields nothing: its shards fail on the
    worker, naming the file, and the rest of the job goes on.
    """
    def fallback(start: int, count: int) -> list[str]:
        return [f"{f.key}#{i}" for i in range(start, start + count)]

    if column not in f.columns:
        for start in range(0, f.num_rows, BATCH_ROWS):
            yield start, fallback(start, min(BATCH_ROWS, f.num_rows - start))
        return
    fs, path = fsspec.core.url_to_fs(f.url)
    try:
        with fs.open(path, "rb") as handle:
            start = 0
            for batch in pq.ParquetFile(handle).iter_batches(BATCH_ROWS, columns=[column]):
                texts = columns.id_texts(batch.column(0))
                yield start, [fb if t is None else t
                              for t, fb in zip(texts, fallback(start, len(texts)), strict=True)]
                start += len(texts)
    except (pa.ArrowException, OSError, ValueError):
        return


def _hash(texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(np.array(texts, dtype=object), categorize=False)
