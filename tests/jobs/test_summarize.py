"""``griffin-batch summarize``: splitting, reading documents, stages, and real jobs on the demo model."""

from __future__ import annotations

import json
import pathlib
import shutil
from pydoc_data import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import read_output

from griffin_batch.actors import output
from griffin_batch.jobs import (
    cli,
    manifest,
    summary_inputs,
    summary_job,
    summary_sections,
    summary_staging,
)
from griffin_batch.jobs import config as config_lib
from griffin_batch.model import demo, tokenizer

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "summarize"
CORPUS = "\n\n".join(topics.topics.values())  # Python's own docs: what the demo model read


@pytest.fixture(scope="module")
def tok() -> tokenizer.Tokenizer:
    return tokenizer.load_tokenizer(demo.demo_tokenizer_path())


# --- splitting -------------------------------------------------------------------------------

def _letters(text: str) -> str:
    """The text without whitespace: a hard cut may fall inside a word."""
    return "".join(text.split())


@pytest.mark.parametrize("budget", [16, 64, 300])
def test_sections_fit_the_budget_and_keep_all_the_text_in_order(tok, budget):
    text = CORPUS[:20000]
    sections = summary_sections.split(text, budget, tok)
    assert len(sections) > 1
    counts = [summary_sections.count_tokens(tok, s) for s in sections]
    assert max(counts) <= budget, counts
    assert _letters("".join(sections)) == _letters(text)


def test_sections_end_on_paragraphs_when_paragraphs_fit(tok):
    paragraphs = [f"Paragraph {i} says something short about lists." for i in range(12)]
    sections = summary_sections.split("\n\n".join(paragraphs), 40, tok)
    assert len(sections) > 1
    for s in sections:  # whole paragraphs only
        assert all(p in paragraphs for p in s.split("\n\n")), s


def test_a_paragraph_over_the_budget_is_cut_on_sentences_then_hard(tok):
    sentences = " ".join(f"Sentence {i} is here." for i in range(30))
    sections = summary_sections.split(sentences, 24, tok)
    assert all(s.rstrip().endswith(".") for s in sections)  # cut after a sentence
    giant = "x" * 3000  # one "word" of many tokens: only a hard cut fits it
    hard = summary_sections.split(giant, 50, tok)
    assert len(hard) > 1 and "".join(hard) == giant
    assert max(summary_sections.count_tokens(tok, s) for s in hard) <= 50
    assert summary_sections.split("short text", 50, tok) == ["short text"]


# --- reading documents -----------------------------------------------------------------------

def test_text_files_are_documents_named_by_path_and_bad_files_are_their_errors(tmp_path):
    (tmp_path / "a.md").write_text("Alpha.")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9")
    (tmp_path / "c.txt").write_text("  \n")
    (tmp_path / "skip.json").write_text("{}")
    sources = summary_inputs.sources([str(tmp_path)], None, None)
    docs = [d for s in sources for d in s.documents()]
    assert [pathlib.Path(d.id).name for d in docs] == ["a.md", "b.txt", "c.txt"]
    assert docs[0].text == "Alpha." and docs[0].error is None
    assert "b.txt is not UTF-8 text (byte 3" in docs[1].error
    assert docs[2].error.endswith("c.txt is empty")
    record = sources[0].record()
    assert (record.size, record.lines) == (6, 1) and len(record.sha256) == 64


def test_parquet_rows_are_documents_with_ids_and_row_errors(tmp_path, write_parquet):
    path = write_parquet(str(tmp_path / "d.parquet"),
                         {"body": ["one", None, ""], "key": ["k1", "k2", "k3"]})
    [source] = summary_inputs.sources([path], "body", "key")
    docs = list(source.documents())
    assert [d.id for d in docs] == ["k1", "k2", "k3"] and docs[0].text == "one"
    assert docs[1].error == f"input {path} row 1: body is null"
    assert docs[2].error == f"input {path} row 2: body is empty"
    [plain] = summary_inputs.sources([path], "body", None)
    assert [d.id for d in plain.documents()] == ["d.parquet#0", "d.parquet#1", "d.parquet#2"]
    for column, flag in (("text", "--text-column"), ("body", "--id-column")):
        [bad] = summary_inputs.sources([path], column, "nope" if column == "body" else None)
        with pytest.raises(config_lib.JobInputError, match=flag):
            list(bad.documents())


def test_a_parquet_file_given_as_text_is_refused_naming_it_and_the_option(tmp_path,
                                                                         write_parquet, capsys):
    path = write_parquet(str(tmp_path / "docs.parquet"), {"body": ["one"]})
    wanted = (f"input {path} is a Parquet file, not a text document: pass --text-column "
              "COLUMN to summarize the documents in its column COLUMN")
    with pytest.raises(config_lib.JobInputError) as refused:
        summary_inputs.sources([path], None, None)  # by name and magic, before any read
    assert str(refused.value) == wanted
    renamed = shutil.copy(path, tmp_path / "docs.bin")  # by magic bytes alone
    [source] = summary_inputs.sources([str(renamed)], None, None)
    with pytest.raises(config_lib.JobInputError, match="docs.bin is a Parquet file"):
        list(source.documents())
    out = tmp_path / "out"
    argv = ["summarize", "--input", path, "--output", str(out), "--max-tokens", "16",
            "--address", "127.0.0.1:1"]  # no cluster there: refused before it is needed
    assert cli.main(argv) == 2
    assert f"griffin-batch summarize: error: {wanted}" in capsys.readouterr().err
    assert not out.exists()


