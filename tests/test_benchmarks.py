"""The prepared GPU benchmark's path, on CPU: ``benchmarks/gpu.sh --smoke``.

The GPU machine has the benchmark's libraries but no install of this package
and no network; the smoke run goes through the same script, phases and JSON
line on a tiny config, and the import shim is checked with the editable
install hidden.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPU_KEYS = {
    "bench", "smoke", "model", "dtype", "params", "device", "backend", "jax", "prompt_tokens",
    "new_tokens", "batches", "engine_tokens_per_s", "hf_tokens_per_s", "vs_hf", "hf_truncated",
    "sweep_batch", "tokens_per_s_by_output_length", "sweep_complete", "flat_2k_8k",
    "cache_bytes_per_slot", "device_bytes_in_use", "hf_peak_bytes_per_slot", "engine_compiles",
    "decode_attention", "decode_attention_max_abs_diff_vs_xla", "decode_attention_us",
    "decode_attention_best", "targets", "skipped", "missing_modules", "torch", "transformers", "phase_s", "wall_s",
}


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_reports_every_key(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run([os.path.join(ROOT, "benchmarks", "gpu.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(line))
    assert set(line) == GPU_KEYS
    assert json.loads((tmp_path / "gpu.json").read_text()) == line
    assert line["smoke"] and line["skipped"] == {} and line["missing_modules"] == []
    batch = str(line["batches"][0])
    assert line["engine_tokens_per_s"][batch] > 0 and line["hf_tokens_per_s"][batch] > 0
    assert line["vs_hf"][batch] > 0 and line["hf_truncated"][batch] is False
    assert sorted(map(int, line["tokens_per_s_by_output_length"])) == [8, 16, 32, 64]
    assert line["sweep_complete"] and 0 < line["flat_2k_8k"] <= 1
    assert line["cache_bytes_per_slot"] > 0
    # On CPU the engine's decode attention is XLA's (a GPU picks the Pallas kernel).
    assert line["decode_attention"] == "xla"
    assert line["decode_attention_max_abs_diff_vs_xla"] is None
    assert line["decode_attention_us"] is None and line["decode_attention_best"] is None
    assert set(line["phase_s"]) == {"prepare", "engine", "hf"}


def test_gpu_benchmark_checks_a_kernel_against_xla_before_the_engine_runs(monkeypatch):
    """Where a Pallas kernel is the choice (a GPU), the record names it and its difference
    from the XLA formulation; here the Triton kernel runs in the interpreter."""
    from benchmarks import bench_gpu
    from griffin_batch.kernels.decode_attention import api
    from griffin_batch.model import testing

    monkeypatch.setattr(api, "resolve_implementation", lambda *a, **k: "pallas_gpu_interpret")
    record = bench_gpu._attention_check(testing.tiny_config(), batch=4, repeats=1)
    print(record)
    assert record["implementation"] == "pallas_gpu_interpret"
    assert 0 <= record["max_abs_diff_vs_xla"] < 2e-2  # bfloat16, a few ulps
    # Then XLA and the kernel at each block size, timed on the benchmark's batch.
    blocks = bench_gpu.ATTENTION_BLOCKS["pallas_gpu"]
    assert set(record["us"]) == {"xla", *(f"pallas_gpu/{b}" for b in blocks)}
    assert all(t > 0 for t in record["us"].values()) and record["rows"] == 4
    assert record["best"] == min(record["us"], key=record["us"].get)


_HIDE_INSTALL = textwrap.dedent("""
    import importlib.util, sys
    # Hide the editable install, as on a machine where griffin_batch is not installed.
    sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "Editable" not in getattr(h, "__qualname__", "")]
    sys.path_importer_cache.clear()
    sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
    try:
        importlib.util.find_spec("griffin_batch.model")
        raise SystemExit("griffin_batch is still importable")
    except ModuleNotFoundError:
        pass
    sys.path.insert(0, {root!r})
    from benchmarks import tree_import
    tree = tree_import.ensure_importable()
    import griffin_batch.model.dtypes
    assert griffin_batch.model.dtypes.__file__.startswith(tree), griffin_batch.model.dtypes.__file__
    for name in ("griffin_batch.data", "griffin_batch.kernels.rglru_scan",
                 "griffin_batch.kernels.decode_attention", "griffin_batch.jobs"):
        assert importlib.util.find_spec(name) is not None, name
    print("ok", tree)
""")


def test_tree_import_makes_the_package_importable_without_an_install():
    script = _HIDE_INSTALL.format(root=ROOT)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    assert proc.stdout.startswith("ok")


def test_figure1a_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional `bench` extra draws figures")
    sys.path.insert(0, ROOT)
    from benchmarks import bench_long

    def windows(speeds):
        return {"windows": [{"end": e, "tokens_per_s": s} for e, s in zip((256, 512), speeds, strict=True)]}

    result = {"batch": 8, "backend": "cpu", "cpus": 2, "window_ends": [256, 512],
              "config": {"width": 128, "blocks": 6, "heads": 4, "vocab": 8000, "window": 256},
              "griffin": windows((900.0, 910.0)), "transformer": windows((800.0, 400.0))}
    path = tmp_path / "figure.png"
    bench_long.plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
