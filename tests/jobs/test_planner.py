"""Planning from Parquet metadata: files, columns, shards; bad input named before anything runs."""

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from griffin_batch.actors import shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import planner

SAMPLING = config_lib.SamplingConfig()


def _io(*inputs, **kw) -> config_lib.IOConfig:
    return config_lib.IOConfig(inputs=tuple(inputs), output="unused", **kw)


def _covered(plan: planner.JobPlan) -> dict[str, list[int]]:
    """File URL -> row indices covered by the plan's shards, in shard order."""
    out: dict[str, list[int]] = {}
    for s in plan.shards:
        out.setdefault(s.path, []).extend(range(s.first_row, s.first_row + s.num_rows))
    return out


def test_shards_cover_every_row_once_within_the_bound(tmp_path, write_parquet):
    a = write_parquet(str(tmp_path / "a.parquet"), {"prompt": ["x"] * 25}, row_group_size=4)
    b = write_parquet(
        str(tmp_path / "sub" / "b.parquet"), {"prompt": ["y"] * 23}, row_group_size=10
    )
    plan = planner.plan(_io(a, str(tmp_path / "sub"), shard_rows=8), SAMPLING)
    assert [f.url for f in plan.files] == [a, b]
    assert plan.total_rows == 48
    assert _covered(plan) == {a: list(range(25)), b: list(range(23))}
    assert all(0 < s.num_rows <= 8 for s in plan.shards)
    assert [s.shard_id for s in plan.shards] == [f"{i:05d}" for i in range(len(plan.shards))]
    # Whole row groups are packed; the 10-row groups of b are split by offset.
    assert [s.row_groups for s in plan.shards if s.path == a] == [(0, 1), (2, 3), (4, 5), (6,)]
    assert [(s.row_groups, s.offset, s.num_rows) for s in plan.shards if s.path == b] == [
        ((0,), 0, 5),
        ((0,), 5, 5),
        ((1,), 0, 5),
        ((1,), 5, 5),
        ((2,), 0, 3),
    ]
    assert planner.JobPlan.from_dict(plan.to_dict()) == plan


def test_planning_reads_only_metadata(tmp_path, write_parquet):
    """A file whose data pages are garbage still plans: only the footer is read."""
    path = write_parquet(
        str(tmp_path / "p.parquet"),
        {"prompt": [f"row {i}" for i in range(64)]},
        row_group_size=16,
        compression="zstd",
    )
    chunks = [pq.ParquetFile(path).metadata.row_group(i).column(0) for i in (1, 2)]
    start = chunks[0].dictionary_page_offset or chunks[0].data_page_offset
    end = (chunks[1].dictionary_page_offset or chunks[1].data_page_offset) + chunks[
        1
    ].total_compressed_size
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * (end - start))
    with pytest.raises((OSError, pa.ArrowInvalid)):
        pq.read_table(path)
    plan = planner.plan(_io(path, shard_rows=16), SAMPLING)
    assert plan.total_rows == 64 and len(plan.shards) == 4


def test_globs_ids_and_sample_index(tmp_path, write_parquet):
    for name in ("x1", "x2"):
        write_parquet(str(tmp_path / name / "data.parquet"), {"prompt": ["a", "b"], "n": [2, 1]})
    (tmp_path / "x1" / "_SUCCESS").write_text("")
    plan = planner.plan(_io(str(tmp_path / "x*" / "*.parquet")), SAMPLING)
    # Two files named data.parquet: their full paths become the id prefix.
    assert [f.key for f in plan.files] == [
        str(tmp_path / "x1" / "data.parquet"),
        str(tmp_path / "x2" / "data.parquet"),
    ]
    assert plan.with_sample_index  # an "n" column may ask for several samples per row


def test_memory_urls(write_parquet):
    write_parquet("memory://planner-test/in.parquet", {"prompt": ["a"] * 5})
    plan = planner.plan(_io("memory://planner-test/", shard_rows=2), SAMPLING)
    assert [f.url for f in plan.files] == ["memory:///planner-test/in.parquet"]
    # One 5-row group, cut by offset into near-equal pieces.
    assert [(s.offset, s.num_rows) for s in plan.shards] == [(0, 1), (1, 2), (3, 2)]


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (
            lambda d, w: w(f"{d}/p.parquet", {"text": ["a"]}),
            {},
            r"p.parquet has no prompt column 'prompt' \(--prompt-column\); its columns are \['text'\]",
        ),
        (
            lambda d, w: w(f"{d}/p.parquet", {"prompt": [1, 2]}),
            {},
            "prompt column 'prompt' has type int64, expected text",
        ),
        (
            lambda d, w: w(f"{d}/p.parquet", {"prompt": ["a"]}),
            {"keep_columns": ("topic",)},
            "has no column 'topic' named in --keep-columns",
        ),
        (
            lambda d, w: pathlib.Path(f"{d}/p.parquet").write_text("id,prompt\n1,hello\n"),
            {},
            "p.parquet is not a readable Parquet file",
        ),
        (lambda d, w: None, {}, "no such file or directory"),
    ],
)
def test_bad_input_is_named(tmp_path, write_parquet, make, options, message):
    make(str(tmp_path), write_parquet)
    with pytest.raises(config_lib.JobInputError, match=message):
        planner.plan(_io(str(tmp_path / "p.parquet"), **options), SAMPLING)


def test_glob_matching_nothing_and_inconsistent_kept_types(tmp_path, write_parquet):
    with pytest.raises(config_lib.JobInputError, match=r"\*.parquet matches no Parquet files"):
        planner.plan(_io(str(tmp_path / "*.parquet")), SAMPLING)
    write_parquet(str(tmp_path / "a.parquet"), {"prompt": ["a"], "k": [1]})
    write_parquet(str(tmp_path / "b.parquet"), {"prompt": ["a"], "k": ["one"]})
    with pytest.raises(config_lib.JobInputError, match="kept column 'k' has type string"):
        planner.plan(_io(str(tmp_path), keep_columns=("k",)), SAMPLING)


def test_split_file_skips_empty_groups():
    f = planner.InputFile(
        url="u", key="k", num_rows=9, row_group_rows=(3, 0, 3, 3), columns=("prompt",)
    )
    specs = planner.split_file(f, 6)
    assert [(s.row_groups, s.first_row, s.num_rows) for s in specs] == [
        ((0, 2), 0, 6),
        ((3,), 6, 3),
    ]
    assert all(isinstance(s, shards.ShardSpec) for s in specs)
