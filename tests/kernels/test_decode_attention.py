"""Decode attention over per-row ring lengths: every kernel against the oracle, and the api.

The Pallas kernels run in interpret mode here (any backend); lowering tests check, on
CPU, that they also lower for TPU (Mosaic) and CUDA (Triton), which the interpreter
alone would not catch. ``tests/model/test_engine.py`` runs a whole engine with each
kernel interpreted against the engine's XLA path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from griffin_batch.kernels import decode_attention as decode_attention_pkg
from griffin_batch.kernels.decode_attention import api, reference

# Tolerances, in one place: |actual - oracle| <= atol + rtol * |oracle|, elementwise.
# float32: the kernels sum the softmax block by block (online), the oracle in one pass:
#   a few float32 ulps of outputs of size ~1.
# bfloat16: the oracle rounds the normalised probabilities to bfloat16 before the
#   values, a kernel the unnormalised ones (and divides at the end): a few bfloat16
#   ulps (2^-8 = 0.4% relative each) of outputs of size ~1.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "bfloat16": {"atol": 2e-2, "rtol": 2e-2},
}
DTYPES = (jnp.float32, jnp.bfloat16)
KERNELS = ("pallas_tpu", "pallas_gpu")
# Block sizes per kernel: None (the default, longer than these rings) and one that leaves
# a partial last block on both rings of SHAPES (37 and 48 slots: TPU 40, GPU 32). Blocks
# of 16 run in ``test_pallas_tpu_row_groups`` and ``test_a_row_reads_nothing_past_its_length``.
BLOCKS = {"pallas_tpu": (None, 40), "pallas_gpu": (None, 32)}
# (heads, head dim, ring slots): multi-query shapes; 37 slots is no multiple of any block,
# 3 heads and head dim 24 are no power of two (the GPU kernel pads them).
SHAPES = ((3, 16, 37), (2, 24, 48))


def make_inputs(b: int, n: int, h: int, s: int, dtype, seed: int = 0):
    """Random q and rings; lengths cycle through empty, one slot, both sides of every
    tested block edge (8, 16, 32, 40) and the full ring."""
    rng = np.random.default_rng(seed)
    q, keys, values = (jnp.asarray(rng.standard_normal(shape), dtype)
                       for shape in ((b, n, h), (b, s, h), (b, s, h)))
    edges = [0, 1, 8, 15, 16, 17, 32, 33, 40, 41, s - 1, s]
    lengths = np.array([min(edges[i % len(edges)], s) for i in range(b)], np.int32)
    return q, keys, values, jnp.asarray(lengths)


def assert_close(actual, expected, dtype, what: str) -> None:
    tol = TOLERANCES[jnp.dtype(dtype).name]
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual - expected)
    print(f"{what}: max|diff| {diff.max():.2e}, mean {diff.mean():.2e} ({tol})")
    bad = diff > tol["atol"] + tol["rtol"] * np.abs(expected)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} outside {tol}; "
                           f"max|diff| {diff.max():.3e}, mean {diff.mean():.3e}")


# ------------------------------------------------------------------- numerics


def test_reference_matches_a_numpy_softmax():
    q, keys, values, lengths = make_inputs(8, 3, 16, 37, jnp.float32, seed=1)
    out = np.asarray(reference.attend(q, keys, values, lengths))
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    for row, length in enumerate(np.asarray(lengths)):
        if length == 0:
            assert not out[row].any()
            continue
        logits = q[row] @ keys[row, :length].T / np.sqrt(q.shape[-1])  # [n, length]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[row], probs @ values[row, :length], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_h{}_s{}".format(*s))
def test_kernels_match_the_reference(impl, dtype, shape):
    n, h, s = shape
    q, keys, values, lengths = make_inputs(12, n, h, s, dtype, seed=s)
    want = reference.attend(q, keys, values, lengths)
    for block in BLOCKS[impl]:
        got = api.decode_attention(q, keys, values, lengths, implementation=impl,
                                   block_size=block, interpret=True)
        assert got.dtype == q.dtype
        assert_close(got, want, dtype, f"{impl} block {block} {jnp.dtype(dtype).name}")
        assert not np.asarray(got[np.asarray(lengths) == 0], np.float32).any()


@pytest.mark.parametrize("impl", KERNELS)
def test_a_row_reads_nothing_past_its_length(impl):
    """Slots at or past a row's length do not count, whatever they hold (NaN included)."""
    q, keys, values, lengths = make_inputs(12, 2, 16, 48, jnp.float32, seed=3)
    slot = jnp.arange(48)[None, :, None]
    past = slot >= lengths[:, None, None]
    poisoned = [jnp.where(past, jnp.nan, a) for a in (keys, values)]
    got = api.decode_attention(q, *poisoned, lengths, implementation=impl, block_size=16,
                               interpret=True)
    assert np.isfinite(np.asarray(got)).all()
    assert_close(got, reference.attend(q, keys, values, lengths), jnp.float32, impl)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_pallas_tpu_row_groups(rows):
    """Rows sharing a grid step each compute only their own length (the group reads up
    to its longest); 12 rows of lengths from 0 to the full ring, in groups of ``rows``
    (4 is also the default for 12 rows, which the other tests use)."""
    from griffin_batch.kernels.decode_attention import pallas_tpu

    q, keys, values, lengths = make_inputs(12, 3, 16, 48, jnp.float32, seed=rows)
    got = pallas_tpu.attend(q, keys, values, lengths, block_size=16, rows=rows, interpret=True)
    assert_close(got, reference.attend(q, keys, values, lengths), jnp.float32, f"rows {rows}")


