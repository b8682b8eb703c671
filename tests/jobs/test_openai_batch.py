"""OpenAI Batch API files in and out: request lines, staging, output records, one real job."""

from __future__ import annotations

import collections
import json
import pathlib

import pyarrow as pa
import pytest
from job_helpers import read_output

from griffin_batch.actors import output, rows, shards
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import (
    generate,
    manifest,
    openai_requests,
    openai_results,
    openai_staging,
    planner,
)
from griffin_batch.model import requests, tokenizer

CHAT = openai_requests.CHAT_URL


def _line(custom_id="r1", url=CHAT, **body) -> str:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _parse(text: str, line: int = 1) -> openai_requests.StagedRow:
    return openai_requests.parse_line(text, line, "batch.jsonl")


# --- request lines ---------------------------------------------------------------------------

def test_messages_render_in_the_chat_format_with_system_text_in_the_first_user_turn():
    row = _parse(_line(model="gpt-4o-mini", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text",
                                                                          "text": "colour."}]},
        {"role": "assistant", "content": "Red."},
        {"role": "developer", "content": "No lists."},
        {"role": "user", "content": "Another?"},
    ]))
    assert row.error is None
    assert row.prompt == (
        "<start_of_turn>user\nBe brief.\n\nNo lists.\n\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\nRed.<end_of_turn>\n"
        "<start_of_turn>user\nAnother?<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert (row.id, row.custom_id, row.model, row.url, row.line) == (
        "r1", "r1", "gpt-4o-mini", CHAT, 1)


def test_a_single_user_turn_renders_as_chat_prompt_does():
    # chat_prompt reads nothing of its tokenizer: no model needs loading to compare.
    assert _parse(_line()).prompt == tokenizer.Tokenizer.chat_prompt(None, "Hi")


def test_every_supported_body_field_becomes_a_sampling_field():
    row = _parse(_line(max_completion_tokens=5, temperature=0.7, top_p=0.9, n=2, seed=2**63,
                       stop=["\n", "END"]))
    assert row.body == {"max_tokens": "5", "temperature": "0.7", "top_p": "0.9", "n": "2",
                        "seed": str(2**63), "stop": ["\n", "END"]}
    assert _parse(_line(max_tokens=3, stop="x")).body["max_tokens"] == "3"
    assert _parse(_line(stop="x")).body["stop"] == ["x"]
    assert _parse(_line(temperature=None, logit_bias=None)).error is None  # null: the default


def test_a_completions_request_keeps_its_prompt_as_it_is():
    row = _parse(_line(url=openai_requests.COMPLETIONS_URL, messages=None, prompt="Once upon"))
    assert (row.error, row.prompt, row.url) == (None, "Once upon", "/v1/completions")


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function"}]), ("logit_bias", {"50256": -100}),
    ("response_format", {"type": "json_object"}), ("frequency_penalty", 0.5),
    ("presence_penalty", 1), ("logprobs", True), ("stream", True),
])
def test_an_unsupported_body_field_is_that_requests_error_naming_it(field, value):
    row = _parse(_line(custom_id="keep-me", **{field: value}), line=7)
    assert row.error.startswith(f"line 7: body.{field} is not supported"), row.error
    assert (row.id, row.custom_id, row.prompt) == ("keep-me", "keep-me", None)


