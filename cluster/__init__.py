"""Ray and hardware: accelerator detection, worker placement, fault outcomes, worker pools.

This package knows Ray and devices, never model internals.
"""

from griffin_batch.cluster import connect, faults, hardware, pool

__all__ = ["connect", "faults", "hardware", "pool"]
