"""Constant-memory continuous-batching engine for Griffin models.

The engine owns ``num_slots`` slots. Each slot holds one sequence's fixed-size
model state (see ``griffin.init_cache``); the whole slot array lives on device
and is donated to every compiled call, so memory is allocated once and never
grows with prompt or output length.

One loop iteration:
  1. if slots are free, start prefilling the next pending requests (a small
     group of rows with its own cache, advanced one chunk per iteration so a
     100k-token prompt never stalls the others);
  2. when a group's prompts are consumed, sample each row's first token and
     copy its state into its slot;
  3. run ``decode_steps`` decode steps for all slots in one compiled call and
     hand the new tokens to the host, which streams text, matches stop
     strings and frees finished slots for the next request.

Modules, one job each (only ``runner`` and ``core`` import JAX):
  * ``messages``: ``OutputChunk`` and ``SlotSnapshot``, the plain values out.
  * ``admission``: the admission queue and request validation.
  * ``scheduler``: slot bookkeeping and plans for prefill and decode.
  * ``runner``: compiled functions and device state.
  * ``output_processor``: stop tokens, stop strings, ``max_tokens``; chunks.
  * ``core``: ``Engine``, the loop over them, snapshots and delivery.

``Engine`` and ``sample`` resolve lazily, so importing the JAX-free parts
(or ``SlotSnapshot``) does not load a device runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from griffin_batch.model.engine.messages import OutputChunk, SlotSnapshot
from griffin_batch.model.engine.scheduler import ring_buckets
from griffin_batch.model.engine_config import EngineConfig

if TYPE_CHECKING:
    from griffin_batch.model.engine.core import Engine, sample

__all__ = ["Engine", "EngineConfig", "OutputChunk", "SlotSnapshot", "ring_buckets", "sample"]

_LAZY = {"Engine": "griffin_batch.model.engine.core", "sample": "griffin_batch.model.engine.core"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
