"""Input columns as per-row values: prompts, ids and sampling overrides.

A Parquet column has one type in every row, so whether a column can play its
role (prompt text, row id, a sampling field) is decided once per file from its
footer, before any worker starts (``check_schema``). What a single value gets
wrong (bytes that are not UTF-8, a number out of range) is that row's error
alone: values are read here without any whole-column conversion that could
fail for one bad row.

Only columns the user names change sampling (``SamplingColumns``): a data
column that happens to be called ``n`` or ``seed`` is data.
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from griffin_batch.model import requests

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "n")
"""Sampling fields an input column may set per row."""

_INT_FIELDS = ("max_tokens", "top_k", "seed", "n")
_FLOAT_FIELDS = ("temperature", "top_p")


class ColumnTypeError(ValueError):
    """A column's type cannot serve its role (a job-level error: every row would fail)."""


@dataclasses.dataclass(frozen=True)
class InvalidText:
    """A text value whose bytes are not UTF-8; ``reason`` says where."""

    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingColumns:
    """Which input columns override which sampling fields, per row.

    Attributes:
      fields: (sampling field, input column) pairs, from ``--sampling-columns``
        (``temperature`` or ``temperature=temp``).
      struct: A struct column whose fields are sampling fields
        (``--sampling-params-column``, as Ray Data LLM's ``sampling_params``).
    """

    fields: tuple[tuple[str, str], ...] = ()
    struct: str | None = None

    @classmethod
    def parse(cls, entries: Sequence[str], struct: str | None = None) -> SamplingColumns:
        """From ``FIELD`` or ``FIELD=COLUMN`` entries.

        Raises:
          ValueError: An entry names no sampling field, or a field or column twice.
        """
        pairs = []
        for entry in entries:
            field, _, column = entry.partition("=")
            field, column = field.strip(), (column.strip() or field.strip())
            if field not in SAMPLING_FIELDS:
                raise ValueError(
                    f"--sampling-columns: {field!r} is not a sampling field; "
                    f"the fields are {', '.join(SAMPLING_FIELDS)}")
            pairs.append((field, column))
        fields = [f for f, _ in pairs]
        columns = [c for _, c in pairs] + ([struct] if struct else [])
        for name, values in (("field", fields), ("column", columns)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"--sampling-columns names the {name} {twice[0]!r} twice")
        return cls(fields=tuple(pairs), struct=struct or None)

    def columns(self) -> list[str]:
        """Input columns these overrides read."""
        return [c for _, c in self.fields] + ([self.struct] if self.struct else [])

    def may_set(self, field: str, schemas: Iterable[pa.Schema] = ()) -> bool:
        """Whether some row may set ``field`` (a named column, or a struct field in ``schemas``)."""
        if any(f == field for f, _ in self.fields):
            return True
        return self.struct is not None and any(
            self.struct in s.names and field in _struct_fields(s.field(self.struct).type)
            for s in schemas)

    def to_json(self) -> dict[str, Any]:
        return {"fields": [list(p) for p in self.fields], "struct": self.struct}


# --- schema checks (planning) -------------------------------------------------------------

def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_text_type(t: pa.DataType) -> bool:
    """Text or bytes (decoded per row as UTF-8), dictionary-encoded or not, or all null."""
    t = _plain(t)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_binary_view(t) or pa.types.is_null(t))


