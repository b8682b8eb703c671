"""Griffin's building blocks as Flax modules.

Parameter names and shapes match DeepMind's reference (``recurrentgemma.jax``)
exactly, so an official Flax checkpoint loads without renaming.

Unlike the reference, every temporal block takes an explicit per-row position
array and an optional fixed-size cache, and processes any number of tokens
with that cache. One code path therefore serves a one-shot forward, chunked
prefill (chunks of any size, straddling window boundaries) and single-token
decode. Position -1 marks a padding token: it reads nothing into the state and
produces an ignored output. Padding must come after the real tokens of a row
(right padding), which is what the engine produces.
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from griffin_batch.kernels.decode_attention import api as decode_attention_api
from griffin_batch.kernels.rglru_scan import rglru_scan
from griffin_batch.model import array_typing as at
from griffin_batch.model import sharding

# Masked attention logits; the reference's constant, so softmax ties match.
_MIN_LOGITS_VALUE = -2.3819763e38
_ROPE_MAX_WAVELENGTH = 10_000
# The RG-LRU's fixed constant c in a_t = a^(c * r_t) (Griffin paper, eq. 4).
_RG_LRU_C = 8.0
_fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
# Variable collection of weights derived from "params" once per compiled call
# and read by every step of a decode loop (see ``griffin.hoist``).
HOISTED = "hoisted"


class RecurrentCache(NamedTuple):
    """State of a recurrent block: constant size whatever the sequence length.

    Attributes:
      rg_lru_state: [b, e] float32 hidden state of the RG-LRU.
      conv1d_state: [b, w, e] the last ``conv1d_width - 1`` inputs of the conv.
    """

    rg_lru_state: at.RnnState
    conv1d_state: at.ConvState


class AttentionCache(NamedTuple):
    """Ring buffer of the last ``window + 1`` keys and values of an attention block.

    A query attends to itself and the ``window`` tokens before it, so the ring
    holds window + 1 entries. The key of position p lives in slot
    ``p % (window + 1)``; ``num_tokens`` is the number of tokens the row has
    seen, so every slot's position is recoverable.

    Attributes:
      keys: [b, s, h] rotated keys (s = attention window + 1).
      values: [b, s, h] values.
      num_tokens: [b] int32 tokens seen so far.
    """

    keys: at.RingKeys
    values: at.RingKeys
    num_tokens: at.NumTokens


BlockCache = RecurrentCache | AttentionCache


def _valid(positions: at.Positions) -> jax.Array:
    return positions >= 0


def _num_valid(positions: at.Positions) -> jax.Array:
    return jnp.sum(_valid(positions), axis=-1).astype(jnp.int32)


class RMSNorm(nn.Module):
    """RMS normalisation with a zero-centred scale (``x * (1 + scale)``)."""

    width: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (self.width,))
        x, scale = nn.dtypes.promote_dtype(x, scale)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * (scale + 1)


class BlockDiagonalLinear(nn.Module):
    """Linear layer whose weight is block-diagonal with ``num_blocks`` blocks."""

    width: int
    num_blocks: int

    @nn.compact
    def __call__(self, x: at.LruActivations) -> at.LruActivations:
        size = self.width // self.num_blocks
        w = self.param("w", _fan_in_normal, (self.num_blocks, size, size))
        b = self.param("b", nn.initializers.zeros_init(), (self.num_blocks, size))
        x, w, b = nn.dtypes.promote_dtype(x, w, b)
        x = einops.rearrange(x, "... (n i) -> ... n i", n=self.num_blocks)
        y = jnp.einsum("... n i, n i j -> ... n j", x, w) + b
        return einops.rearrange(y, "... n j -> ... (n j)")


class Conv1D(nn.Module):
    """Short causal depthwise convolution carrying its last inputs as state."""

    width: int
    temporal_width: int = 4

    @nn.compact
    def __call__(
        self, x: at.LruActivations, positions: at.Positions, state: at.ConvState | None
    ) -> tuple[at.LruActivations, at.ConvState]:
        w = self.param(
            "w", nn.initializers.variance_scaling(0.01, "fan_in", "normal"),
            (self.temporal_width, self.width))
        b = self.param("b", nn.initializers.zeros_init(), (self.width,))
        x, w, b = nn.dtypes.promote_dtype(x, w, b)
        batch, t, _ = x.shape
        if state is None:
            state = jnp.zeros((batch, self.temporal_width - 1, self.width), x.dtype)
        # A row that starts a sequence in this call must not see stale inputs.
        starts = (positions[:, 0] == 0)[:, None, None]
        state = jnp.where(starts, jnp.zeros_like(state), state.astype(x.dtype))
        xc = jnp.concatenate([state, x], axis=1)  # [b, w-1+t, e]
        y = b[None, None]
        for k in range(self.temporal_width):
            y = y + xc[:, k:k + t] * w[k][None, None]
        # The new state is the last w-1 *valid* inputs; padding sits after them.
        n = _num_valid(positions)
        new_state = jax.vmap(
            lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, self.temporal_width - 1)
        )(xc, n)
        return y, new_state


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (Griffin paper, section 2.4)."""

    width: int
    num_heads: int
    scan_implementation: str | None = None

    def _a_param_init(self, key, shape, dtype=jnp.float32):
        # Reference init: |a| uniform on the ring [0.9, 0.999], stored through softplus^-1.
        unif = jax.random.uniform(key, shape)
        a_real = 0.5 * jnp.log(unif * (0.999**2 - 0.9**2) + 0.9**2 + 1e-8)
        return jnp.log(jnp.exp(-a_real) - 1.0).astype(dtype)

    @nn.compact
    def __call__(
        self, x: at.LruActivations, positions: at.Positions, h0: at.RnnState | None
    ) -> tuple[at.LruActivations, at.RnnState]:
        a_param = self.param("a_param", self._a_param_init, (self.width,))
        gate_x = jax.nn.sigmoid(BlockDiagonalLinear(self.width, self.num_heads, name="input_gate")(x))
        gate_a = jax.nn.sigmoid(BlockDiagonalLinear(self.width, self.num_heads, name="a_gate")(x))
        x, a_param = nn.dtypes.promote_dtype(x, a_param)

        log_a = -_RG_LRU_C * gate_a * jax.nn.softplus(a_param)
        a, a_squared = jnp.exp(log_a), jnp.exp(2 * log_a)
        reset = (positions == 0)[..., None]
        valid = _valid(positions)[..., None]
        # sqrt(1 - a^2) keeps the state's scale; the first token is not scaled.
        multiplier = jnp.where(reset, 1.0, jnp.sqrt(1 - a_squared))
        normalized_x = jnp.where(valid, x * gate_x * multiplier.astype(x.dtype), 0)
        # Padding leaves the state untouched (a = 1, x = 0); a reset forgets it.
        a = jnp.where(valid, jnp.where(reset, 0.0, a), 1.0).astype(x.dtype)
        if h0 is None:
            h0 = jnp.zeros((x.shape[0], self.width), jnp.float32)
        return rglru_scan(normalized_x, a, h0, implementation=self.scan_implementation)


