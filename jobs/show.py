"""A look at a finished job's first output rows (``griffin-batch generate --show N``).

Reads only the first committed part files' first rows, so it costs the same for
a job of eight rows and one of eight million.
"""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

from griffin_batch.actors import output

WIDTH = 100
"""Most characters of a prompt or completion shown on one line."""


def first_rows(output_url: str, n: int, prompt_column: str = "prompt") -> list[dict[str, str]]:
    """Up to ``n`` output rows in shard order: id, completion or error, and prompt when kept.

    A row of a request with several samples (``--n``, a per-row ``n``) also
    has ``sample``, its sample index.

    Args:
      output_url: The job's output directory (any fsspec URL).
      n: Most rows to return.
      prompt_column: The prompt column, shown when ``--keep-columns`` copied it.
    """
    if n <= 0:
        return []
    fs, root = fsspec.core.url_to_fs(output_url)
    rows: list[dict] = []
    several: list[bool] = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/{output.part_name('*')}")):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            wanted = [c for c in ("id", prompt_column, "completion", "error", "sample_index")
                      if c in parquet.schema_arrow.names]
            # One row more than shown: whether the last shown row's request has a sample 1.
            for batch in parquet.iter_batches(batch_size=n - len(rows) + 1, columns=wanted):
                got = batch.to_pylist()
                several.extend(_several_samples(got)[: n - len(rows)])
                rows.extend(got[: n - len(rows)])
                break
        if len(rows) >= n:
            break
    return [
        {"id": str(r["id"]),
         **({"sample": str(r["sample_index"])} if mates else {}),
         **({"prompt": str(r[prompt_column])} if r.get(prompt_column) is not None else {}),
         **({"error": r["error"]} if r.get("error") else {"completion": r["completion"]})}
        for r, mates in zip(rows, several, strict=True)
    ]


def _several_samples(rows: list[dict]) -> list[bool]:
    """Whether each row (of one part, in order) is one of its request's several samples.

    A part holds a request's samples together and in order, and never splits
    them across parts: sample 0 has mates iff the next row is a sample > 0.
    """
    return [row.get("sample_index", 0) > 0 or after.get("sample_index", 0) > 0
            for row, after in zip(rows, [*rows[1:], {}], strict=True)]


def _clip(text: str) -> str:
    """``text`` as a Python literal (newlines show as \\n), cut to ``WIDTH`` characters."""
    shown = repr(text)
    return shown if len(shown) <= WIDTH else shown[: WIDTH - 3] + "..."


def format_rows(rows: list[dict[str, str]]) -> str:
    """Two lines per row: the id with its prompt, then its completion (or error), clipped.

    The id is ``[a]``, or ``[a #1]`` for sample 1 of a request with several.
    """
    lines = []
    for r in rows:
        name = f"[{r['id']} #{r['sample']}]" if "sample" in r else f"[{r['id']}]"
        lines.append(f"{name} {_clip(r['prompt'])}" if "prompt" in r else name)
        lines.append(f"  error: {r['error'][:WIDTH]}" if "error" in r
                     else f"  -> {_clip(r['completion'])}")
    return "\n".join(lines)