def test_pallas_tpu_rows_per_step():
    from griffin_batch.kernels.decode_attention import pallas_tpu

    assert [pallas_tpu.rows_per_step(b) for b in (1, 6, 12, 64, 256)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="rows=5 does not divide the batch 12"):
        pallas_tpu.attend(*make_inputs(12, 1, 16, 8, jnp.float32), rows=5, interpret=True)


def test_pallas_tpu_under_the_tpu_interpreter():
    """TPU-faithful interpreter: VMEM scratch, resident output block, NaN-poisoned fresh
    memory (the partial last block past the ring's end holds NaN, and must not leak)."""
    from jax.experimental.pallas import tpu as pltpu

    from griffin_batch.kernels.decode_attention import pallas_tpu

    q, keys, values, lengths = make_inputs(12, 3, 16, 37, jnp.float32, seed=5)
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    got = pallas_tpu.attend(q, keys, values, lengths, block_size=16, interpret=params)
    assert_close(got, reference.attend(q, keys, values, lengths), jnp.float32, "pallas_tpu")


def test_interpreted_names_run_the_kernels():
    q, keys, values, lengths = make_inputs(4, 2, 16, 20, jnp.float32)
    want = reference.attend(q, keys, values, lengths)
    for impl in KERNELS:
        got = jax.jit(lambda *a, impl=impl: api.decode_attention(
            *a, implementation=f"{impl}_interpret"))(q, keys, values, lengths)
        assert_close(got, want, jnp.float32, f"{impl}_interpret under jit")
    assert api.is_kernel("pallas_tpu_interpret") and not api.is_kernel("xla")


# ------------------------------------------------------------------- api contract


@pytest.mark.parametrize("args, error, match", [
    (((2, 3, 16, 1), (2, 8, 16), (2, 8, 16), (2,)), ValueError, "q has shape"),
    (((2, 3, 16), (2, 8, 8), (2, 8, 8), (2,)), ValueError, "keys has shape"),
    (((2, 3, 16), (2, 8, 16), (2, 9, 16), (2,)), ValueError, "values has shape"),
    (((2, 3, 16), (2, 8, 16), (2, 8, 16), (3,)), ValueError, "lengths has shape"),
])
def test_bad_shapes_name_the_argument(args, error, match):
    q, keys, values, lengths = (jnp.zeros(s, jnp.int32 if i == 3 else jnp.float32)
                                for i, s in enumerate(args))
    with pytest.raises(error, match=match):
        api.decode_attention(q, keys, values, lengths)


