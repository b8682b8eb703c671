"""Every RG-LRU scan implementation against the ``lax.scan`` oracle, plus the api contract.

The Pallas kernels run in interpret mode here (any backend); ``tpu_only`` tests run them
compiled. Lowering tests check, on CPU, that the kernels also lower for TPU (Mosaic) and
CUDA (Triton), which the interpreter alone would not catch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import re
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from griffin_batch.kernels import rglru_scan as rglru_scan_pkg
from griffin_batch.kernels.rglru_scan import api, reference
from griffin_batch.kernels.rglru_scan import block_sizes as bs

# Tolerances, in one place: |actual - oracle| <= atol + rtol * |oracle|, elementwise.
# float32: every implementation accumulates in float32 like the oracle; only the order of
#   operations differs (associative), so a few float32 ulps of |h| <= ~20 suffice.
# bfloat16: y is the float32 state rounded once to bfloat16. Different float32 rounding
#   can flip that rounding, i.e. 1 bfloat16 ulp (2^-8 = 0.4% relative); 2e-2 allows a
#   few. h_last is float32 whatever the input dtype, so it always uses the float32 row.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "bfloat16": {"atol": 2e-2, "rtol": 2e-2},
}

DTYPES = (jnp.float32, jnp.bfloat16)
LENGTHS = (1, 7, 64, 200)
# block_t 48 divides none of 7, 64, 200: exercises the a = 1, x = 0 time padding.
# GPU block_e 64 splits the width in two; 256 pads it from 128.
BLOCKS = {
    "sequential": (None,),
    "associative": (None,),
    "pallas_tpu": (None, bs.BlockSizes(1, 16, 128), bs.BlockSizes(2, 48, 128)),
    "pallas_gpu": (None, bs.BlockSizes(1, 16, 64), bs.BlockSizes(2, 48, 256)),
}
# Interpret mode is slow to compile: small batch and width for the Pallas kernels.
SHAPES = {
    "sequential": (3, 40),
    "associative": (3, 40),
    "pallas_tpu": (2, 128),
    "pallas_gpu": (2, 128),
}
PALLAS = ("pallas_tpu", "pallas_gpu")


def make_inputs(b: int, t: int, e: int, dtype, seed: int = 0):
    """x ~ N(0, 1); a in [0, 1) with some exact 0 (reset) and 1 (padding) steps.

    NumPy rather than jax.random: nothing to compile per shape, which keeps the grid fast.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, e), np.float32)
    a = rng.uniform(size=(b, t, e)).astype(np.float32) ** 0.25  # mostly near 1, like Griffin
    special = rng.integers(0, 10, size=(b, t, 1))
    a = np.where(special == 0, 0.0, np.where(special == 1, 1.0, a)).astype(np.float32)
    h0 = rng.standard_normal((b, e), np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(h0)


def assert_close(actual, expected, dtype, what: str) -> None:
    tol = TOLERANCES[jnp.dtype(dtype).name]
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual - expected)
    bad = diff > tol["atol"] + tol["rtol"] * np.abs(expected)
    if bad.any():
        pytest.fail(
            f"{what}: {bad.sum()} of {bad.size} elements outside {tol}; max abs diff "
            f"{diff.max():.3e}, mean abs diff {diff.mean():.3e}"
        )


def _grid_cases():
    for impl, dtype, t in itertools.product(BLOCKS, DTYPES, LENGTHS):
        for blocks in BLOCKS[impl]:
            marks = [pytest.mark.slow] if impl in PALLAS and t > 1 else []
            block_id = (
                "default" if blocks is None else "b{}t{}e{}".format(*dataclasses.astuple(blocks))
            )
            yield pytest.param(
                impl, dtype, t, blocks, marks=marks, id=f"{impl}-{dtype.__name__}-t{t}-{block_id}"
            )


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize(("impl", "dtype", "t", "blocks"), list(_grid_cases()))
def test_matches_reference(impl, dtype, t, blocks, with_h0):
    b, e = SHAPES[impl]
    x, a, h0 = make_inputs(b, t, e, dtype)
    h0_arg = h0 if with_h0 else None
    y, h_last = api.rglru_scan(
        x, a, h0_arg, implementation=impl, block_sizes=blocks, interpret=impl in PALLAS
    )
    y_ref, h_ref = reference.scan(x, a, h0 if with_h0 else jnp.zeros_like(h0))

    assert y.dtype == x.dtype and y.shape == x.shape
    assert h_last.dtype == jnp.float32 and h_last.shape == (b, e)
    assert_close(y, y_ref, dtype, f"{impl} y")
    assert_close(h_last, h_ref, jnp.float32, f"{impl} h_last")
    # y is the state cast to x's dtype, so its last step is exactly h_last, rounded.
    np.testing.assert_array_equal(
        np.asarray(y[:, -1], np.float32), np.asarray(h_last.astype(dtype), np.float32)
    )


