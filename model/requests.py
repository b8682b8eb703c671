"""Request and result values exchanged with the generation engine.

These are plain, picklable values: the driver builds ``Request`` objects from
Parquet rows, Ray ships them to workers, and workers return ``Completion``s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

FinishReason = Literal["stop", "length", "error"]


class RequestError(ValueError):
    """A request that cannot be served; reported per request, never fatal to a batch."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
      max_tokens: Maximum number of generated tokens (> 0).
      temperature: 0 means greedy; otherwise logits are divided by it.
      top_k: Keep only the k most likely tokens (None: all).
      top_p: Nucleus sampling mass in (0, 1] (None: 1).
      seed: Seed of this request's random stream. The stream depends only on
        (seed, sample index, token index), never on batch mates or worker.
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
        """Raises RequestError naming the first invalid field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise RequestError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n <= 0:
            raise RequestError(f"n must be a positive integer, got {self.n!r}")
        if not isinstance(self.seed, int):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise RequestError(
                    f"stop token id {t!r} is outside the vocabulary [0, {vocab_size})")


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
