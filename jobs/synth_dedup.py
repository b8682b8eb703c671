"""``--dedup``: synthesize's rows without repeated completions, once every shard is committed.

Committed parts are never changed (their sizes and SHA-256 are what exactly-once
verifies), so the deduplicated rows are a second file set:
``<output>/_deduplicated/part-<shard>.parquet`` holds each part's rows that are
kept, in the same schema and order, and ``_deduplicated/_duplicates.parquet``
lists each row removed: its ``id``, the ``duplicate_of`` id it repeats, the
``method`` (``exact`` or ``near``) and the ``similarity`` (1 for exact, the
MinHash estimate of Jaccard similarity for near). The names start with ``_`` so
that reading the output directory as a Parquet dataset still gives every
committed row once; read ``_deduplicated/`` for the deduplicated set.

Rows are taken in input order (shard order, then row order) and the first of
each group of duplicates is kept. Error rows are always kept and never count as
the original of another row.

* ``exact``: the completion's text with runs of whitespace made one space and
  the ends stripped; a row whose text was seen before is removed (a 16-byte
  BLAKE2 digest per kept text in memory).
* ``near``: ``exact`` first, then MinHash LSH (``datasketch``) over the
  lower-cased text's character 5-grams: a row whose estimated Jaccard similarity
  to a kept row reaches ``threshold`` is removed. LSH finds the candidates
  (``lsh_threshold``), and their estimated similarity is checked before a row is
  removed; a near duplicate that LSH does not offer as a candidate stays (LSH
  is probabilistic). Memory: a MinHash (512 bytes) and the LSH entries per kept row.

Everything is deterministic (fixed MinHash seed, ties to the earliest row), so
a ``--resume`` writes the same files. Each file is written under ``_temporary/``
and then moved to its name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import datasketch
import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import output
from griffin_batch.jobs import manifest, planner

EXACT, NEAR, NONE = "exact", "near", "none"
MODES = (EXACT, NEAR, NONE)
DUPLICATES_FILE = "_duplicates.parquet"
SHINGLE_CHARS = 5
NUM_PERM = 128
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"
"""Named, not left to datasketch's default: a resume decides as the first run did."""

DUPLICATES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("duplicate_of", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("similarity", pa.float64(), nullable=False),
])

_BATCH_ROWS = 4096


def normalize(text: str) -> str:
    """The text exact duplicates are compared by: whitespace runs as one space, ends stripped."""
    return " ".join(text.split())


def shingles(text: str) -> set[bytes]:
    """Character ``SHINGLE_CHARS``-grams of the normalized, lower-cased text (the whole of a shorter one)."""
    text = normalize(text).lower()
    if len(text) <= SHINGLE_CHARS:
        return {text.encode()} if text else set()
    return {text[i:i + SHINGLE_CHARS].encode("utf-8", errors="surrogatepass")
            for i in range(len(text) - SHINGLE_CHARS + 1)}


LSH_MARGIN = 0.1
LSH_MOST = 0.9


def lsh_threshold(threshold: float) -> float:
    """Where the LSH index finds candidates: ``LSH_MARGIN`` below ``threshold``, at most ``LSH_MOST``.

    An LSH index misses about half the pairs right at its own threshold, so
    candidates are sought below the one that decides; and 128 permutations
    leave an index no bands to hash above about 0.98. Each candidate's
    estimated similarity is then compared with ``threshold`` itself.
    """
    return min(LSH_MOST, max(0.05, threshold - LSH_MARGIN))


@dataclasses.dataclass(frozen=True)
class Removal:
    """Why one row goes: it repeats ``duplicate_of`` by ``method``, with ``similarity``."""

    duplicate_of: str
    method: str
    similarity: float


