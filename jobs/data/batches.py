"""A Ray Data batch in the worker's terms and back: checks, a batch's shard, output rows.

The worker turns a table of rows into the job's output rows
(``actors.rows.prepare`` and ``assemble``: per-row parsing, per-row errors,
exactly-once accounting). Here a Ray Data batch becomes such a table, and the
worker's answer becomes the batch's own columns plus the generated ones, one
row per sample, in input order.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from griffin_batch.actors import columns, output, rows, shards

OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    *(f for f in output.BASE_FIELDS if f.name != "id"),
    output.SAMPLE_INDEX_FIELD,
)
"""Columns a processor adds to each row: the job's output columns but ``id`` (the
row's own columns stay as they are), and ``sample_index`` always."""

OUTPUT_COLUMNS = tuple(f.name for f in OUTPUT_FIELDS)

WHERE = "Ray Data batch"
"""How column errors name the input (a batch has no file name)."""


class BatchColumnError(ValueError):
    """A batch's columns cannot be processed (every row would fail): names the column."""


def for_worker(batch: pa.Table, options: shards.ShardOptions) -> pa.Table:
    """The batch as the worker reads rows: its columns checked, all-null override columns gone.

    A column that is null in every row of one batch has Arrow's null type there
    (Ray Data infers types per block), which is no struct; it sets nothing, so it
    is dropped rather than refused.

    Raises:
      BatchColumnError: The prompt column is missing, a column's type cannot serve
        its role, or a column has the name of an output column.
    """
    clash = [c for c in batch.column_names if c in OUTPUT_COLUMNS]
    if clash:
        raise BatchColumnError(
            f"{WHERE}: column(s) {clash} have the names of output columns {list(OUTPUT_COLUMNS)}; "
            "rename or drop them before the processor (e.g. in preprocess)")
    nulls = [c for c in options.sampling_columns.columns()
             if c in batch.column_names and pa.types.is_null(batch.schema.field(c).type)]
    table = batch.drop_columns(nulls)
    try:
        columns.check_schema(WHERE, table.schema, options.prompt_column, options.id_column,
                             options.sampling_columns)
    except columns.ColumnTypeError as e:
        raise BatchColumnError(str(e)) from None
    return table


def batch_shard(num_rows: int) -> shards.ShardSpec:
    """A shard of its own for one batch.

    Its id is unique, so batches running at once in one actor never share engine
    request ids; rows without an id column get ``batch-<that id>#<row>`` as theirs.
    """
    key = uuid.uuid4().hex
    return shards.ShardSpec(shard_id=key, path="", file_key=f"batch-{key}", row_groups=(),
                            offset=0, num_rows=num_rows, first_row=0)


def with_output(batch: pa.Table, generated: pa.Table) -> pa.Table:
    """The batch's rows with the generated columns: one row per sample, in input order.

    Args:
      batch: The input batch, every column as it came.
      generated: The worker's output for it (``actors.rows.assemble``: input order,
        then sample order, ``sample_index`` included).
    """
    starts = pc.equal(generated.column("sample_index"), 0).to_numpy(zero_copy_only=False)
    row_of = np.cumsum(starts, dtype=np.int64) - 1  # each row's samples start at index 0
    if int(starts.sum()) != batch.num_rows:  # assemble checked this; a cheap second look
        raise rows.RowAccountingError(
            f"{WHERE}: {batch.num_rows} rows in, {int(starts.sum())} came back")
    out = batch.take(pa.array(row_of, pa.int64()))
    for f in OUTPUT_FIELDS:
        out = out.append_column(f, generated.column(f.name))
    return out
