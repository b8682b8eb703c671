"""The RG-LRU linear scan as one ``jax.lax.associative_scan`` over time.

Composing two steps h -> a1 h + x1 then h -> a2 h + x2 gives h -> (a1 a2) h + (a2 x1 + x2),
an associative operator, so the whole sequence takes O(log t) parallel depth and about
twice the work of the sequential scan. Shape legend: b batch, t time, e lru width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from griffin_batch.kernels.rglru_scan import block_sizes as bs


def combine(
    earlier: tuple[jax.Array, jax.Array], later: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Composes the affine maps (a, x) of two consecutive spans of time."""
    a_1, x_1 = earlier
    a_2, x_2 = later
    return a_1 * a_2, a_2 * x_1 + x_2


@jax.jit
def _scan(x: jax.Array, a: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
    a32 = a.astype(jnp.float32)  # [b, t, e]
    # Fold the initial state into the first step: h_0 = a_0 h0 + x_0.
    x32 = x.astype(jnp.float32).at[:, 0].add(a32[:, 0] * h0)  # [b, t, e]
    _, h = jax.lax.associative_scan(combine, (a32, x32), axis=1)  # [b, t, e]
    return h.astype(x.dtype), h[:, -1]


def scan(
    x: jax.Array,
    a: jax.Array,
    h0: jax.Array,
    *,
    block_sizes: bs.BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Parallel-prefix scan over the whole time axis.

    Args:
      x: [b, t, e] inputs.
      a: [b, t, e] decay, same dtype as x.
      h0: [b, e] float32 initial state.
      block_sizes: unused.
      interpret: unused.

    Returns:
      y: [b, t, e] in x.dtype, and h_last: [b, e] float32.
    """
    del block_sizes, interpret
    return _scan(x, a, h0)
