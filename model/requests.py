"""Request and result values exchanged with the generation engine.

These are plain, picklable values: the driver builds ``Request`` objects from
Parquet rows, Ray ships them to workers, and workers return ``Completion``s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Literal

FinishReason = Literal["stop", "length", "error"]


class RequestError(ValueError):
    """A request that cannot be served; reported per request, never fatal to a batch."""


# What the device code can represent, and what one request may ask for. Positions,
# top-k and token counts are int32 on device; a request beyond these is rejected
# on its own instead of overflowing inside a batch that other requests share.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**64 - 1
"""Seeds are 64-bit on device (``griffin_batch.model.sampling``)."""
MAX_SAMPLES = 4096
"""Most samples (``n``) one request may ask for."""
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
      max_tokens: Maximum number of generated tokens (> 0).
      temperature: 0 means greedy; otherwise logits are divided by it.
      top_k: Keep only the k most likely tokens (None: all).
      top_p: Nucleus sampling mass in (0, 1] (None: 1).
      seed: Seed of this request's random stream, in [0, 2**64). The stream
        depends only on (seed, sample index, token index), never on batch
        mates or worker.
      stop: Strings that end generation when they appear in the decoded text;
        the completion is cut before the stop string.
      stop_token_ids: Token ids that end generation (EOS and <end_of_turn> are
        always stop tokens when the tokenizer has them).
      n: Number of independent samples per prompt.
      logprobs: Return the log-probability of each generated token.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    logprobs: bool = False

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises RequestError naming the first invalid field and what it accepts."""
        if not _is_int(self.max_tokens) or not 0 < self.max_tokens <= INT32_MAX:
            raise RequestError(
                f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        if not is_number(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise RequestError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k)
                                       or not 0 < self.top_k <= INT32_MAX):
            raise RequestError(
                f"top_k must be an integer in [1, {INT32_MAX}] or None, got {self.top_k!r}")
        if self.top_p is not None and (not is_number(self.top_p)
                                       or not 0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.n) or not 0 < self.n <= MAX_SAMPLES:
            raise RequestError(f"n must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise RequestError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        if not isinstance(self.logprobs, bool):
            raise RequestError(f"logprobs must be true or false, got {self.logprobs!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(
                not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise RequestError(
                f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters, got {_short(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(f"stop_token_ids holds {len(self.stop_token_ids)} ids, at most "
                               f"{MAX_STOP_TOKEN_IDS} are allowed")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise RequestError(
                    f"stop_token_ids: id {t!r} is outside the vocabulary [0, {vocab_size})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float, not a bool (JSON and Parquet values are checked with it)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """One prompt to complete.

    Attributes:
      request_id: Caller's id, carried through to every Completion.
      prompt: Text (encoded with BOS as the reference sampler does) or token ids
        (used as given).
      params: Sampling parameters.
    """

    request_id: str
    prompt: str | Sequence[int]
    params: SamplingParams = SamplingParams()


def prompt_digest(prompt: str | Sequence[int]) -> str:
    """A short fingerprint of a prompt as given, cheap to recompute from an input row.

    ``text:<SHA-256 hex of the UTF-8 text>`` for a text prompt,
    ``ids:<SHA-256 hex of the ids in decimal, comma-separated>`` for token ids.
    It hashes what the caller gave, not token ids after encoding, so checking
    a row against a stored sample needs no tokenizer (the tokenizer is pinned
    separately, by the snapshot's model fingerprint).
    """
    if isinstance(prompt, str):
        return "text:" + hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
    ids = ",".join(str(int(t)) for t in prompt)
    return "ids:" + hashlib.sha256(ids.encode("ascii")).hexdigest()


class _NothingYet:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOTHING_YET"


NOTHING_YET = _NothingYet()
"""What a request feed yields when it has nothing now but may have more later.

``Engine.stream`` then goes on decoding what it holds and asks again before
its next admission, instead of treating the feed as ended and draining its
slots. A feed should yield it only while the engine holds work, and block
while the engine is idle (asked again at once, it would otherwise spin).
"""


@dataclasses.dataclass(kw_only=True)
class Completion:
    """One finished sample of one request.

    Attributes:
      request_id: The request's id.
      sample_index: Which of the request's ``n`` samples this is.
      tokens: Generated token ids; a stop token is excluded, the token that completes a
        stop string is kept (the text is cut before the stop string).
      text: Decoded text of ``tokens``.
      finish_reason: "stop", "length" or "error".
      num_prompt_tokens: Prompt length in tokens, BOS included.
      error: Message when finish_reason is "error", else None.
      logprobs: Per-token log-probabilities when requested.
    """

    request_id: str
    sample_index: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    num_prompt_tokens: int = 0
    error: str | None = None
    logprobs: list[float] | None = None