@pytest.mark.parametrize("text, wanted", [
    ("{not json", "line 3: not JSON"),
    ("[1, 2]", "line 3: not a JSON object"),
    (b'{"custom_id": "\xff"}', "line 3: not UTF-8"),
    ('{"custom_id": "a\\ud800"}', "line 3: not UTF-8 (an escaped lone surrogate, '\\ud800')"),
    (_line("a").replace('"Hi"', '"\\udfff Hi"'), "line 3: not UTF-8 (an escaped lone"),
    (json.dumps({"url": CHAT, "body": {"messages": []}}), "line 3: custom_id is missing"),
    (_line(custom_id=5), "line 3: custom_id must be a non-empty string, got 5"),
    (_line(url="/v1/embeddings"), 'line 3: url "/v1/embeddings" is not supported'),
    (_line(messages="hi"), "line 3: body.messages must be a non-empty list"),
    (_line(messages=[{"role": "system", "content": "x"}]), "body.messages has no user message"),
    (_line(messages=[{"role": "tool", "content": "x"}]), 'body.messages[0].role "tool" is not'),
    (_line(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     'body.messages[0].content[0].type "image_url" is not supported'),
    (_line(messages=[{"role": "user", "content": None}]), "body.messages[0].content must be"),
    (_line(max_tokens=3, max_completion_tokens=4), "are both set"),
    (_line(stop=[1, 2]), "body.stop must be a string or a list of strings"),
    (_line(url=openai_requests.COMPLETIONS_URL, messages=None, prompt=["a"]),
     "body.prompt must be a string"),
])
def test_a_malformed_line_is_that_lines_error(text, wanted):
    row = _parse(text, line=3)
    assert row.prompt is None and wanted in row.error, row.error
    if row.custom_id is None:
        assert row.id == "batch.jsonl#line3"


def _prepared(lines: list[str]) -> rows.Prepared:
    """Staged rows through the worker's own row preparation (the job's --max-tokens 8)."""
    table = openai_requests.rows_table([_parse(t, i + 1) for i, t in enumerate(lines)])
    spec = shards.ShardSpec(shard_id="00000", path="x.parquet", file_key="x.parquet",
                            row_groups=(0,), offset=0, num_rows=table.num_rows, first_row=0)
    io = openai_staging.job_config(config_lib.JobConfig(io=config_lib.IOConfig(
        inputs=("x",), output="o", input_format=config_lib.OPENAI_BATCH))).io
    options = shards.ShardOptions(
        id_column=io.id_column, sampling=requests.SamplingParams(max_tokens=8, seed=1),
        sampling_columns=io.sampling_overrides(), error_column=openai_requests.ERROR_COLUMN)
    return rows.prepare(table, spec, options, attempt=0)


def test_body_values_meet_the_same_per_row_checks_as_a_parquet_column():
    prepared = _prepared([
        _line("good", max_tokens=5, temperature=0.5, top_p=0.9, n=2, seed=9, stop=["a", "b"]),
        _line("hot", temperature="hot"),
        _line("n0", n=0),
        _line("top_p", top_p=2),
        _line("inf", temperature=1e999),
        _line("tools", tools=[]),
        _line("plain"),
    ])
    good, plain = prepared.requests
    assert good.params == requests.SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9,
                                                  n=2, seed=9, stop=("a", "b"))
    assert plain.params.max_tokens == 8 and plain.params.n == 1  # the job's options hold
    errors = {prepared.ids[rows.row_of(c.request_id)]: c.error for c in prepared.rejected}
    assert errors["hot"].startswith("body.temperature: temperature must be a number")
    assert errors["n0"].startswith("body.n: n must be")
    assert errors["top_p"].startswith("body.top_p: top_p must be")
    assert errors["inf"].startswith("body.temperature: temperature must be a finite number")
    assert errors["tools"].startswith("line 6: body.tools is not supported")
    assert prepared.samples == [2, 1, 1, 1, 1, 1, 1]


# --- staging ------------------------------------------------------------------------------------

