"""The engine core: ``Engine`` runs the loop that ties the engine's parts together.

Each iteration restores snapshots waiting for a slot, admits and advances
prefill groups (``admission``, ``scheduler``, ``runner``), runs one decode
round, turns its tokens into chunks (``output_processor``) and delivers them
through an outbox, which lets ``snapshot`` account for chunks computed but
not yet handed out.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence

import jax

from griffin_batch.model import array_typing as at
from griffin_batch.model.config import GriffinConfig
from griffin_batch.model.engine import output_processor as op
from griffin_batch.model.engine.admission import AdmissionQueue, RequestValidator
from griffin_batch.model.engine.messages import OutputChunk, SlotSnapshot
from griffin_batch.model.engine.runner import ModelRunner, PrefillGroup
from griffin_batch.model.engine.scheduler import SlotScheduler, pow2_at_least, ring_buckets
from griffin_batch.model.engine_config import EngineConfig
from griffin_batch.model.requests import (
    Completion,
    Request,
    RequestError,
    SamplingParams,
    prompt_digest,
)

# A computed chunk waiting in the outbox, with its request and sample (None
# when the sample was rejected or restored already finished).
_Outgoing = tuple[Request, op.SampleState | None, OutputChunk]


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
        self._runner = ModelRunner(config, params, ec)
        self._slots = SlotScheduler(ec.num_slots,
                                    ring_buckets(ec.min_ring, config.attention_window_size),
                                    config.attention_window_size)
        self._validate = RequestValidator(tokenizer, config.vocab_size, ec.max_prompt_tokens)
        # Chunks computed but not yet yielded, with their (request, sample or None).
        # A decode round advances every slot's cache at once, so its chunks wait
        # here and snapshots taken between yields can account for them.
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        # The current stream's queue and prefill group, for snapshots.
        self._pending = AdmissionQueue(())
        self._group: PrefillGroup | None = None
        # Decode rounds and prefill chunks run so far: rises while the engine
        # works, so a watchdog can tell a busy engine from a hung one.
        self.rounds_done = 0

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The devices the engine spans."""
        return self._runner.mesh

    @property
    def params(self) -> at.Params:
        """The parameters, sharded over ``mesh``."""
        return self._runner.params

    @property
    def dtype(self):
        """The compute dtype (that of the parameters)."""
        return self._runner.dtype

    @property
    def cache(self):
        """Every slot's model state, on device."""
        return self._runner.cache

    # Public API -----------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yields one ``Completion`` per (request, sample) as each finishes."""
        parts: dict[tuple[str, int], list[OutputChunk]] = collections.defaultdict(list)
        for chunk in self.stream(requests):
            key = (chunk.request_id, chunk.sample_index)
            parts[key].append(chunk)
            if chunk.finish_reason is not None:
                yield op.completion(parts.pop(key))

    def stream(self, requests: Iterable[Request],
               resume: Iterable[SlotSnapshot] = ()) -> Iterator[OutputChunk]:
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
        self._pending = pending = AdmissionQueue(requests, longest_first=ec.longest_first,
                                                 lookahead=ec.lookahead or 4 * ec.num_slots)
        for snap in resume:
            pending.add_snapshot(snap)
        restored = pending.restored
        self._group = None
        while True:
            while restored and (restored[0].cache is None or self._slots.free()):
                self._restore(restored.popleft())
            yield from self._deliver()
            yield from self._prefill_round(pending)
            if self._slots.busy():
                self._decode_round()
                yield from self._deliver()
            elif (self._group is None and not restored and pending.peek() is None
                  and pending.exhausted):
                return

    def snapshot(self) -> list[SlotSnapshot]:
        """Snapshots every sample the engine holds and every chunk not yet handed out.

        Call between ``stream`` iterations. Decoding samples carry their state;
        samples still prefilling and requests already pulled from the caller's
        iterable but not started come back as ``pending`` snapshots (prefilled
        again on resume). Chunks yielded so far plus the output of
        ``stream(rest, resume=snapshot)``, where ``rest`` is what the caller's
        iterable has not yet yielded, equal an uninterrupted run.
        """
        undelivered = self._undelivered()
        decoding = self._slots.decoding()
        out = []
        for slot, row in zip(decoding, self._runner.read_slots(decoding), strict=True):
            s = self._slots.slots[slot]
            out.append(SlotSnapshot(
                request=s.request, sample_index=s.sample_index, prompt_len=len(s.prompt),
                generated=s.generated, last_token=s.last_token, cache=row,
                text_state=s.text.state(),
                undelivered=undelivered.pop(id(s), (None, s, []))[2]))
        out.extend(self._pending.restored)  # restored, still waiting for a slot
        not_started = [(s.request, s.sample_index, len(s.prompt))
                       for s in self._slots.reserved()]
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
        return self._runner.compile_counts()

    def compile_decode(self, max_position: int | None = None) -> None:
        """Compiles every decode program a run whose positions stay below
        ``max_position`` (None: any) can use, so that none compiles mid-run.
        Runs each once on idle slots; call it between runs."""
        for limit in self._slots.ring_limits(max_position):
            self._runner.compile_decode(limit, self._slots.row_rings(limit))

    # Admission and prefill ----------------------------------------------------
    def _prefill_round(self, pending: AdmissionQueue) -> Iterator[OutputChunk]:
        # Up to prefill_chunks_per_round chunks before the next decode round:
        # short prompts fill every free slot at once, while a long prompt
        # still advances only that many chunks between decode rounds.
        for _ in range(self.engine_config.prefill_chunks_per_round):
            if self._group is None and self._slots.free():
                self._group = self._start_group(pending)
                yield from self._deliver()
            if self._group is None:
                break
            self._group.advance(self._runner)
            self.rounds_done += 1
            if self._group.done:
                self._finish_group(self._group)
                self._group = None
                yield from self._deliver()

    def _start_group(self, pending: AdmissionQueue) -> PrefillGroup | None:
        """Admits up to ``prefill_batch`` samples into free slots; rejects get an error chunk."""
        want = min(len(self._slots.free()), self.engine_config.prefill_batch)
        samples = []
        while len(samples) < want and (item := pending.pop()) is not None:
            request, index = item
            try:
                samples.append(self._validate(request, index))
            except RequestError as e:
                self._outbox.append((request, None, op.error_chunk(request, index, str(e))))
            except Exception as e:  # noqa: BLE001 - one request's problem is its own error
                self._outbox.append((request, None, op.error_chunk(request, index, _failure(e))))
        if not samples:
            return None
        return self._runner.start_prefill(self._slots.plan_prefill(samples))

    def _finish_group(self, group: PrefillGroup) -> None:
        tokens, logprobs = self._runner.finish_prefill(group)
        plan = group.plan
        for i, (slot, s) in enumerate(zip(plan.slots, plan.samples, strict=True)):
            self._slots.occupy(slot, s)
            self._emit(slot, s, tokens[i : i + 1], logprobs[i : i + 1])

    # Decoding -----------------------------------------------------------------
    def _decode_round(self) -> None:
        plan = self._slots.plan_decode(self.engine_config.decode_steps)
        if plan is None:
            return
        tokens, logprobs = self._runner.decode(plan)
        self.rounds_done += 1
        for slot, s in enumerate(plan.samples):
            if s is not None:
                self._emit(slot, s, tokens[slot], logprobs[slot])

    def _emit(self, slot: int, s: op.SampleState, tokens, logprobs) -> None:
        """Puts a sample's chunk of new tokens in the outbox; frees its slot when it finishes.

        Host work on one sample's output (detokenizing, stop strings) that
        raises ends that sample with an error; the others go on.
        """
        try:
            chunk = op.process_tokens(s, tokens, logprobs)
        except Exception as e:  # noqa: BLE001 - one request's problem is its own error
            chunk = op.error_chunk(s.request, s.sample_index, _failure(e))
        if chunk is None:
            return
        if chunk.finish_reason is not None:
            self._slots.release(slot)
        self._outbox.append((s.request, s, chunk))

    def _deliver(self) -> Iterator[OutputChunk]:
        while self._outbox:
            yield self._outbox.popleft()[2]  # popped first: a snapshot now excludes it

    # Snapshots ----------------------------------------------------------------
    def _undelivered(self) -> dict[int, tuple[Request, op.SampleState | None,
                                              list[OutputChunk]]]:
        """The outbox by sample (keyed by its id, or by the chunk's id when it has none)."""
        undelivered: dict[int, tuple[Request, op.SampleState | None, list[OutputChunk]]] = {}
        for request, s, chunk in self._outbox:
            key = id(s) if s is not None else id(chunk)
            undelivered.setdefault(key, (request, s, []))[2].append(chunk)
        return undelivered

    def _restore(self, snap: SlotSnapshot) -> None:
        if snap.cache is None:  # nothing left to compute, only chunks to hand out
            self._outbox.extend((snap.request, None, c) for c in snap.undelivered)
            return
        if (snap.prompt_digest is not None
                and prompt_digest(snap.request.prompt) != snap.prompt_digest):
            # Stored state keeps only its prompt's digest: the caller hands the
            # request back (its input row), and a state must never continue another prompt.
            raise ValueError(f"snapshot of {snap.request.request_id!r} was taken for another "
                             "prompt (its prompt digest differs); restore it with its own "
                             "request")
        s = self._validate(snap.request, snap.sample_index)
        if len(s.prompt) != snap.prompt_len:
            raise ValueError(f"snapshot of {snap.request.request_id!r} was taken with another "
                             f"tokenizer: its prompt has {snap.prompt_len} tokens here "
                             f"{len(s.prompt)}")
        s.generated, s.last_token = snap.generated, snap.last_token
        s.text.load_state(snap.text_state)
        slot = self._slots.free()[0]
        self._runner.load_slot(slot, snap.cache)
        self._slots.occupy(slot, s)
        self._outbox.extend((snap.request, s, c) for c in snap.undelivered)


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
    slots = num_slots or max(n_dev, pow2_at_least(min(len(prompts), 32)))
    slots = -(-slots // n_dev) * n_dev
    engine = Engine(config, params, tokenizer, EngineConfig(
        num_slots=slots, decode_steps=min(decode_steps, max(max_tokens, 1)),
        chunk_size=chunk_size or 256))
    requests = [Request(request_id=str(i), prompt=p, params=params_)
                for i, p in enumerate(prompts)]
    by_id = {c.request_id: c for c in engine.generate(requests)}
    return [by_id[str(i)] for i in range(len(prompts))]


def _failure(error: Exception) -> str:
    """A request's error text for an unexpected exception while serving it."""
    return f"failed while serving this request: {type(error).__name__}: {error}"[:500]