class RecurrentBlock(nn.Module):
    """Griffin's recurrent temporal block: gelu(W_y x) * RG-LRU(Conv(W_x x))."""

    width: int
    num_heads: int
    lru_width: int
    conv1d_width: int = 4
    scan_implementation: str | None = None

    @nn.compact
    def __call__(
        self, x: at.Activations, positions: at.Positions, cache: RecurrentCache | None
    ) -> tuple[at.Activations, RecurrentCache]:
        y = jax.nn.gelu(nn.Dense(self.lru_width, kernel_init=_fan_in_normal, name="linear_y")(x))
        x = nn.Dense(self.lru_width, kernel_init=_fan_in_normal, name="linear_x")(x)
        x, conv_state = Conv1D(self.lru_width, self.conv1d_width, name="conv_1d")(
            x, positions, None if cache is None else cache.conv1d_state)
        x, lru_state = RGLRU(self.lru_width, self.num_heads, self.scan_implementation,
                             name="rg_lru")(
            x, positions, None if cache is None else cache.rg_lru_state)
        out = nn.Dense(self.width, kernel_init=_fan_in_normal, name="linear_out")(x * y)
        return out, RecurrentCache(rg_lru_state=lru_state, conv1d_state=conv_state)


def apply_rope(x: jax.Array, positions: at.Positions) -> jax.Array:
    """Rotary embedding on the first half of the head dimension; [b, t, ..., h]."""
    x_rope, x_pass = jnp.split(x, 2, axis=-1)
    half = x_rope.shape[-1] // 2
    freq_exponents = 2 * jnp.arange(half) / x_rope.shape[-1]
    inv_frequencies = 1.0 / (_ROPE_MAX_WAVELENGTH**freq_exponents)
    pos = positions.reshape(positions.shape + (1,) * (x.ndim - positions.ndim))
    sinusoid = pos * inv_frequencies
    sin, cos = jnp.sin(sinusoid).astype(x.dtype), jnp.cos(sinusoid).astype(x.dtype)
    first, second = jnp.split(x_rope, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, x_pass], -1)


