"""Rows in, rows out: reading shards, bad rows, per-row overrides, exactly-once assembly."""

import dataclasses

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from griffin_batch.actors import columns, output, rows, shards
from griffin_batch.model import requests


def _spec(path="/data/prompts.parquet", num_rows=4, **kw) -> shards.ShardSpec:
    base = dict(
        shard_id="00003",
        path=path,
        file_key="prompts.parquet",
        row_groups=(0,),
        offset=0,
        num_rows=num_rows,
        first_row=0,
    )
    return shards.ShardSpec(**{**base, **kw})


OPTIONS = shards.ShardOptions(sampling=requests.SamplingParams(max_tokens=8, seed=1))
# Every sampling field from the column of its name (--sampling-columns max_tokens,...).
OVERRIDING = dataclasses.replace(
    OPTIONS, sampling_columns=columns.SamplingColumns.parse(columns.SAMPLING_FIELDS))


def test_read_rows_reads_only_planned_groups_and_offset(tmp_path, write_parquet):
    path = write_parquet(
        str(tmp_path / "p.parquet"),
        {"prompt": [f"p{i}" for i in range(12)], "other": list(range(12))},
        row_group_size=4,
    )
    spec = _spec(path, row_groups=(1, 2), offset=2, num_rows=5, first_row=6)
    table = rows.read_rows(spec, OPTIONS)
    assert table.column("prompt").to_pylist() == ["p6", "p7", "p8", "p9", "p10"]
    assert table.column_names == ["prompt"]  # unused columns are not read


def test_read_rows_detects_a_changed_file(tmp_path, write_parquet):
    path = write_parquet(str(tmp_path / "p.parquet"), {"prompt": ["a", "b"]})
    with pytest.raises(rows.InputChangedError, match="read 2 rows where the plan has 4"):
        rows.read_rows(_spec(path, num_rows=4), OPTIONS)
    with pytest.raises(rows.InputChangedError, match="row groups"):
        rows.read_rows(_spec(path, row_groups=(3,), num_rows=1), OPTIONS)


def test_prepare_turns_bad_rows_into_error_rows():
    table = pa.table(
        {
            "prompt": ["ok", None, "", "  ", "ok", "ok", "ok", "ok"],
            "max_tokens": [None, None, None, None, -1, None, 2.5, None],
            "temperature": [None, None, None, None, None, "hot", None, None],
            "n": [None, None, None, None, None, None, None, 0],
        }
    )
    prepared = rows.prepare(table, _spec(num_rows=8), OVERRIDING, attempt=0)
    assert [r.request_id for r in prepared.requests] == ["00003:0:0"]
    errors = {rows.row_of(c.request_id): c.error for c in prepared.rejected}
    assert errors == {
        1: "prompt is null",
        2: "prompt is empty",
        3: "prompt is empty",
        4: "max_tokens must be an integer in [1, 2147483647], got -1",
        5: "temperature must be a number, got 'hot'",
        6: "max_tokens must be an integer, got 2.5",
        7: "n must be an integer in [1, 4096], got 0",
    }
    assert all(c.finish_reason == "error" for c in prepared.rejected)


def test_prepare_applies_per_row_overrides():
    table = pa.table(
        {
            "prompt": ["a", "b", "c"],
            "max_tokens": [3, None, 5],
            "temperature": [None, 0.7, None],
            "seed": [None, 9.0, None],
            "stop": [None, "x", None],
            "n": [None, 2, None],
        }
    )
    prepared = rows.prepare(table, _spec(num_rows=3), OVERRIDING, attempt=2)
    a, b, c = (r.params for r in prepared.requests)
    seed_a = columns.row_seed(1, "prompts.parquet#0")  # no seed of its own: (job seed, id)
    assert (a.max_tokens, a.temperature, a.seed, a.n) == (3, 0.0, seed_a, 1)
    assert (b.max_tokens, b.temperature, b.seed, b.stop, b.n) == (8, 0.7, 9, ("x",), 2)
    assert c.max_tokens == 5
    assert prepared.samples == [1, 2, 1]
    assert prepared.requests[1].request_id == "00003:2:1"


def test_chat_format_wraps_prompts():
    table = pa.table({"prompt": ["hi"]})
    prepared = rows.prepare(table, _spec(num_rows=1), OPTIONS, 0, chat_format=lambda t: f"<{t}>")
    assert prepared.requests[0].prompt == "<hi>"


def test_ids_come_from_the_id_column_or_file_and_row():
    spec = _spec(num_rows=3, first_row=10)
    assert rows.row_ids(pa.table({"prompt": ["a"] * 3}), spec, "id") == [
        "prompts.parquet#10",
        "prompts.parquet#11",
        "prompts.parquet#12",
    ]
    table = pa.table({"prompt": ["a"] * 3, "id": [7, None, 9]})
    assert rows.row_ids(table, spec, "id") == ["7", "prompts.parquet#11", "9"]


