"""One entry point for decode attention over per-row ring lengths: validates, picks
a backend, dispatches.

    out = decode_attention(q, keys, values, lengths, implementation=None)

attends each row's query heads q[b] [n, h] to the first ``lengths[b]`` slots of
its ring, keys[b] and values[b] [s, h] (multi-query: the heads share them).

Implementations (``IMPLEMENTATIONS``):

* ``xla``: ``reference.attend``, a masked dense softmax over the whole ring; the
  oracle, and the choice on CPU (where the model has its own per-row XLA loop).
* ``pallas_tpu``: Pallas Mosaic kernel; needs a TPU unless ``interpret=True``.
* ``pallas_gpu``: Pallas Triton kernel; needs a GPU unless ``interpret=True``.
* ``pallas_tpu_interpret``, ``pallas_gpu_interpret``: those kernels in the Pallas
  interpreter, on any backend (slow): for tests that run a whole model with a kernel
  on CPU, through the same one-string setting as the others.

Accelerator-only modules are imported on first use, so this module imports anywhere.
Shape legend: b batch, n query heads, s ring slots, h head dim.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from griffin_batch.kernels import backends
from griffin_batch.kernels.decode_attention import reference

KERNELS = ("pallas_tpu", "pallas_gpu")
_INTERPRETED = {f"{name}_interpret": name for name in KERNELS}
IMPLEMENTATIONS = ("xla", *KERNELS, *_INTERPRETED)
_INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MODULES = {name: f"griffin_batch.kernels.decode_attention.{name}" for name in KERNELS}


@functools.cache
def _pallas_gpu_compiles() -> bool:
    """Whether the Triton kernel compiles on this GPU, at RecurrentGemma-2B's decode shapes."""
    q = jax.ShapeDtypeStruct((2, 10, 256), jnp.bfloat16)
    ring = jax.ShapeDtypeStruct((2, 2049, 256), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    return backends.compiles("decode_attention", lambda: importlib.import_module(
        _MODULES["pallas_gpu"]).attend.lower(q, ring, ring, lengths), fallback="xla")


def resolve_implementation(name: str | None = None, *, platform: str | None = None) -> str:
    """Maps a requested implementation (None or "auto" included) to a concrete name:
    the Pallas kernel on TPU and on GPU (where it compiles), XLA elsewhere.

    Args:
      name: one of ``IMPLEMENTATIONS``, or None / "auto" for the best on ``platform``.
      platform: backend to choose for; ``jax.default_backend()`` when None.

    Returns:
      A name from ``IMPLEMENTATIONS``.

    Raises:
      ValueError: ``name`` is not a known implementation.
    """
    return backends.resolve("decode_attention", name, IMPLEMENTATIONS, platform=platform,
                            cpu="xla", gpu_fallback="xla",
                            triton_compiles=lambda: _pallas_gpu_compiles())


def is_kernel(implementation: str) -> bool:
    """Whether a resolved implementation is a Pallas kernel (interpreted or not): it
    reads each row's own length, so callers need no ring bucket."""
    return implementation != "xla"


def _validate(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array,
              block_size: int | None, implementation: str) -> None:
    """Checks shapes, dtypes and the block size, naming the offending argument."""
    if q.ndim != 3:
        raise ValueError(f"decode_attention: q has shape {tuple(q.shape)}; expected rank 3 "
                         "[batch, heads, head_dim]")
    b, _, h = q.shape
    for name, ring in (("keys", keys), ("values", values)):
        if ring.ndim != 3 or ring.shape[0] != b or ring.shape[2] != h:
            raise ValueError(
                f"decode_attention: {name} has shape {tuple(ring.shape)}; expected "
                f"[batch, slots, head_dim] with batch {b} and head_dim {h} from q")
    if values.shape != keys.shape:
        raise ValueError(f"decode_attention: values has shape {tuple(values.shape)} but keys "
                         f"has {tuple(keys.shape)}; expected equal")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"decode_attention: lengths has shape {tuple(lengths.shape)}; "
                         f"expected [batch] = ({b},)")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"decode_attention: lengths has dtype {lengths.dtype}; expected int32")
    for name, array in (("q", q), ("keys", keys), ("values", values)):
        if array.dtype not in _INPUT_DTYPES:
            raise TypeError(f"decode_attention: {name} has dtype {array.dtype}; expected "
                            "float32 or bfloat16")
    if block_size is None or implementation not in KERNELS:
        return
    if implementation == "pallas_tpu" and (block_size <= 0 or block_size % 8):
        raise ValueError(f"decode_attention: block_size={block_size}; the TPU kernel needs a "
                         "positive multiple of 8 (sublanes)")
    if implementation == "pallas_gpu" and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"decode_attention: block_size={block_size}; the GPU kernel needs a "
                         "power of two >= 16 (Triton tiles)")


def decode_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    lengths: jax.Array,
    *,
    implementation: str | None = None,
    block_size: int | None = None,
    interpret: bool = False,
    batch_axis: str | None = None,
) -> jax.Array:
    """Each row's query heads attend to the first ``lengths`` slots of its ring.

    Works eagerly and under ``jax.jit`` (the implementation is chosen at trace time).
    The caller states what a row may see through ``lengths`` alone: in Griffin's
    decode, a ring of window + 1 slots right after the new key's write holds only
    keys inside the window, so a row sees its first min(tokens, window + 1) slots.

    Args:
      q: [b, n, h] float32 or bfloat16 queries, one token per row.
      keys: [b, s, h] ring of keys, q's head dim.
      values: [b, s, h] ring of values.
      lengths: [b] int32 in [0, s]: slots each row attends to (0: the row's output
        is zeros).
      implementation: None or "auto" (best on this backend), or one of
        ``IMPLEMENTATIONS``. An explicit Pallas kernel on the wrong platform raises.
      block_size: ring slots per kernel block (a default per kernel when None).
      interpret: run a Pallas kernel in the Pallas interpreter (works on CPU; slow).
      batch_axis: the axis of the current mesh (``jax.set_mesh``) the rows are
        split over, if any. XLA cannot split a Pallas kernel by itself: it would
        gather every row's ring onto every device and run the whole batch on
        each. With this axis each device runs the kernel on its own rows
        (``jax.shard_map``); other mesh axes see the whole of its rows.

    Returns:
      [b, n, h] in q's dtype.

    Raises:
      ValueError / TypeError: bad shapes, dtypes, block size or implementation name.
      RuntimeError: an explicitly requested kernel cannot run on this platform.
    """
    q, keys, values, lengths = map(jnp.asarray, (q, keys, values, lengths))
    name = resolve_implementation(implementation)
    if name in _INTERPRETED:
        name, interpret = _INTERPRETED[name], True
    _validate(q, keys, values, lengths, block_size, name)
    backends.check_runnable("decode_attention", name, interpret, portable="xla")
    if name == "xla":
        return reference.attend(q, keys, values, lengths.astype(jnp.int32))
    module = importlib.import_module(_MODULES[name])
    call = functools.partial(module.attend, block_size=block_size, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if batch_axis is not None and not mesh.empty and mesh.shape.get(batch_axis, 1) > 1:
        rows = jax.sharding.PartitionSpec(batch_axis)
        # check_vma off: the Pallas call carries no varying-axes rule of its own.
        call = jax.shard_map(call, in_specs=(rows,) * 4, out_specs=rows, check_vma=False)
    return call(q, keys, values, lengths.astype(jnp.int32))
