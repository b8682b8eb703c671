"""The command line refuses bad job input before any worker starts, naming the file or option."""

import subprocess
import sys

import pytest

from griffin_batch.jobs import generate


def _run(capsys, *argv) -> tuple[int, str]:
    code = generate.main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def good_input(tmp_path, write_parquet) -> str:
    return write_parquet(str(tmp_path / "in.parquet"), {"prompt": ["a", "b"]})


def test_missing_column(capsys, tmp_path, write_parquet):
    path = write_parquet(str(tmp_path / "q.parquet"), {"question": ["a"]})
    code, err = _run(capsys, "--input", path, "--output", str(tmp_path / "out"))
    assert code == generate.EXIT_BAD_INPUT
    assert f"input {path} has no prompt column 'prompt'" in err
    assert not (tmp_path / "out").exists()  # nothing written either


def test_not_parquet(capsys, tmp_path):
    (tmp_path / "in.csv").write_text("prompt\nhello\n")
    code, err = _run(capsys, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o"))
    assert code == generate.EXIT_BAD_INPUT and "in.csv is not a readable Parquet file" in err


def test_non_empty_output(capsys, tmp_path, good_input):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    code, err = _run(capsys, "--input", good_input, "--output", str(tmp_path / "out"))
    assert code == generate.EXIT_BAD_INPUT
    assert "is not empty" in err and "--resume" in err and "--overwrite" in err


def test_overwrite_never_deletes_the_input_or_a_bucket(capsys, tmp_path, good_input):
    (tmp_path / "notes.txt").write_text("mine")  # beside the input, in.parquet
    code, err = _run(capsys, "--input", good_input, "--output", str(tmp_path), "--overwrite")
    assert code == generate.EXIT_BAD_INPUT and f"holds the input file {good_input}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "notes.txt"]
    code, err = _run(capsys, "--input", good_input, "--output", "gs://bucket", "--overwrite")
    assert code == generate.EXIT_BAD_INPUT and "gs://bucket is the root of a bucket" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--workers", "2", "--min-workers", "1"], "--workers excludes"),
        (["--max-tokens", "0"], "--max-tokens must be an integer in [1, "),
        (["--dtype", "float8"], "--dtype must be one of bfloat16, float32, got 'float8'"),
        (
            ["--checkpoint", "/nowhere/ckpt", "--tokenizer", "/nowhere/t.model"],
            "--checkpoint /nowhere/ckpt does not exist",
        ),
    ],
)
def test_inconsistent_options(capsys, tmp_path, good_input, flags, message):
    code, err = _run(capsys, "--input", good_input, "--output", str(tmp_path / "out"), *flags)
    assert code == generate.EXIT_BAD_INPUT and message in err
    assert not (tmp_path / "out").exists()  # refused before the output or a cluster


def test_unreachable_output(capsys, tmp_path, good_input):
    (tmp_path / "f").write_text("")
    code, err = _run(capsys, "--input", good_input, "--output", str(tmp_path / "f" / "out"))
    assert code == generate.EXIT_BAD_INPUT and "is not writable" in err
    code, err = _run(capsys, "--input", good_input, "--output", str(tmp_path / "f"), "--overwrite")
    assert code == generate.EXIT_BAD_INPUT
    assert f"output {tmp_path / 'f'} is a file: --output names a directory" in err, err
    assert (tmp_path / "f").read_text() == ""  # kept


def test_input_is_checked_before_ray_is_contacted(tmp_path):
    """With an address nothing listens on, bad input still fails at once with its own message."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "griffin_batch.jobs.generate",
            "--input",
            str(tmp_path / "missing.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--address",
            "127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == generate.EXIT_BAD_INPUT
    assert "missing.parquet: no such file or directory" in proc.stderr


def test_an_unknown_option_shows_its_subcommands_usage(capsys):
    from griffin_batch.jobs import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["status", "out", "--bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    # argparse alone printed the top level's usage ("griffin-batch [-h] [--version] COMMAND").
    assert err.startswith("usage: griffin-batch status") and (
        "griffin-batch status: error: unrecognized arguments: --bogus") in err, err


@pytest.mark.parametrize("command", ["generate", "synthesize", "summarize"])
def test_every_option_says_what_it_does(command):
    # --max-tokens, --top-k and eight others once showed a bare flag in --help, their
    # defaults (256, greedy) nowhere but in the code.
    bare = [a.option_strings[0] for a in _subparser(command)._actions
            if a.option_strings and not a.help]
    assert bare == [], f"{command} --help shows these without a word: {bare}"


@pytest.mark.parametrize("command, n_help", [
    ("synthesize", "samples per combination, one output row each"),
    ("summarize", "must be 1: one summary per document"),
])
def test_commands_whose_rows_cannot_set_sampling_say_so(command, n_help):
    from griffin_batch.jobs import cli

    text = " ".join(_subparser(command).format_help().split())
    # Their help once pointed at --sampling-columns, which they lack, and at a row's own seed.
    assert "--sampling-columns" not in text and "unless the row sets a seed" not in text
    assert "sampling (the same for every request):" in text
    assert f"--n N {n_help}" in text
    assert "--temperature TEMPERATURE 0 (the default) is greedy" in text
    with pytest.raises(SystemExit):  # not an option there
        cli.main([command, "--output", "o", "--sampling-columns", "n"])
    # generate, which has --sampling-columns, keeps its title.
    assert "sampling (per row: see --sampling-columns):" in " ".join(
        _subparser("generate").format_help().split())


def _subparser(command: str):
    from griffin_batch.jobs import cli

    (sub,) = [a for a in cli.build_parser([command])._actions if a.dest == "command"]
    return sub.choices[command]
