"""Finished samples on local disk, and the shard file written from them group by group.

No engine: completions are made up, so the tests check the spill's contract
alone (the same rows as ``rows.assemble``, the same exactly-once check, and
finished samples kept out of memory).
"""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from griffin_batch.actors import batching, rows, shards, spill
from griffin_batch.model import requests

SPEC = shards.ShardSpec(shard_id="00001", path="x.parquet", file_key="x.parquet",
                        row_groups=(0,), offset=0, num_rows=600, first_row=0)


def _shard(num_rows: int, n: int = 2):
    """A table with good rows, bad rows and a kept column; its prepared requests; completions."""
    prompts = [None if i % 97 == 5 else f"prompt {i}" for i in range(num_rows)]
    table = pa.table({"prompt": prompts, "topic": [f"t{i % 7}" for i in range(num_rows)],
                      "id": [f"row-{i}" for i in range(num_rows)]})
    options = shards.ShardOptions(keep_columns=("topic",), with_sample_index=True,
                                  sampling=requests.SamplingParams(max_tokens=9, n=n))
    prepared = rows.prepare(table, SPEC, options, attempt=0)
    done = [requests.Completion(
        request_id=r.request_id, sample_index=i, tokens=list(range(rows.row_of(r.request_id) % 9)),
        text=f"text {r.request_id}/{i} ✓", finish_reason="length" if i else "stop",
        num_prompt_tokens=3) for r in prepared.requests for i in range(n)]
    return table, options, prepared, done


def test_the_file_written_from_the_spill_equals_the_assembled_rows(tmp_path):
    table, options, prepared, done = _shard(600)
    want = rows.assemble(prepared, [*prepared.rejected, *done], table, options)
    store = spill.CompletionSpill(str(tmp_path))
    for start in range(0, len(done), 50):  # in finish order, not row order
        store.add(done[::-1][start : start + 50])
    store.add(prepared.rejected)
    windows = rows.iter_windows(SPEC, options, table, window_rows=64)
    stats = spill.write_output(prepared.ids, prepared.samples, store.close(), windows, options,
                               str(tmp_path / "p.parquet"))
    got = pq.read_table(tmp_path / "p.parquet")
    assert got.equals(want)
    assert pq.ParquetFile(tmp_path / "p.parquet").num_row_groups == -(-600 // 64)
    assert stats == spill.OutputStats(
        samples=want.num_rows, error_rows=len(prepared.rejected), prompt_tokens=3 * len(done),
        completion_tokens=sum(len(c.tokens) for c in done))
    store.remove()


@pytest.mark.parametrize("change", ["missing", "twice"])
def test_a_sample_missing_or_twice_is_refused(tmp_path, change):
    table, options, prepared, done = _shard(20, n=1)
    done = done[1:] if change == "missing" else [*done, done[0]]
    store = spill.CompletionSpill(str(tmp_path))
    store.add([*prepared.rejected, *done])
    with pytest.raises(rows.RowAccountingError, match="never came back" if change == "missing"
                       else "came back twice"):
        spill.write_output(prepared.ids, prepared.samples, store.close(),
                           rows.iter_windows(SPEC, options, table), options,
                           str(tmp_path / "p.parquet"))


def test_a_batch_keeps_only_a_few_finished_samples_in_memory(tmp_path):
    table, options, prepared, done = _shard(300, n=1)
    store = spill.CompletionSpill(str(tmp_path))
    batch = batching.Batch(spill=store)
    batch._expect(len(done))  # what EngineLoop.feed does
    batch.close_input()
    most = 0
    for c in done:
        batch._add(c)  # what the engine thread does as samples finish
        most = max(most, len(batch._recent))
    assert batch.done and batch.completions == []
    assert most < spill.SPILL_EVERY
    assert store.count == len(done)


_HOLD_A_SPILL = (
    "import os, signal, sys\n"
    "from griffin_batch.actors import spill\n"
    "store = spill.CompletionSpill(sys.argv[1])\n"
    "print(store.path, flush=True)\n"
    "if sys.argv[2] == 'kill':\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "sys.stdin.read()  # alive until the test closes stdin\n"
)


def _spill_in_process(directory, how: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_SPILL, str(directory), how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def _age(path: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_spill_files_of_killed_workers_are_removed_and_nothing_else(tmp_path):
    """A worker SIGKILLed mid-shard leaves its spill file; the next spill in that directory
    deletes it. A live worker's file, a fresh one and files of other names stay."""
    killed, orphan = _spill_in_process(tmp_path, "kill")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    fresh_proc, fresh = _spill_in_process(tmp_path, "kill")
    fresh_proc.wait(timeout=60)
    live, held = _spill_in_process(tmp_path, "hold")
    others = [tmp_path / "griffin-spill-notes.txt", tmp_path / "results.arrow"]
    for path in others:
        path.write_text("not ours")
    for path in (orphan, held, *others):
        _age(str(path), 2 * spill.ORPHAN_AGE_S)
    try:
        store = spill.CompletionSpill(str(tmp_path))
        assert not os.path.exists(orphan)
        assert os.path.exists(held) and os.path.exists(fresh)  # locked; too young to judge
        assert all(p.exists() for p in others)
        store.remove()
    finally:
        live.communicate(input="", timeout=60)
    # Its process gone, the held file is an orphan like the others.
    assert spill.remove_orphans(str(tmp_path)) == [held]
    assert os.path.exists(fresh) and all(p.exists() for p in others)
