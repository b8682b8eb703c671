"""Pallas GPU (Triton) kernel for decode attention over per-row ring lengths.

Grid: (rows,). Each program holds its row's query heads and walks the row's ring
block by block up to its length, a loop whose trip count is the row's own
(``ceil(length / block)``), with an online softmax (running max, running sum,
unnormalised output, float32) in registers. A row therefore reads only its own
filled slots, whatever the longest row's length.

Triton needs power-of-two tiles of at least 16 for its dots, so the query heads
are padded to such a count (q is small) and the head dim must already be one
(Griffin's is 128 or 256; ``attend`` pads it, copying the ring, otherwise). The
ring need not be a multiple of the block: loads past its end are masked to zero.

Only checked in interpret mode and by lowering for CUDA on a CPU host; the
default block is untuned on real GPUs.

Shape legend: b batch, n query heads, s ring slots, h head dim, k block slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from griffin_batch.kernels.decode_attention import reference

DEFAULT_BLOCK = 64  # ring slots per block; untuned on hardware (no GPU here)
MIN_TILE = 16  # Triton's smallest dot dimension


def _pow2_at_least(n: int, floor: int = MIN_TILE) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, block: int, scale: float):
    """One row.

    Args:
      lengths_ref: [] int32 the row's length.
      q_ref: [n_pad, h] its query heads (padded heads are zeros).
      k_ref, v_ref: [s, h] its ring.
      o_ref: [n_pad, h] output.
    """
    length = lengths_ref[()]
    q = q_ref[...]  # [n_pad, h]
    dtype = q.dtype
    n_pad, h = q.shape
    s = k_ref.shape[0]

    def body(i, carry):
        acc, m_prev, l_prev = carry  # [n_pad, h], [n_pad], [n_pad]
        start = i * block
        slot = start + jnp.arange(block)  # [k]
        in_ring = (slot < s)[:, None]
        k = pltriton.load(k_ref.at[pl.ds(start, block), :], mask=in_ring, other=0.0)
        v = pltriton.load(v_ref.at[pl.ds(start, block), :], mask=in_ring, other=0.0)
        scores = pl.dot(q, k.astype(dtype), trans_b=True)  # [n_pad, k] float32
        scores = (scores.astype(dtype) * jnp.asarray(scale, dtype)).astype(jnp.float32)
        scores = jnp.where((slot < length)[None, :], scores, reference.MIN_LOGITS)
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(scores - m_next[:, None])  # [n_pad, k]
        v = jnp.where((slot < length)[:, None], v.astype(dtype), 0)
        acc = correction[:, None] * acc + pl.dot(p.astype(dtype), v)
        return acc, m_next, correction * l_prev + jnp.sum(p, axis=1)

    init = (jnp.zeros((n_pad, h), jnp.float32),
            jnp.full((n_pad,), reference.MIN_LOGITS, jnp.float32),
            jnp.zeros((n_pad,), jnp.float32))
    acc, _, total = jax.lax.fori_loop(0, pl.cdiv(length, block), body, init)
    o_ref[...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def attend(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, *,
           block_size: int | None = None, interpret: bool = False) -> jax.Array:
    """Decode attention as a Pallas Triton kernel; see ``reference.attend`` for the contract.

    Args:
      q: [b, n, h]; keys, values: [b, s, h]; lengths: [b] int32.
      block_size: ring slots per block, a power of two >= 16 (``DEFAULT_BLOCK``
        when None).
      interpret: run through the Pallas interpreter (any backend, slow).

    Returns:
      [b, n, h] in q's dtype.
    """
    b, n, h = q.shape
    s = keys.shape[1]
    block = block_size or DEFAULT_BLOCK
    n_pad, h_pad = _pow2_at_least(n), _pow2_at_least(h)
    q_p = jnp.pad(q, ((0, 0), (0, n_pad - n), (0, h_pad - h)))
    if h_pad != h:  # a copy of the ring: only for head dims Triton cannot tile as they are
        keys, values = (jnp.pad(a, ((0, 0), (0, 0), (0, h_pad - h))) for a in (keys, values))
    heads = pl.BlockSpec((None, n_pad, h_pad), lambda row: (row, 0, 0))
    ring = pl.BlockSpec((None, s, h_pad), lambda row: (row, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, scale=h ** -0.5),
        out_shape=jax.ShapeDtypeStruct((b, n_pad, h_pad), q.dtype),
        grid=(b,),
        in_specs=[pl.BlockSpec((None,), lambda row: (row,)), heads, ring, ring],
        out_specs=heads,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(lengths.astype(jnp.int32), q_p, keys, values)
    return out[:, :n, :h]
