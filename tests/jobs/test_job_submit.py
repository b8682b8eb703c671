"""``ray job submit`` runs the job as the README documents, on a real Ray head with its dashboard.

The test starts ``ray start --head --block`` in a temporary directory (its own
ports and token), runs the README's submit command verbatim against it, and
checks the output, and that the workers ran the code the command shipped
(``py_modules``), not the copy installed in this environment.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from ray_head import free_port, private_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 180


def readme_block(marker: str) -> str:
    """The ```bash block after ``<!-- marker -->`` in the README."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(f"<!-- {marker} -->")
    first = next(i for i in range(start, len(lines)) if lines[i] == "```bash") + 1
    last = next(i for i in range(first, len(lines)) if lines[i] == "```")
    return "\n".join(lines[first:last])


@pytest.fixture
def ray_head():
    """A Ray head with its dashboard, in its own session and temporary directory; yields
    (dashboard URL, env). A second dashboard agent on the default port never registers, so
    every port is its own."""
    dashboard_port = free_port()
    with private_head(dashboard_port=dashboard_port) as (_, env, _):
        url = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:  # answering (401 without the token): it is up
                break
            except OSError:
                assert time.monotonic() < deadline, f"no dashboard at {url}"
                time.sleep(0.5)
        _wait_for_job_agent(url, env, deadline)
        yield url, env


def _wait_for_job_agent(url: str, env: dict, deadline: float) -> None:
    """Submits a no-op job until the head's job agent takes it.

    The dashboard answers before the node's agent has registered; a submission
    in between fails with "No available agent to submit job".
    """
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--", "true"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        if proc.returncode == 0:
            return
        assert time.monotonic() < deadline, proc.stdout[-2000:] + proc.stderr[-2000:]
        time.sleep(1.0)


def test_ray_job_submit_as_the_readme_says(ray_head):
    url, env = ray_head
    command = readme_block("submit-command")
    output = ROOT / "out" / "submitted"
    assert str(output.relative_to(ROOT)) in command, command
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=ROOT, env={**env, "RAY_ADDRESS": url},
        capture_output=True, text=True, timeout=600,
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0
    assert "succeeded" in proc.stdout + proc.stderr
    table = pq.read_table(sorted(output.glob("part-*.parquet")))
    rows_in = pq.read_metadata(ROOT / "examples" / "prompts.parquet").num_rows
    assert table.num_rows == rows_in and len(set(table.column("id").to_pylist())) == rows_in
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["status"] == "completed" and summary["rows"] == rows_in
    # The workers imported the shipped package (Ray's runtime resources), not this checkout.
    for worker in summary["workers"]:
        assert "runtime_resources" in worker["code"], worker["code"]
