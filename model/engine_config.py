"""``EngineConfig``: the engine's sizing, and the one source of its defaults.

This module imports no JAX, so the driver, the command line and the worker's
spec build on it without loading a device runtime. Fields a job exposes carry
their command-line flag and help text in their metadata (``job_options``); the
CLI, the job config and the worker all read defaults from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _field(default: Any, flag: str | None = None, help: str | None = None) -> Any:
    metadata = {"flag": flag, "help": help} if flag else {}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Engine sizing.

    Attributes:
      num_slots: Sequences decoded together. Must be a multiple of the number
        of devices the engine spans.
      decode_steps: Decode steps per compiled call (K); tokens leave the device
        every K steps.
      chunk_size: Prefill chunk length (C); prefill memory is O(C x (window + C)).
      prefill_batch: Most prompts prefilled together in one group.
      prefill_chunks_per_round: Most prefill chunks run between two decode
        rounds; bounds how long decoding slots wait for new prompts.
      max_prompt_tokens: Longer prompts are rejected per request.
      min_ring: Smallest attention-ring bucket; decode attends only to the
        filled part of the window, rounded up to a bucket (``ring_buckets``).
      longest_first: Admit the pending request with the largest ``max_tokens``
        first (among ``lookahead`` pulled ahead). Long requests then start
        early instead of forming a tail after the short ones are done, which
        is what bounds a batch's total time; outputs do not depend on the
        order. False: arrival order.
      lookahead: Requests pulled ahead of admission for ``longest_first``
        (None: 4 x num_slots). Bounds host memory for unbounded iterables.
      scan_implementation: RG-LRU scan backend (None: auto).
      attention_implementation: Decode attention backend
        (``griffin_batch.kernels.decode_attention``; None: a Pallas kernel over
        per-row ring lengths on TPU and GPU, XLA on CPU).
      num_devices: Local devices the engine spans (None: all).
      model_parallel: Devices each parameter is split over (tensor
        parallelism); slots are split over the remaining factor.
    """

    num_slots: int = _field(32, "--slots", "sequences decoded together per worker")
    decode_steps: int = _field(32, "--decode-steps", "decode steps per device call")
    chunk_size: int = _field(256, "--chunk-size", "prefill chunk length in tokens")
    prefill_batch: int = _field(8)
    prefill_chunks_per_round: int = _field(4)
    max_prompt_tokens: int = _field(
        131_072, "--max-prompt-tokens", "longer prompts become error rows"
    )
    min_ring: int = _field(256)
    longest_first: bool = _field(True)
    lookahead: int | None = _field(None)
    scan_implementation: str | None = _field(None)
    attention_implementation: str | None = _field(None)
    num_devices: int | None = _field(None)
    model_parallel: int = _field(1)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and value <= 0:
                flag = f.metadata.get("flag")
                where = f"EngineConfig.{f.name}" + (f" ({flag})" if flag else "")
                raise ValueError(f"{where} must be positive, got {value}")


def job_options() -> list[dataclasses.Field]:
    """The fields a job exposes as command-line options, in declaration order."""
    return [f for f in dataclasses.fields(EngineConfig) if f.metadata.get("flag")]


def flag_dest(f: dataclasses.Field) -> str:
    """The argparse destination of a field's flag (``--max-prompt-tokens`` -> ``max_prompt_tokens``)."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")
