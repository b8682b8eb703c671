"""Input values per row: text in any encoding, explicit sampling overrides, ids, row seeds."""

import dataclasses
import math

import pyarrow as pa
import pytest

from griffin_batch.actors import columns, rows, shards
from griffin_batch.model import requests

SPEC = shards.ShardSpec(shard_id="00000", path="/in/p.parquet", file_key="p.parquet",
                        row_groups=(0,), offset=0, num_rows=0, first_row=0)
OPTIONS = shards.ShardOptions(sampling=requests.SamplingParams(max_tokens=8, seed=7))


def _prepare(table: pa.Table, **options) -> tuple[rows.Prepared, dict[int, str]]:
    prepared = rows.prepare(table, SPEC, dataclasses.replace(OPTIONS, **options), attempt=0)
    return prepared, {rows.row_of(c.request_id): c.error for c in prepared.rejected}


def _invalid_utf8(values: list[bytes | None], t: pa.DataType | None = None) -> pa.Array:
    """Text with bytes that are not UTF-8: what a careless writer stores (Arrow does not check)."""
    t = t or pa.string()
    binary = pa.large_binary() if t == pa.large_string() else pa.binary()
    return pa.array(values, binary).view(t)


@pytest.mark.parametrize("text_type", [pa.string(), pa.large_string()])
def test_a_prompt_that_is_not_utf8_is_that_rows_error(text_type):
    table = pa.table({"prompt": _invalid_utf8([b"fine", b"bad \xff\xfe", b"also fine"], text_type)})
    with pytest.raises(UnicodeDecodeError):
        table.column("prompt").to_pylist()  # what used to fail the whole shard
    prepared, errors = _prepare(table)
    assert [r.prompt for r in prepared.requests] == ["fine", "also fine"]
    assert errors == {1: "prompt is not valid UTF-8 (byte 4: b'\\xff')"}


def test_dictionary_and_bytes_prompts_are_text():
    table = pa.table({"prompt": pa.array(["a", "b", "a", None]).dictionary_encode(),
                      "q": pa.array([b"x", b"\xff", None, b"y"], pa.binary())})
    prepared, errors = _prepare(table)
    assert [r.prompt for r in prepared.requests] == ["a", "b", "a"]
    assert errors == {3: "prompt is null"}
    prepared, errors = _prepare(table, prompt_column="q")
    assert [r.prompt for r in prepared.requests] == ["x", "y"]
    assert errors == {1: "q is not valid UTF-8 (byte 0: b'\\xff')", 2: "q is null"}


def test_only_named_columns_change_sampling():
    """A data column called n, seed or stop is data: today's rows used to change silently."""
    table = pa.table({"prompt": ["a", "b"], "n": [3, 3], "seed": [1, 1], "stop": ["a", "b"],
                      "temp": [0.5, None]})
    prepared, _ = _prepare(table)
    assert [r.params.n for r in prepared.requests] == [1, 1]
    assert all(r.params.stop == () for r in prepared.requests)
    named = columns.SamplingColumns.parse(["temperature=temp", "n"])
    prepared, _ = _prepare(table, sampling_columns=named)
    assert [(r.params.temperature, r.params.n) for r in prepared.requests] == [(0.5, 3), (0.0, 3)]
    assert all(r.params.stop == () for r in prepared.requests)


def test_struct_sampling_params_apply_per_row_and_name_their_field():
    sp = pa.array([{"temperature": 0.3, "top_k": 5, "stop": ["x"]},
                   {"temperature": None, "top_k": 2**31, "stop": None},
                   None,
                   {"temperature": math.inf, "top_k": None, "stop": None}])
    table = pa.table({"prompt": ["a", "b", "c", "d"], "sampling_params": sp})
    prepared, errors = _prepare(table, sampling_columns=columns.SamplingColumns(
        struct="sampling_params"))
    a, c = (r.params for r in prepared.requests)
    assert (a.temperature, a.top_k, a.stop) == (0.3, 5, ("x",))
    assert (c.temperature, c.top_k, c.stop) == (0.0, None, ())
    assert errors == {
        1: "sampling_params.top_k: top_k must be an integer in [1, 2147483647] or None, got "
           "2147483648",
        3: "sampling_params.temperature: temperature must be a finite number, got inf",
    }


def test_a_renamed_column_is_named_in_its_error():
    table = pa.table({"prompt": ["a", "b"], "budget": ["12", "lots"],
                      "stops": pa.array([[b"ok"], [b"\xff"]], pa.list_(pa.binary()))})
    named = columns.SamplingColumns.parse(["max_tokens=budget", "stop=stops"])
    prepared, errors = _prepare(table, sampling_columns=named)
    assert [(r.params.max_tokens, r.params.stop) for r in prepared.requests] == [(12, ("ok",))]
    assert errors == {1: "budget: max_tokens must be an integer, got 'lots'"}
    table = table.set_column(1, "budget", pa.array(["3", "4"]))
    _, errors = _prepare(table, sampling_columns=named)
    assert errors == {1: "stops: stop is not valid UTF-8 (byte 0: b'\\xff')"}


def test_rows_get_independent_reproducible_seeds():
    table = pa.table({"prompt": ["same"] * 4, "id": ["a", "b", None, "d"],
                      "seed": pa.array([None, None, None, 2**64 - 1], pa.uint64())})
    prepared, _ = _prepare(table, sampling_columns=columns.SamplingColumns.parse(["seed"]))
    seeds = [r.params.seed for r in prepared.requests]
    assert seeds[:3] == [columns.row_seed(7, "a"), columns.row_seed(7, "b"),
                         columns.row_seed(7, "p.parquet#2")]
    assert len(set(seeds)) == 4 and seeds[3] == 2**64 - 1  # a row's own seed pins it
    again, _ = _prepare(table.slice(1), sampling_columns=columns.SamplingColumns.parse(["seed"]))
    assert again.requests[0].params.seed == seeds[1]  # whatever the window or batch mates
    assert columns.row_seed(8, "a") != seeds[0]  # the job seed changes every unpinned row
    assert all(0 <= s < 2**64 for s in seeds)


def test_ids_become_text_the_same_way_everywhere():
    ids = pa.array([1, None, 3], pa.int64())
    assert columns.id_texts(ids) == ["1", None, "3"]
    assert columns.id_texts(_invalid_utf8([b"a\xff"])) == ["a\\xff"]
    assert columns.id_texts(pa.array(["k", "k"]).dictionary_encode()) == ["k", "k"]
