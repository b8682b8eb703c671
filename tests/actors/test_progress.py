"""Row-level progress: checkpoints written while shards run, and attempts that continue from them.

The real engine on the demo model (bfloat16 state) behind a real ``EngineLoop``;
checkpoints on local disk. An attempt is interrupted with ``EngineLoop.drain``
(what a worker does on SIGTERM); a fresh engine, as on another worker, then
continues from the stored progress. Every continued sample must equal an
uninterrupted run token for token and character for character, for greedy
and seeded sampling, with stop strings and several samples per request.
"""

from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest

from griffin_batch.actors import batching, progress, rows, shards
from griffin_batch.cluster import faults
from griffin_batch.model import engine, requests, snapshots
from griffin_batch.model.engine_config import EngineConfig

SIZING = EngineConfig(num_slots=4, decode_steps=8)
SPEC = shards.ShardSpec(shard_id="00000", path="x", file_key="x", row_groups=(0,), offset=0,
                        num_rows=6, first_row=0)
PROMPT = "The lighthouse keeper climbed"


def _requests(attempt: int) -> list[requests.Request]:
    """Six rows, more samples than slots: some wait while others decode."""
    params = [
        dict(max_tokens=40, temperature=1.0, seed=10),  # admitted last (longest first)
        dict(max_tokens=300),  # greedy
        dict(max_tokens=260, temperature=1.0, seed=7),
        dict(max_tokens=240, temperature=0.8, top_p=0.9, seed=8, n=2),
        dict(max_tokens=200, temperature=1.0, seed=9, stop=("qz",)),
        dict(max_tokens=280, temperature=1.0, top_k=20, seed=11, logprobs=True),
    ]
    return [requests.Request(request_id=rows.request_id(SPEC, attempt, i), prompt=f"{PROMPT} {i}",
                             params=requests.SamplingParams(**p)) for i, p in enumerate(params)]


@pytest.fixture(scope="module")
def model(demo_model, jax_cache):
    config, params, tokenizer = demo_model
    eng = engine.Engine(config, params, tokenizer, SIZING)
    fingerprint = snapshots.model_fingerprint(config, eng.dtype, tokenizer.model_proto)
    return config, params, tokenizer, fingerprint, snapshots.cache_template(config, eng.dtype)


def _loop(model) -> batching.EngineLoop:
    config, params, tokenizer, *_ = model
    return batching.EngineLoop(engine.Engine(config, params, tokenizer, SIZING))


def _store(model, path) -> progress.ProgressStore:
    *_, fingerprint, template = model
    return progress.ProgressStore(str(path), fingerprint, template)


def _outputs(completions) -> dict:
    """Completions by (row, sample): what an output row holds."""
    return {(rows.row_of(c.request_id), c.sample_index):
            (c.tokens, c.text, c.finish_reason, c.logprobs) for c in completions}


@pytest.fixture(scope="module")
def uninterrupted_run(model):
    """(outputs, decode rounds) of the shard run once without interruption."""
    loop = _loop(model)
    batch = loop.submit(batching.Batch(_requests(0)))
    outputs = _outputs(batch.wait(timeout=600))
    return outputs, loop._engine.rounds_done


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[0]


def _attempt(model, store, attempt: int, *, stop_after_rounds: int | None):
    """One attempt from the store's newest checkpoint; drained after some rounds, or to the end."""
    loop = _loop(model)
    restored = store.load()
    work = progress.resume_work(_requests(attempt), restored, rows.row_of)
    checkpointer = progress.ShardCheckpointer(store, restored,
                                              stored_id=lambda rid: str(rows.row_of(rid)))
    batch = loop.submit(batching.Batch(work.requests, work.resumed, work.finished, checkpointer,
                                       checkpoint_every_s=0.01,
                                       restored_tokens=work.restored_tokens))
    if stop_after_rounds is None:
        return restored, work, _outputs(batch.wait(timeout=600))
    start = loop._engine.rounds_done
    while loop._engine.rounds_done - start < stop_after_rounds:
        assert not batch.done, "finished before it could be interrupted"
        time.sleep(0.01)
    assert loop.drain("test", timeout_s=120)
    with pytest.raises(faults.WorkerLost, match="drained"):
        batch.wait(timeout=60)
    return restored, work, None


def test_interrupted_attempts_continue_mid_sequence_exactly(model, uninterrupted_run, tmp_path):
    uninterrupted, rounds = uninterrupted_run
    # Interrupt twice before the end, wherever the rows' EOS puts it (43 to 48 rounds seen).
    first, second = rounds * 2 // 3, max(1, rounds // 9)
    store = _store(model, tmp_path / "p")
    _attempt(model, store, 0, stop_after_rounds=first)
    restored, work, _ = _attempt(model, store, 1, stop_after_rounds=second)
    # The second attempt continued the first: samples mid-sequence, others finished.
    assert any(not s.pending and s.generated > 0 for s, _ in work.resumed)
    assert work.finished, "some rows should have finished in the first attempt"
    restored, work, got = _attempt(model, store, 2, stop_after_rounds=None)
    decoding = {(snap.request.request_id, snap.sample_index): snap.generated
                for snap, _ in restored.decoding}
    print(f"third attempt restored {work.restored_tokens} tokens; decoding at {decoding}; "
          f"chain {len(restored.chain)} checkpoints")
    assert len(restored.chain) >= 2 and work.restored_tokens > 0
    assert got.keys() == uninterrupted.keys()
    for key, want in uninterrupted.items():
        assert got[key][:3] == want[:3], key
        if want[3] is not None:  # logprobs: same tokens from the same state, float32
            np.testing.assert_allclose(got[key][3], want[3], atol=1e-5)


