"""Pallas GPU (Triton) kernel for the RG-LRU linear scan.

Triton grid programs run concurrently with no ordering between them, so time cannot
be a grid axis carrying state. The grid is (batch blocks, width blocks) and each
program walks the whole time axis with the float32 state of its [block_b, block_e]
tile in registers: one [block_b, block_e] load of a and x and one store of y per step.
``block_t`` is therefore unused. Triton needs power-of-two tile shapes, so e is zero
padded to a multiple of ``block_e`` (channels are independent) and sliced back.

Only checked in interpret mode and by lowering for CUDA on a CPU host; the default
tile (block_b = 1, block_e = 128) is untuned on real GPUs.

Shape legend: b batch, t time, e lru width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from griffin_batch.kernels.rglru_scan import block_sizes as bs


def _scan_kernel(x_ref, a_ref, h0_ref, y_ref, h_last_ref):
    """One (batch block, width block) program.

    Args:
      x_ref: [block_b, t, block_e] inputs.
      a_ref: [block_b, t, block_e] decay.
      h0_ref: [block_b, block_e] float32 initial state.
      y_ref: [block_b, t, block_e] output, x's dtype.
      h_last_ref: [block_b, block_e] float32 final state.
    """

    def step(i, h):  # h: [block_b, block_e] float32
        h = a_ref[:, i, :].astype(jnp.float32) * h + x_ref[:, i, :].astype(jnp.float32)
        y_ref[:, i, :] = h.astype(y_ref.dtype)  # [block_b, block_e]
        return h

    h_last_ref[...] = jax.lax.fori_loop(0, x_ref.shape[1], step, h0_ref[...])


def make_block_specs(block_b: int, t: int, block_e: int) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """BlockSpecs over the (batch, width) grid: (sequence spec, state spec)."""
    sequence = pl.BlockSpec((block_b, t, block_e), lambda ib, ie: (ib, 0, ie))
    state = pl.BlockSpec((block_b, block_e), lambda ib, ie: (ib, ie))
    return sequence, state


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def scan(
    x: jax.Array,
    a: jax.Array,
    h0: jax.Array,
    *,
    block_sizes: bs.BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The RG-LRU scan as a Pallas Triton kernel.

    Args:
      x: [b, t, e] inputs.
      a: [b, t, e] decay, same dtype as x.
      h0: [b, e] float32 initial state.
      block_sizes: tiling (block_b, block_e powers of two; block_t unused);
        ``block_sizes.default_block_sizes`` when None.
      interpret: run through the Pallas interpreter (any backend, slow).

    Returns:
      y: [b, t, e] in x.dtype, and h_last: [b, e] float32.
    """
    b, t, e = x.shape
    blocks = block_sizes or bs.default_block_sizes("pallas_gpu", x.shape, x.dtype)
    blocks.validate(x.shape, "pallas_gpu")
    x_p, a_p, h0_p = bs.pad_width([x, a, h0], blocks.block_e)  # [b, t, e_pad], [b, e_pad]
    e_pad = x_p.shape[2]
    sequence, state = make_block_specs(blocks.block_b, t, blocks.block_e)
    y, h_last = pl.pallas_call(
        _scan_kernel,
        out_shape=(
            jax.ShapeDtypeStruct(x_p.shape, x.dtype),
            jax.ShapeDtypeStruct(h0_p.shape, jnp.float32),
        ),
        grid=(b // blocks.block_b, e_pad // blocks.block_e),
        in_specs=[sequence, sequence, state],
        out_specs=[sequence, state],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="rglru_scan",
    )(x_p, a_p, h0_p)
    return y[:, :, :e], h_last[:, :e]
