"""The variables of ``griffin-batch synthesize``: one mapping per combination.

``--vars URL`` (any fsspec URL) is read by its name's ending:

* ``.parquet`` / ``.pq`` and ``.csv``: one combination per row, one variable per
  column (read by pyarrow, types kept);
* ``.jsonl`` / ``.ndjson``: one JSON object per non-blank line;
* ``.yaml`` / ``.yml`` / ``.json``: a list of mappings, one per combination; with
  ``--grid`` a mapping of lists, whose cartesian product gives the combinations
  (the last key varies fastest; a single value counts as a list of one).

A combination lacking a variable that another has leaves it undefined, so a
template that uses it fails naming the row (``jobs.synth_template``), rather
than rendering ``None``. Every error names the file and the row, line or
variable. The file's bytes are hashed so that ``--resume`` refuses a changed one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import yaml

from griffin_batch.jobs import config as config_lib

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".yaml": "yaml", ".yml": "yaml", ".json": "yaml"}
"""File name ending -> format (YAML reads JSON too)."""


@dataclasses.dataclass(frozen=True)
class Variables:
    """The combinations of one ``--vars`` file.

    Attributes:
      url: The file.
      rows: Each combination's variables (only those it defines).
      table: The same, one column per variable (null where a row lacks it): the
        output columns.
      size: Bytes of the file.
      sha256: Hex SHA-256 of them.
    """

    url: str
    rows: list[dict[str, Any]]
    table: pa.Table
    size: int
    sha256: str


def format_of(url: str) -> str:
    """The format of ``url`` by its name.

    Raises:
      JobInputError: An ending that names no known format.
    """
    name = posixpath.basename(url.rstrip("/")).lower()
    for ending, kind in FORMATS.items():
        if name.endswith(ending):
            return kind
    raise config_lib.JobInputError(
        f"--vars {url}: cannot tell its format from its name; name it "
        f"{', '.join(sorted(FORMATS))} (Parquet, CSV, JSONL, or YAML/JSON)")


def load(url: str, *, grid: bool = False) -> Variables:
    """Reads the combinations of ``url``.

    Args:
      url: Parquet, CSV, JSONL or YAML file (any fsspec URL).
      grid: The file is a YAML mapping of lists: take their cartesian product.

    Raises:
      JobInputError: The file cannot be read, is of no known format, holds no
        combination, or a row, line or variable is malformed (named).
    """
    kind = format_of(url)
    if grid and kind != "yaml":
        raise config_lib.JobInputError(
            f"--grid needs a YAML (or JSON) mapping of lists, not a {kind} file: --vars {url}")
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise config_lib.JobInputError(f"--vars {url}: cannot read it: {e}") from None
    if kind in ("parquet", "csv"):
        table = _read_table(url, data, kind)
        rows = table.to_pylist()
    else:
        rows = _jsonl_rows(url, data) if kind == "jsonl" else _yaml_rows(url, data, grid)
        table = _table_of(url, rows)
    if not rows:
        raise config_lib.JobInputError(f"--vars {url} holds no combination (no rows)")
    return Variables(url=url, rows=rows, table=table, size=len(data),
                     sha256=hashlib.sha256(data).hexdigest())


def _read_table(url: str, data: bytes, kind: str) -> pa.Table:
    try:
        if kind == "parquet":
            return pq.read_table(io.BytesIO(data))
        return pa_csv.read_csv(io.BytesIO(data))
    except (pa.ArrowException, ValueError, OSError) as e:
        raise config_lib.JobInputError(
            f"--vars {url} is not a readable {kind} file: {' '.join(str(e).split())}") from None


def _jsonl_rows(url: str, data: bytes) -> list[dict[str, Any]]:
    rows = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise config_lib.JobInputError(f"--vars {url}: line {number} is not JSON: {e}") from None
        rows.append(_mapping(url, value, f"line {number}"))
    return rows


def _yaml_rows(url: str, data: bytes, grid: bool) -> list[dict[str, Any]]:
    try:
        value = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise config_lib.JobInputError(f"--vars {url} is not YAML: {e}") from None
    if grid:
        if not isinstance(value, Mapping):
            raise config_lib.JobInputError(
                f"--vars {url}: --grid needs a mapping of variable -> list of values, got "
                f"{type(value).__name__}")
        return grid_rows(url, value)
    if isinstance(value, Mapping):
        raise config_lib.JobInputError(
            f"--vars {url} is a mapping: pass --grid for the cartesian product of its lists, "
            "or write a list of mappings (one per combination)")
    if not isinstance(value, list):
        raise config_lib.JobInputError(
            f"--vars {url}: expected a list of mappings (one per combination), got "
            f"{type(value).__name__}")
    return [_mapping(url, v, f"row {i}") for i, v in enumerate(value)]


def grid_rows(url: str, grid: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid``'s lists, the last key varying fastest.

    Raises:
      JobInputError: A key is not text, or a list is empty (named).
    """
    names = [_name(url, k, "the grid") for k in grid]
    lists = [v if isinstance(v, list) else [v] for v in grid.values()]
    for name, values in zip(names, lists, strict=True):
        if not values:
            raise config_lib.JobInputError(
                f"--vars {url}: the grid's {name!r} has no values, so it has no combination")
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists)]


def _mapping(url: str, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise config_lib.JobInputError(
            f"--vars {url}: {where} is not a mapping of variable -> value (got "
            f"{type(value).__name__}: {_short(value)})")
    return {_name(url, k, where): v for k, v in value.items()}


def _name(url: str, key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise config_lib.JobInputError(
            f"--vars {url}: {where} has a variable named {key!r}; names must be non-empty text")
    return key


def _table_of(url: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """One column per variable (first-seen order), each of one type across rows."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    arrays = []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:
            kinds = sorted({type(v).__name__ for v in values if v is not None})
            raise config_lib.JobInputError(
                f"--vars {url}: variable {name!r} mixes values of kinds {kinds} ({e}); give "
                "each variable one kind of value") from None
    return pa.table(arrays, names=names)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
