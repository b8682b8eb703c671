"""griffin-batch synthesize: variables, templates, staging, schema checks, redraws, dedup, one real job."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import assert_exactly_once, read_output

from griffin_batch.actors import columns, output, redraw, spill, validation
from griffin_batch.jobs import (
    cli,
    manifest,
    planner,
    synth_checks,
    synth_dedup,
    synth_job,
    synth_staging,
    synth_template,
    synth_vars,
)
from griffin_batch.jobs import config as config_lib
from griffin_batch.model import requests

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples" / "synthesize"


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- variables -------------------------------------------------------------------------------

def test_every_vars_format_gives_one_combination_per_row(tmp_path, write_parquet):
    expected = [{"topic": "sets", "level": 1}, {"topic": "dicts", "level": 2}]
    urls = [
        write_parquet(str(tmp_path / "v.parquet"), {"topic": ["sets", "dicts"], "level": [1, 2]}),
        _write(tmp_path / "v.csv", "topic,level\nsets,1\ndicts,2\n"),
        _write(tmp_path / "v.jsonl", '{"topic": "sets", "level": 1}\n\n{"topic": "dicts", '
               '"level": 2}\n'),
        _write(tmp_path / "v.yaml", "- {topic: sets, level: 1}\n- {topic: dicts, level: 2}\n"),
        _write(tmp_path / "v.json", json.dumps(expected)),
    ]
    for url in urls:
        loaded = synth_vars.load(url)
        assert loaded.rows == expected, url
        assert loaded.table.column_names == ["topic", "level"]
        assert loaded.size == pathlib.Path(url).stat().st_size and len(loaded.sha256) == 64


def test_a_grid_is_the_cartesian_product_with_the_last_key_fastest(tmp_path):
    url = _write(tmp_path / "g.yaml", "a: [1, 2]\nb: [x, y, z]\nc: fixed\n")
    rows = synth_vars.load(url, grid=True).rows
    assert rows == [{"a": a, "b": b, "c": "fixed"} for a in (1, 2) for b in "xyz"]


def test_rows_lacking_a_variable_leave_it_undefined_not_none(tmp_path):
    url = _write(tmp_path / "v.jsonl", '{"a": 1, "b": "x"}\n{"a": 2}\n')
    loaded = synth_vars.load(url)
    assert loaded.rows[1] == {"a": 2}
    assert loaded.table.column("b").to_pylist() == ["x", None]
    template = synth_template.load(None, "{{ a }} {{ b }}")
    with pytest.raises(config_lib.JobInputError, match="'b' is undefined in row 1; its "
                                                       r"variables are \['a'\]"):
        template.render(template.compile(), loaded.rows[1], "row 1")


@pytest.mark.parametrize("name, text, grid, message", [
    ("v.txt", "a,b", False, r"--vars .*v\.txt: cannot tell its format from its name"),
    ("v.jsonl", '{"a": 1}\n{"a": \n', False, r"v\.jsonl: line 2 is not JSON"),
    ("v.jsonl", '{"a": 1}\n[1, 2]\n', False, r"v\.jsonl: line 2 is not a mapping"),
    ("v.yaml", "- {a: 1}\n- just text\n", False, r"v\.yaml: row 1 is not a mapping"),
    ("v.yaml", "a: [1, 2]\n", False, "is a mapping: pass --grid"),
    ("v.yaml", "- {a: 1}\n", True, "--grid needs a mapping"),
    ("v.yaml", "a: [1]\nb: []\n", True, "the grid's 'b' has no values"),
    ("v.csv", "a\n1\n", True, "--grid needs a YAML"),
    ("v.yaml", "- {a: 1}\n- {a: text}\n", False, r"variable 'a' mixes values of kinds"),
    ("v.yaml", "- {1: x}\n", False, "row 0 has a variable named 1"),
    ("v.yaml", "[]\n", False, "holds no combination"),
    ("v.parquet", "not parquet", False, "is not a readable parquet file"),
])
def test_bad_vars_files_are_refused_naming_file_and_place(tmp_path, name, text, grid, message):
    url = _write(tmp_path / name, text)
    with pytest.raises(config_lib.JobInputError, match=message):
        synth_vars.load(url, grid=grid)


# --- templates -------------------------------------------------------------------------------

def test_templates_render_strictly_in_a_sandbox(tmp_path):
    path = _write(tmp_path / "t.jinja", "Write about {{ topic | upper }}.\n")
    template = synth_template.load(path, None)
    assert template.render(template.compile(), {"topic": "sets"}, "row 0") == "Write about SETS."
    assert template.is_file and template.size == len("Write about {{ topic | upper }}.\n")
    with pytest.raises(config_lib.JobInputError, match=r"--template .*bad\.jinja: line 2:"):
        synth_template.load(_write(tmp_path / "bad.jinja", "ok\n{% for %}"), None).compile()
    evil = synth_template.load(None, "{{ x.__class__.__mro__ }}")
    with pytest.raises(config_lib.JobInputError, match="SecurityError"):
        evil.render(evil.compile(), {"x": 1}, "row 0")
    with pytest.raises(config_lib.JobInputError, match="exactly one of"):
        synth_template.load(path, "text")


# --- staging ---------------------------------------------------------------------------------

def _staged(tmp_path, template_text, vars_text=None, n=2, seed=7, grid=False, temperature=0.0,
            **synth_options):
    vars_url = _write(tmp_path / "vars.yaml", vars_text) if vars_text else None
    synth = synth_job.SynthConfig(template_text=template_text, vars=vars_url, n=n, grid=grid,
                                  **synth_options)
    job = synth_job.SynthesizeJob(synth)
    config = config_lib.JobConfig(
        io=config_lib.IOConfig(inputs=synth.sources(), output=str(tmp_path / "out")),
        sampling=config_lib.SamplingConfig(seed=seed, n=n, temperature=temperature))
    config, plan, staged = job.stage(config, print)
    try:
        table = pq.read_table(next(iter(staged.local.values())))
    finally:
        staged.cleanup()
    return config, plan, table


def test_staging_writes_one_row_per_sample_with_its_seed_and_variables(tmp_path):
    config, plan, table = _staged(tmp_path, "{{ a }} and {{ b }}", "a: [1, 2]\nb: [x]\n",
                                  grid=True)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["vars.yaml#0/0", "vars.yaml#0/1", "vars.yaml#1/0",
                                       "vars.yaml#1/1"]
    assert [r["prompt"] for r in rows] == ["1 and x", "1 and x", "2 and x", "2 and x"]
    assert [(r["combination_id"], r["sample_index"], r["a"], r["b"]) for r in rows] == [
        ("vars.yaml#0", 0, 1, "x"), ("vars.yaml#0", 1, 1, "x"),
        ("vars.yaml#1", 0, 2, "x"), ("vars.yaml#1", 1, 2, "x")]
    # The seed a generate row of that id gets: it reproduces the sample.
    assert [r["seed"] for r in rows] == [columns.row_seed(7, r["id"]) for r in rows]
    assert config.sampling.n == 1 and config.io.sampling_columns == ("seed",)
    assert config.io.keep_columns == ("combination_id", "sample_index", "prompt", "a", "b")
    assert plan.total_rows == 4 and plan.files[0].url.endswith(
        f"{manifest.STAGED_INPUTS_DIR}/{synth_staging.STAGED_NAME}")
    (source,) = plan.sources
    assert source.url.endswith("vars.yaml") and source.lines == 2 and len(source.sha256) == 64


def test_without_vars_the_template_is_rendered_once(tmp_path):
    _, plan, table = _staged(tmp_path, "Name a colour.", n=3)
    assert table.column("id").to_pylist() == ["template#0/0", "template#0/1", "template#0/2"]
    assert set(table.column("prompt").to_pylist()) == {"Name a colour."}
    assert plan.sources == ()


def test_resume_refuses_a_changed_vars_file_naming_it(tmp_path):
    vars_path = tmp_path / "vars.yaml"

    def planned(text):
        vars_path.write_text(text)
        synth = synth_job.SynthConfig(template_text="{{ a }}", vars=str(vars_path))
        job = synth_job.SynthesizeJob(synth)
        config = config_lib.JobConfig(io=config_lib.IOConfig(inputs=synth.sources(),
                                                             output=str(tmp_path / "out")))
        config, plan, staged = job.stage(config, print)
        staged.cleanup()
        return plan, {**config.fingerprint(), **job.fingerprint()}

    plan, fingerprint = planned("- {a: 1}\n- {a: 2}\n")
    out = manifest.OutputDir(str(tmp_path / "out"))
    out.prepare(plan, fingerprint, resume=False, overwrite=False)
    out.release()
    plan, fingerprint = planned("- {a: 1}\n- {a: 3}\n")  # the same rows, another value
    with pytest.raises(config_lib.JobInputError,
                       match=r"the inputs changed .*\(.*vars\.yaml: size or SHA-256 differ"):
        out.prepare(plan, fingerprint, resume=True, overwrite=False)


def test_a_missing_variable_or_a_taken_name_stops_the_job_before_it_starts(tmp_path):
    with pytest.raises(config_lib.JobInputError,
                       match=r"'b' is undefined in combination vars\.yaml#1 \(row 1 of --vars"):
        _staged(tmp_path, "{{ a }} {{ b }}", "- {a: 1, b: 2}\n- {a: 3}\n")
    with pytest.raises(config_lib.JobInputError, match=r"variable\(s\) \['seed'\] take the name"):
        _staged(tmp_path, "{{ seed }}", "- {seed: 1}\n")


def test_a_variable_named_like_a_sampling_field_is_noted_as_data_only(tmp_path, capsys):
    _staged(tmp_path, "{{ name }} {{ n }}", "- {name: x, n: 2}\n", n=1)
    notes = capsys.readouterr().out.splitlines()
    url = tmp_path / "vars.yaml"
    # synthesize has no --sampling-columns: the planner's advice to pass it is not shown.
    assert notes == [f"note: --vars {url}: variable(s) ['n'] are only template variables and "
                     "do not change sampling; the sampling options (--n, --temperature, ...) "
                     "set it for every prompt"]


def test_n_above_1_at_temperature_0_warns_once_that_the_samples_are_identical(tmp_path, capsys):
    _staged(tmp_path, "{{ a }}", "- {a: 1}\n", n=2)
    assert capsys.readouterr().out.splitlines() == [
        "warning: --n 2 at --temperature 0 (greedy, the default): the 2 samples of each "
        "prompt will be identical, and --dedup exact keeps one of them; pass --temperature "
        "above 0 (e.g. 0.7) for different samples"]
    _staged(tmp_path, "{{ a }}", "- {a: 1}\n", n=2, temperature=0.7)
    _staged(tmp_path, "{{ a }}", "- {a: 1}\n", n=1)
    assert capsys.readouterr().out == ""
    # Nor can a greedy redraw of a completion the schema rejected differ from it.
    schema = str(EXAMPLES / "integer.schema.json")
    _staged(tmp_path, "{{ a }}", "- {a: 1}\n", n=1, json_schema=schema, max_attempts=3)
    assert capsys.readouterr().out.startswith(
        "warning: --max-attempts 3 at --temperature 0 (greedy, the default): a redraw repeats")
    _staged(tmp_path, "{{ a }}", "- {a: 1}\n", n=1, json_schema=schema, max_attempts=1)
    _staged(tmp_path, "{{ a }}", "- {a: 1}\n", n=1, json_schema=schema, temperature=0.7)
    assert capsys.readouterr().out == ""


# --- schema checks ---------------------------------------------------------------------------

def test_the_schema_check_parses_then_validates(tmp_path):
    check, digest = synth_checks.load(str(EXAMPLES / "integer.schema.json"))
    assert len(digest) == 64
    assert check(" 12 ") is None
    assert check("12 apples").startswith("not JSON: Extra data")
    assert check("NaN").startswith("not JSON")
    assert check('"12"') == "the value: '12' is not of type 'integer'"
    nested, _ = synth_checks.load(_write(tmp_path / "s.json", json.dumps(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})))
    assert nested('{"n": "x"}') == "n: 'x' is not of type 'integer'"
    with pytest.raises(config_lib.JobInputError, match=r"bad\.json is not a valid JSON Schema"):
        synth_checks.load(_write(tmp_path / "bad.json", '{"type": 12}'))
    with pytest.raises(config_lib.JobInputError, match="cannot read it as JSON"):
        synth_checks.load(_write(tmp_path / "text.json", "{type"))


def test_verdicts_without_redraws_record_seeds_attempts_and_validity(tmp_path):
    samples = pa.Table.from_pylist([
        {"row": 0, "sample_index": 0, "tokens": [1], "text": "5", "finish_reason": "stop",
         "num_prompt_tokens": 3, "error": None},
        {"row": 1, "sample_index": 0, "tokens": [2], "text": "five", "finish_reason": "length",
         "num_prompt_tokens": 3, "error": None},
        {"row": 2, "sample_index": 0, "tokens": [], "text": "", "finish_reason": "error",
         "num_prompt_tokens": 0, "error": "prompt is empty"},
    ], schema=spill.SCHEMA)
    first = [requests.Request(request_id=f"s:0:{r}", prompt="p",
                              params=requests.SamplingParams(seed=100 + r)) for r in (0, 1)]
    check = synth_checks.JsonSchemaCheck('{"type": "integer"}')
    # One attempt: nothing is drawn again, so no engine is needed.
    table = redraw.redraw(None, samples, validation.Validation(check=check, max_attempts=1),
                          first, tag="s:0", directory=str(tmp_path))
    assert table.schema == redraw.SCHEMA
    got = table.select(["row", "seed", "attempts", "valid", "validation_error"]).to_pylist()
    assert got == [
        {"row": 0, "seed": 100, "attempts": 1, "valid": True, "validation_error": None},
        {"row": 1, "seed": 101, "attempts": 1, "valid": False,
         "validation_error": "not JSON: Expecting value (line 1 column 1)"},
        {"row": 2, "seed": None, "attempts": 1, "valid": None, "validation_error": None},
    ]
    assert validation.redraw_seed(100, 2) not in (100, validation.redraw_seed(100, 3))


# --- dedup -----------------------------------------------------------------------------------

def test_exact_dedup_compares_whitespace_normalised_text():
    d = synth_dedup.Deduplicator(synth_dedup.EXACT)
    assert d.see("a", "one  two\n") is None
    assert d.see("b", " one two") == synth_dedup.Removal("a", "exact", 1.0)
    assert d.see("c", "One two") is None  # case counts for exact


def test_near_dedup_finds_near_duplicates_by_minhash_lsh():
    text = "The for statement is used to iterate over the elements of a sequence."
    d = synth_dedup.Deduplicator(synth_dedup.NEAR, threshold=0.8)
    assert d.see("a", text) is None
    near = d.see("b", text.replace("elements", "element"))
    assert near.duplicate_of == "a" and near.method == "near" and 0.8 <= near.similarity < 1
    assert d.see("c", text) == synth_dedup.Removal("a", "exact", 1.0)
    assert d.see("d", "An unrelated sentence about dictionaries and their keys.") is None
    assert d.see("e", "") is None and d.see("f", "") == synth_dedup.Removal("e", "exact", 1.0)
    strict = synth_dedup.Deduplicator(synth_dedup.NEAR, threshold=1.0)
    assert strict.see("a", text) is None
    assert strict.see("b", text.replace("elements", "element")) is None


def test_dedup_writes_kept_rows_beside_the_committed_parts(tmp_path, write_parquet):
    inputs = write_parquet(str(tmp_path / "in.parquet"), {"prompt": ["p"] * 5},
                           row_group_size=3)
    io = config_lib.IOConfig(inputs=(inputs,), output=str(tmp_path / "out"), shard_rows=3)
    plan = planner.plan(io, config_lib.SamplingConfig())
    out = manifest.OutputDir(io.output)
    out.prepare(plan, config_lib.JobConfig(io=io).fingerprint(), resume=False, overwrite=False)
    parts = [[("a", "same text"), ("b", None), ("c", "same  text")],
             [("d", None), ("e", "other")]]
    for spec, rows in zip(plan.shards, parts, strict=True):
        table = pa.Table.from_pylist([
            {"id": rid, "completion": text or "", "completion_tokens": [],
             "finish_reason": "error" if text is None else "stop", "num_prompt_tokens": 1,
             "num_completion_tokens": 0, "error": "boom" if text is None else None}
            for rid, text in rows], schema=output.output_schema(False))
        pq.write_table(table, tmp_path / "out" / output.part_name(spec.shard_id))
    counts = synth_dedup.write(out, plan, synth_dedup.EXACT, 0.9)
    assert (counts.rows, counts.kept, counts.removed_exact, counts.removed_near) == (5, 4, 1, 0)
    kept = tmp_path / "out" / manifest.DEDUP_DIR
    assert [pq.read_table(kept / output.part_name(s.shard_id)).column("id").to_pylist()
            for s in plan.shards] == [["a", "b"], ["d", "e"]]  # error rows always stay
    assert pq.read_table(kept / synth_dedup.DUPLICATES_FILE).to_pylist() == [
        {"id": "c", "duplicate_of": "a", "method": "exact", "similarity": 1.0}]
    # --overwrite knows the directory as this tool's.
    out.release()
    again = manifest.OutputDir(io.output)
    again.prepare(plan, config_lib.JobConfig(io=io).fingerprint(), resume=False, overwrite=True)
    again.release()
    assert not kept.exists()


# --- the command -----------------------------------------------------------------------------

def test_bad_input_exits_2_naming_it_before_any_worker_starts(tmp_path, capsys):
    vars_url = _write(tmp_path / "v.yaml", "- {a: 1}\n- {b: 2}\n")
    code = cli.main(["synthesize", "--template-text", "{{ a }}", "--vars", vars_url,
                     "--output", str(tmp_path / "out"), "--address", "127.0.0.1:1"])
    assert code == 2
    assert "'a' is undefined in combination v.yaml#1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_the_example_runs_with_a_grid_a_schema_and_dedup_then_resumes(tmp_path, ray_address,
                                                                         capsys):
    out = str(tmp_path / "out")
    argv = ["synthesize", "--template", str(EXAMPLES / "assignment.jinja"),
            "--vars", str(EXAMPLES / "assignments.yaml"), "--grid", "--n", "3",
            "--json-schema", str(EXAMPLES / "integer.schema.json"), "--max-attempts", "3",
            "--dedup", "near", "--temperature", "0.6", "--max-tokens", "3", "--stop", "\n",
            "--output", out, "--address", ray_address, "--workers", "1",
            "--accelerator", "cpu", "--shard-rows", "8", "--slots", "4", "--decode-steps", "8"]
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    table = read_output(out)
    rows = table.to_pylist()
    for row in rows[:6]:
        print({k: row[k] for k in ("id", "prompt", "completion", "seed", "attempts", "valid")})
    ids = [f"assignments.yaml#{c}/{s}" for c in range(6) for s in range(3)]
    assert_exactly_once(table, ids)
    check = synth_checks.JsonSchemaCheck('{"type": "integer"}')
    for row in rows:
        combo, sample = row["id"].split("/")
        assert (row["combination_id"], row["sample_index"]) == (combo, int(sample))
        assert row["prompt"] == f"{row['name']} {row['op']}"
        first = columns.row_seed(0, row["id"])
        assert row["seed"] == (first if row["attempts"] == 1 else
                               validation.redraw_seed(first, row["attempts"]))
        assert row["finish_reason"] in ("stop", "length")
        assert row["validation_error"] == check(row["completion"])
        assert row["valid"] == (row["validation_error"] is None)
        assert 1 <= row["attempts"] <= 3 and (row["valid"] or row["attempts"] == 3)
    assert {r["name"] for r in rows} == {"x", "total", "size"}
    assert any(r["valid"] and r["attempts"] == 1 for r in rows)
    assert any(r["valid"] and r["attempts"] > 1 for r in rows)  # a redraw that passed
    assert any(not r["valid"] for r in rows)

    summary = json.loads(pathlib.Path(out, manifest.SUMMARY_FILE).read_text())
    assert summary["status"] == "completed"
    assert summary["validation"] == {
        "valid": sum(r["valid"] for r in rows), "invalid": sum(not r["valid"] for r in rows),
        "unchecked": 0, "redrawn": sum(r["attempts"] > 1 for r in rows)}
    dedup = summary["dedup"]
    removed = pq.read_table(pathlib.Path(out, manifest.DEDUP_DIR,
                                         synth_dedup.DUPLICATES_FILE)).to_pylist()
    kept = pq.read_table(pathlib.Path(out, manifest.DEDUP_DIR)).to_pylist()
    assert dedup["rows"] == 18 and dedup["kept"] == len(kept) == 18 - len(removed)
    assert dedup["removed_exact"] == sum(r["method"] == "exact" for r in removed) > 0
    assert dedup["removed_near"] == sum(r["method"] == "near" for r in removed)
    text = {r["id"]: r["completion"] for r in rows}
    kept_ids = [r["id"] for r in kept]
    assert kept_ids == [r["id"] for r in rows if r["id"] not in {d["id"] for d in removed}]
    for d in removed:
        assert d["duplicate_of"] in kept_ids
        if d["method"] == "exact":
            assert text[d["id"]].split() == text[d["duplicate_of"]].split()
        else:
            assert d["similarity"] >= 0.9
    print("summary:", {k: summary[k] for k in ("validation", "dedup")})

    # A resumed finished job writes the same files (nothing left to run).
    names = [p.relative_to(out) for p in sorted(pathlib.Path(out).rglob("*.parquet"))]
    before = {n: pathlib.Path(out, n).read_bytes() for n in names}
    assert cli.main([*argv, "--resume"]) == 0
    assert {n: pathlib.Path(out, n).read_bytes() for n in names} == before

    # The recorded seed reproduces the sample: a generate row with that prompt and seed,
    # for a first draw, a redraw that passed and one that did not.
    picks = [next(r for r in rows if r["attempts"] == 1), next(
        r for r in rows if r["valid"] and r["attempts"] > 1), next(
        r for r in rows if not r["valid"])]
    again = str(tmp_path / "again")
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in picks],
                             "seed": pa.array([r["seed"] for r in picks], pa.uint64())}),
                   tmp_path / "picks.parquet")
    assert cli.main(["generate", "--input", str(tmp_path / "picks.parquet"),
                     "--sampling-columns", "seed", *argv[argv.index("--temperature"):
                                                         argv.index("--output")],
                     "--output", again, *argv[argv.index("--address"):]]) == 0
    assert read_output(again).column("completion").to_pylist() == [
        r["completion"] for r in picks]
