"""Block sizes for the RG-LRU scan kernels: a frozen value that validates itself.

Shape legend (as in ``model/array_typing.py``): b batch, t time, e lru width.

A ``BlockSizes`` is plain data and imports nothing accelerator-specific, so the
dispatcher can validate a request before it loads (or fails to load) a kernel.
Each implementation reads only the fields it uses:

* ``pallas_tpu``: all three; the grid is (b / block_b, e / block_e, t / block_t).
* ``pallas_gpu``: ``block_b`` and ``block_e`` (powers of two, as Triton needs);
  each program walks the whole time axis, so ``block_t`` is unused.
* ``reference``, ``sequential`` and ``associative`` ignore block sizes.

t and e need not be multiples of ``block_t`` and ``block_e``: the kernels pad
them and slice the padding off (see ``pad_time`` / ``pad_width``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# A TPU vreg is 8 sublanes x 128 lanes of 32 bits; Mosaic requires the last two
# dimensions of every block to be multiples of (8, 128) or the whole array dim.
TPU_LANES = 128
TPU_SUBLANES = 8
# Per-buffer VMEM budget of the TPU kernel. Pallas double-buffers x, a and y,
# so the blocks take 6 x this, inside the 16 MiB default scoped VMEM of v4/v5e.
TPU_BLOCK_BYTES = 2 * 1024 * 1024
GPU_BLOCK_E = 128


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def compute_tile_size(dim: int, max_tile: int, multiple: int = 1) -> int:
    """Largest tile <= ``max_tile`` that is a multiple of ``multiple`` and divides ``dim``.

    Args:
      dim: the (already padded) dimension to tile; a multiple of ``multiple``.
      max_tile: the upper bound, e.g. from a VMEM budget.
      multiple: hardware granularity (8 sublanes, 128 lanes, 1 for none).

    Returns:
      The tile size; ``multiple`` itself when nothing larger divides ``dim``.
    """
    if dim % multiple:
        raise ValueError(f"compute_tile_size: dim={dim} is not a multiple of {multiple}")
    tile = max(multiple, min(dim, max_tile) // multiple * multiple)
    while dim % tile:
        tile -= multiple
    return tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of the [b, t, e] inputs that one kernel step processes.

    Attributes:
      block_b: rows of the batch per block; must divide b.
      block_t: time steps per block.
      block_e: channels of the lru width per block.
    """

    block_b: int
    block_t: int
    block_e: int

    def __post_init__(self):
        for name in ("block_b", "block_t", "block_e"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int; got {value!r}")

    def validate(self, shape: tuple[int, int, int], implementation: str) -> None:
        """Raises ValueError, naming the field, if these blocks cannot tile ``shape``.

        Args:
          shape: the [b, t, e] shape of x.
          implementation: the resolved implementation name; its rules apply.
        """
        b, _, e = shape
        if implementation in ("reference", "associative"):
            return
        if b % self.block_b:
            raise ValueError(
                f"BlockSizes.block_b={self.block_b} must divide the batch size {b} of x "
                f"(shape {tuple(shape)}); batch is not padded"
            )
        if implementation == "pallas_tpu":
            self._validate_tpu(e)
        elif implementation == "pallas_gpu":
            for name in ("block_b", "block_e"):
                if not is_power_of_two(getattr(self, name)):
                    raise ValueError(
                        f"BlockSizes.{name}={getattr(self, name)} must be a power of two "
                        "for implementation 'pallas_gpu' (Triton block shapes)"
                    )

    def _validate_tpu(self, e: int) -> None:
        if self.block_e % TPU_LANES:
            raise ValueError(
                f"BlockSizes.block_e={self.block_e} must be a multiple of {TPU_LANES} "
                "(TPU lanes) for implementation 'pallas_tpu'"
            )
        tiles = self.block_e // TPU_LANES
        if tiles % TPU_SUBLANES and self.block_e < round_up(e, TPU_LANES):
            raise ValueError(
                f"BlockSizes.block_e={self.block_e} must be a multiple of "
                f"{TPU_LANES * TPU_SUBLANES} or cover the whole width e={e} (one block of "
                f"{round_up(e, TPU_LANES)}) for implementation 'pallas_tpu'"
            )


def tpu_block_e(block_e: int, e: int) -> int:
    """The block width the TPU kernel uses: never wider than e padded to lanes."""
    return min(block_e, round_up(e, TPU_LANES))


def default_block_sizes(implementation: str, shape: tuple[int, int, int], dtype) -> BlockSizes:
    """Block sizes used when the caller passes none.

    The Pallas defaults follow the hardware granularity and a VMEM budget; they are
    untuned on real chips. Implementations without blocks get the whole array.

    Args:
      implementation: resolved implementation name.
      shape: [b, t, e] shape of x.
      dtype: dtype of x and a.

    Returns:
      BlockSizes valid for ``shape`` under ``implementation``.
    """
    b, t, e = shape
    if implementation == "pallas_tpu":
        e_pad = round_up(e, TPU_LANES)
        # One full vreg of the dtype per batch row: 8 x 128 lanes of float32, 16 x 128 of
        # bfloat16 (packed two per 32 bits); the whole width when that does not tile e.
        packing = max(1, 4 // jnp.dtype(dtype).itemsize)
        granule = TPU_LANES * TPU_SUBLANES * packing
        block_e = granule if e_pad % granule == 0 else e_pad
        # Up to 8 independent rows give the VPU work while the time chain is serial.
        block_b = compute_tile_size(b, 8)
        row_bytes = block_b * block_e * 4
        block_t = max(TPU_SUBLANES, min(256, TPU_BLOCK_BYTES // row_bytes))
        block_t = min(block_t // TPU_SUBLANES * TPU_SUBLANES, round_up(t, TPU_SUBLANES))
        return BlockSizes(block_b, block_t, block_e)
    if implementation == "pallas_gpu":
        return BlockSizes(1, max(t, 1), min(GPU_BLOCK_E, 1 << max(e - 1, 0).bit_length()))
    return BlockSizes(max(b, 1), max(t, 1), max(e, 1))


def pad_time(x: jax.Array, a: jax.Array, block_t: int) -> tuple[jax.Array, jax.Array]:
    """Pads x with 0 and a with 1 at the end of time up to a multiple of ``block_t``.

    a = 1, x = 0 maps h to itself, so the padded steps leave the state (and the final
    state) unchanged; callers slice the padded steps off y.
    """
    t = x.shape[1]
    pad = round_up(t, block_t) - t
    if pad == 0:
        return x, a
    widths = ((0, 0), (0, pad), (0, 0))
    return jnp.pad(x, widths), jnp.pad(a, widths, constant_values=1)


def pad_width(arrays: list[jax.Array], block_e: int) -> list[jax.Array]:
    """Zero-pads the last (width) axis up to a multiple of ``block_e``.

    Channels are independent, so the padded ones never touch the real ones; callers
    slice them off.
    """
    e = arrays[0].shape[-1]
    pad = round_up(e, block_e) - e
    if pad == 0:
        return arrays
    return [jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]) for v in arrays]
