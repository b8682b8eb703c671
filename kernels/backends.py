"""What every kernel package's dispatcher shares: the backend this process runs on,
the platforms each Pallas kernel needs, and the errors for a wrong request.

A module of the ``griffin_batch.kernels`` namespace, imported by
``rglru_scan.api`` and ``decode_attention.api``; it imports JAX only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax

AUTO = (None, "auto")
"""Requested implementation names that mean "the best on this backend"."""
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
NEEDS_PLATFORM = {"pallas_tpu": ("TPU", ("tpu",)), "pallas_gpu": ("GPU", GPU_PLATFORMS)}
"""Each Pallas implementation's backend: (its name in messages, platform names)."""

_log = logging.getLogger(__name__)


def current_platform() -> str:
    """The default backend's platform name ("cpu", "tpu", "gpu", ...)."""
    return jax.default_backend()


def check_name(kernel: str, name: str, implementations: tuple[str, ...]) -> None:
    """Raises ValueError, naming the kernel, for a name that is neither auto nor known."""
    if name not in AUTO and name not in implementations:
        raise ValueError(f"{kernel}: unknown implementation {name!r}; expected None, 'auto' "
                         f"or one of {implementations}")


def check_runnable(kernel: str, implementation: str, interpret: bool, portable: str) -> None:
    """Fails fast when an explicitly requested Pallas kernel cannot run on this backend.

    Args:
      kernel: the kernel package's name, for the message.
      implementation: the resolved implementation.
      interpret: the kernel runs in the Pallas interpreter (any backend).
      portable: the implementation to suggest instead, one that runs anywhere.
    """
    if implementation not in NEEDS_PLATFORM or interpret:
        return
    label, platforms = NEEDS_PLATFORM[implementation]
    if current_platform() not in platforms:
        raise RuntimeError(
            f"{kernel}: implementation {implementation!r} needs a {label} backend; found "
            f"{current_platform()}. Use implementation={portable!r} (or None to pick the fastest "
            "available), or pass interpret=True to run the kernel in the Pallas interpreter.")


def resolve(kernel: str, name: str | None, implementations: tuple[str, ...], *,
            platform: str | None, cpu: str, gpu_fallback: str,
            triton_compiles: Callable[[], bool]) -> str:
    """A dispatcher's choice: ``name`` itself when given, else the Pallas kernel on TPU,
    the Triton kernel on GPU when it compiles there (else ``gpu_fallback``), ``cpu`` on CPU.

    Raises:
      ValueError: ``name`` is not a known implementation.
    """
    check_name(kernel, name, implementations)
    if name not in AUTO:
        return name
    platform = platform or current_platform()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in GPU_PLATFORMS:
        return "pallas_gpu" if triton_compiles() else gpu_fallback
    return cpu


def compiles(kernel: str, lower: Callable[[], Any], fallback: str) -> bool:
    """Whether ``lower()`` (a Triton kernel's lowering) compiles here; compiles only, never
    runs. Any failure (no Triton, an old driver, ...) logs and answers False."""
    try:
        lower().compile()
        return True
    except Exception as err:  # noqa: BLE001 - whatever fails, the caller falls back
        _log.warning("%s: Pallas Triton kernel unavailable (%s); using %s", kernel, err,
                     fallback)
        return False
