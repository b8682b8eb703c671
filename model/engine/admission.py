"""Admission: which samples enter the engine, in what order, and whether they may.

``AdmissionQueue`` pulls requests lazily from the caller's feed, expands each
into its ``n`` samples and hands them out (longest first within a lookahead,
or in arrival order); snapshots arriving through the feed are taken back.
``RequestValidator`` turns one sample into its host state, or rejects it with
a ``RequestError``. No device code.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable

import numpy as np

from griffin_batch.model.engine.messages import SlotSnapshot
from griffin_batch.model.engine.output_processor import SampleState
from griffin_batch.model.requests import NOTHING_YET, Request, RequestError, SamplingParams
from griffin_batch.model.textstream import TextStream


class AdmissionQueue:
    """Lazily expands requests into (request, sample_index) items.

    With ``longest_first``, up to ``lookahead`` items are pulled from the
    iterable and the one with the largest ``max_tokens`` (arrival order among
    equals) is handed out first; otherwise items leave in arrival order.

    The iterable may yield ``NOTHING_YET`` (nothing now, more may come) and
    ``SlotSnapshot``s: a pending one is queued again from its prompt, the
    others wait in ``restored`` for a free slot, ahead of new requests.

    Attributes:
      restored: snapshots of samples that were decoding, waiting for a free slot.
    """

    def __init__(self, requests: Iterable[Request], *, longest_first: bool = False,
                 lookahead: int = 1):
        self._it = iter(requests)
        self._heap: list[tuple[float, int, tuple[Request, int]]] = []
        self._lookahead = max(lookahead, 1) if longest_first else 1
        self._longest_first = longest_first
        self._arrived = 0
        self._exhausted = False
        self.restored: collections.deque[SlotSnapshot] = collections.deque()

    def _key(self, request: Request) -> float:
        if not self._longest_first:
            return 0.0
        m = getattr(request.params, "max_tokens", None)
        # Malformed requests go first: they are rejected at once and free nothing.
        valid = isinstance(m, int) and not isinstance(m, bool) and m > 0
        return -m if valid else -float("inf")

    @property
    def exhausted(self) -> bool:
        """The iterable has ended (not merely said ``NOTHING_YET``)."""
        return self._exhausted

    def _fill(self) -> None:
        while not self._exhausted and len(self._heap) < self._lookahead:
            request = next(self._it, None)
            if request is None:
                self._exhausted = True
                return
            if request is NOTHING_YET:  # more may come: ask again next admission
                return
            if isinstance(request, SlotSnapshot):
                self.add_snapshot(request)
                continue
            n = getattr(request.params, "n", 1)
            for i in range(max(n, 1) if isinstance(n, int) else 1):
                self.add(request, i)

    def add(self, request: Request, sample_index: int) -> None:
        """Queues one sample (a restored one) alongside those pulled from the iterable."""
        heapq.heappush(self._heap, (self._key(request), self._arrived, (request, sample_index)))
        self._arrived += 1

    def add_snapshot(self, snap: SlotSnapshot) -> None:
        """Takes back a snapshot: one that had not started decoding is prefilled again."""
        if snap.pending:
            self.add(snap.request, snap.sample_index)
        else:
            self.restored.append(snap)

    def items(self) -> list[tuple[Request, int]]:
        """Queued (request, sample_index) items, in the order they would be admitted."""
        return [item for *_, item in sorted(self._heap)]

    def peek(self) -> tuple[Request, int] | None:
        """The next item (pulling from the iterable if needed), left in the queue."""
        self._fill()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> tuple[Request, int] | None:
        """Takes the next item (pulling from the iterable if needed); None if none now."""
        self._fill()
        return heapq.heappop(self._heap)[2] if self._heap else None


class RequestValidator:
    """Checks one sample of a request and builds its host state.

    Args:
      tokenizer: encodes string prompts; its ``stream_decoder()`` feeds the text.
      vocab_size: token ids must lie in ``[0, vocab_size)``.
      max_prompt_tokens: longer prompts are rejected.
    """

    def __init__(self, tokenizer, vocab_size: int, max_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_prompt_tokens = max_prompt_tokens
        self.always_stop = frozenset(getattr(tokenizer, "stop_token_ids", ()) or ())

    def __call__(self, request: Request, sample_index: int) -> SampleState:
        """The host state of sample ``sample_index`` of ``request``.

        Raises:
          RequestError: the request's params or prompt are invalid.
        """
        p = request.params
        if not isinstance(p, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(p).__name__}")
        p.validate(self.vocab_size)
        ids = self._prompt_ids(request.prompt)
        limit = self.max_prompt_tokens
        if len(ids) > limit:
            raise RequestError(f"prompt has {len(ids)} tokens, over the limit of {limit}")
        return SampleState(request=request, sample_index=sample_index, prompt=ids,
                           stop_ids=self.always_stop | frozenset(p.stop_token_ids),
                           text=TextStream(self.tokenizer.stream_decoder(), tuple(p.stop)))

    def _prompt_ids(self, prompt) -> np.ndarray:
        # int32, not a list: a sample holds its prompt's ids until it finishes, and a
        # Python list of ids takes nine times the memory (a 128k-token prompt: 4.6 MB).
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            return np.asarray(self.tokenizer.encode(prompt), np.int32)
        ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside [0, "
                               f"{self.vocab_size})")
        return np.asarray(ids, np.int32)
