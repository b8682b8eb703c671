"""Pallas TPU (Mosaic) kernel for the RG-LRU linear scan.

Grid: (batch blocks, width blocks, time blocks). Batch and width blocks are
independent ("parallel", so megacore chips split them across cores); time is the
innermost "arbitrary" axis, walked in order, and the float32 state of the current
(batch, width) block lives in a VMEM scratch between time blocks. Inside a block a
``fori_loop`` walks the ``block_t`` steps with the state in vregs.

Layout: the kernel sees x, a and y as [b, t, e / 128, 128] (a free reshape). Mosaic
tiles the last two dimensions of a block into (8, 128) vregs; keeping time in a
leading, untiled dimension makes ``x_ref[:, i]`` a plain address offset that yields
whole [block_b, block_e / 128, 128] tiles, with no sublane shuffles per step.

Ragged shapes: t is padded to a multiple of ``block_t`` with a = 1, x = 0 (the padded
steps leave h, hence h_last, unchanged) and e to a multiple of ``block_e`` with zeros
(channels are independent); both paddings are sliced off the outputs.

Shape legend: b batch, t time, e lru width; tiles = block_e / 128 lane tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from griffin_batch.kernels.rglru_scan import block_sizes as bs

LANES = bs.TPU_LANES
# Steps unrolled per fori_loop iteration: hides the scalar loop overhead.
_UNROLL = 8


def _scan_kernel(x_ref, a_ref, h0_ref, y_ref, h_last_ref, h_carry_ref):
    """One (batch block, width block, time block) grid step.

    Args:
      x_ref: [block_b, block_t, tiles, 128] inputs.
      a_ref: [block_b, block_t, tiles, 128] decay.
      h0_ref: [block_b, tiles, 128] float32 initial state.
      y_ref: [block_b, block_t, tiles, 128] output, x's dtype.
      h_last_ref: [block_b, tiles, 128] float32 final state; its block index does not
        depend on the time block, so it stays resident and is written once at the end.
      h_carry_ref: [block_b, tiles, 128] float32 VMEM scratch carried across time blocks.
    """
    time_block = pl.program_id(2)

    @pl.when(time_block == 0)
    def _init():
        h_carry_ref[...] = h0_ref[...]  # [block_b, tiles, 128]

    def step(i, h):  # h: [block_b, tiles, 128] float32
        h = a_ref[:, i].astype(jnp.float32) * h + x_ref[:, i].astype(jnp.float32)
        y_ref[:, i] = h.astype(y_ref.dtype)  # [block_b, tiles, 128]
        return h

    block_t = x_ref.shape[1]
    h = jax.lax.fori_loop(0, block_t, step, h_carry_ref[...], unroll=min(_UNROLL, block_t))
    h_carry_ref[...] = h

    @pl.when(time_block == pl.num_programs(2) - 1)
    def _finish():
        h_last_ref[...] = h  # [block_b, tiles, 128]


def make_block_specs(block_b: int, block_t: int, tiles: int) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """BlockSpecs over the (batch, width, time) grid.

    Returns:
      (sequence spec for x, a and y; state spec for h0 and h_last).
    """
    sequence = pl.BlockSpec(
        (block_b, block_t, tiles, LANES), lambda ib, ie, it: (ib, it, ie, 0)
    )  # [block_b, block_t, tiles, 128]
    state = pl.BlockSpec((block_b, tiles, LANES), lambda ib, ie, it: (ib, ie, 0))
    return sequence, state


def _pallas_call(x4, a4, h04, *, block_b: int, block_t: int, tiles: int, interpret):
    """Runs the kernel on lane-tiled, block-aligned arrays.

    Args:
      x4, a4: [b, t, e / 128, 128] with t % block_t == 0 and (e / 128) % tiles == 0.
      h04: [b, e / 128, 128] float32.

    Returns:
      y4: [b, t, e / 128, 128] in x4's dtype; h_last: [b, e / 128, 128] float32.
    """
    b, t, e_tiles, _ = x4.shape
    grid = (b // block_b, e_tiles // tiles, t // block_t)
    sequence, state = make_block_specs(block_b, block_t, tiles)
    itemsize = jnp.dtype(x4.dtype).itemsize
    return pl.pallas_call(
        _scan_kernel,
        out_shape=(
            jax.ShapeDtypeStruct(x4.shape, x4.dtype),
            jax.ShapeDtypeStruct(h04.shape, jnp.float32),
        ),
        grid=grid,
        in_specs=[sequence, sequence, state],
        out_specs=[sequence, state],
        scratch_shapes=[pltpu.VMEM((block_b, tiles, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * x4.size, transcendentals=0, bytes_accessed=3 * x4.size * itemsize
        ),
        interpret=interpret,
        name="rglru_scan",
    )(x4, a4, h04)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def scan(
    x: jax.Array,
    a: jax.Array,
    h0: jax.Array,
    *,
    block_sizes: bs.BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
    """The RG-LRU scan as a Pallas TPU kernel.

    Args:
      x: [b, t, e] inputs.
      a: [b, t, e] decay, same dtype as x.
      h0: [b, e] float32 initial state.
      block_sizes: tiling; ``block_sizes.default_block_sizes`` when None. A block longer
        than t or wider than e (rounded up to 128 lanes) is shrunk to fit.
      interpret: run through the Pallas interpreter (any backend, slow); True for the
        generic one or a ``pltpu.InterpretParams`` for the TPU-faithful one.

    Returns:
      y: [b, t, e] in x.dtype, and h_last: [b, e] float32.
    """
    b, t, e = x.shape
    blocks = block_sizes or bs.default_block_sizes("pallas_tpu", x.shape, x.dtype)
    blocks.validate(x.shape, "pallas_tpu")
    block_t = min(blocks.block_t, t)
    block_e = bs.tpu_block_e(blocks.block_e, e)

    x_p, a_p = bs.pad_time(x, a, block_t)  # [b, t_pad, e]
    x_p, a_p, h0_p = bs.pad_width([x_p, a_p, h0], block_e)  # [b, t_pad, e_pad], [b, e_pad]
    t_pad, e_pad = x_p.shape[1], x_p.shape[2]
    e_tiles = e_pad // LANES
    y4, h_last = _pallas_call(
        x_p.reshape(b, t_pad, e_tiles, LANES),
        a_p.reshape(b, t_pad, e_tiles, LANES),
        h0_p.reshape(b, e_tiles, LANES),
        block_b=blocks.block_b,
        block_t=block_t,
        tiles=block_e // LANES,
        interpret=interpret,
    )
    y = y4.reshape(b, t_pad, e_pad)[:, :t, :e]
    return y, h_last.reshape(b, e_pad)[:, :e]
