"""Constant-memory continuous-batching engine for Griffin models.

The engine owns ``num_slots`` slots. Each slot holds one sequence's fixed-size
model state (see ``griffin.init_cache``); the whole slot array lives on device
and is donated to every compiled call, so memory is allocated once and never
grows with prompt or output length.

One loop iteration:
  1. if slots are free, start prefilling the next pending requests (a small
     group of rows with its own cache, advanced one chunk per iteration so a
     100k-token prompt never stalls the others);
  2. when a group's prompts are consumed, sample each row's first token and
     copy its state into its slot;
  3. run ``decode_steps`` decode steps for all slots in one compiled call and
     hand the new tokens to the host, which streams text, matches stop
     strings and frees finished slots for the next request.

Compilation is bounded by design: prefill chunk lengths and group sizes are
powers of two, and decode compiles once per attention-ring bucket.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from griffin_batch.model import array_typing as at
from griffin_batch.model import griffin, sharding
from griffin_batch.model.config import GriffinConfig
from griffin_batch.model.engine_config import EngineConfig
from griffin_batch.model.requests import (
    NOTHING_YET,
    Completion,
    Request,
    RequestError,
    SamplingParams,
)
from griffin_batch.model.sampling import RowParams, sample_tokens
from griffin_batch.model.textstream import TextStream

_MIN_CHUNK = 16  # smallest prefill chunk bucket
_MIN_GROUP = 2  # smallest prefill group (see _PrefillGroup)


@dataclasses.dataclass
class Chunk:
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
    """

    request: Request
    sample_index: int
    prompt_len: int
    generated: int
    last_token: int
    cache: object | None
    text_state: dict | None
    undelivered: list[Chunk] = dataclasses.field(default_factory=list)
    pending: bool = False


@dataclasses.dataclass
class _Sample:
    """Host bookkeeping of one sample occupying a slot."""

    request: Request
    sample_index: int
    prompt: list[int]
    stop_ids: frozenset[int]
    text: TextStream
    generated: int = 0
    last_token: int = 0
    finished: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def position(self) -> int:
        return len(self.prompt) + self.generated - 1


# Compiled device functions --------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "steps", "ring_limit", "scan"),
                   donate_argnames=("cache",))
def _decode(config, params, hoisted, cache, last_tokens, positions, token_index, rows, *,
            steps, ring_limit, scan):
    """``steps`` decode steps for every slot; inactive slots have position -1.

    ``hoisted``: ``griffin.hoist(params)`` or {} (see ``Engine.__init__``).
    """

    def step(carry, _):
        cache, tokens, pos, idx = carry
        logits, cache = griffin.apply(config, params, tokens[:, None], pos[:, None], cache,
                                      ring_limit=ring_limit, scan_implementation=scan,
                                      hoisted=hoisted)
        nxt, logprob = sample_tokens(logits[:, 0], rows, idx)
        pos = jnp.where(pos >= 0, pos + 1, -1)
        return (cache, nxt, pos, idx + 1), (nxt, logprob)

    (cache, _, _, _), (tokens, logprobs) = jax.lax.scan(
        step, (cache, last_tokens, positions, token_index), None, length=steps)
    return cache, tokens.T, logprobs.T  # [S, K]


@functools.partial(jax.jit, static_argnames=("config", "scan"), donate_argnames=("cache",))
def _prefill_chunk(config, params, cache, tokens, positions, *, scan):
    """One prefill chunk for a group; returns logits at each row's last valid token."""
    last = jnp.maximum(jnp.sum(positions >= 0, axis=1) - 1, 0)
    logits, cache = griffin.apply(config, params, tokens, positions, cache,
                                  scan_implementation=scan, logits_at=last)
    return cache, logits[:, 0]


