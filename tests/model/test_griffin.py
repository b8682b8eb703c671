"""Numerics of our Griffin against DeepMind's reference, from the inside out.

Tolerances (max abs difference of logits):
  * float32 against the reference, one-shot, chunked and token-by-token: 1e-4
  * bfloat16: our error against the float32 reference stays within
    BF16_RATIO x the reference's own bfloat16 error (bfloat16 rounding alone
    moves these noisy-weight logits by ~0.3, so a fixed 1e-1 cannot hold).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recurrentgemma import jax as rg

from griffin_batch.model import griffin, testing
from griffin_batch.model.config import ATTENTION, RECURRENT, GriffinConfig

F32_TOL = 1e-4
BF16_RATIO = 1.5
R, A = RECURRENT, ATTENTION

CONFIGS = {
    # width != lru_width, 3 heads (not a power of two), window 8 << sequence length.
    "narrow_lru": GriffinConfig(
        vocab_size=97, width=48, mlp_expanded_width=80, num_heads=3, lru_width=60,
        block_types=(R, A, R, A), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=8, logits_soft_cap=30.0),
    # Irregular order starting with attention, no embedding scale, no soft-cap.
    "irregular": GriffinConfig(
        vocab_size=64, width=40, mlp_expanded_width=96, num_heads=5, lru_width=40,
        block_types=(A, A, R, R, R), embeddings_scale_by_sqrt_dim=False,
        attention_window_size=5, logits_soft_cap=0.0),
    # Hawk: recurrent only.
    "hawk": GriffinConfig(
        vocab_size=50, width=32, mlp_expanded_width=64, num_heads=2, lru_width=48,
        block_types=(R, R), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=4, logits_soft_cap=30.0),
}
SEQ_LEN = 29  # several windows for every config above


def reference_config(cfg: GriffinConfig) -> rg.GriffinConfig:
    return rg.GriffinConfig(
        vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.mlp_expanded_width,
        num_heads=cfg.num_heads, lru_width=cfg.lru_width,
        block_types=tuple(rg.TemporalBlockType[b.upper()] for b in cfg.block_types),
        embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
        attention_window_size=cfg.attention_window_size, logits_soft_cap=cfg.logits_soft_cap,
        scan_type=rg.ScanType.LINEAR_NATIVE)


def noisy_params(cfg: GriffinConfig, seed: int = 0, scale: float = 0.2):
    """Random params with every leaf perturbed (the reference init zeroes biases and scales)."""
    return jax.tree.map(jnp.asarray, testing.noisy_params(cfg, seed=seed, noise=scale))


@functools.cache
def case(name: str):
    cfg = CONFIGS[name]
    params = noisy_params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, SEQ_LEN), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN), tokens.shape)
    # jit: one compile instead of op-by-op dispatch of the reference's eager Flax code.
    ref_logits, _ = jax.jit(rg.Griffin(reference_config(cfg)).apply)(
        {"params": params}, tokens, positions)
    ours = griffin.forward_logits(cfg, params, tokens)
    return cfg, params, tokens, np.asarray(ref_logits), np.asarray(ours)


# griffin.apply compiled: eager Flax dispatches op by op, seconds per call even on these sizes.
apply = jax.jit(griffin.apply, static_argnums=0,
                static_argnames=("return_logits", "ring_limit", "row_rings", "scan_implementation"))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_tree_equals_reference(name):
    cfg = CONFIGS[name]
    tokens = jnp.zeros((1, 1), jnp.int32)
    # Structure and shapes only: traced, never computed.
    ref = jax.eval_shape(rg.Griffin(reference_config(cfg)).init,
                         jax.random.PRNGKey(0), tokens, tokens)["params"]
    ours = jax.eval_shape(functools.partial(griffin.init_params, cfg), jax.random.PRNGKey(0))
    assert jax.tree.structure(ref) == jax.tree.structure(ours)
    assert jax.tree.map(lambda x: x.shape, ref) == jax.tree.map(lambda x: x.shape, ours)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_reference(name):
    _, _, _, ref, ours = case(name)
    diff = max_diff(ref, ours)
    print(f"{name}: one-shot forward max|diff| = {diff:.2e} (tol {F32_TOL})")
    assert ours.dtype == np.float32
    assert diff <= F32_TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("chunk", [3, 8])
def test_chunked_prefill_equals_one_shot(name, chunk):
    cfg, params, tokens, _, ours = case(name)
    chunked = griffin.forward_logits(cfg, params, tokens, chunk_size=chunk)
    diff = max_diff(chunked, ours)
    print(f"{name}: chunk {chunk} vs one-shot max|diff| = {diff:.2e} (tol {F32_TOL})")
    assert diff <= F32_TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_token_by_token_decode_equals_forward(name):
    cfg, params, tokens, ref, _ = case(name)
    step = jax.jit(functools.partial(griffin.apply, cfg))
    cache = griffin.init_cache(cfg, tokens.shape[0])
    worst = 0.0
    for t in range(SEQ_LEN):
        pos = jnp.full((tokens.shape[0], 1), t, jnp.int32)
        logits, cache = step(params, tokens[:, t : t + 1], pos, cache)
        worst = max(worst, max_diff(logits[:, 0], ref[:, t]))
    print(f"{name}: decode step-by-step vs reference forward max|diff| = {worst:.2e}")
    assert worst <= F32_TOL


def test_cache_size_is_constant():
    cfg = CONFIGS["narrow_lru"]
    size = griffin.cache_bytes(griffin.init_cache(cfg, 1))
    params = noisy_params(cfg)
    cache = griffin.init_cache(cfg, 1)
    for length in (3, 40):
        tokens = jnp.zeros((1, length), jnp.int32)
        _, cache = apply(cfg, params, tokens, jnp.arange(length)[None], None)
        assert griffin.cache_bytes(cache) == size
        assert jax.tree.map(jnp.shape, cache) == jax.tree.map(
            jnp.shape, griffin.init_cache(cfg, 1))


def test_padding_leaves_state_untouched():
    """Rows with position -1 (padding / idle slots) must not change their state."""
    cfg = CONFIGS["narrow_lru"]
    _, params, tokens, _, _ = case("narrow_lru")
    _, cache = apply(cfg, params, tokens[:, :10], jnp.broadcast_to(jnp.arange(10),
                                                                            (2, 10)), None)
    idle = jnp.full((2, 4), -1, jnp.int32)
    _, after = apply(cfg, params, tokens[:, 10:14], idle, cache)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_matches_reference_in_bfloat16():
    cfg, params, tokens, ref32, _ = case("narrow_lru")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN), tokens.shape)
    ref16, _ = jax.jit(rg.Griffin(reference_config(cfg)).apply)({"params": p16}, tokens, positions)
    ours16 = griffin.forward_logits(cfg, p16, tokens)
    chunked16 = griffin.forward_logits(cfg, p16, tokens, chunk_size=8)
    ref_err, our_err = max_diff(ref16, ref32), max_diff(ours16, ref32)
    chunk_err = max_diff(chunked16, ref32)
    print(f"bfloat16 max|diff| vs float32: reference {ref_err:.2e}, ours {our_err:.2e}, "
          f"ours chunked {chunk_err:.2e}, ours vs reference {max_diff(ours16, ref16):.2e}")
    assert our_err <= BF16_RATIO * ref_err
    assert chunk_err <= BF16_RATIO * ref_err


def test_forward_logits_rejects_bad_input():
    cfg, params, tokens, _, _ = case("hawk")
    with pytest.raises(ValueError, match="batch, time"):
        griffin.forward_logits(cfg, params, tokens[0])
    with pytest.raises(ValueError, match="chunk_size"):
        griffin.forward_logits(cfg, params, tokens, chunk_size=0)


def test_logits_at_picks_one_position_per_row():
    """Prefill asks for each row's last-token logits only; they equal the full forward's."""
    cfg, params, tokens, ref, _ = case("narrow_lru")
    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN), tokens.shape)
    at = jnp.array([SEQ_LEN - 1, 7][: tokens.shape[0]], jnp.int32)
    logits, _ = apply(cfg, params, tokens, positions, None, logits_at=at)
    assert logits.shape == (tokens.shape[0], 1, cfg.vocab_size)
    diff = max_diff(logits[:, 0], ref[jnp.arange(tokens.shape[0]), at])
    print(f"logits_at vs reference forward max|diff| = {diff:.2e} (tol {F32_TOL})")
    assert diff <= F32_TOL
