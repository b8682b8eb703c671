"""The Griffin model (arXiv 2402.19427) and its functional entry points.

``Griffin`` is a Flax module whose parameter tree equals the reference's.
The functions below are what the rest of the project calls:

* ``init_cache``: the fixed-size state of ``batch`` sequences.
* ``apply``: run tokens at given positions through the model, carrying a cache.
* ``forward_logits``: logits of fresh sequences, optionally with chunked prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from griffin_batch.model import array_typing as at
from griffin_batch.model import layers
from griffin_batch.model.config import ATTENTION, RECURRENT, GriffinConfig

Cache = tuple[layers.BlockCache, ...]


class ResidualBlock(nn.Module):
    """Pre-norm residual block: temporal mixing, then a gated MLP."""

    config: GriffinConfig
    block_type: str
    scan_implementation: str | None = None
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x, positions, cache, ring_limit=None, row_rings=None):
        cfg = self.config
        h = layers.RMSNorm(cfg.width, name="temporal_pre_norm")(x)
        if self.block_type == RECURRENT:
            h, cache = layers.RecurrentBlock(
                cfg.width, cfg.num_heads, cfg.effective_lru_width, cfg.conv1d_width,
                self.scan_implementation, name="recurrent_block")(h, positions, cache)
        else:
            h, cache = layers.LocalAttentionBlock(
                cfg.width, cfg.num_heads, cfg.attention_window_size,
                self.attention_implementation, name="attention_block")(
                h, positions, cache, ring_limit, row_rings)
        residual = h + x
        h = layers.RMSNorm(cfg.width, name="channel_pre_norm")(residual)
        h = layers.MLPBlock(cfg.width, cfg.mlp_expanded_width, name="mlp_block")(h)
        return h + residual, cache


class Embedder(nn.Module):
    """Holds the tied input/output embedding table [v, d]."""

    vocab_size: int
    width: int

    def setup(self):
        self.input_embedding = self.param(
            "input_embedding",
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0),
            (self.vocab_size, self.width))

    def table(self) -> jax.Array:
        return self.input_embedding


class Griffin(nn.Module):
    """Griffin / RecurrentGemma language model.

    Attributes:
      config: Architecture hyper-parameters.
      scan_implementation: RG-LRU scan backend (see ``griffin_batch.kernels.rglru_scan``).
      attention_implementation: decode attention backend (see
        ``griffin_batch.kernels.decode_attention``).
    """

    config: GriffinConfig
    scan_implementation: str | None = None
    attention_implementation: str | None = None

    def setup(self):
        cfg = self.config
        self.embedder = Embedder(cfg.vocab_size, cfg.width)
        self.blocks = [
            ResidualBlock(cfg, block_type, self.scan_implementation,
                          self.attention_implementation, name=f"blocks.{i}")
            for i, block_type in enumerate(cfg.block_types)
        ]
        self.final_norm = layers.RMSNorm(cfg.width)

    def __call__(
        self,
        tokens: at.Tokens,
        positions: at.Positions,
        cache: Cache | None = None,
        *,
        return_logits: bool = True,
        ring_limit: int | None = None,
        row_rings: tuple[int, ...] | None = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[at.Logits | None, Cache]:
        """Runs ``tokens`` [b, t] at ``positions`` [b, t] (-1 = padding) from ``cache``.

        ``logits_at`` [b] (optional) picks one time index per row: logits are
        then computed there only, [b, 1, v], which is all prefill needs and
        spares the vocabulary projection of every other prompt token.
        ``ring_limit`` and ``row_rings``: see ``layers.LocalAttentionBlock``.

        Returns:
          Soft-capped logits [b, t, v] in the compute dtype (None unless
          ``return_logits``) and the updated cache.
        """
        table = self.embedder.table()
        x = table[tokens]
        if self.config.embeddings_scale_by_sqrt_dim:
            x = x * jnp.asarray(self.config.embedding_scale, x.dtype)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, block_cache = block(x, positions, None if cache is None else cache[i], ring_limit,
                                   row_rings)
            new_cache.append(block_cache)
        if not return_logits:
            return None, tuple(new_cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.final_norm(x)
        logits = x @ table.T.astype(x.dtype)
        if c := self.config.logits_soft_cap:
            logits = jnp.tanh(logits / c) * c
        return logits, tuple(new_cache)


# Compiled: run eagerly, Flax's init dispatches its ~200 small ops one by one, which takes
# longer than compiling them as one program (9.5 s against 4 s for the demo model).
@functools.partial(jax.jit, static_argnums=(0, 2))  # config, dtype (by position or name)
def init_params(config: GriffinConfig, key: jax.Array, dtype=jnp.float32) -> at.Params:
    """Random parameters with the reference's initialisers (zeros for biases and scales)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Griffin(config).init(key, tokens, tokens)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def init_cache(config: GriffinConfig, batch_size: int, dtype=jnp.float32) -> Cache:
    """An empty cache for ``batch_size`` sequences; its size is independent of length."""
    caches = []
    for block_type in config.block_types:
        if block_type == RECURRENT:
            e = config.effective_lru_width
            caches.append(layers.RecurrentCache(
                rg_lru_state=jnp.zeros((batch_size, e), jnp.float32),
                conv1d_state=jnp.zeros((batch_size, config.conv1d_width - 1, e), dtype)))
        else:
            assert block_type == ATTENTION
            shape = (batch_size, config.attention_window_size + 1, config.head_dim)
            caches.append(layers.AttentionCache(
                keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                num_tokens=jnp.zeros((batch_size,), jnp.int32)))
    return tuple(caches)


