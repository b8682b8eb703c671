"""Oracle: the RG-LRU linear scan as a plain ``lax.scan`` over time.

h_t = a_t * h_{t-1} + x_t, carried in float32 whatever the input dtype.
Shape legend: b batch, t time, e lru width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from griffin_batch.kernels.rglru_scan import block_sizes as bs


@jax.jit
def _scan(x: jax.Array, a: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
    def step(h, inputs):  # h: [b, e] float32
        x_t, a_t = inputs  # [b, e]
        h = a_t.astype(jnp.float32) * h + x_t.astype(jnp.float32)
        return h, h.astype(x.dtype)

    time_major = (jnp.swapaxes(x, 0, 1), jnp.swapaxes(a, 0, 1))  # [t, b, e]
    h_last, y = jax.lax.scan(step, h0, time_major)  # [b, e], [t, b, e]
    return jnp.swapaxes(y, 0, 1), h_last


def scan(
    x: jax.Array,
    a: jax.Array,
    h0: jax.Array,
    *,
    block_sizes: bs.BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Sequential scan; the oracle every other implementation is tested against.

    Args:
      x: [b, t, e] inputs.
      a: [b, t, e] decay, same dtype as x.
      h0: [b, e] float32 initial state.
      block_sizes: unused (accepted so every implementation has one signature).
      interpret: unused.

    Returns:
      y: [b, t, e] in x.dtype with y_t = h_t, and h_last: [b, e] float32.
    """
    del block_sizes, interpret
    return _scan(x, a, h0)