def _is_number_type(t: pa.DataType) -> bool:
    t = _plain(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_list_of_text(t: pa.DataType) -> bool:
    t = _plain(t)
    return (pa.types.is_list(t) or pa.types.is_large_list(t)
            or pa.types.is_list_view(t)) and is_text_type(t.value_type)


def _struct_fields(t: pa.DataType) -> dict[str, pa.DataType]:
    return {t.field(i).name: t.field(i).type for i in range(t.num_fields)}


def _field_accepts(field: str, t: pa.DataType) -> str | None:
    """What ``field`` expects when type ``t`` cannot hold it, else None."""
    if field == "stop":
        return None if is_text_type(t) or _is_list_of_text(t) else "text or a list of text"
    if is_text_type(t) or _is_number_type(t):
        return None
    return "an integer or text" if field in _INT_FIELDS else "a number or text"


def check_schema(url: str, schema: pa.Schema, prompt_column: str, id_column: str | None,
                 sampling: SamplingColumns) -> None:
    """Checks that the file's columns can play their roles.

    Args:
      url: The file (named in errors).
      schema: Its Arrow schema.
      prompt_column: The prompt column (must be present).
      id_column: An explicitly chosen id column (must be present), or None.
      sampling: The sampling override columns (checked where present; see
        ``missing_sampling_columns``).

    Raises:
      ColumnTypeError: A column is missing or its type cannot serve its role; the
        message names the file, the column and what was expected.
    """
    names = schema.names
    for role, column in (("prompt", prompt_column), ("id", id_column)):
        if column is not None and column not in names:
            raise ColumnTypeError(f"input {url} has no {role} column {column!r} "
                                  f"(--{role}-column); its columns are {names}")
    prompt_type = schema.field(prompt_column).type
    if not is_text_type(prompt_type):
        raise ColumnTypeError(f"input {url}: prompt column {prompt_column!r} has type "
                              f"{prompt_type}, expected text")
    if id_column is not None or "id" in names:
        column = id_column or "id"
        if pa.types.is_nested(_plain(schema.field(column).type)):
            raise ColumnTypeError(f"input {url}: id column {column!r} has type "
                                  f"{schema.field(column).type}, expected text or a number")
    for field, column in sampling.fields:
        if column in names:  # a file without it runs its rows with the job's value
            _check_field(url, column, field, schema.field(column).type)
    if sampling.struct is not None and sampling.struct in names:
        _check_struct(url, schema, sampling)


def missing_sampling_columns(schemas: Sequence[pa.Schema], sampling: SamplingColumns
                             ) -> dict[str, int]:
    """Each override column and how many of ``schemas`` lack it (those present everywhere omitted)."""
    counts = {c: sum(c not in s.names for s in schemas) for c in sampling.columns()}
    return {c: n for c, n in counts.items() if n}


def _check_field(url: str, where: str, field: str, t: pa.DataType) -> None:
    expected = _field_accepts(field, t)
    if expected:
        raise ColumnTypeError(f"input {url}: column {where!r} sets {field} but has type {t}, "
                              f"expected {expected}")


def _check_struct(url: str, schema: pa.Schema, sampling: SamplingColumns) -> None:
    name = sampling.struct
    t = schema.field(name).type
    if not pa.types.is_struct(t):
        raise ColumnTypeError(f"input {url}: column {name!r} (--sampling-params-column) has "
                              f"type {t}, expected a struct of {', '.join(SAMPLING_FIELDS)}")
    named = {f for f, _ in sampling.fields}
    for field, field_type in _struct_fields(t).items():
        if field not in SAMPLING_FIELDS:
            raise ColumnTypeError(f"input {url}: {name}.{field} is not a sampling field; "
                                  f"the fields are {', '.join(SAMPLING_FIELDS)}")
        if field in named:
            raise ColumnTypeError(f"input {url}: {field} is set both by {name}.{field} and "
                                  "by --sampling-columns; name one")
        _check_field(url, f"{name}.{field}", field, field_type)


# --- values (workers) -----------------------------------------------------------------------

def _as_bytes_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every text type replaced by its bytes type (no UTF-8 check on conversion)."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_string_view(t):
        return pa.binary_view()
    if pa.types.is_list(t):
        return pa.list_(_as_bytes_type(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_as_bytes_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _as_bytes_type(f.type)) for f in t])
    return t


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            return InvalidText(f"is not valid UTF-8 (byte {e.start}: {value[e.start:e.start + 1]!r})")
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """The column's values as Python objects, text decoded row by row.

    A text value that is not UTF-8 becomes ``InvalidText`` instead of failing
    the whole column; bytes columns decode as UTF-8 too (text stored as bytes).
    """
    t = column.type
    if pa.types.is_dictionary(t):
        column = pc.cast(column, t.value_type)  # dictionary_decode; cast keeps chunking
        t = t.value_type
    return [_decode(v) for v in column.cast(_as_bytes_type(t)).to_pylist()]


