"""The device runner: compiled functions, the device state, and the work done on device.

``ModelRunner`` holds the mesh, the sharded parameters (and on CPU their
hoisted slices) and the slot cache, the fixed-size model state of every slot,
which lives on device and is donated to every compiled call. It runs what the
scheduler plans: prefill groups chunk by chunk (``PrefillGroup``), their
first tokens and the copy of their state into slots, and decode rounds.

Compilation is bounded by design: prefill chunk lengths and group sizes are
powers of two, and decode compiles once per attention-ring bucket for every
slot and once for each smaller batch (a quarter, a half of the slots) of a
round with few busy slots.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from griffin_batch.kernels.decode_attention import api as decode_attention_api
from griffin_batch.model import array_typing as at
from griffin_batch.model import griffin, sharding
from griffin_batch.model.config import GriffinConfig
from griffin_batch.model.engine.output_processor import SampleState
from griffin_batch.model.engine.scheduler import DecodePlan, PrefillPlan, pow2_at_least
from griffin_batch.model.engine_config import EngineConfig
from griffin_batch.model.sampling import RowParams, sample_tokens, seed_words

MIN_CHUNK = 16  # smallest prefill chunk bucket
MIN_GROUP = 2  # smallest prefill group (see PrefillGroup)


# Compiled device functions --------------------------------------------------

@functools.partial(jax.jit,
                   static_argnames=("config", "steps", "ring_limit", "row_rings", "scan", "attention"),
                   donate_argnames=("cache",))
def _decode(config, params, hoisted, cache, last_tokens, positions, token_index, rows, *,
            steps, ring_limit, row_rings, scan, attention):
    """``steps`` decode steps for every slot; inactive slots have position -1.

    ``hoisted``: ``griffin.hoist(params)`` or {} (see ``ModelRunner.__init__``).
    ``row_rings``: per-slot ring lengths (``DecodePlan.row_rings``) or None.
    ``scan``, ``attention``: the RG-LRU scan and decode attention backends.
    """

    def step(carry, _):
        cache, tokens, pos, idx = carry
        logits, cache = griffin.apply(config, params, tokens[:, None], pos[:, None], cache,
                                      ring_limit=ring_limit, row_rings=row_rings,
                                      scan_implementation=scan,
                                      attention_implementation=attention,
                                      hoisted=hoisted)
        nxt, logprob = sample_tokens(logits[:, 0], rows, idx)
        pos = jnp.where(pos >= 0, pos + 1, -1)
        return (cache, nxt, pos, idx + 1), (nxt, logprob)

    (cache, _, _, _), (tokens, logprobs) = jax.lax.scan(
        step, (cache, last_tokens, positions, token_index), None, length=steps)
    return cache, tokens.T, logprobs.T  # [S, K]


@functools.partial(jax.jit,
                   static_argnames=("config", "steps", "ring_limit", "row_rings", "scan", "attention"),
                   donate_argnames=("cache",))
def _decode_slots(config, params, hoisted, cache, slots, last_tokens, positions, token_index,
                  rows, *, steps, ring_limit, row_rings, scan, attention):
    """``_decode`` over the slots ``slots`` [k] alone (distinct; k < the slot count).

    Their rows of the cache are gathered, decoded as a batch of k and written
    back; no other slot is read or written. The per-row arguments are the
    chosen slots' own, in ``slots``' order. Returns tokens and logprobs [k, K].
    """
    rows_cache = jax.tree.map(lambda c: c[slots], cache)
    rows_cache, tokens, logprobs = _decode(
        config, params, hoisted, rows_cache, last_tokens, positions, token_index, rows,
        steps=steps, ring_limit=ring_limit, row_rings=row_rings, scan=scan, attention=attention)
    cache = jax.tree.map(lambda c, r: c.at[slots].set(r), cache, rows_cache)
    return cache, tokens, logprobs


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


_COMPILED = (_decode, _decode_slots, _prefill_chunk, _first_tokens, _insert)


def _row_params(samples: Sequence[SampleState | None]) -> RowParams:
    def col(fn, dtype, default):
        return np.array([fn(s.params) if s else default for s in samples], dtype)

    return RowParams(
        temperature=col(lambda p: p.temperature, np.float32, 0.0),
        top_k=col(lambda p: p.top_k or 0, np.int32, 0),
        top_p=col(lambda p: 1.0 if p.top_p is None else p.top_p, np.float32, 1.0),
        seed=np.array([seed_words(s.params.seed) if s else (0, 0) for s in samples],
                      np.uint32).reshape(len(samples), 2),
        sample_index=np.array([s.sample_index if s else 0 for s in samples], np.int32),
    )


class PrefillGroup:
    """Prompts prefilled together with their own cache, one chunk per ``advance``.

    Attributes:
      plan: the samples, their slots and prompt rows.
      cache: the group's model state, one row per prompt (padded).
      last_logits: per row, the logits at its prompt's last token once consumed.
      done: every prompt is consumed.
    """

    def __init__(self, plan: PrefillPlan, runner: ModelRunner):
        self.plan = plan
        # At least two rows: XLA:CPU compiles a one-row batch differently (other
        # fusions, other bf16 rounding), and a prompt must prefill to the same
        # state whatever its group, or a retried shard would not reproduce it.
        self.size = pow2_at_least(len(plan.prompts), MIN_GROUP)
        self.lengths = np.zeros(self.size, np.int64)
        self.lengths[: len(plan.prompts)] = [len(p) for p in plan.prompts]
        self.offset = 0
        self.cache = jax.device_put(
            griffin.init_cache(runner.config, self.size, runner.dtype), runner.replicated)
        self.last_logits = jnp.zeros((self.size, runner.config.vocab_size), jnp.float32)
        self.chunk = runner.engine_config.chunk_size
        self.done = False
        self._alone: tuple[int, Any] | None = None  # (row, its state) prefilling alone

    def advance(self, runner: ModelRunner) -> None:
        """Prefills the next chunk of every prompt."""
        remaining = int(self.lengths.max()) - self.offset
        length = min(self.chunk, pow2_at_least(remaining, MIN_CHUNK))
        active = np.flatnonzero(self.lengths > self.offset)
        if len(active) == 1 and self.lengths[active[0]] > self.offset + length:
            self._advance_alone(runner, int(active[0]), length)
            return
        self._rejoin()
        tokens = np.zeros((self.size, length), np.int32)
        positions = np.full((self.size, length), -1, np.int32)
        for i, prompt in enumerate(self.plan.prompts):
            piece = prompt[self.offset : self.offset + length]
            tokens[i, : len(piece)] = piece
            positions[i, : len(piece)] = np.arange(self.offset, self.offset + len(piece))
        self.cache, logits = _prefill_chunk(
            runner.config, runner.params, self.cache, tokens, positions,
            scan=runner.engine_config.scan_implementation)
        # Keep the logits of rows whose prompt ended in this chunk.
        ends = (self.lengths > self.offset) & (self.lengths <= self.offset + length)
        self.last_logits = jnp.where(jnp.asarray(ends)[:, None], logits, self.last_logits)
        self.offset += length
        self.done = self.offset >= self.lengths.max()

    def _advance_alone(self, runner: ModelRunner, row: int, length: int) -> None:
        """A full chunk of the one prompt still prefilling, on a one-row state of its own.

        The other rows would only be padding, as costly as a prompt. Only chunks
        that do not end the prompt run alone: a one-row batch gives the same
        state on XLA:CPU, but other logits (its last matmul is a matrix-vector
        product), so the chunk that ends it, whose logits give its first token,
        runs in the group again (``_rejoin``) and a retried prompt reproduces.
        """
        if self._alone is None:
            self._alone = (row, jax.tree.map(lambda c: c[row : row + 1], self.cache))
        piece = self.plan.prompts[row][self.offset : self.offset + length]
        positions = np.arange(self.offset, self.offset + length, dtype=np.int32)[None]
        cache, _ = _prefill_chunk(runner.config, runner.params, self._alone[1], piece[None],
                                  positions, scan=runner.engine_config.scan_implementation)
        self._alone = (row, cache)
        self.offset += length

    def _rejoin(self) -> None:
        """Copies the state of a row that prefilled alone back into the group's."""
        if self._alone is not None:
            row, cache = self._alone
            self.cache = _insert(self.cache, cache, np.zeros(1, np.int32),
                                 jnp.asarray([row], jnp.int32))
            self._alone = None