def test_bad_dtypes_and_block_sizes_name_the_argument():
    q, keys, values, lengths = make_inputs(2, 2, 16, 8, jnp.float32)
    with pytest.raises(TypeError, match="lengths has dtype"):
        api.decode_attention(q, keys, values, lengths.astype(jnp.float32))
    with pytest.raises(TypeError, match="keys has dtype float16"):
        api.decode_attention(q, keys.astype(jnp.float16), values, lengths)
    with pytest.raises(ValueError, match="multiple of 8"):
        api.decode_attention(q, keys, values, lengths, implementation="pallas_tpu",
                             block_size=12, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        api.decode_attention(q, keys, values, lengths, implementation="pallas_gpu",
                             block_size=48, interpret=True)


def test_unknown_implementation_and_unrunnable_kernel():
    q, keys, values, lengths = make_inputs(2, 2, 16, 8, jnp.float32)
    with pytest.raises(ValueError, match="unknown implementation 'flash'"):
        api.decode_attention(q, keys, values, lengths, implementation="flash")
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU-only error path")
    for impl, label in (("pallas_tpu", "TPU"), ("pallas_gpu", "GPU")):
        with pytest.raises(RuntimeError, match=f"needs a {label} backend"):
            api.decode_attention(q, keys, values, lengths, implementation=impl)


def test_auto_choice_per_platform():
    assert api.resolve_implementation(None, platform="cpu") == "xla"
    assert api.resolve_implementation("auto", platform="tpu") == "pallas_tpu"
    assert api.resolve_implementation("pallas_gpu", platform="cpu") == "pallas_gpu"
    for compiles, choice in ((True, "pallas_gpu"), (False, "xla")):
        with mock.patch.object(api, "_pallas_gpu_compiles", return_value=compiles):
            assert api.resolve_implementation(platform="cuda") == choice


def test_a_triton_kernel_that_fails_to_compile_means_fall_back(caplog):
    from griffin_batch.kernels import backends

    def lower():
        raise RuntimeError("no Triton here")

    assert not backends.compiles("decode_attention", lower, fallback="xla")
    assert "Pallas Triton kernel unavailable (no Triton here); using xla" in caplog.text
    assert set(api.IMPLEMENTATIONS) == {"xla", "pallas_tpu", "pallas_gpu",
                                        "pallas_tpu_interpret", "pallas_gpu_interpret"}


def test_public_surface_and_lazy_imports():
    assert decode_attention_pkg.__all__ == ["api", "decode_attention", "reference"]
    code = ("import sys; import griffin_batch.kernels.decode_attention; "
            "assert not any(m.endswith(('pallas_tpu', 'pallas_gpu')) for m in sys.modules "
            "if 'decode_attention' in m), 'kernel imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_ON_A_MESH = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from griffin_batch.kernels.decode_attention import api, reference
mesh = Mesh(np.array(jax.devices()).reshape(4, 1), ("data", "model"))
rng = np.random.default_rng(0)
q, keys, values = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                   for s in ((8, 2, 16), (8, 40, 16), (8, 40, 16)))
lengths = jnp.asarray([0, 1, 5, 16, 17, 33, 39, 40], jnp.int32)
args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (q, keys, values, lengths)]
out = {}
for axis in ("data", None):
    f = jax.jit(lambda *a, axis=axis: api.decode_attention(
        *a, implementation="pallas_tpu_interpret", batch_axis=axis))
    with jax.set_mesh(mesh):
        got = f(*args)
        hlo = f.lower(*args).compile().as_text()
    out[str(axis)] = dict(
        diff=float(jnp.max(jnp.abs(got - reference.attend(q, keys, values, lengths)))),
        all_gather="all-gather" in hlo, split=got.sharding.spec == P("data"))
print(json.dumps(out))
"""


def test_a_kernel_runs_on_each_devices_own_rows():
    """XLA cannot split a Pallas call: given rows split over 4 devices, it gathers every
    row's ring onto each. With ``batch_axis`` each device runs the kernel on its own rows:
    no all-gather in the compiled program, the output stays split, the values equal."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _ON_A_MESH], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out)
    assert out["data"] == dict(diff=out["data"]["diff"], all_gather=False, split=True)
    assert out["None"]["all_gather"]  # what the split avoids
    assert max(out["data"]["diff"], out["None"]["diff"]) <= 1e-5


# ------------------------------------------------------------ lowering and hardware

# RecurrentGemma-2B's decode: 10 query heads of 256 over a ring of window + 1 slots.
_2B = dict(b=64, n=10, h=256, s=2049)


def _abstract(dtype):
    b, n, h, s = _2B.values()
    ring = jax.ShapeDtypeStruct((b, s, h), dtype)
    return (jax.ShapeDtypeStruct((b, n, h), dtype), ring, ring,
            jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_pallas_tpu_lowers_for_tpu(dtype):
    """Cross-lowers on any host: Mosaic's block-shape rules are checked at this stage."""
    from griffin_batch.kernels.decode_attention import pallas_tpu

    exported = export.export(jax.jit(pallas_tpu.attend), platforms=("tpu",))(*_abstract(dtype))
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_pallas_gpu_lowers_for_cuda(dtype):
    """Triton's power-of-two tile rule is checked at this stage (10 heads must be padded)."""
    from griffin_batch.kernels.decode_attention import pallas_gpu

    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(jax.jit(pallas_gpu.attend), platforms=("cuda",),
                             disabled_checks=[triton_call])(*_abstract(dtype))
    assert "triton" in exported.mlir_module()


def _compiled_kernel_case(impl: str):
    b, n, h, s = _2B.values()
    q, keys, values, _ = make_inputs(b, n, h, s, jnp.bfloat16, seed=6)
    lengths = jnp.asarray(np.random.default_rng(6).integers(0, s + 1, b), jnp.int32)
    got = api.decode_attention(q, keys, values, lengths, implementation=impl)
    assert_close(got, reference.attend(q, keys, values, lengths), jnp.bfloat16, impl)


@pytest.mark.tpu_only
@pytest.mark.skipif(jax.default_backend() != "tpu",
                    reason="runs the compiled Mosaic kernel; needs a TPU")
def test_pallas_tpu_compiled():
    assert api.resolve_implementation() == "pallas_tpu"
    _compiled_kernel_case("pallas_tpu")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="runs the compiled Triton kernel; needs a GPU")
def test_pallas_gpu_compiled():
    _compiled_kernel_case("pallas_gpu")