def cache_bytes(cache: Cache) -> int:
    """Bytes held by a cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def hoist(params: at.Params) -> dict:
    """Weights a decode loop should derive once, outside the loop.

    XLA:CPU does not hoist cheap-looking ops such as slices of loop-invariant
    weights out of a while loop, and then materialises them on every step.
    Pass the result as ``apply(..., hoisted=...)`` inside the loop body.
    """
    out = {}
    for name, block in params.items():
        if name.startswith("blocks."):
            w = block["mlp_block"]["ffw_up"]["w"]
            out[name] = {"mlp_block": {"ffw_up": {"w_0": w[0], "w_1": w[1]}}}
    return out


def apply(
    config: GriffinConfig,
    params: at.Params,
    tokens: at.Tokens,
    positions: at.Positions,
    cache: Cache | None,
    *,
    return_logits: bool = True,
    ring_limit: int | None = None,
    row_rings: tuple[int, ...] | None = None,
    scan_implementation: str | None = None,
    attention_implementation: str | None = None,
    hoisted: dict | None = None,
    logits_at: jax.Array | None = None,
) -> tuple[at.Logits | None, Cache]:
    """Functional form of ``Griffin.__call__`` (see there); ``hoisted``: see ``hoist``."""
    variables = {"params": params}
    if hoisted:
        variables[layers.HOISTED] = hoisted
    return Griffin(config, scan_implementation, attention_implementation).apply(
        variables, tokens, positions, cache,
        return_logits=return_logits, ring_limit=ring_limit, row_rings=row_rings,
        logits_at=logits_at)


def param_dtype(params: at.Params):
    return jax.tree.leaves(params)[0].dtype


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def _forward_logits(config, params, tokens, chunk_size):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if chunk_size is None or chunk_size >= length:
        logits, _ = apply(config, params, tokens, positions, None)
        return logits.astype(jnp.float32)

    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    chunks = (tokens.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1),
              positions.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1))

    def step(cache, chunk):
        logits, cache = apply(config, params, chunk[0], chunk[1], cache)
        return cache, logits.astype(jnp.float32)

    # A scan keeps one chunk's activations live at a time: memory O(C x (window + C)).
    _, logits = jax.lax.scan(step, init_cache(config, batch, param_dtype(params)), chunks)
    logits = logits.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size, -1)
    return logits[:, :length]


def forward_logits(
    config: GriffinConfig, params: at.Params, tokens, *, chunk_size: int | None = None
) -> jax.Array:
    """Logits of fresh sequences at positions 0..T-1.

    Args:
      config: Model hyper-parameters.
      params: Parameter tree.
      tokens: [batch, time] int token ids.
      chunk_size: Process the prompt in chunks of this many tokens, carrying the
        fixed-size cache between chunks (None: one pass).

    Returns:
      float32 logits [batch, time, vocab].
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _forward_logits(config, params, tokens, chunk_size)
