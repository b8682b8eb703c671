"""``--show N``: the first output rows of a finished job, read from its part files alone."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from griffin_batch.actors import output
from griffin_batch.jobs import show


def _part(root, shard_id: str, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), f"{root}/{output.part_name(shard_id)}")


def test_first_rows_in_shard_order_with_prompt_and_error(tmp_path):
    _part(tmp_path, "b", [{"id": "b0", "prompt": "p2", "completion": "", "error": "prompt is null"}])
    _part(tmp_path, "a", [{"id": f"a{i}", "prompt": f"p{i}", "completion": f"line\nnext {i}",
                           "error": None} for i in range(2)])
    (tmp_path / "_summary.json").write_text("{}")  # not a part: ignored

    rows = show.first_rows(str(tmp_path), 3)
    assert rows == [
        {"id": "a0", "prompt": "p0", "completion": "line\nnext 0"},
        {"id": "a1", "prompt": "p1", "completion": "line\nnext 1"},
        {"id": "b0", "prompt": "p2", "error": "prompt is null"},
    ]
    text = show.format_rows(rows)
    print(text)
    assert text.splitlines() == [
        "[a0] 'p0'", "  -> 'line\\nnext 0'",
        "[a1] 'p1'", "  -> 'line\\nnext 1'",
        "[b0] 'p2'", "  error: prompt is null",
    ]
    assert show.first_rows(str(tmp_path), 1) == rows[:1]
    assert show.first_rows(str(tmp_path), 0) == []


def test_rows_without_the_prompt_column_and_long_text_are_clipped(tmp_path):
    _part(tmp_path, "a", [{"id": "x", "completion": "w" * 500, "error": None}])
    (line_id, line_text) = show.format_rows(show.first_rows(str(tmp_path), 5)).splitlines()
    assert line_id == "[x]"
    assert len(line_text) == len("  -> ") + show.WIDTH and line_text.endswith("...")


def test_a_row_of_several_samples_shows_each_samples_index(tmp_path):
    # --n 2 (or a per-row n): a row's samples follow one another in its part, sample 0 first.
    _part(tmp_path, "a", [
        {"id": "a", "prompt": "p", "sample_index": 0, "completion": "one", "error": None},
        {"id": "a", "prompt": "p", "sample_index": 1, "completion": "two", "error": None},
        {"id": "b", "prompt": "q", "sample_index": 0, "completion": "only", "error": None},
        {"id": "c", "prompt": "r", "sample_index": 0, "completion": "c0", "error": None},
        {"id": "c", "prompt": "r", "sample_index": 1, "completion": "c1", "error": None},
    ])
    rows = show.first_rows(str(tmp_path), 4)
    assert [(r["id"], r.get("sample")) for r in rows] == [
        ("a", "0"), ("a", "1"), ("b", None), ("c", "0")]  # c's sample 1 is past the 4th row
    assert show.format_rows(rows).splitlines() == [
        "[a #0] 'p'", "  -> 'one'",
        "[a #1] 'p'", "  -> 'two'",
        "[b] 'q'", "  -> 'only'",
        "[c #0] 'r'", "  -> 'c0'",
    ]
