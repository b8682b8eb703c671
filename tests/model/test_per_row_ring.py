"""Decode with per-row ring lengths (``row_rings``) against the whole-ring decode.

Rows sit at staggered positions, before and after their ring wraps, plus an
idle row (position -1); each step must give the logits and the cache of the
decode that attends over every row's whole ring.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from griffin_batch.model import griffin, testing
from griffin_batch.model.config import ATTENTION, RECURRENT, GriffinConfig
from griffin_batch.model.engine import ring_buckets

CONFIG = GriffinConfig(
    vocab_size=61, width=32, mlp_expanded_width=48, num_heads=2, lru_width=32,
    block_types=(RECURRENT, ATTENTION, ATTENTION), embeddings_scale_by_sqrt_dim=True,
    attention_window_size=8, logits_soft_cap=30.0)
# Tokens each row has seen before decoding: empty, inside each bucket, and wrapped.
PROMPT_LENGTHS = [1, 2, 3, 5, 7, 9, 14, 30]
STEPS = 12
# The same maths over fewer masked slots: equal up to float32 summation order.
TOL = dict(rtol=1e-5, atol=1e-5)
_apply = jax.jit(functools.partial(griffin.apply, CONFIG),
                 static_argnames=("return_logits", "ring_limit", "row_rings"))


def _noisy_params():
    # Zero-initialised scales and biases would hide mistakes: every leaf is perturbed.
    return jax.tree.map(jnp.asarray, testing.noisy_params(CONFIG, noise=0.3))


def test_per_row_rings_decode_like_the_whole_ring():
    params = _noisy_params()
    rings = tuple(ring_buckets(2, CONFIG.attention_window_size))
    assert rings[-1] == CONFIG.attention_window_size + 1
    rng = np.random.default_rng(0)
    batch, longest = len(PROMPT_LENGTHS) + 1, max(PROMPT_LENGTHS)
    tokens = rng.integers(0, CONFIG.vocab_size, (batch, longest)).astype(np.int32)
    positions = np.full((batch, longest), -1, np.int32)
    for row, n in enumerate(PROMPT_LENGTHS):  # the last row stays idle
        positions[row, :n] = np.arange(n)
    _, cache = _apply(params, tokens, positions, None, return_logits=False)

    pos = np.array(PROMPT_LENGTHS + [-1], np.int32)
    tok = jnp.asarray(tokens[:, :1])
    ours, theirs = cache, cache
    for _ in range(STEPS):
        want, theirs = _apply(params, tok, pos[:, None], theirs)
        got, ours = _apply(params, tok, pos[:, None], ours, row_rings=rings)
        np.testing.assert_allclose(got, want, **TOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), ours, theirs)
        tok = jnp.argmax(want, axis=-1).astype(jnp.int32)
        pos = np.where(pos >= 0, pos + 1, -1)


def test_row_rings_capped_by_the_batch_bucket():
    """With a ring limit, the rows' lengths stop at it (positions stay below it)."""
    params = _noisy_params()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CONFIG.vocab_size, (3, 4)).astype(np.int32)
    positions = np.array([[0, 1, 2, 3], [0, -1, -1, -1], [0, 1, -1, -1]], np.int32)
    _, cache = _apply(params, tokens, positions, None, return_logits=False)
    pos = np.array([[4], [1], [2]], np.int32)
    want, _ = _apply(params, tokens[:, :1], pos, cache)
    got, _ = _apply(params, tokens[:, :1], pos, cache, ring_limit=6, row_rings=(2, 3, 4, 6))
    np.testing.assert_allclose(got, want, **TOL)