def _write_lines(path: pathlib.Path, lines: list[str | bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((t if isinstance(t, bytes) else t.encode()) + b"\n" for t in lines))
    return str(path)


def _io(inputs, output, **kw) -> config_lib.IOConfig:
    config = config_lib.JobConfig(io=config_lib.IOConfig(
        inputs=tuple(inputs), output=output, input_format=config_lib.OPENAI_BATCH, **kw))
    return openai_staging.job_config(config).io


def test_staging_plans_over_parquet_in_the_manifest_and_records_the_sources(tmp_path):
    good = _write_lines(tmp_path / "in" / "a.jsonl",
                        [_line("a"), "", "{oops", _line("b", n=3)])
    garbage = _write_lines(tmp_path / "in" / "b.jsonl", [b"PAR1\x00\x01", b"\xff\xfe"])
    out = str(tmp_path / "out")
    said = []
    staged = openai_staging.stage(_io([str(tmp_path / "in")], out, shard_rows=2),
                                  config_lib.SamplingConfig(), said.append)
    try:
        plan = staged.plan
        url = f"{out}/{manifest.STAGED_INPUTS_DIR}/00000-a.jsonl.parquet"
        assert [f.url for f in plan.files] == [url] and plan.total_rows == 3
        assert {s.path for s in plan.shards} == {url} and plan.with_sample_index
        [source] = plan.sources
        assert (source.url, source.staged, source.lines) == (good, url, 3)
        assert source.size == pathlib.Path(good).stat().st_size
        [(bad_url, why)] = plan.unreadable
        assert bad_url == garbage and "is not OpenAI batch JSONL" in why
        assert any("is not OpenAI batch JSONL" in s for s in said)
        assert not pathlib.Path(out).exists()  # nothing in the output before prepare
    finally:
        staged.cleanup()


def test_an_escaped_lone_surrogate_is_its_lines_error_and_staging_goes_on(tmp_path):
    # It failed the whole staging step with UnicodeEncodeError when the rows became Parquet.
    pair = _parse(_line("a").replace('"Hi"', '"\\ud83d\\ude00"'))  # an escaped pair is fine
    assert pair.error is None and "\U0001f600" in pair.prompt
    _write_lines(tmp_path / "in.jsonl", [_line("ok"), '{"custom_id": "b\\udc80"}'])
    staged = openai_staging.stage(_io([str(tmp_path / "in.jsonl")], str(tmp_path / "out")),
                                  config_lib.SamplingConfig(), lambda _: None)
    staged.cleanup()
    assert staged.plan.total_rows == 2 and not staged.plan.unreadable  # its error row is staged


def test_repeated_custom_ids_follow_the_duplicate_id_rule(tmp_path):
    _write_lines(tmp_path / "a.jsonl", [_line("same"), _line("same")])
    with pytest.raises(config_lib.JobInputError, match="custom_id 'same' repeats"):
        openai_staging.stage(_io([str(tmp_path / "a.jsonl")], str(tmp_path / "out")),
                             config_lib.SamplingConfig(), print)
    staged = openai_staging.stage(
        _io([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), allow_duplicate_ids=True),
        config_lib.SamplingConfig(), print)
    staged.cleanup()
    assert staged.plan.total_rows == 2


def test_a_repeated_custom_id_is_named_by_its_jsonl_file_and_lines(tmp_path):
    req = _write_lines(tmp_path / "req.jsonl",
                       [_line("a"), _line("b"), "", _line("a"), _line("c"), _line("a")])
    other = _write_lines(tmp_path / "other.jsonl", [_line("c")])
    with pytest.raises(config_lib.JobInputError) as raised:
        openai_staging.stage(_io([req, other], str(tmp_path / "out")),
                             config_lib.SamplingConfig(), print)
    message = str(raised.value)
    print(message)
    assert message.startswith(f"custom_id 'a' repeats in {req}: line 1, line 4, line 6; "
                              f"custom_id 'c' repeats: {req} line 5, {other} line 1. ")
    assert "--allow-duplicate-ids" in message
    assert "griffin-batch-staging" not in message and ".parquet" not in message


def test_no_readable_input_refuses_the_job(tmp_path):
    _write_lines(tmp_path / "a.jsonl", ["nope", "still not"])
    with pytest.raises(config_lib.JobInputError, match="no line is a JSON object"):
        openai_staging.stage(_io([str(tmp_path / "a.jsonl")], str(tmp_path / "o")),
                             config_lib.SamplingConfig(), print)


def test_column_options_are_refused_with_openai_input():
    config = config_lib.JobConfig(io=config_lib.IOConfig(
        inputs=("x",), output="o", input_format=config_lib.OPENAI_BATCH, keep_columns=("a",)))
    with pytest.raises(config_lib.JobInputError, match="--keep-columns do"):
        config.validate()


def test_overwrite_deletes_the_staged_inputs_and_batch_outputs_as_its_own(tmp_path):
    _write_lines(tmp_path / "a.jsonl", [_line("a")])
    out = tmp_path / "out"
    config = openai_staging.job_config(config_lib.JobConfig(io=config_lib.IOConfig(
        inputs=(str(tmp_path / "a.jsonl"),), output=str(out),
        input_format=config_lib.OPENAI_BATCH)))
    for overwrite in (False, True):
        staged = openai_staging.stage(config.io, config.sampling, print)
        o = manifest.OutputDir(str(out))
        o.prepare(staged.plan, config.fingerprint(), resume=False, overwrite=overwrite)
        staged.upload(o)
        staged.cleanup()
        o.release()
        (out / manifest.BATCH_OUTPUT_FILE).write_text("{}\n")
        (out / manifest.BATCH_ERRORS_FILE).write_text("")
    assert sorted(p.name for p in (out / manifest.STAGED_INPUTS_DIR).iterdir()) == [
        "00000-a.jsonl.parquet"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(config_lib.JobInputError, match="notes.txt"):
        manifest.OutputDir(str(out)).prepare(staged.plan, config.fingerprint(), resume=False,
                                             overwrite=True)


# --- output records ---------------------------------------------------------------------------

def _sample(i, text, reason="stop", tokens=3, **kw):
    return {"id": "c1", "completion": text, "finish_reason": reason, "num_prompt_tokens": 11,
            "num_completion_tokens": tokens, "error": None, "sample_index": i, **kw}


def test_a_requests_samples_become_the_choices_of_one_chat_completion():
    kept = {"custom_id": "c1", "model": "gpt-4o-mini", "url": CHAT}
    rec, failed = openai_results.record(
        [_sample(0, "Hello", **kept), _sample(1, "Hi", "length", 8, **kept)],
        key="k", position=4, created=1700000000, default_model="demo")
    assert not failed and rec["error"] is None and rec["custom_id"] == "c1"
    assert rec["id"].startswith("batch_req_")
    response = rec["response"]
    assert response["status_code"] == 200 and response["request_id"]
    body = response["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert (body["created"], body["model"]) == (1700000000, "gpt-4o-mini")
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"},
         "finish_reason": "stop", "logprobs": None},
        {"index": 1, "message": {"role": "assistant", "content": "Hi"},
         "finish_reason": "length", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 11, "total_tokens": 22}
    again, _ = openai_results.record(
        [_sample(0, "Hello", **kept), _sample(1, "Hi", "length", 8, **kept)],
        key="k", position=4, created=1700000000, default_model="demo")
    assert again == rec  # ids are a function of the job and the request


def test_a_failed_request_is_an_error_record_and_parquet_rows_use_their_id():
    rec, failed = openai_results.record(
        [_sample(0, "", "error", 0, error="body.top_p: top_p must be in (0, 1]")],
        key="k", position=0, created=0, default_model="demo")
    assert failed and rec["response"] is None and rec["custom_id"] == "c1"
    assert rec["error"] == {"code": "invalid_request",
                            "message": "body.top_p: top_p must be in (0, 1]"}
    plain, _ = openai_results.record([_sample(0, "x")], key="k", position=0, created=0,
                                     default_model="demo")
    assert plain["custom_id"] == "c1" and plain["response"]["body"]["model"] == "demo"


# --- one real job ---------------------------------------------------------------------------

# The README's example file, with bad requests put between its lines: every request comes
# back once, in input order, in one of the two files.
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "openai_batch" / "requests.jsonl"
_GOOD = EXAMPLE.read_text().splitlines()  # sys, two, stops, multi, cmpl, greedy, last
E2E_LINES = [
    *_GOOD[:5],
    _line("tools", tools=[{"type": "function"}]),
    "this line is not JSON",
    _line("hot", temperature=-1),
    _GOOD[5],
    "",
    _GOOD[6],
]


@pytest.mark.ray
@pytest.mark.slow
def test_a_batch_file_runs_to_output_and_error_files(tmp_path, ray_address, capsys):
    inputs = _write_lines(tmp_path / "requests.jsonl", E2E_LINES)
    out = str(tmp_path / "out")
    argv = ["--input", inputs, "--output", out, "--address", ray_address, "--workers", "1",
            "--accelerator", "cpu", "--shard-rows", "4", "--slots", "4", "--decode-steps", "8",
            "--max-tokens", "5", "--input-format", "openai-batch", "--output-format",
            "openai-batch"]
    assert generate.main(argv) == 0, capsys.readouterr().err[-3000:]
    ok_lines = pathlib.Path(out, manifest.BATCH_OUTPUT_FILE).read_text().splitlines()
    err_lines = pathlib.Path(out, manifest.BATCH_ERRORS_FILE).read_text().splitlines()
    print("output.jsonl:", ok_lines[1])
    print("errors.jsonl:", err_lines[0])
    ok = [json.loads(t) for t in ok_lines]
    errors = [json.loads(t) for t in err_lines]

    # Every request once, in input order, across the two files.
    order = ["sys", "two", "stops", "multi", "cmpl", "greedy", "last"]
    assert [r["custom_id"] for r in ok] == order
    assert [r["custom_id"] for r in errors] == ["tools", None, "hot"]
    ids = [r["id"] for r in ok + errors]
    assert len(set(ids)) == len(ids) and all(i.startswith("batch_req_") for i in ids)

    by_id = {r["custom_id"]: r for r in ok}
    n_of = {"two": 2, "last": 2}
    parquet = collections.defaultdict(list)
    for row in read_output(out).to_pylist():
        parquet[row["id"]].append(row)
    for custom_id, rec in by_id.items():
        body = rec["response"]["body"]
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        assert len(body["choices"]) == n_of.get(custom_id, 1)
        assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
        usage, samples = body["usage"], parquet[custom_id]
        assert usage["completion_tokens"] == sum(s["num_completion_tokens"] for s in samples)
        assert usage["prompt_tokens"] == samples[0]["num_prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        texts = [c["message"]["content"] if "message" in c else c["text"]
                 for c in body["choices"]]
        assert texts == [s["completion"] for s in samples]
    assert by_id["greedy"]["response"]["body"]["model"] == "gpt-4o-mini"
    assert by_id["cmpl"]["response"]["body"]["object"] == "text_completion"
    assert by_id["sys"]["response"]["body"]["usage"]["completion_tokens"] <= 4
    assert all(" the" not in c["message"]["content"] and "." not in c["message"]["content"]
               for c in by_id["stops"]["response"]["body"]["choices"])
    assert errors[0]["response"] is None
    assert "line 6: body.tools is not supported" in errors[0]["error"]["message"]
    assert errors[1]["error"]["message"].startswith("line 7: not JSON")
    assert errors[2]["error"]["message"].startswith("body.temperature: temperature must be")

    # A resumed job writes the same bytes (nothing left to run: no cluster needed).
    before = [pathlib.Path(out, n).read_bytes()
              for n in (manifest.BATCH_OUTPUT_FILE, manifest.BATCH_ERRORS_FILE)]
    assert generate.main([*argv, "--resume"]) == 0
    assert before == [pathlib.Path(out, n).read_bytes()
                      for n in (manifest.BATCH_OUTPUT_FILE, manifest.BATCH_ERRORS_FILE)]


def test_tables_of_staged_rows_have_the_staged_schema():
    table = openai_requests.rows_table([_parse(_line()), _parse("x", 2)])
    assert table.schema == openai_requests.STAGED_SCHEMA
    assert table.column(openai_requests.ERROR_COLUMN).null_count == 1
    assert isinstance(table, pa.Table)


# A Parquet prompt is text to continue (/v1/completions) unless --chat made it a user turn.
@pytest.mark.parametrize("chat, kind, prefix", [
    (False, "text_completion", "cmpl-"), (True, "chat.completion", "chatcmpl-")])
def test_parquet_input_writes_batch_files_with_the_row_id_as_custom_id(
        tmp_path, write_parquet, chat, kind, prefix):
    inputs = write_parquet(str(tmp_path / "in.parquet"), {"id": ["a", "b"], "prompt": ["x", "y"]})
    io = config_lib.IOConfig(inputs=(inputs,), output=str(tmp_path / "out"),
                             output_format=config_lib.OPENAI_BATCH)
    plan = planner.plan(io, config_lib.SamplingConfig())
    out = manifest.OutputDir(io.output)
    job = config_lib.JobConfig(io=io, model=config_lib.ModelConfig(chat=chat))
    out.prepare(plan, job.fingerprint(), resume=False, overwrite=False)
    part = pa.Table.from_pylist([  # a committed part as a worker writes it
        {"id": "a", "completion": "hi", "completion_tokens": [5, 6], "finish_reason": "length",
         "num_prompt_tokens": 2, "num_completion_tokens": 2, "error": None},
        {"id": "b", "completion": "", "completion_tokens": [], "finish_reason": "error",
         "num_prompt_tokens": 0, "num_completion_tokens": 0, "error": "prompt is too long"},
    ], schema=output.output_schema(False))
    (tmp_path / "out" / output.part_name(plan.shards[0].shard_id)).write_bytes(
        output.encode(part))
    assert openai_results.write(out, plan, default_model="demo") == (1, 1)
    out.release()
    [ok] = [json.loads(t) for t in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    [bad] = [json.loads(t) for t in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert ok["custom_id"] == "a" and ok["response"]["body"]["model"] == "demo"
    body = ok["response"]["body"]
    assert body["object"] == kind and body["id"].startswith(prefix)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    assert (choice["message"] if chat else choice) == (
        {"role": "assistant", "content": "hi"} if chat else {
            "index": 0, "text": "hi", "finish_reason": "length", "logprobs": None})
    assert bad["custom_id"] == "b" and bad["error"]["message"] == "prompt is too long"
    assert not list((tmp_path / "out" / output.TEMP_DIR).iterdir())  # moved, not copied
