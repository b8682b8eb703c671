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


def test_a_directorys_other_files_are_named_as_skipped(tmp_path, write_parquet):
    a = write_parquet(str(tmp_path / "d" / "a.parquet"), {"prompt": ["x"]})
    (tmp_path / "d" / "b.csv").write_text("prompt\ny\n")
    (tmp_path / "d" / "_SUCCESS").write_text("")  # a writer's marker: not the user's data
    notes = []
    plan = planner.plan(_io(str(tmp_path / "d")), SAMPLING, notes.append)
    assert [f.url for f in plan.files] == [a]
    assert notes == [f"note: --input {tmp_path / 'd'}: 1 file(s) not named *.parquet are "
                     f"skipped ({tmp_path / 'd' / 'b.csv'})"]
    (tmp_path / "d" / "a.parquet").unlink()
    with pytest.raises(config_lib.JobInputError,
                       match=r"matches no Parquet files \(it holds .*b\.csv\)"):
        planner.plan(_io(str(tmp_path / "d")), SAMPLING)


def test_a_file_named_twice_is_read_once_and_the_job_says_so(tmp_path, write_parquet):
    a = write_parquet(str(tmp_path / "a.parquet"), {"prompt": ["x"] * 5})
    notes = []
    plan = planner.plan(_io(a, a, str(tmp_path)), SAMPLING, notes.append)
    assert [f.url for f in plan.files] == [a] and plan.total_rows == 5
    assert notes == [f"note: {a} matched more than one --input and are read once "
                     "(2 repeat(s) dropped)"]


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
    # A column called "n" is data unless named: no sample_index, and a note says so.
    notes = []
    plan = planner.plan(_io(str(tmp_path / "x*" / "*.parquet")), SAMPLING, notes.append)
    assert not plan.with_sample_index
    assert notes == ["note: input columns ['n'] are data, not sampling parameters; to set "
                     "sampling per row pass --sampling-columns n"]
    named = _io(str(tmp_path / "x*" / "*.parquet"), sampling_columns=("n",))
    assert planner.plan(named, SAMPLING).with_sample_index  # n may ask for several samples


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


def _write(path, columns: dict, schema: pa.Schema | None = None) -> str:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def test_text_columns_of_every_encoding_are_accepted(tmp_path):
    """Dictionary-encoded, large-string, bytes and all-null prompt columns plan; files whose
    schemas disagree only in how they hold text plan together."""
    d = tmp_path / "in"
    _write(d / "a.parquet", {"prompt": pa.array(["x", "y", "x"]).dictionary_encode()})
    _write(d / "b.parquet", {"prompt": pa.array(["x"], pa.large_string())})
    _write(d / "c.parquet", {"prompt": pa.array([b"x"], pa.binary())})
    _write(d / "d.parquet", {"prompt": pa.array([None], pa.null())})
    plan = planner.plan(_io(str(d)), SAMPLING)
    assert plan.total_rows == 6 and not plan.unreadable


@pytest.mark.parametrize(
    "columns, options, message",
    [
        ({"prompt": ["a"], "temperature": pa.array([[0.5]])}, {"sampling_columns": ("temperature",)},
         r"column 'temperature' sets temperature but has type list<.*double>, expected a "
         "number or text"),
        ({"prompt": ["a"], "sp": pa.array([{"top_k": {"x": 1}}])},
         {"sampling_params_column": "sp"},
         r"column 'sp.top_k' sets top_k but has type struct<x: int64>, expected an integer"),
        ({"prompt": ["a"], "sp": pa.array([{"topk": 1}])}, {"sampling_params_column": "sp"},
         r"sp.topk is not a sampling field"),
        ({"prompt": ["a"], "sp": [1]}, {"sampling_params_column": "sp"},
         r"column 'sp' \(--sampling-params-column\) has type int64, expected a struct"),
        ({"prompt": ["a"], "stop": [1]}, {"sampling_columns": ("stop",)},
         r"column 'stop' sets stop but has type int64, expected text or a list of text"),
        ({"prompt": ["a"], "id": pa.array([{"a": 1}])}, {},
         r"id column 'id' has type struct<a: int64>, expected text or a number"),
        ({"prompt": ["a"]}, {"id_column": "key"},
         r"has no id column 'key' \(--id-column\)"),
    ],
)
def test_columns_that_cannot_serve_their_role_are_named(tmp_path, columns, options, message):
    path = _write(tmp_path / "p.parquet", columns)
    with pytest.raises(config_lib.JobInputError, match=message) as e:
        planner.plan(_io(path, **options), SAMPLING)
    assert path in str(e.value)