class Deduplicator:
    """Decides row by row, in order, which rows repeat an earlier kept row.

    Args:
      mode: ``exact`` or ``near``.
      threshold: Least estimated Jaccard similarity of a near duplicate, in (0, 1].
    """

    def __init__(self, mode: str, threshold: float = 0.9):
        if mode not in (EXACT, NEAR):
            raise ValueError(f"mode must be {EXACT} or {NEAR}, got {mode!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        self.mode, self.threshold = mode, threshold
        self._seen: dict[bytes, str] = {}
        self._kept_ids: list[str] = []
        self._minhashes: list[datasketch.MinHash] = []
        if mode == NEAR:
            self._lsh = datasketch.MinHashLSH(threshold=lsh_threshold(threshold),
                                              num_perm=NUM_PERM)
            self._base = datasketch.MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED,
                                            scheme=MINHASH_SCHEME)

    def see(self, row_id: str, text: str) -> Removal | None:
        """None when the row is kept (and remembered), else what it repeats."""
        digest = hashlib.blake2b(normalize(text).encode("utf-8", errors="surrogatepass"),
                                 digest_size=16).digest()
        first = self._seen.get(digest)
        if first is not None:
            return Removal(first, EXACT, 1.0)
        found = self._near(text) if self.mode == NEAR else None
        if isinstance(found, Removal):
            return found
        self._seen[digest] = row_id
        if found is not None:  # a kept row's MinHash: later rows are compared with it
            key = len(self._kept_ids)
            self._kept_ids.append(row_id)
            self._minhashes.append(found)
            self._lsh.insert(key, found)
        return None

    def _near(self, text: str) -> Removal | datasketch.MinHash | None:
        """The removal of a near duplicate, else the text's MinHash (None: no shingles)."""
        grams = shingles(text)
        if not grams:
            return None
        # The permutations are drawn once, not per row.
        m = datasketch.MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=MINHASH_SCHEME,
                               permutations=self._base.permutations)
        m.update_batch(sorted(grams))
        best: tuple[float, int] | None = None
        for key in self._lsh.query(m):  # candidates; their similarity decides
            similarity = m.jaccard(self._minhashes[key])
            if similarity >= self.threshold and (best is None or (-similarity, key) < (
                    -best[0], best[1])):
                best = (similarity, key)
        if best is None:
            return m
        return Removal(self._kept_ids[best[1]], NEAR, round(float(best[0]), 6))


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a deduplication did (``_summary.json``'s ``dedup``)."""

    mode: str
    threshold: float | None
    rows: int
    kept: int
    removed_exact: int
    removed_near: int

    def to_summary(self) -> dict[str, Any]:
        """As written in ``_summary.json``."""
        return {**dataclasses.asdict(self), "output": f"{manifest.DEDUP_DIR}/"}


def _part(out: manifest.OutputDir, shard_id: str) -> str:
    return f"{out.path}/{output.part_name(shard_id)}"


def _rows(out: manifest.OutputDir, shard_id: str) -> Iterator[tuple[int, str, str, str]]:
    """(row, id, completion, finish_reason) of one committed part, in order."""
    with out.fs.open(_part(out, shard_id), "rb") as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(
                _BATCH_ROWS, columns=["id", "completion", "finish_reason"]):
            for rid, text, reason in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                yield row, rid, text, reason
                row += 1


def write(out: manifest.OutputDir, plan: planner.JobPlan, mode: str, threshold: float) -> Counts:
    """Writes ``_deduplicated/`` from the committed parts of ``plan`` (every shard committed).

    Args:
      out: The job's output directory.
      plan: Its plan (parts are read in its order: input order).
      mode: ``exact`` or ``near``.
      threshold: The near-duplicate similarity threshold.

    Returns:
      What was kept and removed.
    """
    dedup = Deduplicator(mode, threshold)
    removed: dict[str, list[int]] = {}
    listed: list[dict[str, Any]] = []
    total = 0
    for spec in plan.shards:
        gone = removed[spec.shard_id] = []
        for row, rid, text, reason in _rows(out, spec.shard_id):
            total += 1
            if reason == "error":  # never a duplicate, never an original
                continue
            why = dedup.see(rid, text)
            if why is not None:
                gone.append(row)
                listed.append({"id": rid, **dataclasses.asdict(why)})
    target = f"{out.path}/{manifest.DEDUP_DIR}"
    for spec in plan.shards:
        _write_kept(out, spec.shard_id, set(removed[spec.shard_id]), target)
    _publish(out, pa.Table.from_pylist(listed, schema=DUPLICATES_SCHEMA), target,
             DUPLICATES_FILE)
    exact = sum(1 for r in listed if r["method"] == EXACT)
    return Counts(mode=mode, threshold=threshold if mode == NEAR else None, rows=total,
                  kept=total - len(listed), removed_exact=exact,
                  removed_near=len(listed) - exact)


def _write_kept(out: manifest.OutputDir, shard_id: str, gone: set[int], target: str) -> None:
    with out.fs.open(_part(out, shard_id), "rb") as f:
        pf = pq.ParquetFile(f)
        temp = _temp(out, output.part_name(shard_id))
        first = 0
        with out.fs.open(temp, "wb") as sink, pq.ParquetWriter(
                sink, pf.schema_arrow, compression="zstd") as writer:
            for batch in pf.iter_batches(_BATCH_ROWS):
                keep = [first + i not in gone for i in range(batch.num_rows)]
                first += batch.num_rows
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
    _promote(out, temp, target, output.part_name(shard_id))


def _publish(out: manifest.OutputDir, table: pa.Table, target: str, name: str) -> None:
    temp = _temp(out, name)
    with out.fs.open(temp, "wb") as sink:
        pq.write_table(table, sink, compression="zstd")
    _promote(out, temp, target, name)


def _temp(out: manifest.OutputDir, name: str) -> str:
    temp_dir = f"{out.path}/{output.TEMP_DIR}"
    if output.has_atomic_rename(out.fs):
        out.fs.makedirs(temp_dir, exist_ok=True)
    return f"{temp_dir}/{name}.{uuid.uuid4().hex}"


def _promote(out: manifest.OutputDir, temp: str, target: str, name: str) -> None:
    if output.has_atomic_rename(out.fs):
        out.fs.makedirs(target, exist_ok=True)
    output.promote(out.fs, temp, f"{target}/{name}")