def ring_positions(num_tokens: at.NumTokens, ring_len: int) -> jax.Array:
    """Position held by each ring slot: the latest p < num_tokens with p % s == slot; -1 if none."""
    slots = jnp.arange(ring_len)[None]
    last = num_tokens[:, None] - 1
    p = last - jnp.mod(last - slots, ring_len)
    return jnp.where(p >= 0, p, -1)


def write_ring(ring: jax.Array, new: jax.Array, positions: at.Positions) -> jax.Array:
    """Writes the last ``s`` valid entries of ``new`` [b, t, h] into ``ring`` [b, s, h]."""
    s, t = ring.shape[1], new.shape[1]
    n = _num_valid(positions)
    keep = _valid(positions) & (jnp.arange(t)[None] >= (n[:, None] - s))
    # Dropped entries go to slot s (out of range) and are discarded by the scatter.
    slot = jnp.where(keep, jnp.mod(positions, s), s)
    rows = jnp.arange(ring.shape[0])[:, None]
    return ring.at[rows, slot].set(new.astype(ring.dtype), mode="drop")


def _in_window(q_pos, k_pos, window: int) -> jax.Array:
    """Whether a query at ``q_pos`` sees a key at ``k_pos`` (-1: empty), broadcast: the key
    is filled, not later, and at most ``window`` tokens back."""
    return (k_pos >= 0) & (q_pos >= k_pos) & (q_pos - k_pos <= window)


def _scores(q, q_pos, keys, k_pos, window: int) -> jax.Array:
    """Masked attention logits [b, n, t, s] of queries q [b, t, n, h] at ``q_pos`` [b, t]
    against keys [b, s, h] at ``k_pos`` [b, s] (-1: empty)."""
    mask = _in_window(q_pos[:, None, :, None], k_pos[:, None, None, :], window)
    logits = jnp.einsum("btnh,bsh->bnts", q, keys.astype(q.dtype)) * q.shape[-1] ** -0.5
    return jnp.where(mask, logits, _MIN_LOGITS_VALUE).astype(jnp.float32)


def _decode_attention(q, positions, keys, values, num_tokens, *, limit: int, window: int,
                      dtype):
    """One query per row [b, 1, n, h] over the first ``limit`` slots of its ring [b, s, h].

    ``dtype``: of the probabilities, values and output (the block's activations).
    """
    ring_pos = ring_positions(num_tokens, window + 1)[:, :limit]
    probs = jax.nn.softmax(_scores(q, positions, keys[:, :limit], ring_pos, window), -1)
    return jnp.einsum("bnts,bsh->btnh", probs.astype(dtype), values[:, :limit].astype(dtype))