def test_a_parquet_file_without_the_text_column_lists_its_columns(tmp_path, write_parquet):
    path = write_parquet(str(tmp_path / "d.parquet"), {"body": ["one"], "key": ["k1"]})
    [source] = summary_inputs.sources([path], "nope", None)
    with pytest.raises(config_lib.JobInputError) as refused:
        list(source.documents())
    assert str(refused.value) == (f"input {path} has no column 'nope' (--text-column); "
                                  "its columns are ['body', 'key']")


def test_options_are_checked_by_name():
    config = config_lib.JobConfig(io=config_lib.IOConfig(inputs=("x",), output="o"))
    for summ, flag in [(summary_job.SummarizeConfig(mode="tree"), "--mode"),
                       (summary_job.SummarizeConfig(keep_sections=True), "--keep-sections"),
                       (summary_job.SummarizeConfig(id_column="k"), "--id-column"),
                       (summary_job.SummarizeConfig(mode="map-reduce", section_tokens=0),
                        "--section-tokens"),
                       (summary_job.SummarizeConfig(instruction=" "), "--instruction")]:
        with pytest.raises(config_lib.JobInputError, match=flag):
            summ.validate(config)


def test_the_output_text_column_is_named_by_the_job_and_may_not_take_another_columns_name():
    assert output.output_schema(False).names[:2] == ["id", "completion"]
    named = output.output_schema(False, [summary_staging.TOKENS_FIELD],
                                 text_column=summary_staging.SUMMARY)
    assert named.names[:2] == ["id", "summary"] and "completion" not in named.names
    for taken in ("error", "document_tokens"):
        with pytest.raises(ValueError, match=f"text column '{taken}'"):
            output.output_schema(False, [summary_staging.TOKENS_FIELD], text_column=taken)


def test_prompts_are_plain_or_one_chat_turn():
    plain = summary_staging.Prompts("Sum up.", chat=False)
    assert plain.summarize("Text.") == "Sum up.\n\nText.\n\nSummary:"
    chat = summary_staging.Prompts("Sum up.", chat=True)
    assert chat.summarize("Text.") == ("<start_of_turn>user\nSum up.\n\nText.<end_of_turn>\n"
                                       "<start_of_turn>model\n")
    assert summary_staging.REDUCE_LEAD in plain.combine(["A.", "B."])
    assert "A.\n\nB." in plain.combine(["A.", "B."])


def test_summaries_that_do_not_fit_are_combined_in_groups_of_two_or_more(tok):
    many = summary_staging.Summaries("d", tuple(f"Summary number {i}." for i in range(7)), None)
    groups = summary_staging.reduce_groups(many, 12, tok)
    assert [t for g in groups for t in g] == list(many.texts)
    assert len(groups) < 7 and all(len(g) >= 2 for g in groups)
    assert summary_staging.reduce_groups(many, 10_000, tok) == []  # fits: the final combines
    failed = summary_staging.Summaries("d", many.texts, "2 of 7: boom")
    assert summary_staging.reduce_groups(failed, 12, tok) == []


# --- real jobs --------------------------------------------------------------------------------

def _argv(inputs, out, ray_address, *extra) -> list[str]:
    # Both jobs run the same engine sizes, so the second finds most of its programs in the
    # session's compilation cache: two slots (prefill groups of two), 512-token chunks.
    return ["summarize", *[a for i in inputs for a in ("--input", i)], "--output", out,
            "--address", ray_address, "--workers", "1", "--accelerator", "cpu",
            "--slots", "2", "--decode-steps", "8", "--chunk-size", "512", "--max-tokens", "6",
            *extra]


@pytest.mark.ray
@pytest.mark.slow
def test_single_mode_summarizes_a_64k_token_document_from_a_parquet_column(
        tmp_path, ray_address, write_parquet, tok, capsys):
    long_doc = CORPUS[:int(len(CORPUS) * 0.48)]
    tokens = summary_sections.count_tokens(tok, long_doc)
    assert tokens > 65_536
    path = write_parquet(str(tmp_path / "docs.parquet"), {
        "doc_id": ["long", "short", "missing"],
        "body": [long_doc, "The for statement iterates over the items of a sequence.", None]})
    out = str(tmp_path / "out")
    argv = _argv([path], out, ray_address, "--text-column", "body", "--id-column", "doc_id")
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    table = read_output(out)
    assert table.column_names[:2] == ["id", "summary"] and "completion" not in table.column_names
    assert table.column_names[-1] == "document_tokens"
    rows = {r["id"]: r for r in table.to_pylist()}
    assert list(rows) == ["long", "short", "missing"]
    print("single:", {k: (r["document_tokens"], r["summary"]) for k, r in rows.items()})
    assert rows["long"]["document_tokens"] == tokens
    assert rows["long"]["num_prompt_tokens"] > tokens  # BOS and the instruction too
    assert rows["long"]["finish_reason"] in ("stop", "length") and rows["long"]["summary"]
    assert rows["short"]["finish_reason"] in ("stop", "length")
    assert rows["missing"]["finish_reason"] == "error"
    assert rows["missing"]["error"] == f"input {path} row 2: body is null"
    plan = manifest.OutputDir(out).plan_record()
    [source] = plan["plan"]["sources"]
    assert source["url"] == path and source["lines"] == 3
    assert cli.main(["status", out]) == 0


