"""Output processing: a sample's new tokens become at most one ``OutputChunk``.

Holds the per-sample host bookkeeping (``SampleState``) and the rules that end
a sample: a stop token, a stop string (matched by the sample's ``TextStream``)
or ``max_tokens``. ``completion`` joins a sample's chunks into a
``Completion``. No device code: the engine hands in host arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from griffin_batch.model.engine.messages import OutputChunk
from griffin_batch.model.requests import Completion, Request, SamplingParams
from griffin_batch.model.textstream import TextStream


@dataclasses.dataclass
class SampleState:
    """Host bookkeeping of one sample, from admission to its last token.

    Attributes:
      request: the request the sample belongs to.
      sample_index: which of the request's ``n`` samples.
      prompt: the prompt's token ids (int32).
      stop_ids: token ids that end the sample (the tokenizer's and the request's).
      text: the sample's text stream (incremental decoding, stop strings).
      generated: tokens generated and accounted so far.
      last_token: the token to feed next.
    """

    request: Request
    sample_index: int
    prompt: np.ndarray
    stop_ids: frozenset[int]
    text: TextStream
    generated: int = 0
    last_token: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def position(self) -> int:
        """Position of ``last_token``, the next token the model reads."""
        return len(self.prompt) + self.generated - 1


def process_tokens(s: SampleState, tokens: np.ndarray, logprobs: np.ndarray
                   ) -> OutputChunk | None:
    """Accounts new tokens of a sample; returns its chunk, None if nothing to hand out.

    The sample has finished when the chunk's ``finish_reason`` is set. Tokens
    after the sample's end (stop token, stop string, length) were computed
    inside the same K-step call but are never emitted.

    Args:
      s: the sample; ``generated``, ``last_token`` and ``text`` advance.
      tokens: the new token ids, in order.
      logprobs: their log-probabilities (same length).
    """
    p = s.params
    keep, text, reason = [], "", None
    for t in tokens.tolist():
        if t in s.stop_ids:  # stop tokens are not part of the completion
            reason = "stop"
            break
        keep.append(t)
        if p.stop:  # token by token, so nothing after a stop string leaks out
            text += s.text.push([t])
            if s.text.stopped:
                reason = "stop"
                break
        if s.generated + len(keep) >= p.max_tokens:
            reason = "length"
            break
    if not p.stop and keep:
        text = s.text.push(keep)
    if reason is not None and not s.text.stopped:
        text += s.text.finish()
    s.generated += len(keep)
    if keep:
        s.last_token = keep[-1]
    lps = logprobs[: len(keep)].tolist() if p.logprobs else None
    if keep or reason is not None:
        return OutputChunk(s.request.request_id, s.sample_index, text, keep, lps, reason,
                           num_prompt_tokens=len(s.prompt))
    return None


def error_chunk(request: Request, sample_index: int, error: str) -> OutputChunk:
    """The single chunk of a sample whose request was rejected."""
    return OutputChunk(request.request_id, sample_index, "", [], finish_reason="error",
                       error=error)


def completion(chunks: list[OutputChunk]) -> Completion:
    """One sample's chunks, in order, joined into its ``Completion``."""
    last = chunks[-1]
    logprobs = None
    if any(c.logprobs is not None for c in chunks):
        logprobs = [x for c in chunks for x in (c.logprobs or [])]
    return Completion(
        request_id=last.request_id, sample_index=last.sample_index,
        tokens=[t for c in chunks for t in c.tokens], text="".join(c.text for c in chunks),
        finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
        error=last.error, logprobs=logprobs)
