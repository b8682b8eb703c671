"""A worker that cannot start fails the job fast and clearly, as a user would see it.

Each case runs ``griffin-batch generate`` as a subprocess on a fresh local Ray
cluster, with a real cause: a package that cannot be imported on the worker, a
checkpoint the worker cannot read, and Ray's memory monitor killing the worker
while it loads. Each must end within one attempt with exit status 2 and one
line naming the cause and the host; Ray's stack traces stay in its log files.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = pathlib.Path(sys.executable).parent
ROWS = 6


@pytest.fixture
def job_input(tmp_path, write_parquet) -> str:
    return write_parquet(str(tmp_path / "in.parquet"), {"prompt": [f"p{i}" for i in range(ROWS)]})


def _generate(tmp_path, job_input, *flags, env=None) -> tuple[int, str]:
    """Runs the CLI on a fresh local cluster; returns (exit status, stdout + stderr)."""
    env = {**os.environ, "RAY_ADDRESS": "", **(env or {})}
    proc = subprocess.run(
        [str(BIN / "griffin-batch"), "generate", "--input", job_input,
         "--output", str(tmp_path / "out"), "--address", "local", "--slots", "2",
         "--max-tokens", "4", *flags],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _check_fast_and_clear(code: int, out: str, cause: str) -> str:
    print(out)
    assert code == 2, out
    (error,) = [ln for ln in out.splitlines() if ln.startswith("griffin-batch generate: error:")]
    assert "could not start" in error and cause in error, error
    assert re.search(r" on \S+", error) and " on unknown " not in error, error  # names the host
    assert f"0 of {ROWS} input row(s), 0 of 1 shard file(s)" in out
    # --resume alone keeps the options: a fix that changes one needs --overwrite.
    assert "nothing is committed: fix the cause and rerun, with --overwrite" in out, out
    # One attempt: no replacement was started, and no stack trace reached the terminal.
    assert "lost:" not in out and "Traceback" not in out and "Stack trace" not in out, out
    (log_dir,) = re.findall(r"worker logs \(and Ray's own\): (\S+) on each node", out)
    return log_dir


def test_missing_package_on_the_worker(tmp_path, job_input):
    # A package the model needs, unimportable where the worker runs (as `einops` once was).
    broken = tmp_path / "site" / "einops"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'einops'\", name='einops')\n"
    )
    code, out = _generate(tmp_path, job_input, env={"PYTHONPATH": str(broken.parent)})
    log_dir = _check_fast_and_clear(code, out, "ModuleNotFoundError: No module named 'einops'")
    # The traceback is in Ray's log files, where the driver said.
    logs = [p.read_text(errors="replace") for p in pathlib.Path(log_dir).glob("worker-*.err")]
    assert any("Traceback" in t and "einops" in t for t in logs), log_dir


def test_unreadable_checkpoint_on_the_worker(tmp_path, job_input):
    from griffin_batch.model import demo

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    src = pathlib.Path(demo.demo_checkpoint_path())
    (ckpt / "config.json").write_text((src / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated
    code, out = _generate(
        tmp_path, job_input, "--checkpoint", str(ckpt),
        "--tokenizer", str(demo.demo_tokenizer_path()),
    )
    _check_fast_and_clear(code, out, "model.safetensors")


def test_out_of_memory_while_loading(tmp_path, job_input):
    # Ray's memory monitor, told that 1% of the node's memory is the limit, kills the
    # worker as it loads: the same kill a model too large for its host gets.
    env = {"RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}
    code, out = _generate(tmp_path, job_input, env=env)
    _check_fast_and_clear(code, out, "ran out of memory while loading")
