"""Sampling parameters: every field is checked against what the device code can represent."""

import math

import pytest

from griffin_batch.model.requests import (
    INT32_MAX,
    MAX_SAMPLES,
    MAX_STOP_STRINGS,
    RequestError,
    SamplingParams,
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", INT32_MAX + 1),  # positions are int32 on device
        ("max_tokens", True),
        ("temperature", -0.5),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_k", 2**31),  # what used to overflow inside a shared batch
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("n", MAX_SAMPLES + 1),
        ("seed", 1.5),
        ("seed", -1),  # seeds are 64-bit unsigned on device
        ("seed", 2**64),
        ("logprobs", "yes"),
        ("stop", ("",)),
        ("stop", ("x" * 2000,)),
        ("stop", tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))),
        ("stop_token_ids", (5000,)),
    ],
)
def test_each_invalid_field_is_named(field, value):
    with pytest.raises(RequestError, match=field.rstrip("s") if field == "stop" else field):
        SamplingParams(**{field: value}).validate(vocab_size=1024)


def test_the_limits_themselves_are_accepted():
    SamplingParams(max_tokens=INT32_MAX, top_k=INT32_MAX, top_p=1.0, n=MAX_SAMPLES,
                   seed=2**64 - 1, stop=("x" * 1024,) * MAX_STOP_STRINGS).validate(vocab_size=8)
