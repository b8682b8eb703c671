"""Pallas TPU (Mosaic) kernel for decode attention over per-row ring lengths.

Grid: (rows, ring blocks). Rows are independent ("parallel", so megacore chips
split them); ring blocks are the innermost "arbitrary" axis and carry an online
softmax (running max, running sum, unnormalised output, all float32) in VMEM
scratch, as flash attention does. The row lengths are scalar-prefetched into SMEM:

* a block at or past a row's length computes nothing (``pl.when``);
* its index map clamps the block index to the row's last needed block, so the
  pipeline sees the same block again and issues no copy for it.

A row therefore reads ``ceil(length / block)`` blocks of its ring, whatever the
longest row's length. The ring need not be a multiple of the block: the slots of
the last block past the ring's end hold whatever the copy left, so both the
scores and the values are masked by slot index (a masked score alone would still
multiply a NaN value by zero).

Shape legend: b batch, n query heads, s ring slots, h head dim, k block slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from griffin_batch.kernels.decode_attention import reference

# Mosaic tiles the last two dims of a block into (8 sublanes, 128 lanes).
SUBLANES = 8
DEFAULT_BLOCK = 256  # ring slots per block; untuned on hardware (no TPU here)


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, scale: float):
    """One (row, ring block) grid step.

    Args:
      lengths_ref: [b] int32 in SMEM (scalar prefetch).
      q_ref: [n, h] the row's query heads.
      k_ref, v_ref: [k, h] one block of the row's ring.
      o_ref: [n, h] output; its block index ignores the ring block, so it stays
        resident and is written once, at the last block.
      m_ref, l_ref: [n, 1] float32 running max and sum of exponentials.
      acc_ref: [n, h] float32 unnormalised output.
    """
    row, block = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[row]
    size = k_ref.shape[0]

    @pl.when(block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, reference.MIN_LOGITS, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(block * size < length)
    def _attend():
        q = q_ref[...]  # [n, h]
        dtype = q.dtype
        scores = jax.lax.dot_general(q, k_ref[...].astype(dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [n, k]
        # Rounded to the compute dtype, then scaled in it: the reference's rounding.
        scores = (scores.astype(dtype) * jnp.asarray(scale, dtype)).astype(jnp.float32)
        slot = block * size + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        scores = jnp.where(slot < length, scores, reference.MIN_LOGITS)
        m_prev = m_ref[...]  # [n, 1]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        correction = jnp.exp(m_prev - m_next)  # [n, 1]
        p = jnp.exp(scores - m_next)  # [n, k]
        l_ref[...] = correction * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        value_slot = block * size + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0)
        v = jnp.where(value_slot < length, v_ref[...].astype(dtype), 0)  # [k, h]
        acc_ref[...] = correction * acc_ref[...] + jnp.dot(
            p.astype(dtype), v, preferred_element_type=jnp.float32)
        m_ref[...] = m_next

    @pl.when(block == pl.num_programs(1) - 1)
    def _finish():
        total = l_ref[...]
        out = acc_ref[...] / jnp.where(total > 0, total, 1.0)
        o_ref[...] = out.astype(o_ref.dtype)  # a row of length 0 gets zeros


def make_block_specs(n: int, h: int, block: int) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """BlockSpecs over the (row, ring block) grid: (query/output spec, ring spec)."""

    def ring_index(row, block_index, lengths):
        last = jnp.maximum(pl.cdiv(lengths[row], block) - 1, 0)
        return row, jnp.minimum(block_index, last), 0

    heads = pl.BlockSpec((None, n, h), lambda row, block_index, lengths: (row, 0, 0))
    ring = pl.BlockSpec((None, block, h), ring_index)
    return heads, ring


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def attend(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, *,
           block_size: int | None = None,
           interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Decode attention as a Pallas TPU kernel; see ``reference.attend`` for the contract.

    Args:
      q: [b, n, h]; keys, values: [b, s, h]; lengths: [b] int32.
      block_size: ring slots per block, a multiple of 8 (``DEFAULT_BLOCK``
        when None); shrunk to the ring rounded up to 8 when that is shorter.
      interpret: run through the Pallas interpreter (any backend, slow); True for
        the generic one or a ``pltpu.InterpretParams`` for the TPU-faithful one.

    Returns:
      [b, n, h] in q's dtype.
    """
    b, n, h = q.shape
    s = keys.shape[1]
    block = min(block_size or DEFAULT_BLOCK, -(-s // SUBLANES) * SUBLANES)
    heads, ring = make_block_specs(n, h, block)
    itemsize = jnp.dtype(keys.dtype).itemsize
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, pl.cdiv(s, block)),
        in_specs=[heads, ring, ring],
        out_specs=heads,
        scratch_shapes=[pltpu.VMEM((n, 1), jnp.float32), pltpu.VMEM((n, 1), jnp.float32),
                        pltpu.VMEM((n, h), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_kernel, scale=h ** -0.5),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=4 * b * n * s * h, transcendentals=b * n * s,
                                      bytes_accessed=2 * b * s * h * itemsize),
        interpret=interpret,
        name="decode_attention",
    )(lengths.astype(jnp.int32), q, keys, values)