@jax.jit
def _first_tokens(logits, row_of, rows):
    """First token of each sample from the logits of its prompt's row ``row_of[i]``."""
    return sample_tokens(logits[row_of], rows, jnp.zeros(row_of.shape, jnp.int32))


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache, rows_cache, row_of, slots):
    """Copies row ``row_of[i]`` of ``rows_cache`` into slot ``slots[i]`` (out of range: dropped)."""
    return jax.tree.map(lambda c, r: c.at[slots].set(r[row_of].astype(c.dtype), mode="drop"),
                        cache, rows_cache)


def ring_buckets(min_ring: int, window: int) -> list[int]:
    """The attention-ring lengths decode compiles for, ending with the whole window.

    Powers of two times ``min_ring`` and 1.5 times those: a slot pays for at
    most a third more ring than it has filled (a power-of-two ladder pays up
    to double), for about twice as many compiled decode programs.
    """
    out, b = [], min_ring
    while b < window:
        out += [b] + ([b * 3 // 2] if b * 3 // 2 < window and b % 2 == 0 else [])
        b *= 2
    return out + [window + 1]


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def _row_params(samples: Sequence[_Sample | None]) -> RowParams:
    def col(fn, dtype, default):
        return np.array([fn(s.params) if s else default for s in samples], dtype)

    return RowParams(
        temperature=col(lambda p: p.temperature, np.float32, 0.0),
        top_k=col(lambda p: p.top_k or 0, np.int32, 0),
        top_p=col(lambda p: 1.0 if p.top_p is None else p.top_p, np.float32, 1.0),
        seed=col(lambda p: p.seed & 0xFFFFFFFF, np.uint32, 0),
        sample_index=np.array([s.sample_index if s else 0 for s in samples], np.int32),
    )


class Engine:
    """Continuous-batching sampler over a fixed set of constant-size slots.

    Args:
      config: Model hyper-parameters.
      params: Parameter tree (its dtype is the compute dtype).
      tokenizer: ``griffin_batch.model.tokenizer.Tokenizer``.
      engine_config: Sizing; see ``EngineConfig``.
    """

    def __init__(self, config: GriffinConfig, params: at.Params, tokenizer,
                 engine_config: EngineConfig | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.engine_config = ec = engine_config or EngineConfig()
        self.mesh = sharding.make_mesh(ec.num_devices, ec.model_parallel)
        data_size = self.mesh.shape[sharding.DATA]
        if ec.num_slots % data_size:
            raise ValueError(f"EngineConfig.num_slots={ec.num_slots} must be a multiple of the "
                             f"{data_size} data-parallel device groups the engine spans")
        self._by_slot = sharding.slot_sharding(self.mesh)
        self._replicated = sharding.replicated(self.mesh)
        self.params = jax.device_put(params, sharding.param_shardings(params, self.mesh))
        self.dtype = griffin.param_dtype(params)
        # XLA:CPU copies weight slices inside the decode loop on every step, so
        # on CPU the engine keeps them pre-sliced (extra memory: the MLP's
        # up-projection, a third of the non-embedding weights). Other backends
        # fuse the slices into the matmuls and need nothing.
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self._hoisted = jax.jit(griffin.hoist)(self.params) if on_cpu else {}
        self.cache = jax.device_put(griffin.init_cache(config, ec.num_slots, self.dtype),
                                    self._by_slot)
        self._slots: list[_Sample | None] = [None] * ec.num_slots
        # Chunks computed but not yet yielded, with their (request, sample or None).
        # A decode round advances every slot's cache at once, so its chunks wait
        # here and snapshots taken between yields can account for them.
        self._outbox: collections.deque[tuple[Request, _Sample | None, Chunk]] = (
            collections.deque())
        self._always_stop = frozenset(getattr(tokenizer, "stop_token_ids", ()) or ())
        self._rings = ring_buckets(ec.min_ring, config.attention_window_size)
        # The current stream's queue and prefill group, for snapshots.
        self._pending = _Pending(())
        self._group: _PrefillGroup | None = None
        # Decode rounds and prefill chunks run so far: rises while the engine
        # works, so a watchdog can tell a busy engine from a hung one.
        self.rounds_done = 0

    # Public API -----------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yields one ``Completion`` per (request, sample) as each finishes."""
        parts: dict[tuple[str, int], list[Chunk]] = collections.defaultdict(list)
        for chunk in self.stream(requests):
            key = (chunk.request_id, chunk.sample_index)
            parts[key].append(chunk)
            if chunk.finish_reason is not None:
                yield _completion(parts.pop(key))

    def stream(self, requests: Iterable[Request],
               resume: Iterable[SlotSnapshot] = ()) -> Iterator[Chunk]:
        """Serves ``requests`` (and restored ``resume`` snapshots), yielding output chunks.

        Requests are pulled lazily from the iterable as slots free up, so it may
        be an unbounded generator, and one fed while the engine runs: a feed
        that yields ``NOTHING_YET`` keeps the stream open (the engine decodes
        what it holds and asks again) until it ends. The feed may also yield
        ``SlotSnapshot``s, which continue where they were taken, ahead of new
        requests. Invalid requests yield a single error chunk per sample; the
        rest go on.
        """
        ec = self.engine_config
        self._pending = pending = _Pending(requests, longest_first=ec.longest_first,
                                           lookahead=ec.lookahead or 4 * ec.num_slots)
        for snap in resume:
            pending.add_snapshot(snap)
        restored = pending.restored
        self._group = None
        while True:
            while restored and (restored[0].cache is None or self._free_slots()):
                self._restore(restored.popleft())
            yield from self._deliver()
            # Up to prefill_chunks_per_round chunks before the next decode round:
            # short prompts fill every free slot at once, while a long prompt
            # still advances only that many chunks between decode rounds.
            for _ in range(self.engine_config.prefill_chunks_per_round):
                if self._group is None and self._free_slots():
                    self._group, errors = self._start_group(pending)
                    self._outbox.extend(errors)
                    yield from self._deliver()
                if self._group is None:
                    break
                self._group.advance(self)
                self.rounds_done += 1
                if self._group.done:
                    self._finish_group(self._group)
                    self._group = None
                    yield from self._deliver()
            if any(self._slots):
                self._decode_round()
                yield from self._deliver()
            elif (self._group is None and not restored and not self._has_pending(pending)
                  and pending.exhausted):
                return

    def _deliver(self) -> Iterator[Chunk]:
        while self._outbox:
            yield self._outbox.popleft()[2]  # popped first: a snapshot now excludes it

    def snapshot(self) -> list[SlotSnapshot]:
        """Snapshots every sample the engine holds and every chunk not yet handed out.

        Call between ``stream`` iterations. Decoding samples carry their state;
        samples still prefilling and requests already pulled from the caller's
        iterable but not started come back as ``pending`` snapshots (prefilled
        again on resume). Chunks yielded so far plus the output of
        ``stream(rest, resume=snapshot)``, where ``rest`` is what the caller's
        iterable has not yet yielded, equal an uninterrupted run.
        """
        undelivered: dict[int, tuple[Request, _Sample | None, list[Chunk]]] = {}
        for request, s, chunk in self._outbox:
            key = id(s) if s is not None else id(chunk)
            undelivered.setdefault(key, (request, s, []))[2].append(chunk)
        out = []
        decoding = [slot for slot, s in enumerate(self._slots) if isinstance(s, _Sample)]
        # One transfer of the whole slot array, then host-side copies per row.
        host = jax.device_get(self.cache) if decoding else None
        for slot in decoding:
            s = self._slots[slot]
            row = jax.tree.map(lambda x, i=slot: np.array(x[i : i + 1]), host)
            out.append(SlotSnapshot(
                request=s.request, sample_index=s.sample_index, prompt_len=len(s.prompt),
                generated=s.generated, last_token=s.last_token, cache=row,
                text_state=s.text.state(),
                undelivered=undelivered.pop(id(s), (None, s, []))[2]))
        out.extend(self._pending.restored)  # restored, still waiting for a slot
        not_started = [(r.sample.request, r.sample.sample_index, len(r.sample.prompt))
                       for r in self._slots if isinstance(r, _Reserved)]
        not_started += [(request, index, 0) for request, index in self._pending.items()]
        out.extend(SlotSnapshot(request=request, sample_index=index, prompt_len=prompt_len,
                                generated=0, last_token=0, cache=None, text_state=None,
                                pending=True)
                   for request, index, prompt_len in not_started)
        for request, s, chunks in undelivered.values():  # finished or rejected samples
            out.append(SlotSnapshot(
                request=request, sample_index=chunks[0].sample_index,
                prompt_len=chunks[0].num_prompt_tokens, generated=s.generated if s else 0,
                last_token=s.last_token if s else 0, cache=None, text_state=None,
                undelivered=chunks))
        return out

    @property
    def between_rounds(self) -> bool:
        """Every computed chunk has been handed out (a snapshot then has no ``undelivered``)."""
        return not self._outbox

    def compile_counts(self) -> dict[str, int]:
        """How many programs each compiled function holds (bounded by design)."""
        return {f.__name__: f._cache_size() for f in
                (_decode, _prefill_chunk, _first_tokens, _insert)}

    def _on_slots(self, cache):
        # Keep the slot axis split over devices whatever XLA propagated (no-op if so).
        return jax.device_put(cache, self._by_slot)

    # Request intake ---------------------------------------------------------
    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    @staticmethod
    def _has_pending(pending) -> bool:
        return pending.peek() is not None

    def _validate(self, request: Request, sample_index: int) -> _Sample:
        p = request.params
        if not isinstance(p, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(p).__name__}")
        p.validate(self.config.vocab_size)
        prompt = request.prompt
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise RequestError("prompt has no tokens")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"prompt token ids {bad[:5]} are outside [0, "
                                   f"{self.config.vocab_size})")
        limit = self.engine_config.max_prompt_tokens
        if len(ids) > limit:
            raise RequestError(f"prompt has {len(ids)} tokens, over the limit of {limit}")
        return _Sample(request=request, sample_index=sample_index, prompt=ids,
                       stop_ids=self._always_stop | frozenset(p.stop_token_ids),
                       text=TextStream(self.tokenizer.stream_decoder(), tuple(p.stop)))

    def _start_group(self, pending) -> tuple[_PrefillGroup | None, list]:
        free = self._free_slots()
        want = min(len(free), self.engine_config.prefill_batch)
        samples, errors = [], []
        while len(samples) < want and (item := pending.pop()) is not None:
            request, index = item
            try:
                samples.append(self._validate(request, index))
            except RequestError as e:
                errors.append((request, None, Chunk(request.request_id, index, "", [],
                                                    finish_reason="error", error=str(e))))
        if not samples:
            return None, errors
        for slot, s in zip(free, samples, strict=False):
            self._slots[slot] = _Reserved(s)
        return _PrefillGroup(samples, free[: len(samples)], self), errors

    def _finish_group(self, group: _PrefillGroup) -> None:
        # Samples of one request share a prefilled row: copy it into each slot.
        width = _pow2_at_least(len(group.samples), _MIN_GROUP)
        rows = _row_params(group.samples + [None] * (width - len(group.samples)))
        row_of = np.zeros(width, np.int32)
        row_of[: len(group.row_of)] = group.row_of
        tokens, logprobs = _first_tokens(group.last_logits, row_of, rows)
        slots = np.full(width, self.engine_config.num_slots, np.int32)
        slots[: len(group.slots)] = group.slots
        self.cache = self._on_slots(_insert(self.cache, group.cache, row_of, jnp.asarray(slots)))
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for i, (slot, s) in enumerate(zip(group.slots, group.samples, strict=True)):
            self._slots[slot] = s
            self._outbox.extend((s.request, s, c)
                                for c in self._emit(slot, s, tokens[i : i + 1], logprobs[i : i + 1]))

    # Decoding -----------------------------------------------------------------
    def _ring_limit(self, steps: int) -> int | None:
        window = self.config.attention_window_size
        top = max((s.position + steps for s in self._slots if isinstance(s, _Sample)), default=0)
        limit = next((b for b in self._rings if b > top), None)
        return None if limit is None or limit >= window else limit

    def _decode_round(self) -> None:
        ec = self.engine_config
        live = [s if isinstance(s, _Sample) else None for s in self._slots]
        if not any(live):
            return
        last = np.array([s.last_token if s else 0 for s in live], np.int32)
        pos = np.array([s.position if s else -1 for s in live], np.int32)
        idx = np.array([s.generated if s else 0 for s in live], np.int32)
        cache, tokens, logprobs = _decode(
            self.config, self.params, self._hoisted, self.cache, last, pos, idx, _row_params(live),
            steps=ec.decode_steps, ring_limit=self._ring_limit(ec.decode_steps),
            scan=ec.scan_implementation)
        self.cache = self._on_slots(cache)
        self.rounds_done += 1
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for slot, s in enumerate(live):
            if s is not None:
                self._outbox.extend((s.request, s, c)
                                    for c in self._emit(slot, s, tokens[slot], logprobs[slot]))

    def _emit(self, slot: int, s: _Sample, tokens: np.ndarray, logprobs: np.ndarray
              ) -> Iterator[Chunk]:
        """Accounts new tokens of a sample; frees its slot when it finishes.

        Tokens after the sample's end (stop token, stop string, length) were
        computed inside the same K-step call but are never emitted.
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
        if reason is not None:
            self._slots[slot] = None
        if keep or reason is not None:
            yield Chunk(s.request.request_id, s.sample_index, text, keep, lps, reason,
                        num_prompt_tokens=len(s.prompt))

    # Snapshots ----------------------------------------------------------------
    def _restore(self, snap: SlotSnapshot) -> None:
        if snap.cache is None:  # nothing left to compute, only chunks to hand out
            self._outbox.extend((snap.request, None, c) for c in snap.undelivered)
            return
        s = self._validate(snap.request, snap.sample_index)
        if len(s.prompt) != snap.prompt_len:
            raise ValueError(f"snapshot of {snap.request.request_id!r} was taken with another "
                             f"tokenizer: its prompt has {snap.prompt_len} tokens here "
                             f"{len(s.prompt)}")
        s.generated, s.last_token = snap.generated, snap.last_token
        s.text.load_state(snap.text_state)
        slot = self._free_slots()[0]
        row = jax.device_put(snap.cache, self._replicated)
        self.cache = self._on_slots(_insert(self.cache, row, np.zeros(1, np.int32),
                                            jnp.asarray([slot], jnp.int32)))
        self._slots[slot] = s
        self._outbox.extend((snap.request, s, c) for c in snap.undelivered)


@dataclasses.dataclass
class _Reserved:
    """A slot held for a sample that is still prefilling (not decoded yet)."""

    sample: _Sample


class _PrefillGroup:
    """Prompts prefilled together, one chunk per engine iteration.

    The n samples of one request share one row: its prompt is prefilled once.
    """

    def __init__(self, samples: list[_Sample], slots: list[int], engine: Engine):
        ec = engine.engine_config
        self.samples, self.slots = samples, slots
        row_by_request: dict[int, int] = {}
        self.row_of = [row_by_request.setdefault(id(s.request), len(row_by_request))
                       for s in samples]
        self.prompts = [None] * len(row_by_request)
        for s, row in zip(samples, self.row_of, strict=True):
            self.prompts[row] = s.prompt
        # At least two rows: XLA:CPU compiles a one-row batch differently (other
        # fusions, other bf16 rounding), and a prompt must prefill to the same
        # state whatever its group, or a retried shard would not reproduce it.
        self.size = _pow2_at_least(len(self.prompts), _MIN_GROUP)
        self.lengths = np.zeros(self.size, np.int64)
        self.lengths[: len(self.prompts)] = [len(p) for p in self.prompts]
        self.offset = 0
        self.cache = jax.device_put(
            griffin.init_cache(engine.config, self.size, engine.dtype), engine._replicated)
        self.last_logits = jnp.zeros((self.size, engine.config.vocab_size), jnp.float32)
        self.chunk = ec.chunk_size
        self.done = False

    def advance(self, engine: Engine) -> None:
        remaining = int(self.lengths.max()) - self.offset
        length = min(self.chunk, _pow2_at_least(remaining, _MIN_CHUNK))
        tokens = np.zeros((self.size, length), np.int32)
        positions = np.full((self.size, length), -1, np.int32)
        for i, prompt in enumerate(self.prompts):
            piece = prompt[self.offset : self.offset + length]
            tokens[i, : len(piece)] = piece
            positions[i, : len(piece)] = np.arange(self.offset, self.offset + len(piece))
        self.cache, logits = _prefill_chunk(
            engine.config, engine.params, self.cache, tokens, positions,
            scan=engine.engine_config.scan_implementation)
        # Keep the logits of rows whose prompt ended in this chunk.
        ends = (self.lengths > self.offset) & (self.lengths <= self.offset + length)
        self.last_logits = jnp.where(jnp.asarray(ends)[:, None], logits, self.last_logits)
        self.offset += length
        self.done = self.offset >= self.lengths.max()


class _Pending:
    """Lazily expands requests into (request, sample_index) items.

    With ``longest_first``, up to ``lookahead`` items are pulled from the
    iterable and the one with the largest ``max_tokens`` (arrival order among
    equals) is handed out first; otherwise items leave in arrival order.
    """

    def __init__(self, requests: Iterable[Request], *, longest_first: bool = False,
                 lookahead: int = 1):
        self._it = iter(requests)
        self._heap: list[tuple[float, int, tuple[Request, int]]] = []
        self._lookahead = max(lookahead, 1) if longest_first else 1
        self._longest_first = longest_first
        self._arrived = 0
        self._exhausted = False
        # Snapshots of samples that were decoding, waiting for a free slot.
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

    def peek(self):
        self._fill()
        return self._heap[0][2] if self._heap else None

    def pop(self):
        self._fill()
        return heapq.heappop(self._heap)[2] if self._heap else None


def _completion(chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    logprobs = None
    if any(c.logprobs is not None for c in chunks):
        logprobs = [x for c in chunks for x in (c.logprobs or [])]
    return Completion(
        request_id=last.request_id, sample_index=last.sample_index,
        tokens=[t for c in chunks for t in c.tokens], text="".join(c.text for c in chunks),
        finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
        error=last.error, logprobs=logprobs)


def sample(config: GriffinConfig, params: at.Params, tokenizer, prompts: list[str], *,
           max_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, stop: Sequence[str] | None = None,
           chunk_size: int | None = None, num_slots: int | None = None,
           decode_steps: int = 32) -> list[Completion]:
    """Completes ``prompts`` and returns one ``Completion`` each, in prompt order.

    Prompts are encoded as the reference sampler does (BOS, then the ids).
    Invalid prompts come back with ``finish_reason == "error"``.
    """
    params_ = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop=tuple(stop or ()))
    n_dev = jax.local_device_count()
    slots = num_slots or max(n_dev, _pow2_at_least(min(len(prompts), 32)))
    slots = -(-slots // n_dev) * n_dev
    engine = Engine(config, params, tokenizer, EngineConfig(
        num_slots=slots, decode_steps=min(decode_steps, max(max_tokens, 1)),
        chunk_size=chunk_size or 256))
    requests = [Request(request_id=str(i), prompt=p, params=params_)
                for i, p in enumerate(prompts)]
    by_id = {c.request_id: c for c in engine.generate(requests)}
    return [by_id[str(i)] for i in range(len(prompts))]
