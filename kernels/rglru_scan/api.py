"""One entry point for the RG-LRU linear scan: validates, picks a backend, dispatches.

    y, h_last = rglru_scan(x, a, h0, implementation=None)

computes h_t = a_t * h_{t-1} + x_t over time with h_{-1} = h0, returns y_t = h_t in
x's dtype and the final state h_last in float32. The state is always accumulated in
float32 (Griffin keeps its RG-LRU state in float32), whatever the input dtype.

Implementations (``IMPLEMENTATIONS``):

* ``reference``: plain ``lax.scan``; the oracle.
* ``sequential``: in-place ``fori_loop``; the fastest on CPU (see ``_CPU_CHOICE``).
* ``associative``: ``lax.associative_scan``; log-depth, for GPUs without Triton.
* ``pallas_tpu``: Pallas Mosaic kernel; needs a TPU unless ``interpret=True``.
* ``pallas_gpu``: Pallas Triton kernel; needs a GPU unless ``interpret=True``.

Accelerator-only modules are imported on first use, so this module imports anywhere.
Shape legend: b batch, t time, e lru width.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from griffin_batch.kernels import backends
from griffin_batch.kernels.rglru_scan import block_sizes as bs

IMPLEMENTATIONS = ("reference", "sequential", "associative", "pallas_tpu", "pallas_gpu")
_INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# Auto choice on CPU, from benchmarks/bench_scan.py on a shared 2-core x86 host (float32,
# median ms per call under jax.jit; ranges over five runs on a loaded machine):
#                  b8_t1_e2560   b8_t2048_e512   b1_t16384_e512
#   reference      0.02-0.05        34-52           33-48
#   sequential     0.03-0.05        15-19           16-24
#   associative    0.03-0.06        61-250          60-310
# Decode (t = 1) takes the fused single-step path whatever the choice, so prefill decides.
# The scan is memory-bound on CPU: ``sequential`` touches each element about once, in
# place; ``reference`` adds time-major transposes and a stacked scan output, and
# ``associative`` makes ~2 log2(t) passes over the data. bfloat16 widens the gap (the
# reference's bfloat16 scan takes seconds). Pallas kernels only run interpreted on CPU.
_CPU_CHOICE = "sequential"
_MODULES = {name: f"griffin_batch.kernels.rglru_scan.{name}" for name in IMPLEMENTATIONS}


@functools.cache
def _pallas_gpu_compiles() -> bool:
    """Whether the Triton kernel compiles on this GPU (compile only, never runs)."""
    x = jax.ShapeDtypeStruct((1, 8, 128), jnp.float32)
    h0 = jax.ShapeDtypeStruct((1, 128), jnp.float32)
    return backends.compiles("rglru_scan", lambda: importlib.import_module(
        _MODULES["pallas_gpu"]).scan.lower(x, x, h0), fallback="associative")


def resolve_implementation(name: str | None = None, *, platform: str | None = None) -> str:
    """Maps a requested implementation (None or "auto" included) to a concrete name.

    Args:
      name: one of ``IMPLEMENTATIONS``, or None / "auto" for the fastest on ``platform``.
      platform: backend to choose for; ``jax.default_backend()`` when None.

    Returns:
      A name from ``IMPLEMENTATIONS``.

    Raises:
      ValueError: ``name`` is not a known implementation.
    """
    # GPU, unmeasured (no GPU here): the Triton kernel streams x and a once, where the
    # associative scan makes ~2 log2(t) passes; the latter is the portable fallback.
    return backends.resolve("rglru_scan", name, IMPLEMENTATIONS, platform=platform,
                            cpu=_CPU_CHOICE, gpu_fallback="associative",
                            triton_compiles=lambda: _pallas_gpu_compiles())


def _validate(x: jax.Array, a: jax.Array, h0: jax.Array | None) -> None:
    """Checks shapes and dtypes, naming the offending argument."""
    if x.ndim != 3:
        raise ValueError(
            f"rglru_scan: x has shape {tuple(x.shape)}; expected rank 3 [batch, time, width]"
        )
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(
            f"rglru_scan: a has shape {tuple(a.shape)} but x has shape {tuple(x.shape)}; "
            "expected equal [batch, time, width]"
        )
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"rglru_scan: x has dtype {x.dtype}; expected float32 or bfloat16")
    if a.dtype != x.dtype:
        raise TypeError(
            f"rglru_scan: a has dtype {a.dtype} but x has dtype {x.dtype}; expected the same"
        )
    if h0 is None:
        return
    b, _, e = x.shape
    if tuple(h0.shape) != (b, e):
        raise ValueError(
            f"rglru_scan: h0 has shape {tuple(h0.shape)}; expected [batch, width] = {(b, e)} "
            f"from x's shape {tuple(x.shape)}"
        )
    if h0.dtype != jnp.float32:
        raise TypeError(
            f"rglru_scan: h0 has dtype {h0.dtype}; expected float32 (the RG-LRU state is "
            "kept in float32)"
        )


@jax.jit
def _single_step(x: jax.Array, a: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The decode path (t = 1): one fused multiply-add, no loop, no kernel launch."""
    h = a[:, 0].astype(jnp.float32) * h0 + x[:, 0].astype(jnp.float32)  # [b, e]
    return h[:, None].astype(x.dtype), h


def rglru_scan(
    x: jax.Array,
    a: jax.Array,
    h0: jax.Array | None = None,
    *,
    implementation: str | None = None,
    block_sizes: bs.BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Linear recurrence h_t = a_t * h_{t-1} + x_t over the time axis.

    Works eagerly and under ``jax.jit`` (the implementation is chosen at trace time).

    Args:
      x: [b, t, e] float32 or bfloat16 inputs.
      a: [b, t, e] decay in [0, 1], same dtype as x.
      h0: [b, e] float32 initial state; zeros when None.
      implementation: None or "auto" (fastest on this backend), or one of
        ``IMPLEMENTATIONS``. An explicit Pallas kernel on the wrong platform raises.
      block_sizes: tiling for the Pallas kernels (a default per shape when None);
        validated against x under the chosen implementation's rules, ignored by the
        implementations without blocks.
      interpret: run a Pallas kernel in the Pallas interpreter (works on CPU; slow).

    Returns:
      y: [b, t, e] in x.dtype with y[:, i] = h_i, and h_last: [b, e] float32.

    Raises:
      ValueError / TypeError: bad shapes, dtypes, block sizes or implementation name.
      RuntimeError: an explicitly requested kernel cannot run on this platform.
    """
    x, a = jnp.asarray(x), jnp.asarray(a)
    h0 = None if h0 is None else jnp.asarray(h0)
    _validate(x, a, h0)
    name = resolve_implementation(implementation)
    backends.check_runnable("rglru_scan", name, interpret, portable="reference")
    if block_sizes is not None:
        block_sizes.validate(x.shape, name)
    b, t, e = x.shape
    if h0 is None:
        h0 = jnp.zeros((b, e), jnp.float32)
    if t == 0:
        return x, h0
    if t == 1:
        return _single_step(x, a, h0)
    module = importlib.import_module(_MODULES[name])
    return module.scan(x, a, h0, block_sizes=block_sizes, interpret=interpret)