class ModelRunner:
    """The engine's device side: sharded parameters and the slot cache.

    Args:
      config: Model hyper-parameters.
      params: Parameter tree (its dtype is the compute dtype).
      engine_config: Sizing; see ``EngineConfig``.

    Attributes:
      mesh: the devices the engine spans.
      params: the parameters, sharded over ``mesh``.
      dtype: the compute dtype.
      cache: every slot's model state, split over the mesh's data axis.
    """

    def __init__(self, config: GriffinConfig, params: at.Params, engine_config: EngineConfig):
        self.config = config
        self.engine_config = ec = engine_config
        self.mesh = sharding.make_mesh(ec.num_devices, ec.model_parallel)
        data_size = self.mesh.shape[sharding.DATA]
        if ec.num_slots % data_size:
            raise ValueError(f"EngineConfig.num_slots={ec.num_slots} must be a multiple of the "
                             f"{data_size} data-parallel device groups the engine spans")
        self._by_slot = sharding.slot_sharding(self.mesh)
        self.replicated = sharding.replicated(self.mesh)
        self.params = jax.device_put(params, sharding.param_shardings(params, self.mesh))
        self.dtype = griffin.param_dtype(params)
        # XLA:CPU copies weight slices inside the decode loop on every step, so
        # on CPU the engine keeps them pre-sliced (extra memory: the MLP's
        # up-projection, a third of the non-embedding weights). Other backends
        # fuse the slices into the matmuls and need nothing.
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self._hoisted = jax.jit(griffin.hoist)(self.params) if on_cpu else {}
        # Each slot attends over its own ring length. On TPU/GPU a Pallas
        # kernel reads each row's filled ring entries itself, so decode needs no
        # ring bucket and compiles once. With XLA, on CPU, a loop over slots picks a
        # branch per bucket; elsewhere XLA's per-slot loop would run one small
        # kernel per slot, so decode attends over the batch's ring bucket.
        self._attention = decode_attention_api.resolve_implementation(
            ec.attention_implementation, platform=self.mesh.devices.flat[0].platform)
        self._attention_kernel = decode_attention_api.is_kernel(self._attention)
        self._per_row_rings = on_cpu and not self._attention_kernel
        # With few slots decoding (the tail of a run, a draining worker), a
        # round decodes a smaller batch of just those slots, a quarter or half
        # of the slots: a round costs nearly as much for idle rows as for busy
        # ones (``benchmarks/bench_tail.py``). Two sizes only, so decode
        # programs at most triple. One device group only: gathering slots
        # across groups would move state between devices.
        sizes = {max(MIN_GROUP, ec.num_slots // 4), max(MIN_GROUP, ec.num_slots // 2)}
        self._compact_sizes = sorted(k for k in sizes if k < ec.num_slots and data_size == 1)
        self.cache = jax.device_put(griffin.init_cache(config, ec.num_slots, self.dtype),
                                    self._by_slot)
        self._warm_decode: set[tuple] = set()  # decode programs compile_decode has run

    def start_prefill(self, plan: PrefillPlan) -> PrefillGroup:
        """A prefill group for ``plan``, with a fresh cache of its own."""
        return PrefillGroup(plan, self)

    def finish_prefill(self, group: PrefillGroup) -> tuple[np.ndarray, np.ndarray]:
        """Samples each sample's first token and copies its row's state into its slot.

        Returns:
          (tokens, logprobs), host arrays with one entry per sample of the
          plan, then padding.
        """
        plan, ec = group.plan, self.engine_config
        # Samples of one request share a prefilled row: copy it into each slot.
        width = pow2_at_least(len(plan.samples), MIN_GROUP)
        rows = _row_params(plan.samples + [None] * (width - len(plan.samples)))
        row_of = np.zeros(width, np.int32)
        row_of[: len(plan.row_of)] = plan.row_of
        tokens, logprobs = _first_tokens(group.last_logits, row_of, rows)
        slots = np.full(width, ec.num_slots, np.int32)
        slots[: len(plan.slots)] = plan.slots
        self.cache = self._on_slots(_insert(self.cache, group.cache, row_of, jnp.asarray(slots)))
        return np.asarray(tokens), np.asarray(logprobs)

    def decode(self, plan: DecodePlan) -> tuple[np.ndarray, np.ndarray]:
        """Runs one decode round; returns host (tokens, logprobs), both [num_slots, steps].

        When at most half of the slots decode, the round runs on a batch of
        just those slots, padded with idle ones to a quarter or half of the
        slots, whichever holds them (at least ``MIN_GROUP``); idle slots'
        entries are then zero.
        """
        ec = self.engine_config
        static = self._decode_static(plan.ring_limit, plan.row_rings)
        active = np.flatnonzero(plan.positions >= 0)
        size = next((k for k in self._compact_sizes if len(active) <= k), None)
        if size is None:
            with jax.set_mesh(self.mesh):  # a decode-attention kernel splits over it
                cache, tokens, logprobs = _decode(
                    self.config, self.params, self._hoisted, self.cache, plan.last_tokens,
                    plan.positions, plan.token_index, _row_params(plan.samples), **static)
            self.cache = self._on_slots(cache)
            return np.asarray(tokens), np.asarray(logprobs)
        idle = np.flatnonzero(plan.positions < 0)[: size - len(active)]
        slots = np.concatenate([active, idle]).astype(np.int32)
        with jax.set_mesh(self.mesh):
            self.cache, tokens, logprobs = _decode_slots(
                self.config, self.params, self._hoisted, self.cache, slots,
                plan.last_tokens[slots], plan.positions[slots], plan.token_index[slots],
                _row_params([plan.samples[i] for i in slots]), **static)
        self.cache = self._on_slots(self.cache)
        all_tokens = np.zeros((ec.num_slots, ec.decode_steps), np.int32)
        all_logprobs = np.zeros((ec.num_slots, ec.decode_steps), np.float32)
        all_tokens[slots], all_logprobs[slots] = np.asarray(tokens), np.asarray(logprobs)
        return all_tokens, all_logprobs

    def compile_decode(self, ring_limit: int | None, row_rings: tuple[int, ...]) -> None:
        """Compiles (and runs, on idle slots: no state changes) the decode programs
        of a ring bucket, over every slot and over each smaller batch."""
        ec = self.engine_config
        static = self._decode_static(ring_limit, row_rings)
        key = tuple(sorted(static.items()))
        if key in self._warm_decode:  # e.g. every ring bucket, with a kernel: one program
            return
        self._warm_decode.add(key)
        n = ec.num_slots
        idle = dict(last_tokens=np.zeros(n, np.int32), positions=np.full(n, -1, np.int32),
                    token_index=np.zeros(n, np.int32))
        with jax.set_mesh(self.mesh):  # as decode() runs them
            cache, tokens, _ = _decode(
                self.config, self.params, self._hoisted, self.cache, *idle.values(),
                _row_params([None] * n), **static)
            self.cache = self._on_slots(cache)  # as decode() leaves it, so the next call matches
            for k in self._compact_sizes:
                cache, tokens, _ = _decode_slots(
                    self.config, self.params, self._hoisted, self.cache,
                    np.arange(k, dtype=np.int32), *(a[:k] for a in idle.values()),
                    _row_params([None] * k), **static)
                self.cache = self._on_slots(cache)  # each call sees the cache as decode() leaves it
        np.asarray(tokens)

    def _decode_static(self, ring_limit: int | None, row_rings: tuple[int, ...]) -> dict:
        ec = self.engine_config
        if self._attention_kernel:
            ring_limit = None  # the kernel reads each row's length: one program for all
        return dict(steps=ec.decode_steps, ring_limit=ring_limit,
                    row_rings=row_rings if self._per_row_rings else None,
                    scan=ec.scan_implementation, attention=self._attention)

    def load_slot(self, slot: int, row) -> None:
        """Copies one row of model state (a host pytree, as ``read_slots`` gives) into ``slot``."""
        row = jax.device_put(row, self.replicated)
        self.cache = self._on_slots(_insert(self.cache, row, np.zeros(1, np.int32),
                                            jnp.asarray([slot], jnp.int32)))

    def read_slots(self, slots: Sequence[int]) -> list:
        """Each slot's model state as a host pytree of one row (numpy arrays)."""
        if not slots:
            return []
        # One transfer of the whole slot array, then host-side copies per row.
        host = jax.device_get(self.cache)
        return [jax.tree.map(lambda x, i=slot: np.array(x[i : i + 1]), host) for slot in slots]

    @staticmethod
    def compile_counts() -> dict[str, int]:
        """How many programs each compiled function holds (bounded by design)."""
        return {f.__name__: f._cache_size() for f in _COMPILED}

    def _on_slots(self, cache):
        # Keep the slot axis split over devices whatever XLA propagated (no-op if so).
        return jax.device_put(cache, self._by_slot)
