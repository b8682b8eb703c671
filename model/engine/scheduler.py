"""Slot scheduling: what each slot holds, and plain plans for the next device calls.

A slot is free (None), ``Reserved`` for a sample still prefilling, or holds a
decoding ``SampleState``. ``SlotScheduler`` hands free slots to a prefill
group (``PrefillPlan``) and describes the next decode round (``DecodePlan``,
including the attention-ring bucket it compiles for). Plans are lists and
numpy arrays; the runner turns them into device calls.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from griffin_batch.model.engine.output_processor import SampleState


def ring_buckets(min_ring: int, window: int) -> list[int]:
    """The attention-ring lengths decode compiles for, ending with the whole window.

    Powers of two times ``min_ring`` and 1.5 times those: a slot pays for at
    most a third more ring than it has filled (a power-of-two ladder pays up
    to double), for about twice as many compiled decode programs.
    """
    out, b = [], min_ring
    while b < window:
        out += [b] + ([b * 3 // 2] if b * 3 // 2 < window and b % 2 == 0 else [])
        b *= 2
    return out + [window + 1]


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= ``n``, and at least ``floor``."""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class Reserved:
    """A slot held for a sample that is still prefilling (not decoded yet)."""

    sample: SampleState


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Samples prefilled together, and the slots they will decode in.

    The samples of one request share one prompt row (it is prefilled once).

    Attributes:
      samples: the samples, in admission order.
      slots: ``slots[i]`` is reserved for ``samples[i]``.
      row_of: ``row_of[i]`` is the prompt row of ``samples[i]``.
      prompts: token ids of each row.
    """

    samples: list[SampleState]
    slots: list[int]
    row_of: list[int]
    prompts: list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """One decode round over every slot; free and reserved slots are inactive.

    Attributes:
      samples: per slot, the decoding sample or None.
      last_tokens: per slot, the token to feed (0 when inactive).
      positions: per slot, that token's position (-1 when inactive).
      token_index: per slot, tokens generated so far (seeds each step's sampling).
      ring_limit: attention-ring length to compile for (None: the whole window).
      row_rings: the ring buckets up to ``ring_limit`` (the whole ring for
        None), from which each slot's own ring length is picked on device.
    """

    samples: list[SampleState | None]
    last_tokens: np.ndarray
    positions: np.ndarray
    token_index: np.ndarray
    ring_limit: int | None
    row_rings: tuple[int, ...]


class SlotScheduler:
    """Bookkeeping of ``num_slots`` slots.

    Args:
      num_slots: slots the engine decodes together.
      rings: ``ring_buckets(...)`` of the engine.
      window: the model's attention window.
    """

    def __init__(self, num_slots: int, rings: list[int], window: int):
        self.slots: list[SampleState | Reserved | None] = [None] * num_slots
        self._rings = rings
        self._window = window

    def free(self) -> list[int]:
        """Free slots, in slot order."""
        return [i for i, s in enumerate(self.slots) if s is None]

    def busy(self) -> bool:
        """Some slot is decoding or reserved."""
        return any(s is not None for s in self.slots)

    def decoding(self) -> list[int]:
        """Slots holding a decoding sample, in slot order."""
        return [i for i, s in enumerate(self.slots) if isinstance(s, SampleState)]

    def reserved(self) -> list[SampleState]:
        """Samples that hold a slot while they prefill, in slot order."""
        return [r.sample for r in self.slots if isinstance(r, Reserved)]

    def plan_prefill(self, samples: list[SampleState]) -> PrefillPlan:
        """Reserves the first free slots for ``samples`` (no more than are free)."""
        slots = self.free()[: len(samples)]
        for slot, s in zip(slots, samples, strict=True):
            self.slots[slot] = Reserved(s)
        row_by_request: dict[int, int] = {}
        row_of = [row_by_request.setdefault(id(s.request), len(row_by_request))
                  for s in samples]
        prompts: list[np.ndarray] = [np.zeros(0, np.int32) for _ in row_by_request]
        for s, row in zip(samples, row_of, strict=True):
            prompts[row] = s.prompt
        return PrefillPlan(samples, slots, row_of, prompts)

    def occupy(self, slot: int, sample: SampleState) -> None:
        """``sample`` decodes in ``slot`` from now on."""
        self.slots[slot] = sample

    def release(self, slot: int) -> None:
        """``slot`` is free again (its sample finished)."""
        self.slots[slot] = None

    def plan_decode(self, steps: int) -> DecodePlan | None:
        """The next round of ``steps`` decode steps; None when no slot decodes."""
        live = [s if isinstance(s, SampleState) else None for s in self.slots]
        if not any(live):
            return None
        limit = self.ring_limit(steps)
        return DecodePlan(
            samples=live,
            last_tokens=np.array([s.last_token if s else 0 for s in live], np.int32),
            positions=np.array([s.position if s else -1 for s in live], np.int32),
            token_index=np.array([s.generated if s else 0 for s in live], np.int32),
            ring_limit=limit,
            row_rings=self.row_rings(limit))

    def row_rings(self, limit: int | None) -> tuple[int, ...]:
        """The ring buckets a round with ring limit ``limit`` picks each slot's from."""
        top = limit or self._window + 1
        return tuple(b for b in self._rings if b < top) + (top,)

    def ring_limits(self, max_position: int | None = None) -> list[int | None]:
        """Every ring limit a round can have while positions stay below ``max_position``
        (None: any position)."""
        limits = [b if b < self._window else None for b in self._rings]
        if max_position is not None:
            limits = limits[: next((i + 1 for i, b in enumerate(self._rings)
                                    if b > max_position), len(limits))]
        return list(dict.fromkeys(limits))

    def ring_limit(self, steps: int) -> int | None:
        """The smallest ring bucket past every decoding slot's position after ``steps``.

        None when that is the whole window (decode then attends to all of it).
        """
        top = max((s.position + steps for s in self.slots if isinstance(s, SampleState)),
                  default=0)
        limit = next((b for b in self._rings if b > top), None)
        return None if limit is None or limit >= self._window else limit
