"""Oracle: decode attention over per-row ring lengths as one masked dense softmax.

Every row scores its query against all ``s`` ring slots and masks the slots at or
past its length, so the cost is the longest row's. The rounding is the model's
(``layers._decode_attention``): scores in the compute dtype, softmax in float32,
probabilities rounded to the compute dtype before the values.

Shape legend: b batch, n query heads, s ring slots, h head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The model's masked-logit constant (``layers._MIN_LOGITS_VALUE``), so softmax ties match.
MIN_LOGITS = -2.3819763e38


@jax.jit
def attend(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array) -> jax.Array:
    """Masked decode attention; the oracle every kernel is tested against.

    Args:
      q: [b, n, h] one query per row (all heads share the row's keys and values).
      keys: [b, s, h] the row's ring of keys.
      values: [b, s, h] its values.
      lengths: [b] int32 slots each row attends to, its first ``lengths[b]``
        (0 <= length <= s; a row of length 0 gets zeros).

    Returns:
      [b, n, h] in q's dtype.
    """
    dtype = q.dtype
    scores = jnp.einsum("bnh,bsh->bns", q, keys.astype(dtype)) * q.shape[-1] ** -0.5
    filled = jnp.arange(keys.shape[1])[None, None] < lengths[:, None, None]  # [b, 1, s]
    logits = jnp.where(filled, scores, MIN_LOGITS).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bns,bsh->bnh", probs, values.astype(dtype))
    return jnp.where(lengths[:, None, None] > 0, out, 0).astype(dtype)
