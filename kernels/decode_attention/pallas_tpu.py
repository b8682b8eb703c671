"""Pallas TPU (Mosaic) kernel for decode attention over per-row ring lengths.

Grid: (row groups, ring blocks). A group is a few rows (``rows_per_step``), so
that the fixed cost of a grid step is shared. Groups are independent
("parallel", so megacore chips split them); ring blocks are the innermost
"arbitrary" axis and carry each row's online softmax (running max, running sum,
unnormalised output, all float32) in VMEM scratch, as flash attention does. The
row lengths and each group's longest are scalar-prefetched into SMEM:

* a block at or past a row's length computes nothing for it (``pl.when``);
* the ring's index map clamps the block index to the group's last needed block,
  so the pipeline sees the same block again and issues no copy for it.

A group therefore reads ``ceil(longest / block)`` blocks of its rings, whatever
the batch's longest row. The ring need not be a multiple of the block: the slots of
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
# Rows per grid step: Pallas puts a fixed cost on every grid step (the TPU docs
# give ~0.35 us), which one row's short ring would not cover; untuned as well.
DEFAULT_ROWS = 8


def rows_per_step(batch: int, most: int = DEFAULT_ROWS) -> int:
    """The largest power of two <= ``most`` that divides ``batch`` (rows share a step)."""
    rows = 1
    while rows * 2 <= most and batch % (rows * 2) == 0:
        rows *= 2
    return rows


def _kernel(lengths_ref, longest_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
            scale: float):
    """One (row group, ring block) grid step.

    Args:
      lengths_ref: [b] int32 in SMEM (scalar prefetch): each row's length.
      longest_ref: [b / rows] int32 in SMEM: each row group's longest length.
      q_ref: [rows, n, h] the group's query heads.
      k_ref, v_ref: [rows, k, h] one block of the group's rings.
      o_ref: [rows, n, h] output; its block index ignores the ring block, so it
        stays resident and is written once, at the last block.
      m_ref, l_ref: [rows, n, 1] float32 running max and sum of exponentials.
      acc_ref: [rows, n, h] float32 unnormalised output.
    """
    group, block = pl.program_id(0), pl.program_id(1)
    rows, size = k_ref.shape[0], k_ref.shape[1]

    @pl.when(block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, reference.MIN_LOGITS, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(block * size < longest_ref[group])
    def _attend():
        for i in range(rows):  # unrolled: plain 2-D dots per row
            length = lengths_ref[group * rows + i]
            pl.when(block * size < length)(
                functools.partial(_attend_row, q_ref.at[i], k_ref.at[i], v_ref.at[i],
                                  m_ref.at[i], l_ref.at[i], acc_ref.at[i], block * size,
                                  length, scale))

    @pl.when(block == pl.num_programs(1) - 1)
    def _finish():
        total = l_ref[...]
        out = acc_ref[...] / jnp.where(total > 0, total, 1.0)
        o_ref[...] = out.astype(o_ref.dtype)  # a row of length 0 gets zeros


def _attend_row(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, first, length, scale):
    """One row's online-softmax update from one ring block starting at slot ``first``.

    Refs as ``_kernel``'s, for one row: q [n, h], k and v [k, h], m and l [n, 1],
    acc [n, h].
    """
    q = q_ref[...]  # [n, h]
    dtype = q.dtype
    scores = jax.lax.dot_general(q, k_ref[...].astype(dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [n, k]
    # Rounded to the compute dtype, then scaled in it: the reference's rounding.
    scores = (scores.astype(dtype) * jnp.asarray(scale, dtype)).astype(jnp.float32)
    slot = first + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    scores = jnp.where(slot < length, scores, reference.MIN_LOGITS)
    m_prev = m_ref[...]  # [n, 1]
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    correction = jnp.exp(m_prev - m_next)  # [n, 1]
    p = jnp.exp(scores - m_next)  # [n, k]
    l_ref[...] = correction * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    value_slot = first + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0)
    v = jnp.where(value_slot < length, v_ref[...].astype(dtype), 0)  # [k, h]
    acc_ref[...] = correction * acc_ref[...] + jnp.dot(p.astype(dtype), v,
                                                       preferred_element_type=jnp.float32)
    m_ref[...] = m_next


def make_block_specs(rows: int, n: int, h: int, block: int) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """BlockSpecs over the (row group, ring block) grid: (query/output spec, ring spec)."""

    def ring_index(group, block_index, lengths, longest):
        last = jnp.maximum(pl.cdiv(longest[group], block) - 1, 0)
        return group, jnp.minimum(block_index, last), 0

    heads = pl.BlockSpec((rows, n, h), lambda group, block_index, *_: (group, 0, 0))
    ring = pl.BlockSpec((rows, block, h), ring_index)
    return heads, ring


@functools.partial(jax.jit, static_argnames=("block_size", "rows", "interpret"))
def attend(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, *,
           block_size: int | None = None, rows: int | None = None,
           interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Decode attention as a Pallas TPU kernel; see ``reference.attend`` for the contract.

    Args:
      q: [b, n, h]; keys, values: [b, s, h]; lengths: [b] int32.
      block_size: ring slots per block, a multiple of 8 (``DEFAULT_BLOCK``
        when None); shrunk to the ring rounded up to 8 when that is shorter.
      rows: rows per grid step, dividing b (``rows_per_step(b)`` when None). A
        group reads ring blocks up to its longest row, each row computes only
        its own.
      interpret: run through the Pallas interpreter (any backend, slow); True for
        the generic one or a ``pltpu.InterpretParams`` for the TPU-faithful one.

    Returns:
      [b, n, h] in q's dtype.
    """
    b, n, h = q.shape
    s = keys.shape[1]
    block = min(block_size or DEFAULT_BLOCK, -(-s // SUBLANES) * SUBLANES)
    rows = rows or rows_per_step(b)
    if b % rows:
        raise ValueError(f"decode_attention: rows={rows} does not divide the batch {b}")
    lengths = lengths.astype(jnp.int32)
    longest = jnp.max(lengths.reshape(b // rows, rows), axis=1)
    heads, ring = make_block_specs(rows, n, h, block)
    itemsize = jnp.dtype(keys.dtype).itemsize
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b // rows, pl.cdiv(s, block)),
        in_specs=[heads, ring, ring],
        out_specs=heads,
        scratch_shapes=[pltpu.VMEM((rows, n, 1), jnp.float32),
                        pltpu.VMEM((rows, n, 1), jnp.float32),
                        pltpu.VMEM((rows, n, h), jnp.float32)],
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
    )(lengths, longest, q, keys, values)
