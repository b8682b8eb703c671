"""Stored states keep a digest of their prompt, so a checkpoint does not grow with the document.

The real engine on the demo model takes a snapshot of a sample mid-decode; it
goes through the storage format (``snapshots.to_data`` and ``progress.encode_file``,
then back) and continues in a fresh engine, as a retried shard does. A
checkpoint's bytes must not depend on the prompt's length; a row whose prompt
changed must not continue a stored state; states written with the whole
prompt (the previous format) must still continue exactly.
"""

from __future__ import annotations

import dataclasses

import pytest

from griffin_batch.actors import progress
from griffin_batch.model import engine, requests, snapshots
from griffin_batch.model.engine_config import EngineConfig

SIZING = EngineConfig(num_slots=2, decode_steps=8)
PARAMS = requests.SamplingParams(max_tokens=24, temperature=1.0, seed=5)
SHORT = "The lighthouse keeper climbed"
# About 14k characters (9k tokens, dozens of prefill chunks): the previous format stored them all.
LONG = " ".join(f"Line {i}: the keeper climbed the stairs again." for i in range(300))


@pytest.fixture(scope="module")
def model(demo_model, jax_cache):
    config, params, tokenizer = demo_model
    dtype = engine.Engine(config, params, tokenizer, SIZING).dtype
    return demo_model, snapshots.model_fingerprint(config, dtype, tokenizer.model_proto), \
        snapshots.cache_template(config, dtype)


def _engine(model) -> engine.Engine:
    (config, params, tokenizer), *_ = model
    return engine.Engine(config, params, tokenizer, SIZING)


def _decoding_snapshot(model, prompt: str):
    """Chunks before the snapshot, and the snapshot of the (only) sample once it decodes."""
    eng = _engine(model)
    stream = eng.stream([requests.Request(request_id="0", prompt=prompt, params=PARAMS)])
    before = [next(stream)]  # the first chunk comes once the prefill is done
    (snap,) = eng.snapshot()
    assert snap.cache is not None and not snap.undelivered
    return before, snap


def _stored(model, snap, *, old_format: bool = False):
    """The snapshot through a state file's bytes and back; the file's size."""
    _, fingerprint, template = model
    arrays, meta = snapshots.to_data(snap, "s0")
    if old_format:  # what the previous version wrote: the whole prompt
        meta["request"] = snapshots.request_to_json(snap.request)
    data = progress.encode_file(arrays, {"version": progress.FORMAT_VERSION,
                                         "fingerprint": fingerprint, "samples": [meta]})
    arrays, header = progress.decode_file(data)
    return snapshots.from_data(arrays, header["samples"][0], "s0", template), len(data)


def _text(chunks) -> tuple[list[int], str]:
    return [t for c in chunks for t in c.tokens], "".join(c.text for c in chunks)


def _resumed(request: requests.Request, stored) -> list:
    """What a retried shard resumes of ``stored`` for its row ``request`` (row 0)."""
    restored = progress.Restored(finished=[], decoding=[(stored, progress.SoFar())], chain=["x"])
    work = progress.resume_work([request], restored, lambda request_id: 0)
    return [s for s, _ in work.resumed if not s.pending]


@pytest.mark.slow
def test_a_stored_state_does_not_grow_with_its_prompt(model):
    _, short = _decoding_snapshot(model, SHORT)
    _, long = _decoding_snapshot(model, LONG)
    assert long.prompt_len > 50 * short.prompt_len
    (_, short_bytes), (stored, long_bytes) = _stored(model, short), _stored(model, long)
    (_, old_bytes) = _stored(model, long, old_format=True)
    print(f"state file: {short.prompt_len}-token prompt {short_bytes} bytes, "
          f"{long.prompt_len}-token prompt {long_bytes} bytes "
          f"(with the whole prompt, as before: {old_bytes})")
    assert abs(long_bytes - short_bytes) <= 200, (short_bytes, long_bytes)
    assert old_bytes - long_bytes >= len(LONG) - 200
    assert stored.request.prompt == "" and stored.prompt_len == long.prompt_len
    assert stored.prompt_digest == requests.prompt_digest(LONG)


@pytest.mark.parametrize("old_format", [False, True], ids=["digest", "previous-format"])
def test_a_stored_state_continues_exactly_from_its_row(model, old_format):
    request = requests.Request(request_id="0", prompt=SHORT, params=PARAMS)
    whole = _text(list(_engine(model).stream([request])))
    before, snap = _decoding_snapshot(model, SHORT)
    stored, _ = _stored(model, snap, old_format=old_format)
    assert (stored.prompt_digest is None) == old_format
    (resumed,) = _resumed(dataclasses.replace(request, request_id="7"), stored)
    assert resumed.request.prompt == SHORT and resumed.generated == snap.generated > 0
    after = list(_engine(model).stream([], resume=[resumed]))
    assert _text(before + after) == whole


@pytest.mark.parametrize("old_format", [False, True], ids=["digest", "previous-format"])
def test_a_changed_row_does_not_continue_a_stored_state(model, old_format):
    _, snap = _decoding_snapshot(model, SHORT)
    stored, _ = _stored(model, snap, old_format=old_format)
    changed = [requests.Request(request_id="0", prompt=SHORT + " ", params=PARAMS),
               requests.Request(request_id="0", prompt=list(range(1, 9)), params=PARAMS),
               requests.Request(request_id="0", prompt=SHORT,
                                params=dataclasses.replace(PARAMS, seed=6))]
    for request in changed:
        work = progress.resume_work([request], progress.Restored(
            finished=[], decoding=[(stored, progress.SoFar())], chain=["x"]), lambda rid: 0)
        assert work.requests == [request] and work.resumed == [], request.prompt
    if not old_format:  # the engine itself refuses a state for another prompt
        wrong = dataclasses.replace(stored, request=changed[0])
        with pytest.raises(ValueError, match="another prompt"):
            list(_engine(model).stream([], resume=[wrong]))


def test_a_malformed_prompt_digest_is_refused(model):
    _, fingerprint, template = model
    _, snap = _decoding_snapshot(model, SHORT)
    arrays, meta = snapshots.to_data(snap, "s0")
    for bad in ("text:" + "A" * 64, "sha256:" + "0" * 64, "ids:123", 5, None):
        meta["request"]["prompt_digest"] = bad
        with pytest.raises(snapshots.SnapshotError, match="prompt_digest"):
            snapshots.from_data(arrays, meta, "s0", template)
    meta["request"]["prompt_digest"] = requests.prompt_digest(SHORT)
    meta["request"]["prompt"] = SHORT  # both: which one is meant is unclear
    with pytest.raises(snapshots.SnapshotError, match="prompt or a prompt_digest"):
        snapshots.from_data(arrays, meta, "s0", template)
    del meta["request"]["prompt"]
    meta["prompt_len"] = 0
    with pytest.raises(snapshots.SnapshotError, match="at least one token"):
        snapshots.from_data(arrays, meta, "s0", template)


def test_prompt_digest_tells_text_from_token_ids():
    assert requests.prompt_digest("12") != requests.prompt_digest([12])
    assert requests.prompt_digest([1, 2]) == requests.prompt_digest((1, 2))
    assert requests.prompt_digest([1, 2]) != requests.prompt_digest([12])
    assert requests.prompt_digest("é").startswith("text:")
