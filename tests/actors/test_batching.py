"""``EngineLoop``: one engine stream fed while it runs, with the real engine on the demo model."""

import time

import pytest

from griffin_batch.actors import batching
from griffin_batch.model import engine, requests
from griffin_batch.model.engine_config import EngineConfig

LONG, SHORT = 400, 4


@pytest.fixture(scope="module")
def loop(demo_model, jax_cache) -> batching.EngineLoop:
    config, params, tokenizer = demo_model
    eng = engine.Engine(config, params, tokenizer, EngineConfig(num_slots=4, decode_steps=8))
    return batching.EngineLoop(eng)


def _request(rid: str, max_tokens: int) -> requests.Request:
    return requests.Request(
        request_id=rid, prompt="The lighthouse keeper climbed",
        params=requests.SamplingParams(max_tokens=max_tokens),
    )


def _until_taken(loop: batching.EngineLoop, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while loop.queued:
        assert time.monotonic() < deadline, "the engine did not take the request"
        time.sleep(0.005)


def test_a_request_submitted_mid_decode_does_not_wait_for_the_others(loop):
    """Before, the feed ended whenever its queue was empty and the engine drained every
    in-flight sample before taking the next request: one long row idled every slot."""
    long = loop.submit(batching.Batch([_request("long", LONG)]))
    _until_taken(loop)  # the long request is decoding, and the queue is empty
    short = loop.submit(batching.Batch([_request("short", SHORT)]))
    (done,) = short.wait(timeout=300)
    assert done.finish_reason == "length" and len(done.tokens) == SHORT
    assert not long.done, "the short request waited for the long one to finish"
    (finished,) = long.wait(timeout=600)
    assert finished.finish_reason == "length" and len(finished.tokens) == LONG
    loop.release(long), loop.release(short)


def test_the_loop_serves_batch_after_batch(loop):
    """The feed blocks while the engine is idle and the stream never ends between batches."""
    for i in range(3):
        batch = loop.submit(batching.Batch([_request(f"b{i}-{j}", SHORT) for j in range(3)]))
        assert sorted(c.request_id for c in batch.wait(timeout=300)) == [f"b{i}-{j}" for j in range(3)]
        loop.release(batch)
    assert loop.fatal is None