def _row_attention(q, position, keys, values, num_tokens, *, window: int, dtype):
    """One row's decode attention: query q [n, h] at ``position`` over the first
    slots of its ring, keys and values [l, h]; returns [n, h].

    The scores are products summed over h, not a dot: XLA:CPU feeds a dot its
    keys transposed, a copy of every key read, where the reduce reads them in
    place (per-row decode attention of the benchmark model 2.2x faster at ring
    256, 1.2-1.6x at 1024). The masked values, softmax and output are
    ``_decode_attention``'s, and so is the rounding: the sum runs in float32,
    as a dot accumulates, and the scores are rounded to the compute dtype, as
    a dot's output is (scores kept in float32 moved a bfloat16 model's
    logprobs by up to 0.09 against prefill's and the reference's rounding).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)  # bfloat16 sums would lose the scores
    scores = jnp.sum(keys[None].astype(acc) * q[:, None].astype(acc), -1).astype(q.dtype)
    logits = scores * q.shape[-1] ** -0.5
    k_pos = ring_positions(num_tokens, window + 1)[0, : keys.shape[0]]
    logits = jnp.where(_in_window(position, k_pos, window)[None], logits, _MIN_LOGITS_VALUE)
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, -1).astype(dtype)
    return probs @ values.astype(dtype)


def _filled(positions: at.Positions, num_tokens: at.NumTokens, ring_len: int) -> jax.Array:
    """[b] ring slots each decoding row attends to right after its write: slots fill
    from 0 until the ring wraps, and all of them are then inside the window; 0 for an
    inactive row (position -1)."""
    return jnp.where(positions[:, 0] >= 0, jnp.minimum(num_tokens, ring_len), 0)


def _decode_attention_per_row(q, positions, keys, values, num_tokens, *,
                              rings: tuple[int, ...], window: int, dtype):
    """``_decode_attention`` with each row's own ring length: the shortest of
    ``rings`` that holds the row's filled slots (slots fill from 0 until the
    ring wraps, so a row with n tokens needs the first min(n, s) slots).

    Rows go one at a time (``lax.map``) and ``lax.switch`` runs only the
    chosen length's branch: a batched select would pay for every branch. A
    row's matrix-vector products are as efficient alone as batched, since no
    two rows share keys. Each branch slices its row's first slots out of the
    whole ring itself: mapping over the ring's rows would copy every row's
    whole ring into the loop first.
    """
    # An inactive row (position -1) attends to nothing anyone reads: the shortest.
    need = _filled(positions, num_tokens, window + 1)
    pick = jnp.minimum(jnp.searchsorted(jnp.asarray(rings, jnp.int32), need), len(rings) - 1)

    def branch(limit):
        def attend(r):
            one = [jax.lax.dynamic_slice_in_dim(a, r, 1) for a in (q, positions, num_tokens)]
            ring = [jax.lax.dynamic_slice(a, (r, 0, 0), (1, limit, a.shape[2]))[0]
                    for a in (keys, values)]
            return _row_attention(one[0][0, 0], one[1][0, 0], *ring, one[2], window=window,
                                  dtype=dtype)[None]
        return attend

    branches = [branch(r) for r in rings]
    rows = jnp.arange(q.shape[0])
    return jax.lax.map(lambda r: jax.lax.switch(pick[r], branches, r), rows)


class LocalAttentionBlock(nn.Module):
    """Local multi-query attention over a sliding window, with RoPE."""

    width: int
    num_heads: int
    window_size: int
    attention_implementation: str | None = None

    @nn.compact
    def __call__(
        self, x: at.Activations, positions: at.Positions, cache: AttentionCache | None,
        ring_limit: int | None = None, row_rings: tuple[int, ...] | None = None,
    ) -> tuple[at.Activations, AttentionCache]:
        """Attends each token to itself and the ``window_size`` tokens before it.

        Args:
          x: [b, t, d] inputs.
          positions: [b, t] absolute positions, -1 for padding.
          cache: ring buffer of earlier keys/values, or None for a fresh sequence.
          ring_limit: attend only to the first ``ring_limit`` ring slots. Valid
            when every row's positions stay below it; it lets decode skip the
            empty part of the window instead of paying for it.
          row_rings: decode only (t == 1): ascending ring lengths, the last one
            ``ring_limit`` (or the whole ring). Each row then attends to the
            shortest of them that holds its filled slots, chosen per row on
            device, so a row never pays for a longer row's ring.

        ``attention_implementation`` picks decode's attention backend
        (``griffin_batch.kernels.decode_attention``; None: the best here). A
        Pallas kernel reads each row's own filled slots and ignores
        ``ring_limit`` and ``row_rings``; "xla" runs the code below.
        """
        batch, t, _ = x.shape
        head_dim = self.width // self.num_heads
        q = nn.Dense(self.width, use_bias=False, kernel_init=_fan_in_normal, name="proj_q")(x)
        k = nn.Dense(head_dim, use_bias=False, kernel_init=_fan_in_normal, name="proj_k")(x)
        v = nn.Dense(head_dim, use_bias=False, kernel_init=_fan_in_normal, name="proj_v")(x)
        q = apply_rope(einops.rearrange(q, "b t (n h) -> b t n h", n=self.num_heads), positions)
        k = apply_rope(k, positions)  # [b, t, h]

        ring_len = self.window_size + 1
        if cache is None:
            empty = jnp.zeros((batch, ring_len, head_dim), k.dtype)
            cache = AttentionCache(empty, empty, jnp.zeros((batch,), jnp.int32))
        full_k, full_v, num_tokens = cache
        new_cache = AttentionCache(
            keys=write_ring(full_k, k, positions),
            values=write_ring(full_v, v, positions),
            num_tokens=num_tokens + _num_valid(positions),
        )
        limit = ring_limit or ring_len
        window = self.window_size

        if t == 1:
            # Decode: write first, then attend over the ring alone. The ring has
            # window + 1 slots so the new key overwrites nothing still needed,
            # and XLA updates it in place instead of copying it every step.
            ring = (q, positions, new_cache.keys, new_cache.values, new_cache.num_tokens)
            kernel = decode_attention_api.resolve_implementation(self.attention_implementation)
            if decode_attention_api.is_kernel(kernel):
                encoded = decode_attention_api.decode_attention(
                    q[:, 0], new_cache.keys, new_cache.values,
                    _filled(positions, new_cache.num_tokens, ring_len),
                    implementation=kernel, batch_axis=sharding.DATA)[:, None]
            elif row_rings:
                encoded = _decode_attention_per_row(*ring, rings=row_rings, window=window,
                                                    dtype=x.dtype)
            else:
                encoded = _decode_attention(*ring, limit=limit, window=window, dtype=x.dtype)
        else:
            # Prefill chunk: earlier ring entries and the chunk's own keys are
            # scored separately (a concatenation would copy the ring).
            ring_pos = ring_positions(num_tokens, ring_len)[:, :limit]
            logits = jnp.concatenate(
                [_scores(q, positions, full_k[:, :limit], ring_pos, window),
                 _scores(q, positions, k, positions, window)], axis=-1)
            probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
            encoded = (jnp.einsum("bnts,bsh->btnh", probs[..., :limit],
                                  full_v[:, :limit].astype(x.dtype))
                       + jnp.einsum("bnts,bsh->btnh", probs[..., limit:], v.astype(x.dtype)))
        out = nn.Dense(self.width, kernel_init=_fan_in_normal, name="proj_final")(
            einops.rearrange(encoded, "b t n h -> b t (n h)"))
        return out, new_cache


class MLPBlock(nn.Module):
    """Gated MLP: down(gelu(up_0 x) * up_1 x)."""

    width: int
    expanded_width: int

    @nn.compact
    def __call__(self, x: at.Activations) -> at.Activations:
        up = _FfwUp(self.width, self.expanded_width, name="ffw_up")(x)
        hidden = jax.nn.gelu(up[0]) * up[1]
        return nn.Dense(self.width, kernel_init=_fan_in_normal, name="ffw_down")(hidden)


class _FfwUp(nn.Module):
    width: int
    expanded_width: int

    @nn.compact
    def __call__(self, x: at.Activations) -> jax.Array:
        w = self.param("w", nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1),
                       (2, self.width, self.expanded_width))
        b = self.param("b", nn.initializers.zeros_init(), (2, 1, 1, self.expanded_width))
        # Two plain matmuls, not one einsum with a batch axis on w: XLA:CPU
        # re-lays out a batched weight on every decode step inside a loop.
        # Inside a loop it also copies the slices w[0], w[1] on every step
        # (38 MB per step for the benchmark model), so a decode loop passes
        # them in pre-sliced, computed once outside the loop.
        if self.has_variable(HOISTED, "w_0"):
            w0, w1 = self.get_variable(HOISTED, "w_0"), self.get_variable(HOISTED, "w_1")
        else:
            w0, w1 = w[0], w[1]
        x, w0, w1, b = nn.dtypes.promote_dtype(x, w0, w1, b)
        return jnp.stack([x @ w0 + b[0, 0], x @ w1 + b[1, 0]])  # [2, b, t, m]