def test_a_corrupt_or_foreign_checkpoint_is_skipped(model, uninterrupted, tmp_path):
    store = _store(model, tmp_path / "p")
    _attempt(model, store, 0, stop_after_rounds=12)
    chain = store.load().chain
    head = chain[-1]
    state = tmp_path / "p" / head.replace(".delta.", ".state.")
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    state.write_bytes(bytes(data))
    fallback = store.load()
    assert fallback.chain == chain[:-1], "a state that fails its checksum falls back one checkpoint"
    # Truncated delta of the head: ignored, the previous checkpoint is used.
    delta = tmp_path / "p" / head
    delta.write_bytes(delta.read_bytes()[:100])
    assert store.load().chain == chain[:-1]
    # Another model's progress is never used.
    *_, template = model
    assert progress.ProgressStore(str(tmp_path / "p"), "0" * 32, template).load().chain == []
    # Continuing from the fallback still gives the uninterrupted output.
    *_, got = _attempt(model, store, 1, stop_after_rounds=None)
    assert {k: v[:3] for k, v in got.items()} == {k: v[:3] for k, v in uninterrupted.items()}


def test_a_checkpoint_costs_state_plus_new_tokens(model, tmp_path):
    """Delta files hold only tokens since the previous checkpoint; state files stay one size."""
    store = _store(model, tmp_path / "p")
    _attempt(model, store, 0, stop_after_rounds=30)
    names = sorted(os.listdir(tmp_path / "p"))
    deltas = [n for n in names if ".delta." in n]
    states = [n for n in names if ".state." in n]
    assert len(deltas) >= 5
    assert len(states) == progress.STATES_KEPT  # older states are deleted
    new_tokens = []
    for name in deltas:
        arrays, meta = progress.decode_file((tmp_path / "p" / name).read_bytes())
        per_sample = collections.Counter()
        for i, record in enumerate(meta["samples"]):
            per_sample[record["request_id"]] += arrays[f"tokens/{i}"].size
        new_tokens.append(max(per_sample.values(), default=0))
    # A checkpoint per round at most: never more than a few rounds of tokens per sample.
    assert max(new_tokens[1:]) <= 4 * SIZING.decode_steps, new_tokens
    sizes = {os.path.getsize(tmp_path / "p" / n) for n in states}
    print(f"{len(deltas)} checkpoints; new tokens per sample {new_tokens}; state files {sizes}")


def test_a_rows_output_does_not_depend_on_its_batch_mates(model, uninterrupted):
    """What makes continuing elsewhere exact: a sample comes out the same alone or in company.

    A retried shard prefills its restarted samples in other groups and decodes
    its continued ones beside other slots than the first attempt did.
    """
    loop = _loop(model)
    for row in (2, 5):
        (done,) = loop.submit(batching.Batch([_requests(0)[row]])).wait(timeout=600)
        assert (done.tokens, done.text) == uninterrupted[(row, 0)][:2], row


def test_checkpoints_on_s3(model, s3_server):
    """The same files through s3fs against an S3 protocol server (moto) on loopback."""
    url = f"{s3_server.bucket('progress')}/shard"
    store = _store(model, url)
    _attempt(model, store, 0, stop_after_rounds=34)
    restored = store.load()
    assert restored.chain and restored.finished and restored.decoding
    local = _store(model, "memory://progress-copy")
    for name in [*restored.chain, restored.chain[-1].replace(".delta.", ".state.")]:
        local.fs.pipe_file(f"{local.path}/{name}", store.fs.cat_file(f"{store.path}/{name}"))
    again = local.load()
    assert again.chain == restored.chain
    assert [c.tokens for c in again.finished] == [c.tokens for c in restored.finished]
    store.remove()
    assert store.load().chain == []


def test_finished_samples_can_stream_out_of_a_load(model, tmp_path):
    """What a worker does: finished samples go to its spill as the chain is replayed, and only
    the samples still decoding are held in memory."""
    store = _store(model, tmp_path / "p")
    _attempt(model, store, 0, stop_after_rounds=34)
    whole = store.load()
    streamed = []
    light = store.load(on_finished=streamed.append)
    assert light.finished == [] and light.chain == whole.chain
    assert light.finished_keys == {(c.request_id, c.sample_index) for c in whole.finished}
    assert streamed == whole.finished and light.finished_tokens == sum(
        len(c.tokens) for c in streamed) > 0
    assert [(s.sample_index, o.tokens) for s, o in light.decoding] == [
        (s.sample_index, o.tokens) for s, o in whole.decoding]
    plan = progress.ResumePlan(light)
    assert plan.split(_requests(1), rows.row_of).finished == []  # already handed out
    assert plan.restored_tokens == progress.resume_work(
        _requests(1), whole, rows.row_of).restored_tokens
