"""Hostile input through the real command line: every input class has a defined outcome.

Job-level classes fail before any worker starts (exit 2, naming file, column or
option); per-row classes become error rows naming their column while every other
row is generated exactly once, on real Ray, in one job; a file that cannot be read
fails alone.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import read_output

from griffin_batch.jobs import generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "n")
MAX_TOKENS = 6
I64 = (-(2**63), 2**63 - 1)


def _write(path: pathlib.Path, columns: dict, **kw) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kw)
    return str(path)


def _main(capsys, *argv: str) -> tuple[int, str]:
    code = generate.main(list(argv))
    return code, capsys.readouterr().err


# --- job-level classes: refused before any worker starts -------------------------------------

def _dupes(d):
    _write(d / "a.parquet", {"prompt": ["p", "q"], "id": pa.array([7, 8])})
    _write(d / "b.parquet", {"prompt": ["p"], "id": ["7"]})  # 7 and "7" collide as text
    return [], "1 row id(s) repeat in column 'id' (compared as text): '7' at"


def _no_id_column(d):
    _write(d / "a.parquet", {"prompt": ["p"], "key": ["k"]})
    return ["--id-column", "row_id"], "has no id column 'row_id' (--id-column)"


def _nested_param(d):
    _write(d / "a.parquet", {"prompt": ["p"], "top_k": pa.array([[1, 2]])})
    return ["--sampling-columns", "top_k"], "column 'top_k' sets top_k but has type list<"


def _struct_param(d):
    _write(d / "a.parquet", {"prompt": ["p"], "sp": pa.array([{"n": 1, "best_of": 2}])})
    return ["--sampling-params-column", "sp"], "sp.best_of is not a sampling field"


def _unknown_field(d):
    _write(d / "a.parquet", {"prompt": ["p"]})
    return ["--sampling-columns", "temp"], "'temp' is not a sampling field"


def _kept_types_disagree(d):
    _write(d / "a.parquet", {"prompt": ["p"], "k": [1]})
    _write(d / "b.parquet", {"prompt": ["p"], "k": ["x"]})
    return ["--keep-columns", "k"], "kept column 'k' has type string, other inputs have int64"


def _nothing_readable(d):
    (d / "a.parquet").parent.mkdir(parents=True, exist_ok=True)
    (d / "a.parquet").write_bytes(b"")  # an empty file is no Parquet file
    return [], "a.parquet is not a readable Parquet file"


def _prompt_not_text(d):
    _write(d / "a.parquet", {"prompt": pa.array([{"text": "p"}])})
    return [], "prompt column 'prompt' has type struct<text: string>, expected text"


@pytest.mark.parametrize("case", [_dupes, _no_id_column, _nested_param, _struct_param,
                                  _unknown_field, _kept_types_disagree, _nothing_readable,
                                  _prompt_not_text], ids=lambda c: c.__name__.strip("_"))
def test_job_level_classes_are_refused_before_any_worker(capsys, tmp_path, case):
    extra, message = case(tmp_path / "in")
    out = tmp_path / "out"
    code, err = _main(capsys, "--input", str(tmp_path / "in"), "--output", str(out),
                      "--address", "unused:1", *extra)  # never reached: planning refuses first
    assert code == generate.EXIT_BAD_INPUT, err
    assert message in err, err
    assert not out.exists()


# --- per-row classes and a randomized table, one job on real Ray ------------------------------

def _valid(field: str, rng: random.Random):
    return {
        "max_tokens": lambda: rng.choice([1, MAX_TOKENS, rng.randint(1, MAX_TOKENS)]),
        "temperature": lambda: rng.choice([0.0, -0.0, 1e-300, 5e-324, 1e-38, 2.0, 1.7976931348623157e308,
                                           rng.uniform(0, 2)]),
        "top_k": lambda: rng.choice([1, 2**31 - 1, rng.randint(1, 64)]),
        "top_p": lambda: rng.choice([1.0, 5e-324, rng.uniform(0.01, 1.0)]),
        "seed": lambda: rng.choice([0, 2**64 - 1, rng.getrandbits(64)]),
        "stop": lambda: rng.choice([[], ["."], ["x" * 1024] * 16, [chr(0x1F600)]]),
        "n": lambda: rng.choice([1, 2, 3]),
    }[field]()


def _invalid(field: str, rng: random.Random):
    return rng.choice({
        "max_tokens": [0, -1, 2**31, *I64],
        "temperature": [-1e-9, -math.inf, math.inf, math.nan, -1.7976931348623157e308],
        "top_k": [0, -1, 2**31, *I64],
        "top_p": [0.0, -0.0, 1.0000001, math.nan, math.inf, -1.0],
        "seed": [2**64],  # not representable in uint64: the column is int64 below
        "stop": [[""], ["x"] * 17, ["x" * 1025]],
        "n": [0, -1, 4097, 2**31 - 1, -(2**31)],
    }[field])


_TYPES = {"max_tokens": pa.int64(), "temperature": pa.float64(), "top_k": pa.int64(),
          "top_p": pa.float64(), "seed": pa.uint64(), "stop": pa.list_(pa.string()),
          "n": pa.int32()}


def _random_rows(rng: random.Random, count: int) -> tuple[dict, dict[str, str | None]]:
    """``count`` rows: each parameter valid, boundary, null, or (in one column per row at most)
    invalid; returns the columns and, per id, the column whose value is invalid."""
    cols = {f: [] for f in FIELDS}
    ids, prompts, bad = [], [], {}
    for i in range(count):
        wrong = rng.choice([None] * 6 + list(FIELDS))
        if wrong == "seed":
            wrong = None  # uint64 holds every seed; an out-of-range one is a text row below
        for f in FIELDS:
            value = (_invalid(f, rng) if f == wrong else
                     None if rng.random() < 0.2 else _valid(f, rng))
            cols[f].append(value)
        ids.append(f"r{i:03d}")
        prompts.append(rng.choice(["Once upon a time", "def f(x):", "2 + 2 =", "Hello"]))
        bad[ids[-1]] = wrong
    columns = {"id": ids, "prompt": prompts,
               **{f: pa.array(cols[f], _TYPES[f]) for f in FIELDS}}
    return columns, bad


def _class_rows() -> tuple[dict, dict[str, str | None]]:
    """One row per per-row class, parameters as text (another file's schema, on purpose)."""
    cases = [  # id, prompt bytes, {field: text}, column named by the error (None: no error)
        ("ok", b"The sun", {}, None),
        ("null-prompt", None, {}, "prompt"),
        ("empty-prompt", b"  ", {}, "prompt"),
        ("not-utf8", b"caf\xe9", {}, "prompt"),
        ("top-k-2-31", b"The sun", {"top_k": str(2**31)}, "top_k"),  # once stopped the job
        ("seed-2-64", b"The sun", {"seed": str(2**64)}, "seed"),
        ("seed-neg", b"The sun", {"seed": "-1"}, "seed"),
        ("temp-text", b"The sun", {"temperature": " 0.5 "}, None),
        ("temp-word", b"The sun", {"temperature": "hot"}, "temperature"),
        ("temp-huge", b"The sun", {"temperature": "1e400"}, "temperature"),
        ("n-float", b"The sun", {"n": "2.0"}, "n"),
        ("stop-bytes", b"The sun", {"stop": b"\xff"}, "stop"),
    ]
    cases += [(f"same-{i}", b"Tell me a story", {"temperature": "1.0"}, None) for i in range(8)]
    columns = {
        "id": [c[0] for c in cases],
        "prompt": pa.array([c[1] for c in cases], pa.large_binary()).view(pa.large_string())
        .dictionary_encode(),
    }
    for f in FIELDS:
        values = [c[2].get(f) for c in cases]
        values = [v if isinstance(v, bytes | None) else v.encode() for v in values]
        columns[f] = pa.array(values, pa.binary()).view(pa.string())
    return columns, {c[0]: c[3] for c in cases}


def _corrupt_pages(path: str) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = meta.dictionary_page_offset or meta.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * meta.total_compressed_size)


