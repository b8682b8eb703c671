"""Which dtype a worker computes in: the one source of the ``--dtype`` default.

Imports no JAX: the command line and the job config name the default from
here, and the worker resolves it once it knows its device platform.

On TPU and GPU the default is bfloat16: their matrix units run bfloat16 at
several times the float32 rate, and decoding reads every weight once per
step, so half the bytes is close to half the time. bfloat16 logits stay
within a stated tolerance of float32 ones (``tests/model/test_bfloat16.py``).
On CPU the default keeps the checkpoint's stored dtype: a CPU gains little
from bfloat16, and a float32 checkpoint run on CPU is usually a check of numerics.
"""

from __future__ import annotations

DTYPES = ("bfloat16", "float32")
"""What ``--dtype`` accepts."""

ACCELERATOR_DTYPE = "bfloat16"
"""Compute dtype on accelerators when none is requested."""

ACCELERATOR_PLATFORMS = frozenset({"tpu", "gpu", "cuda", "rocm"})
"""``jax.Device.platform`` names that get ``ACCELERATOR_DTYPE`` by default."""

DEFAULT_HELP = f"default: {ACCELERATOR_DTYPE} on TPU and GPU, the stored dtype on CPU"
"""How the command line and config docstrings state the default."""


def compute_dtype(requested: str | None, platform: str) -> str | None:
    """The dtype a worker casts its parameters to.

    Args:
      requested: The job's ``--dtype`` (``bfloat16``, ``float32``), or None.
      platform: The worker's device platform (``jax.local_devices()[0].platform``).

    Returns:
      ``requested`` when given; else ``ACCELERATOR_DTYPE`` on an accelerator
      platform; else None (keep the checkpoint's stored dtypes).
    """
    if requested is not None:
        return requested
    return ACCELERATOR_DTYPE if platform.lower() in ACCELERATOR_PLATFORMS else None