@pytest.mark.parametrize("impl", list(BLOCKS))
def test_single_step_without_the_fast_path(impl):
    """The api routes t = 1 to one fused multiply-add; the kernels must still handle it."""
    b, e = SHAPES[impl]
    x, a, h0 = make_inputs(b, 1, e, jnp.float32, seed=1)
    module = importlib.import_module(f"griffin_batch.kernels.rglru_scan.{impl}")
    y, h_last = module.scan(x, a, h0, interpret=impl in PALLAS)
    expected = a[:, 0] * h0 + x[:, 0]
    assert_close(y[:, 0], expected, jnp.float32, f"{impl} y")
    assert_close(h_last, expected, jnp.float32, f"{impl} h_last")


def _loops_in(fn, *args) -> list[str]:
    """Loop primitives anywhere in fn's jaxpr, nested jaxprs included."""
    return re.findall(r"\b(?:scan|while)\[", str(jax.make_jaxpr(fn)(*args)))


@pytest.mark.parametrize("impl", ["reference", "sequential", "associative", "auto"])
def test_decode_fast_path_is_one_multiply_add(impl):
    x, a, h0 = make_inputs(4, 2, 256, jnp.bfloat16, seed=2)
    scan = functools.partial(rglru_scan_pkg.rglru_scan, implementation=impl)
    y, h_last = scan(x[:, :1], a[:, :1], h0)
    expected = a[:, 0].astype(jnp.float32) * h0 + x[:, 0].astype(jnp.float32)
    # Compiled, the multiply-add fuses into one rounding; the eager oracle rounds twice.
    assert_close(h_last, expected, jnp.float32, "decode h_last")
    assert y.dtype == jnp.bfloat16 and y.shape == (4, 1, 256)
    assert not _loops_in(scan, x[:, :1], a[:, :1], h0)
    if impl != "associative":  # control: the check does see the loop of a longer scan
        assert _loops_in(scan, x, a, h0)


def test_reference_matches_a_numpy_loop():
    """The oracle itself, against the recurrence written out step by step in float32."""
    x, a, h0 = make_inputs(2, 30, 16, jnp.float32, seed=7)
    xn, an, h = np.asarray(x), np.asarray(a), np.asarray(h0)
    expected = []
    for i in range(x.shape[1]):
        h = an[:, i] * h + xn[:, i]
        expected.append(h)
    y, h_last = reference.scan(x, a, h0)
    assert_close(y, np.stack(expected, axis=1), jnp.float32, "reference y")
    assert_close(h_last, h, jnp.float32, "reference h_last")


@pytest.mark.parametrize(
    ("impl", "shape", "blocks"),
    [
        ("pallas_tpu", (2, 37, 200), bs.BlockSizes(1, 16, 256)),  # e padded 200 -> 256
        ("pallas_tpu", (2, 37, 1100), bs.BlockSizes(1, 16, 1024)),  # two width blocks, padded
        ("pallas_gpu", (2, 37, 200), bs.BlockSizes(2, 16, 64)),  # e padded 200 -> 256
    ],
)
def test_ragged_width(impl, shape, blocks):
    x, a, h0 = make_inputs(*shape, jnp.float32, seed=3)
    y, h_last = api.rglru_scan(x, a, h0, implementation=impl, block_sizes=blocks, interpret=True)
    y_ref, h_ref = reference.scan(x, a, h0)
    assert_close(y, y_ref, jnp.float32, f"{impl} y")
    assert_close(h_last, h_ref, jnp.float32, f"{impl} h_last")


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_chunked_prefill_equals_one_pass(impl):
    """Scanning in pieces and carrying h_last equals one scan (the engine's chunked prefill)."""
    x, a, h0 = make_inputs(2, 50, 64, jnp.float32, seed=4)
    y_full, h_full = api.rglru_scan(x, a, h0, implementation=impl)
    h, pieces = h0, []
    for start, stop in [(0, 1), (1, 17), (17, 18), (18, 50)]:
        y, h = api.rglru_scan(x[:, start:stop], a[:, start:stop], h, implementation=impl)
        pieces.append(y)
    assert_close(jnp.concatenate(pieces, axis=1), y_full, jnp.float32, f"{impl} chunked y")
    assert_close(h, h_full, jnp.float32, f"{impl} chunked h_last")


