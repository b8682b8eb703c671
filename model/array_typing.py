"""Named array shapes used across the project, in one place.

Legend:
  b batch (or slots)   t time          d width          e lru width
  w conv window - 1    s ring length   n query heads    h head dim
  v vocab
"""

from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import Array, Bool, Float, Integer

Params = Mapping[str, Any]
Tokens = Integer[Array, "b t"]
Positions = Integer[Array, "b t"]
Activations = Float[Array, "b t d"]
LruActivations = Float[Array, "b t e"]
Logits = Float[Array, "b t v"]
RnnState = Float[Array, "b e"]
ConvState = Float[Array, "b w e"]
RingKeys = Float[Array, "b s h"]
NumTokens = Integer[Array, "b"]
Mask = Bool[Array, "b t s"]
PRNGKey = jax.Array