@pytest.mark.ray
@pytest.mark.slow
def test_map_reduce_summarizes_sections_then_their_summaries_and_resumes(
        tmp_path, ray_address, tok, capsys):
    docs = tmp_path / "docs"
    shutil.copytree(EXAMPLES, docs)
    (docs / "broken.txt").write_bytes(b"\xff\xfe not text")
    (docs / "tiny.txt").write_text("A list holds items in order.")
    out = str(tmp_path / "out")
    # Sections of at most 128 tokens: 4 and 5 of them, whose summaries together fit 128
    # tokens, so the final requests combine them (one reduce level, two stages).
    argv = _argv([str(docs / "*")], out, ray_address, "--mode", "map-reduce",
                 "--section-tokens", "128", "--keep-sections", "--max-tokens", "8")
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    rows = {pathlib.Path(r["id"]).name: r for r in read_output(out).to_pylist()}
    assert sorted(rows) == ["broken.txt", "exceptions.txt", "generators.md", "tiny.txt"]
    for name in ("exceptions.txt", "generators.md"):
        r = rows[name]
        text = (docs / name).read_text()
        assert r["document_tokens"] == summary_sections.count_tokens(tok, text)
        assert len(r["sections"]) == len(summary_sections.split(text, 128, tok)) > 2
        assert r["finish_reason"] in ("stop", "length") and r["error"] is None
        print(f"map-reduce {name}: sections {r['sections'][:2]} ... summary {r['summary']!r}")
    assert rows["tiny.txt"]["sections"] == [] and rows["tiny.txt"]["finish_reason"] != "error"
    assert "broken.txt is not UTF-8 text" in rows["broken.txt"]["error"]
    assert read_output(out).column_names[-3:] == ["error", "document_tokens", "sections"]
    level1 = read_output(f"{out}/{manifest.STAGES_DIR}/level-1")
    assert "completion" in level1.column_names  # stages before the final one are generate's
    assert set(level1.column("document").to_pylist()) == {
        str(docs / "exceptions.txt"), str(docs / "generators.md")}
    assert sorted(p.name for p in pathlib.Path(out, manifest.STAGES_DIR).iterdir()) == ["level-1"]
    summary = json.loads(pathlib.Path(out, manifest.SUMMARY_FILE).read_text())
    assert summary["status"] == "completed" and summary["request_counts"]["total"] == 4
    # The last stage's summary carries the earlier stages' figures; status adds them up (it
    # showed the last stage's tokens and time as if they were the job's).
    level1_summary = json.loads(
        pathlib.Path(out, manifest.STAGES_DIR, "level-1", manifest.SUMMARY_FILE).read_text())
    [earlier] = summary["earlier_stages"]
    assert earlier["stage"] == "level-1"
    assert earlier["completion_tokens"] == level1_summary["completion_tokens"] > 0
    capsys.readouterr()
    assert cli.main(["status", out]) == 0
    total = summary["completion_tokens"] + earlier["completion_tokens"]
    said = capsys.readouterr().out
    assert f"whole job: {total} tokens in " in said, said
    assert "s over 2 stages (before this last one: level-1)" in said, said

    before = read_output(out)
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 0  # every stage finished: nothing runs again
    assert read_output(out).equals(before)
    assert "resuming" in capsys.readouterr().err
    assert cli.main(argv) == 2  # a fresh run into a full output is refused


def test_an_input_changed_since_the_job_was_planned_is_refused_on_resume(
        tmp_path, write_parquet):
    path = write_parquet(str(tmp_path / "d.parquet"), {"body": ["one", "two"]})
    config = config_lib.JobConfig(io=config_lib.IOConfig(inputs=(path,),
                                                         output=str(tmp_path / "out")))
    tok_ = tokenizer.load_tokenizer(demo.demo_tokenizer_path())

    def plan():
        stage = summary_staging.DocumentsStage(
            summary_inputs.sources([path], "body", None), summary_staging.Prompts(), tok_, {})
        _, planned, staged = stage.stage(config, print)
        staged.cleanup()
        return planned

    first = plan()
    out = manifest.OutputDir(config.io.output)
    out.prepare(first, config.fingerprint(), resume=False, overwrite=False)
    out.release()
    write_parquet(path, {"body": ["one", "TWO"]})
    with pytest.raises(config_lib.JobInputError, match="inputs changed"):
        manifest.OutputDir(config.io.output).prepare(plan(), config.fingerprint(), resume=True,
                                                     overwrite=False)
    assert pa.Table.equals(pq.read_table(path), pa.table({"body": ["one", "TWO"]}))