def test_works_under_jit_and_with_empty_time():
    x, a, h0 = make_inputs(2, 9, 16, jnp.float32, seed=5)
    jitted = jax.jit(functools.partial(api.rglru_scan, implementation="auto"))
    assert_close(jitted(x, a, h0)[0], api.rglru_scan(x, a, h0)[0], jnp.float32, "jit y")
    y, h_last = api.rglru_scan(x[:, :0], a[:, :0], h0)
    assert y.shape == (2, 0, 16)
    np.testing.assert_array_equal(np.asarray(h_last), np.asarray(h0))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("impl", "label"), [("pallas_tpu", "TPU"), ("pallas_gpu", "GPU")])
def test_unavailable_backend_fails_fast(impl, label):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU-only error path")
    x, a, h0 = make_inputs(2, 8, 128, jnp.float32)
    with pytest.raises(
        RuntimeError, match=rf"'{impl}' needs a {label} backend; found cpu.*interpret=True"
    ):
        api.rglru_scan(x, a, h0, implementation=impl)


@pytest.mark.parametrize(
    ("x_shape", "a_shape", "h0_shape", "error", "match"),
    [
        ((2, 6), (2, 6), None, ValueError, r"x has shape \(2, 6\); expected rank 3"),
        (
            (2, 6, 8),
            (2, 5, 8),
            None,
            ValueError,
            r"a has shape \(2, 5, 8\) but x has shape \(2, 6, 8\); expected equal \[batch, time, width\]",
        ),
        (
            (2, 6, 8),
            (2, 6, 8),
            (2, 7),
            ValueError,
            r"h0 has shape \(2, 7\); expected \[batch, width\] = \(2, 8\)",
        ),
    ],
)
def test_bad_shapes_name_the_argument(x_shape, a_shape, h0_shape, error, match):
    x, a = jnp.zeros(x_shape), jnp.zeros(a_shape)
    h0 = None if h0_shape is None else jnp.zeros(h0_shape)
    with pytest.raises(error, match=match):
        api.rglru_scan(x, a, h0)


def test_bad_dtypes_name_the_argument():
    x = jnp.zeros((2, 4, 8), jnp.float32)
    with pytest.raises(TypeError, match="x has dtype float16; expected float32 or bfloat16"):
        api.rglru_scan(x.astype(jnp.float16), x.astype(jnp.float16))
    with pytest.raises(TypeError, match="a has dtype bfloat16 but x has dtype float32"):
        api.rglru_scan(x, x.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="h0 has dtype bfloat16; expected float32"):
        api.rglru_scan(x, x, jnp.zeros((2, 8), jnp.bfloat16))


def test_unknown_implementation():
    with pytest.raises(ValueError, match=r"unknown implementation 'cuda'.*'reference'"):
        api.resolve_implementation("cuda")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ((0, 8, 128), "block_b must be a positive int; got 0"),
        ((1, 8.0, 128), "block_t must be a positive int; got 8.0"),
        ((1, 8, -128), "block_e must be a positive int; got -128"),
        ((1, True, 128), "block_t must be a positive int; got True"),
    ],
)
def test_block_sizes_reject_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        bs.BlockSizes(*fields)


@pytest.mark.parametrize(
    ("impl", "shape", "blocks", "match"),
    [
        (
            "pallas_tpu",
            (2, 8, 128),
            bs.BlockSizes(3, 8, 128),
            "block_b=3 must divide the batch size 2",
        ),
        (
            "pallas_tpu",
            (2, 8, 128),
            bs.BlockSizes(1, 8, 100),
            "block_e=100 must be a multiple of 128",
        ),
        (
            "pallas_tpu",
            (2, 8, 1100),
            bs.BlockSizes(1, 8, 256),
            "block_e=256 must be a multiple of 1024 or cover",
        ),
        ("pallas_gpu", (2, 8, 128), bs.BlockSizes(1, 8, 96), "block_e=96 must be a power of two"),
        ("pallas_gpu", (6, 8, 128), bs.BlockSizes(3, 8, 64), "block_b=3 must be a power of two"),
    ],
)
def test_block_sizes_validate_against_the_shape(impl, shape, blocks, match):
    x = jnp.zeros(shape, jnp.float32)
    with pytest.raises(ValueError, match=match):
        api.rglru_scan(x, x, implementation=impl, block_sizes=blocks, interpret=True)


def test_block_sizes_are_frozen_and_hashable():
    blocks = bs.BlockSizes(1, 8, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        blocks.block_t = 16  # type: ignore[misc]
    assert hash(blocks) == hash(bs.BlockSizes(1, 8, 128))


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "sequential"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 2048, 2560), (3, 100, 200), (16, 16384, 512)])
def test_default_block_sizes_are_valid(impl, shape):
    bs.default_block_sizes(impl, shape, jnp.bfloat16).validate(shape, impl)


