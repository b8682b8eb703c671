"""The engine's plain messages: output pieces and portable sample state.

``OutputChunk`` is what ``Engine.stream`` hands out; ``SlotSnapshot`` is one
sample that can continue in another engine (``model.snapshots`` stores it).
Neither holds a device array or a tokenizer.
"""

from __future__ import annotations

import dataclasses

from griffin_batch.model.requests import Request


@dataclasses.dataclass
class OutputChunk:
    """A piece of one sample's output, handed out every ``decode_steps`` steps.

    ``finish_reason`` is set on the last chunk of a sample (then ``error`` may
    be set); ``num_prompt_tokens`` is valid on every chunk.
    """

    request_id: str
    sample_index: int
    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0


@dataclasses.dataclass
class SlotSnapshot:
    """Everything needed to continue one sample elsewhere: arrays and plain values.

    No tokenizer travels with it (``text_state`` is data), so it stays the size
    of one slot's model state however long the output; ``model.snapshots``
    turns it into arrays and JSON for storage.

    Attributes:
      request: the request being served.
      sample_index: which sample of the request.
      prompt_len: prompt length in tokens.
      generated: tokens generated so far.
      last_token: the token to feed next.
      cache: the slot's model state as numpy arrays (a pytree of one row);
        None when the sample no longer decodes (it finished, or was rejected)
        but ``undelivered`` still holds its last chunks.
      text_state: ``TextStream.state()`` of the sample (decoder tail, text
        held back for stop strings); None with cache.
      undelivered: chunks already computed (the state above includes them) but
        not yet handed out when the snapshot was taken; resuming yields them first.
      pending: the sample had not started decoding (still prefilling, or
        pulled ahead but not admitted); resuming starts it from its prompt.
      prompt_digest: set on a decoding sample read back from storage, which
        keeps ``requests.prompt_digest`` of its prompt instead of the prompt
        (whose text grows with the document while the state does not); its
        ``request.prompt`` is then empty, and the request must be replaced by
        the matching input row's before the sample is restored.
    """

    request: Request
    sample_index: int
    prompt_len: int
    generated: int
    last_token: int
    cache: object | None
    text_state: dict | None
    undelivered: list[OutputChunk] = dataclasses.field(default_factory=list)
    pending: bool = False
    prompt_digest: str | None = None