def _done(rid: str, sample: int = 0, tokens=(5, 6)) -> requests.Completion:
    return requests.Completion(
        request_id=rid,
        sample_index=sample,
        tokens=list(tokens),
        text="xy",
        finish_reason="length",
        num_prompt_tokens=3,
    )


def _prepared(n: int = 1) -> tuple[pa.Table, rows.Prepared]:
    table = pa.table({"prompt": ["a", None, "c"], "topic": ["t0", "t1", "t2"]})
    options = shards.ShardOptions(
        keep_columns=("topic",), with_sample_index=n > 1, sampling=requests.SamplingParams(n=n)
    )
    return table, rows.prepare(table, _spec(num_rows=3), options, 0), options


def test_assemble_orders_rows_and_keeps_columns():
    table, prepared, options = _prepared(n=2)
    done = [
        _done("00003:0:2", 1),
        _done("00003:0:0", 1),
        _done("00003:0:2", 0),
        _done("00003:0:0", 0),
    ]
    out = rows.assemble(prepared, [*done, *prepared.rejected], table, options)
    assert out.schema == output.output_schema(True, [pa.field("topic", pa.string())])
    d = out.to_pydict()
    assert (
        d["id"] == ["prompts.parquet#0"] * 2 + ["prompts.parquet#1"] * 2 + ["prompts.parquet#2"] * 2
    )
    assert d["sample_index"] == [0, 1, 0, 1, 0, 1]
    assert d["finish_reason"] == ["length", "length", "error", "error", "length", "length"]
    assert d["error"] == [None, None, "prompt is null", "prompt is null", None, None]
    assert d["completion"][2] == "" and d["completion_tokens"][0] == [5, 6]
    assert d["num_completion_tokens"] == [2, 2, 0, 0, 2, 2]
    assert d["topic"] == ["t0", "t0", "t1", "t1", "t2", "t2"]


@pytest.mark.parametrize(
    ("completions", "message"),
    [
        (["00003:0:0"], "never came back"),
        (["00003:0:0", "00003:0:0", "00003:0:2"], "came back twice"),
        (["00003:0:0", "00003:0:2", "00003:0:7"], "unexpected completion"),
    ],
)
def test_assemble_refuses_missing_duplicated_or_unexpected_rows(completions, message):
    table, prepared, options = _prepared()
    with pytest.raises(rows.RowAccountingError, match=message):
        rows.assemble(prepared, [*map(_done, completions), *prepared.rejected], table, options)


def test_output_schema_is_fixed():
    names = output.output_schema(False).names
    assert names == [
        "id",
        "completion",
        "completion_tokens",
        "finish_reason",
        "num_prompt_tokens",
        "num_completion_tokens",
        "error",
    ]
    schema = output.output_schema(True)
    assert schema.field("completion_tokens").type == pa.list_(pa.int32())
    assert schema.field("sample_index").type == pa.int32()


@pytest.mark.parametrize("url", ["local", "memory://publish-test/out"])
def test_publish_makes_the_whole_file_appear_at_once(tmp_path, url):
    url = str(tmp_path / "out") if url == "local" else url
    fs, directory = fsspec.core.url_to_fs(url)
    fs.makedirs(directory, exist_ok=True)
    table = pa.table({"x": [1, 2, 3]})
    path = output.publish(fs, directory, output.part_name("00001"), output.encode(table))
    assert path.endswith("/part-00001.parquet")
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).equals(table)
    output.publish(fs, directory, output.part_name("00001"), output.encode(table))  # replaces
    files = [p for p in fs.find(directory) if not p.rsplit("/", 1)[-1].startswith("_")]
    assert [p.rsplit("/", 1)[-1] for p in files] == ["part-00001.parquet"]
    assert fs.find(f"{directory}/{output.TEMP_DIR}") == []  # no temp file left behind


def test_a_value_the_device_cannot_represent_is_that_rows_error():
    """Before, ``top_k = 2**31`` in an int64 column overflowed inside the engine's shared
    batch and stopped every worker; now it is one error row and the others go on."""
    table = pa.table({"prompt": ["a", "b", "c"], "top_k": pa.array([None, 2**31, 5], pa.int64())})
    prepared = rows.prepare(table, _spec(num_rows=3), OVERRIDING, attempt=0)
    assert [rows.row_of(r.request_id) for r in prepared.requests] == [0, 2]
    (bad,) = prepared.rejected
    assert rows.row_of(bad.request_id) == 1 and "top_k must be an integer in [1, " in bad.error