def _corrupt_footer(path: str) -> None:
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:-12] + b"\0" * 8 + data[-4:])


@pytest.mark.ray
@pytest.mark.slow
def test_every_row_class_in_one_job_comes_back_once(tmp_path, ray_address):
    d = tmp_path / "in"
    rng = random.Random(20261206)
    random_columns, random_bad = _random_rows(rng, 200)
    class_columns, class_bad = _class_rows()
    _write(d / "a_random.parquet", random_columns)
    _write(d / "b_classes.parquet", class_columns)
    pq.write_table(pa.table(random_columns).slice(0, 0), d / "c_empty.parquet")  # no rows
    bad_pages = _write(d / "d_bad_pages.parquet",
                       {"id": ["bp0", "bp1"], "prompt": ["x", "y"],
                        **{f: pa.array([None, None], _TYPES[f]) for f in FIELDS}},
                       compression="zstd")
    _corrupt_pages(bad_pages)
    bad_footer = str(d / "e_bad_footer.parquet")
    pq.write_table(pa.table(random_columns).slice(0, 3), bad_footer)
    _corrupt_footer(bad_footer)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "griffin_batch.jobs.generate", "--input", str(d),
               "--output", str(out), "--address", ray_address, "--workers", "1",
               "--accelerator", "cpu", "--shard-rows", "64", "--slots", "16",
               "--decode-steps", "8", "--max-tokens", str(MAX_TOKENS), "--seed", "3",
               "--max-failures", "0", "--sampling-columns", ",".join(FIELDS)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-4000:]  # two unreadable inputs, all else done
    summary = json.loads((out / "_summary.json").read_text())
    failed = {f["path"]: f["error"] for f in summary["failures"]}
    assert sorted(failed) == [bad_pages, bad_footer], summary["failures"]
    assert f"cannot read input {bad_pages}" in failed[bad_pages]
    assert bad_footer in failed[bad_footer]
    assert summary["shards"]["failed"] == 1 and summary["unreadable_inputs"] == 1
    # The last lines count what did not run, and the rows that came back as errors.
    assert ("1 shard(s) failed (rerun with --resume to retry them); 1 input file(s) could not "
            "be read, so their rows did not run; see _summary.json 'failures'") in done.stderr
    assert ".; its rows are not run" not in done.stderr
    errors = sum(w is not None for w in {**random_bad, **class_bad}.values())
    assert summary["error_rows"] == errors
    assert f"({errors} of them error rows: their 'error' column says why)" in done.stdout

    table = read_output(str(out)).to_pylist()
    by_id = collections.defaultdict(list)
    for row in table:
        by_id[row["id"]].append(row)
    expected_bad = {**random_bad, **class_bad}
    assert sorted(by_id) == sorted(expected_bad)  # every readable row, none from failed files
    n_of = dict(zip(random_columns["id"], random_columns["n"].to_pylist(), strict=True))
    for row_id, wrong in expected_bad.items():
        rows = by_id[row_id]
        if wrong is not None:
            assert len(rows) == 1 and rows[0]["finish_reason"] == "error", rows
            assert wrong in rows[0]["error"], (row_id, rows[0]["error"])
            continue
        n = (n_of.get(row_id) or 1)
        assert sorted(r["sample_index"] for r in rows) == list(range(n)), row_id
        for r in rows:
            assert r["finish_reason"] in ("stop", "length"), (row_id, r["error"])
    # Eight rows with one prompt at temperature 1: eight different completions (not one).
    same = [by_id[f"same-{i}"][0]["completion_tokens"] for i in range(8)]
    assert len({tuple(t) for t in same}) == 8, same
    print(f"rows: {len(by_id)}, output rows: {len(table)}, error rows: "
          f"{sum(w is not None for w in expected_bad.values())}")
