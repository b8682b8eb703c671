"""Griffin / RecurrentGemma hyper-parameters as an immutable value with presets.

Field names follow DeepMind's reference ``GriffinConfig`` so that a
``config.json`` written for either loads into the other.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_TYPES = (RECURRENT, ATTENTION)


def griffin_pattern(depth: int) -> tuple[str, ...]:
    """The residual pattern (recurrent, recurrent, attention) repeated to ``depth`` blocks."""
    return tuple(itertools.islice(itertools.cycle((RECURRENT, RECURRENT, ATTENTION)), depth))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GriffinConfig:
    """Griffin architecture hyper-parameters (arXiv 2402.19427).

    Attributes:
      vocab_size: Number of tokens in the vocabulary.
      width: Model width (embedding and residual stream dimension).
      mlp_expanded_width: Hidden width of the gated MLP.
      num_heads: Attention query heads; also the number of diagonal blocks of
        the RG-LRU gates. Must divide ``width`` and ``lru_width``.
      lru_width: Width of the RG-LRU branch; ``None`` means ``width``.
      block_types: Temporal block of each residual block, "recurrent" or
        "attention", in order.
      embeddings_scale_by_sqrt_dim: Multiply input embeddings by sqrt(width)
        (rounded to bfloat16, as the reference does).
      attention_window_size: Local attention window; a query attends to itself
        and the ``attention_window_size`` tokens before it.
      logits_soft_cap: ``c * tanh(logits / c)``; 0 disables capping.
      conv1d_width: Temporal width of the short causal convolution.
    """

    vocab_size: int
    width: int
    mlp_expanded_width: int
    num_heads: int
    block_types: tuple[str, ...]
    embeddings_scale_by_sqrt_dim: bool
    attention_window_size: int
    logits_soft_cap: float
    lru_width: int | None = None
    conv1d_width: int = 4

    def __post_init__(self):
        object.__setattr__(self, "block_types", tuple(_block_type(b) for b in self.block_types))
        for name in ("vocab_size", "width", "mlp_expanded_width", "num_heads",
                     "attention_window_size", "conv1d_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GriffinConfig.{name} must be a positive int, got {value!r}")
        if not self.block_types:
            raise ValueError("GriffinConfig.block_types must name at least one block")
        if self.width % self.num_heads:
            raise ValueError(
                f"GriffinConfig.num_heads={self.num_heads} must divide width={self.width}")
        if self.effective_lru_width % self.num_heads:
            raise ValueError(
                f"GriffinConfig.num_heads={self.num_heads} must divide "
                f"lru_width={self.effective_lru_width}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    # Derived properties -------------------------------------------------
    @property
    def effective_lru_width(self) -> int:
        return self.lru_width or self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def embedding_scale(self) -> float:
        """sqrt(width) rounded to bfloat16 exactly as the reference rounds it."""
        if not self.embeddings_scale_by_sqrt_dim:
            return 1.0
        import ml_dtypes  # local: numpy-only, safe inside jit tracing

        return float(ml_dtypes.bfloat16(math.sqrt(self.width)))

    # (De)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_types"] = list(self.block_types)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> GriffinConfig:
        """Builds a config from a dict of field names, naming unknown or missing fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{source}: unknown GriffinConfig fields {unknown}; expected {sorted(fields)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> GriffinConfig:
        return dataclasses.replace(self, **changes)


def _block_type(b: Any) -> str:
    name = getattr(b, "name", b)  # accept the reference's TemporalBlockType enum
    name = str(name).lower()
    if name not in BLOCK_TYPES:
        raise ValueError(f"block type {b!r} is not one of {BLOCK_TYPES}")
    return name


class Preset(enum.Enum):
    """Published model shapes."""

    RECURRENTGEMMA_2B = "recurrentgemma-2b"
    RECURRENTGEMMA_9B = "recurrentgemma-9b"
    GRIFFIN_7B = "griffin-7b"
    HAWK_7B = "hawk-7b"

    def config(self, vocab_size: int = 256_000) -> GriffinConfig:
        return GriffinConfig(vocab_size=vocab_size, **_PRESETS[self])

    @classmethod
    def parse(cls, value: str | Preset) -> Preset:
        if isinstance(value, Preset):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown preset {value!r}; expected one of {[p.value for p in cls]}") from None


_PRESETS: dict[Preset, dict[str, Any]] = {
    Preset.RECURRENTGEMMA_2B: dict(
        width=2560, mlp_expanded_width=3 * 2560, num_heads=10, lru_width=2560,
        block_types=griffin_pattern(26), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=2048, logits_soft_cap=30.0),
    Preset.RECURRENTGEMMA_9B: dict(
        width=4096, mlp_expanded_width=3 * 4096, num_heads=16, lru_width=4096,
        block_types=griffin_pattern(38), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=2048, logits_soft_cap=30.0),
    Preset.GRIFFIN_7B: dict(
        width=4096, mlp_expanded_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=griffin_pattern(32), embeddings_scale_by_sqrt_dim=False,
        attention_window_size=1024, logits_soft_cap=0.0),
    Preset.HAWK_7B: dict(
        width=4096, mlp_expanded_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=(RECURRENT,) * 32, embeddings_scale_by_sqrt_dim=False,
        attention_window_size=1024, logits_soft_cap=0.0),
}

# Fields that parameter shapes determine; the rest must come from config.json or a preset.
SHAPE_FIELDS: Sequence[str] = (
    "vocab_size", "width", "mlp_expanded_width", "num_heads", "lru_width", "block_types")
