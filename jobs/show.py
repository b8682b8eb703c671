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

    Args:
      output_url: The job's output directory (any fsspec URL).
      n: Most rows to return.
      prompt_column: The prompt column, shown when ``--keep-columns`` copied it.
    """
    if n <= 0:
        return []
    fs, root = fsspec.core.url_to_fs(output_url)
    rows: list[dict[str, str]] = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/{output.part_name('*')}")):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            wanted = [c for c in ("id", prompt_column, "completion", "error")
                      if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=n, columns=wanted):
                rows.extend(batch.to_pylist()[: n - len(rows)])
                break
        if len(rows) >= n:
            break
    return [
        {"id": str(r["id"]),
         **({"prompt": str(r[prompt_column])} if r.get(prompt_column) is not None else {}),
         **({"error": r["error"]} if r.get("error") else {"completion": r["completion"]})}
        for r in rows
    ]


def _clip(text: str) -> str:
    """``text`` as a Python literal (newlines show as \\n), cut to ``WIDTH`` characters."""
    shown = repr(text)
    return shown if len(shown) <= WIDTH else shown[: WIDTH - 3] + "..."


def format_rows(rows: list[dict[str, str]]) -> str:
    """Two lines per row: the id with its prompt, then its completion (or error), clipped."""
    lines = []
    for r in rows:
        lines.append(f"[{r['id']}] {_clip(r['prompt'])}" if "prompt" in r else f"[{r['id']}]")
        lines.append(f"  error: {r['error'][:WIDTH]}" if "error" in r
                     else f"  -> {_clip(r['completion'])}")
    return "\n".join(lines)