def text_of(column: str, value: Any) -> str:
    """A prompt value as text.

    Raises:
      RequestError: The value is null, empty, not text, or not UTF-8 (naming ``column``).
    """
    if value is None:
        raise requests.RequestError(f"{column} is null")
    if isinstance(value, InvalidText):
        raise requests.RequestError(f"{column} {value.reason}")
    if not isinstance(value, str):
        raise requests.RequestError(f"{column} must be text, got {type(value).__name__}")
    if not value.strip():
        raise requests.RequestError(f"{column} is empty")
    return value


def id_text(value: Any) -> str | None:
    """A row id as text (None stays None); bytes that are not UTF-8 are escaped, not dropped."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def id_texts(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Each row's id as text: the one conversion both the duplicate check and the output use."""
    t = column.type
    if pa.types.is_dictionary(t):
        column = pc.cast(column, t.value_type)
        t = t.value_type
    return [id_text(v) for v in column.cast(_as_bytes_type(t)).to_pylist()]


def row_overrides(table: pa.Table, sampling: SamplingColumns
                  ) -> list[dict[str, tuple[Any, str]]]:
    """Per row, the sampling fields its override columns set: field -> (raw value, source name).

    Null values set nothing (the job's value holds). Sources are named as a
    user would find them: ``temp`` for a column, ``sampling_params.top_k`` for
    a struct field.
    """
    out: list[dict[str, tuple[Any, str]]] = [{} for _ in range(table.num_rows)]
    for field, column in sampling.fields:
        if column in table.column_names:
            for row, v in zip(out, values(table.column(column)), strict=True):
                if v is not None:
                    row[field] = (v, column)
    if sampling.struct and sampling.struct in table.column_names:
        for row, struct in zip(out, values(table.column(sampling.struct)), strict=True):
            for field, v in (struct or {}).items():
                if v is not None:
                    row[field] = (v, f"{sampling.struct}.{field}")
    return out


def apply_overrides(defaults: requests.SamplingParams,
                    overrides: Mapping[str, tuple[Any, str]]) -> requests.SamplingParams:
    """``defaults`` with the row's overrides, each checked on its own so its error names its source.

    Raises:
      RequestError: An override has the wrong type or an invalid value; the
        message starts with the column it came from.
    """
    changes = {}
    for field, (value, source) in overrides.items():
        try:
            changes[field] = _coerce(field, value)
            dataclasses.replace(defaults, **{field: changes[field]}).validate()
        except requests.RequestError as e:
            message = str(e)
            if source != field or not message.startswith(field):
                message = f"{source}: {message}"
            raise requests.RequestError(message) from None
    return dataclasses.replace(defaults, **changes)


def _coerce(name: str, value: Any) -> Any:
    if isinstance(value, InvalidText):
        raise requests.RequestError(f"{name} {value.reason}")
    if name == "stop":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        bad = next((s for s in value if isinstance(s, InvalidText)), None) if isinstance(
            value, list) else None
        if bad is not None:
            raise requests.RequestError(f"stop {bad.reason}")
        raise requests.RequestError(f"stop must be a string or a list of strings, got "
                                    f"{_short(value)}")
    if name in _FLOAT_FIELDS:
        return _as_float(name, value)
    return _as_int(name, value)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, decimal.Decimal) and value.is_finite() and value == value.to_integral():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise requests.RequestError(f"{name} must be an integer, got {_short(value)}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise requests.RequestError(f"{name} must be a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise requests.RequestError(f"{name} must be a number, got {_short(value)}") from None
    if not math.isfinite(result):
        raise requests.RequestError(f"{name} must be a finite number, got {_short(value)}")
    return result


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- seeds --------------------------------------------------------------------------------------

_ROW_SEED_DOMAIN = b"griffin-batch row seed v1\x00"


def row_seed(job_seed: int, row_id: str) -> int:
    """The 64-bit seed of a row without its own: a hash of (job seed, row id).

    Distinct ids get independent streams; the same (job seed, id) gets the same
    stream on any worker, attempt or resume. Changing it changes every
    unpinned row's output, so the domain string carries a version.
    """
    h = hashlib.blake2b(_ROW_SEED_DOMAIN + str(job_seed).encode() + b"\x00" + row_id.encode(
        "utf-8", errors="surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big")