def test_compute_tile_size():
    assert bs.compute_tile_size(24, 8) == 8
    assert bs.compute_tile_size(6, 8) == 6
    assert bs.compute_tile_size(5, 4) == 1
    assert bs.compute_tile_size(3072, 2048, multiple=1024) == 1024
    with pytest.raises(ValueError, match="not a multiple of 128"):
        bs.compute_tile_size(200, 256, multiple=128)


# ------------------------------------------------------------------- backend choice


def test_auto_resolves_to_a_runnable_implementation():
    name = api.resolve_implementation()
    assert name in api.IMPLEMENTATIONS
    assert api.resolve_implementation("auto") == name
    if jax.default_backend() == "cpu":
        assert name == "sequential"  # the CPU benchmark's winner (see api._CPU_CHOICE)


def test_auto_choice_per_platform():
    assert api.resolve_implementation(platform="tpu") == "pallas_tpu"
    assert api.resolve_implementation(platform="cpu") == "sequential"
    with mock.patch.object(api, "_pallas_gpu_compiles", return_value=True):
        assert api.resolve_implementation(platform="gpu") == "pallas_gpu"
    with mock.patch.object(api, "_pallas_gpu_compiles", return_value=False):
        assert api.resolve_implementation(platform="cuda") == "associative"
    assert api.resolve_implementation("reference", platform="tpu") == "reference"


def test_public_surface_and_lazy_imports():
    assert rglru_scan_pkg.rglru_scan is api.rglru_scan
    assert set(rglru_scan_pkg.__all__) >= {"rglru_scan"}
    code = (
        "import sys, griffin_batch.kernels.rglru_scan; "
        "assert not any(m.startswith('jax.experimental.pallas') for m in sys.modules), "
        "sorted(m for m in sys.modules if 'pallas' in m); "
        "assert 'griffin_batch.kernels.rglru_scan.pallas_tpu' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------ lowering and hardware


@pytest.mark.parametrize("dtype", DTYPES)
def test_pallas_tpu_lowers_for_tpu(dtype):
    """Cross-lowers on any host: Mosaic's block-shape rules are checked at this stage."""
    from griffin_batch.kernels.rglru_scan import pallas_tpu

    x = jax.ShapeDtypeStruct((8, 300, 2560), dtype)
    h0 = jax.ShapeDtypeStruct((8, 2560), jnp.float32)
    exported = export.export(jax.jit(pallas_tpu.scan), platforms=("tpu",))(x, x, h0)
    assert "tpu_custom_call" in exported.mlir_module()


def test_pallas_tpu_under_the_tpu_interpreter():
    """TPU-faithful interpreter: VMEM scratch, block write-back, NaN-poisoned fresh memory.

    Catches what the generic interpreter forgives, e.g. an output block (h_last) that is
    written back before the kernel stores into it.
    """
    from jax.experimental.pallas import tpu as pltpu

    from griffin_batch.kernels.rglru_scan import pallas_tpu

    x, a, h0 = make_inputs(4, 37, 200, jnp.float32, seed=8)
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    y, h_last = pallas_tpu.scan(x, a, h0, block_sizes=bs.BlockSizes(2, 8, 256), interpret=params)
    y_ref, h_ref = reference.scan(x, a, h0)
    assert_close(y, y_ref, jnp.float32, "pallas_tpu y")
    assert_close(h_last, h_ref, jnp.float32, "pallas_tpu h_last")


def test_pallas_gpu_lowers_for_cuda():
    from griffin_batch.kernels.rglru_scan import pallas_gpu

    x = jax.ShapeDtypeStruct((8, 300, 2560), jnp.bfloat16)
    h0 = jax.ShapeDtypeStruct((8, 2560), jnp.float32)
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(
        jax.jit(pallas_gpu.scan), platforms=("cuda",), disabled_checks=[triton_call]
    )(x, x, h0)
    assert "triton" in exported.mlir_module()


def _compiled_kernel_case(impl: str):
    x, a, h0 = make_inputs(8, 300, 2560, jnp.bfloat16, seed=6)
    y, h_last = api.rglru_scan(x, a, h0, implementation=impl)
    y_ref, h_ref = reference.scan(x, a, h0)
    assert_close(y, y_ref, jnp.bfloat16, f"{impl} y")
    assert_close(h_last, h_ref, jnp.float32, f"{impl} h_last")


@pytest.mark.tpu_only
@pytest.mark.skipif(
    jax.default_backend() != "tpu", reason="runs the compiled Mosaic kernel; needs a TPU"
)
def test_pallas_tpu_compiled():
    assert api.resolve_implementation() == "pallas_tpu"
    _compiled_kernel_case("pallas_tpu")


@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="runs the compiled Triton kernel; needs a GPU"
)
def test_pallas_gpu_compiled():
    _compiled_kernel_case("pallas_gpu")
