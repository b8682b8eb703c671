"""The engine's host-side parts without a model: admission, output processing, slots.

Nothing here compiles or imports JAX; each test runs in milliseconds.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from griffin_batch.model.engine import admission, output_processor, scheduler
from griffin_batch.model.engine.messages import OutputChunk, SlotSnapshot
from griffin_batch.model.requests import NOTHING_YET, Request, RequestError, SamplingParams

VOCAB = 32
PIECES = [f"<{i}>" for i in range(10)] + [chr(ord("a") + i) for i in range(VOCAB - 10)]


class FakeDecoder:
    """A stream decoder: id i decodes to ``PIECES[i]``, nothing held back."""

    def push(self, ids):
        return "".join(PIECES[i] for i in ids)

    def flush(self):
        return ""


class FakeTokenizer:
    """Letters encode to their ids (``a`` is 10); id 1 always ends a sample."""

    stop_token_ids = (1,)

    def encode(self, text):
        return [2] + [PIECES.index(c) for c in text]  # BOS, then the letters

    def stream_decoder(self):
        return FakeDecoder()


def req(rid, prompt=(10, 11), **params) -> Request:
    return Request(request_id=str(rid), prompt=prompt, params=SamplingParams(**params))


def state(request=None, **kw) -> output_processor.SampleState:
    request = request or req("a", max_tokens=8)
    validate = admission.RequestValidator(FakeTokenizer(), VOCAB, max_prompt_tokens=64)
    s = validate(request, 0)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def drain(queue: admission.AdmissionQueue) -> list[tuple[str, int]]:
    out = []
    while (item := queue.pop()) is not None:
        out.append((item[0].request_id, item[1]))
    return out


def test_parts_import_without_jax():
    code = ("import sys; from griffin_batch.model.engine import admission, output_processor, "
            "scheduler, SlotSnapshot; assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# Admission queue -------------------------------------------------------------


def test_arrival_order_expands_each_request_into_its_samples():
    queue = admission.AdmissionQueue([req("a", n=2), req("b", max_tokens=99), req("c")])
    assert drain(queue) == [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
    assert queue.exhausted


def test_longest_first_within_the_lookahead_ties_in_arrival_order():
    requests = [req("s", max_tokens=2), req("l", max_tokens=9), req("m", max_tokens=5),
                req("m2", max_tokens=5), req("xl", max_tokens=50)]
    queue = admission.AdmissionQueue(requests, longest_first=True, lookahead=4)
    # "xl" is fifth: it enters the lookahead only once "l" has left it.
    assert drain(queue) == [("l", 0), ("xl", 0), ("m", 0), ("m2", 0), ("s", 0)]


def test_malformed_requests_are_handed_out_first():
    requests = [req("ok", max_tokens=9), req("bad", max_tokens=0)]
    queue = admission.AdmissionQueue(requests, longest_first=True, lookahead=8)
    assert drain(queue) == [("bad", 0), ("ok", 0)]


def test_lookahead_bounds_what_is_pulled_from_the_feed():
    pulled = []

    def feed():
        for i in range(100):
            pulled.append(i)
            yield req(i, max_tokens=i + 1)

    queue = admission.AdmissionQueue(feed(), longest_first=True, lookahead=3)
    assert queue.peek()[0].request_id == "2"
    assert len(pulled) == 3
    assert [r.request_id for r, _ in queue.items()] == ["2", "1", "0"]


def test_nothing_yet_keeps_the_queue_open_and_it_asks_again():
    feed = iter([req("a"), NOTHING_YET, req("b")])
    queue = admission.AdmissionQueue(feed)
    assert queue.pop()[0].request_id == "a"
    assert queue.pop() is None and not queue.exhausted  # nothing now, more may come
    assert queue.pop()[0].request_id == "b"
    assert queue.pop() is None and queue.exhausted


def test_snapshots_in_the_feed_are_restored_or_queued_again():
    decoding = SlotSnapshot(req("d"), 0, 2, 5, 17, cache={"x": 0}, text_state={})
    pending = SlotSnapshot(req("p", n=3), 2, 2, 0, 0, None, None, pending=True)
    queue = admission.AdmissionQueue([req("a"), decoding, pending, req("b")])
    assert drain(queue) == [("a", 0), ("p", 2), ("b", 0)]
    assert list(queue.restored) == [decoding]
    queue.add_snapshot(pending)  # taken back directly (``stream(resume=...)``)
    assert drain(queue) == [("p", 2)]


# Request validation ----------------------------------------------------------


def test_validator_encodes_text_and_merges_stop_tokens():
    s = state(req("t", prompt="abc", max_tokens=3, stop_token_ids=(7,)))
    assert s.prompt.tolist() == [2, 10, 11, 12] and s.prompt.dtype == "int32"
    assert s.stop_ids == frozenset({1, 7})
    assert (s.generated, s.position) == (0, 3)


@pytest.mark.parametrize("request_, message", [
    (req("e", prompt=""), "prompt is empty"),
    (req("e", prompt=[]), "prompt has no tokens"),
    (req("e", prompt=[3, VOCAB]), "outside [0, 32)"),
    (req("e", prompt=list(range(10)) * 7), "over the limit of 64"),
    (req("e", max_tokens=0), "max_tokens"),
    (Request(request_id="e", prompt=[3], params={"max_tokens": 3}), "SamplingParams"),
])
def test_validator_rejects_bad_requests(request_, message):
    validate = admission.RequestValidator(FakeTokenizer(), VOCAB, max_prompt_tokens=64)
    with pytest.raises(RequestError, match=re.escape(message)):
        validate(request_, 0)


# Output processing -----------------------------------------------------------


def process(s, tokens, logprobs=None):
    lp = np.asarray(logprobs if logprobs is not None else [-0.5] * len(tokens), np.float32)
    return output_processor.process_tokens(s, np.asarray(tokens, np.int32), lp)


def test_tokens_become_text_and_advance_the_sample():
    s = state()
    chunk = process(s, [10, 11])
    assert chunk == OutputChunk("a", 0, "ab", [10, 11], None, None, num_prompt_tokens=2)
    assert (s.generated, s.last_token, s.position) == (2, 11, 3)


def test_stop_token_ends_the_sample_and_what_follows_is_dropped():
    s = state(req("a", max_tokens=8, stop_token_ids=(5,), logprobs=True))
    chunk = process(s, [10, 5, 11], [-1.0, -2.0, -3.0])
    assert (chunk.tokens, chunk.text, chunk.finish_reason) == ([10], "a", "stop")
    assert chunk.logprobs == [-1.0]
    assert (s.generated, s.last_token) == (1, 10)
    assert process(state(), [1, 10]).tokens == []  # the tokenizer's stop id, before any text


def test_stop_string_cuts_text_and_tokens_at_the_token_that_completes_it():
    s = state(req("a", max_tokens=8, stop=("bc",)))
    first = process(s, [10, 11])  # "b" is held: it may begin the stop string
    assert (first.text, first.finish_reason) == ("a", None)
    second = process(s, [12, 13, 14])
    assert (second.tokens, second.text, second.finish_reason) == ([12], "", "stop")
    assert s.generated == 3


def test_max_tokens_counts_across_rounds():
    s = state(req("a", max_tokens=3))
    assert process(s, [10, 11]).finish_reason is None
    last = process(s, [12, 13, 14])
    assert (last.tokens, last.text, last.finish_reason) == ([12], "c", "length")


def test_nothing_to_hand_out_gives_no_chunk():
    assert process(state(), []) is None


def test_completion_joins_a_samples_chunks():
    s = state(req("a", max_tokens=4, logprobs=True))
    chunks = [process(s, [10, 11], [-1.0, -2.0]), process(s, [12, 13], [-3.0, -4.0])]
    done = output_processor.completion(chunks)
    assert (done.tokens, done.text, done.finish_reason) == ([10, 11, 12, 13], "abcd", "length")
    assert (done.logprobs, done.num_prompt_tokens) == ([-1.0, -2.0, -3.0, -4.0], 2)
    error = output_processor.error_chunk(req("x"), 1, "bad")
    assert output_processor.completion([error]).error == "bad"


# Slots -----------------------------------------------------------------------


def test_ring_buckets_grow_by_half_steps_and_end_with_the_window():
    assert scheduler.ring_buckets(16, 100) == [16, 24, 32, 48, 64, 96, 101]
    assert scheduler.ring_buckets(256, 256) == [257]


def test_ring_limits_are_every_limit_a_decode_round_can_have():
    slots = scheduler.SlotScheduler(2, scheduler.ring_buckets(16, 100), 100)
    assert slots.ring_limits() == [16, 24, 32, 48, 64, 96, None]
    assert slots.ring_limits(40) == [16, 24, 32, 48]  # positions below 40: up to 48
    assert slots.ring_limits(48) == [16, 24, 32, 48, 64]  # ring_limit picks b > position
    for position in range(1, 100):
        slots.occupy(0, state(generated=position - 1))  # at `position` - 1 + 1
        limit = slots.ring_limit(0)
        assert limit in slots.ring_limits(position + 1), position
        assert slots.plan_decode(0).row_rings == slots.row_rings(limit)


def test_prefill_plan_shares_a_row_per_request_and_reserves_slots():
    slots = scheduler.SlotScheduler(4, scheduler.ring_buckets(16, 100), 100)
    slots.occupy(1, state())
    a, b = req("a", n=2), req("b", prompt=(12, 13, 14))
    samples = [state(a), state(a), state(b)]
    plan = slots.plan_prefill(samples)
    assert (plan.slots, plan.row_of) == ([0, 2, 3], [0, 0, 1])
    assert [p.tolist() for p in plan.prompts] == [[10, 11], [12, 13, 14]]
    assert slots.free() == [] and slots.reserved() == samples and slots.decoding() == [1]
    assert slots.plan_decode(4).samples == [None, slots.slots[1], None, None]


def test_decode_plan_and_ring_limit_follow_the_furthest_slot():
    slots = scheduler.SlotScheduler(3, scheduler.ring_buckets(16, 100), 100)
    assert slots.plan_decode(4) is None and not slots.busy()
    slots.occupy(0, state(generated=5, last_token=12))  # position 6
    slots.occupy(2, state(generated=20, last_token=13))  # position 21
    plan = slots.plan_decode(4)
    assert plan.last_tokens.tolist() == [12, 0, 13]
    assert plan.positions.tolist() == [6, -1, 21]
    assert plan.token_index.tolist() == [5, 0, 20]
    assert plan.ring_limit == 32  # 21 + 4 fits under 32
    assert plan.row_rings == (16, 24, 32)  # each slot picks its own on device
    slots.occupy(2, state(generated=95))  # past the last bucket below the window
    assert slots.ring_limit(4) is None
    assert slots.plan_decode(4).row_rings == (16, 24, 32, 48, 64, 96, 101)  # the whole ring
    slots.release(0)
    slots.release(2)
    assert slots.free() == [0, 1, 2] and not slots.busy()