def test_a_named_sampling_column_must_be_in_some_input(tmp_path):
    d = tmp_path / "in"
    _write(d / "a.parquet", {"prompt": ["a"], "p": [0.5]})
    _write(d / "b.parquet", {"prompt": ["a"]})
    notes = []
    planner.plan(_io(str(d), sampling_columns=("top_p=p",)), SAMPLING, notes.append)
    assert notes == ["note: 1 of 2 input(s) have no column 'p'; their rows use the job's "
                     "sampling options"]
    with pytest.raises(config_lib.JobInputError,
                       match="no input has the column 'q' named in --sampling-columns"):
        planner.plan(_io(str(d), sampling_columns=("top_p=q",)), SAMPLING)


def test_sampling_columns_option_is_checked():
    with pytest.raises(config_lib.JobInputError, match="'temp' is not a sampling field"):
        _io("x", sampling_columns=("temp",)).sampling_overrides()
    with pytest.raises(config_lib.JobInputError, match="names the column 'c' twice"):
        _io("x", sampling_columns=("top_k=c", "top_p=c")).sampling_overrides()


def test_duplicate_ids_are_refused_unless_allowed(tmp_path):
    d = tmp_path / "in"
    _write(d / "a.parquet", {"prompt": ["p"] * 3, "id": pa.array([1, 2, 3], pa.int64())})
    _write(d / "b.parquet", {"prompt": ["p"] * 2, "id": ["4", "1"]})  # "1" is 1 as text
    _write(d / "c.parquet", {"prompt": ["p"] * 2, "id": [None, "c.parquet#0"]})  # collides
    with pytest.raises(config_lib.JobInputError) as e:
        planner.plan(_io(str(d)), SAMPLING)
    text = str(e.value)
    assert "2 row id(s) repeat in column 'id'" in text
    assert f"'1' at {d / 'a.parquet'} row 0, {d / 'b.parquet'} row 1" in text
    assert f"'c.parquet#0' at {d / 'c.parquet'} row 0, {d / 'c.parquet'} row 1" in text
    assert "--allow-duplicate-ids" in text
    assert planner.plan(_io(str(d), allow_duplicate_ids=True), SAMPLING).total_rows == 7


def test_unique_ids_of_mixed_types_plan(tmp_path):
    d = tmp_path / "in"
    _write(d / "a.parquet", {"prompt": ["p"] * 2, "id": pa.array([1, 2], pa.int32())})
    _write(d / "b.parquet", {"prompt": ["p"] * 2, "id": ["x", None]})
    _write(d / "c.parquet", {"prompt": ["p"] * 2})
    assert planner.plan(_io(str(d)), SAMPLING).total_rows == 6


def test_unreadable_footer_fails_that_file_only(tmp_path):
    d = tmp_path / "in"
    good = _write(d / "a.parquet", {"prompt": ["p"] * 3})
    bad = _write(d / "b.parquet", {"prompt": ["p"] * 3})
    data = pathlib.Path(bad).read_bytes()
    pathlib.Path(bad).write_bytes(data[:-12] + b"\0" * 8 + data[-4:])  # footer length and magic
    _write(d / "empty.parquet", {"prompt": pa.array([], pa.string())})  # no rows, no shards
    notes = []
    plan = planner.plan(_io(str(d)), SAMPLING, notes.append)
    assert [f.url for f in plan.files] == [good, str(d / "empty.parquet")]
    assert plan.total_rows == 3 and len(plan.shards) == 1
    ((url, error),) = plan.unreadable
    assert url == bad and f"cannot read input {bad}: Couldn't deserialize thrift" in error
    assert any(bad in n and "the other inputs go on" in n for n in notes)
    assert planner.JobPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(config_lib.JobInputError, match="cannot read input .*b.parquet"):
        planner.plan(_io(bad), SAMPLING)  # nothing readable: a job-level error
