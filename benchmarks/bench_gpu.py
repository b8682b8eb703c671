"""GPU benchmark: our engine against transformers ``generate`` on RecurrentGemma-2B shapes.

Run by ``benchmarks/gpu.sh`` on one GPU machine where JAX (CUDA), PyTorch,
transformers, flax and sentencepiece are installed and nothing can be
downloaded; ``griffin_batch`` is imported from the working tree
(``benchmarks/tree_import.py``). Prints ONE JSON line, also written to
``$OUT/gpu.json`` when ``OUT`` is set:

    {"bench": "gpu", "smoke": false, "params": ..., "dtype": "bfloat16",
     "prompt_tokens": 2048, "new_tokens": 1024, "batches": [64, 256],
     "engine_tokens_per_s": {"64": ..., "256": ...}, "hf_tokens_per_s": {...},
     "vs_hf": {...}, "tokens_per_s_by_output_length": {"1024": ..., ..., "8192": ...},
     "flat_2k_8k": ..., "cache_bytes_per_slot": ..., "decode_attention": ...,
     "decode_attention_us": {"xla": ..., "pallas_gpu/64": ...}, "decode_attention_best": ...,
     "targets": {...},
     "skipped": {...}, ...}

Workload: the RecurrentGemma-2B preset (vocab 256k, width 2560, 26 blocks,
window 2048) with random bfloat16 weights (the reference initialisers),
written once as a Hugging Face checkpoint by our writer, so both sides run
the same weights. ``--batch`` prompts of 2048 random tokens, 1024 greedy new
tokens each, never stopping early. tokens/s is batch x new tokens over the
wall time of one timed run, prefill included, after an untimed run of the
same prompts with a few new tokens (2 x decode_steps for our engine, which
compiles there; 2 for transformers, which warms its kernels and allocator).

``tokens_per_s_by_output_length``: one run of ``--sweep-batch`` prompts
generating 8192 tokens each on the engine of that batch; for each length L
(1k, 2k, 4k, 8k) the decode tokens/s (all sequences) of the window ending at
L (from the previous length; the first from the end of prefill).
``flat_2k_8k`` is min/max over the windows ending at 2k, 4k and 8k.

``decode_attention``: the engine's decode attention here (``pallas_gpu`` when
the Triton kernel compiles, else ``xla``); for a kernel,
``decode_attention_max_abs_diff_vs_xla`` compares it with the XLA formulation
on the model's decode shapes before the engine runs, and ``decode_attention_us``
times one call of the XLA formulation and of the kernel at each block size in
``ATTENTION_BLOCKS`` on the largest batch's rings (lengths from 1 to the full
ring); ``decode_attention_best`` names the fastest. No kernel has run on a GPU
before this benchmark: these set its default block and check the auto choice.

Memory: ``cache_bytes_per_slot`` is the engine's whole per-slot state
(attention rings and recurrent states); ``device_bytes_in_use`` is what the
device reports after each timed run (JAX: ``memory_stats``; transformers:
``torch.cuda.max_memory_allocated`` of its timed run) and
``hf_peak_bytes_per_slot`` that peak less the weights, over the batch.

Time box: every phase runs in its own process (so JAX and PyTorch never hold
GPU memory at the same time) under a deadline; a phase that would start with
too little time left is skipped and named in ``skipped``; the length sweep
and transformers stop at the deadline and say how far they got. The whole
run stays within ``--budget-s`` (default 450 s).

``--smoke`` runs the same path on a tiny config with tiny lengths on CPU
(``tests/test_benchmarks.py``).

Usage (from the repository root): benchmarks/gpu.sh [--smoke] [--budget-s S]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import tree_import  # noqa: E402

# What the engine and transformers phases import beyond the standard library.
REQUIRED_MODULES = [
    "numpy", "jax", "jaxlib", "flax", "ml_dtypes", "einops", "jaxtyping", "sentencepiece",
    "fsspec", "safetensors", "torch", "transformers",
]
HF_CHECKPOINT = "hf"  # folder under the work directory
GRACE_S = 15  # after a child's deadline, before it is killed: time to print its lines


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes of one benchmark run (``FULL`` on a GPU, ``SMOKE`` on CPU in the suite)."""

    batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    lengths: tuple[int, ...]
    sweep_batch: int
    decode_steps: int
    chunk_size: int
    min_phase_s: float  # a phase starting with less time left is skipped
    smoke: bool

    def config(self):
        from griffin_batch.model import config, testing

        if self.smoke:
            return testing.tiny_config()
        return config.Preset.RECURRENTGEMMA_2B.config()


FULL = Workload(batches=(64, 256), prompt_tokens=2048, new_tokens=1024,
                lengths=(1024, 2048, 4096, 8192), sweep_batch=256, decode_steps=32,
                chunk_size=256, min_phase_s=40, smoke=False)
SMOKE = Workload(batches=(4,), prompt_tokens=12, new_tokens=8, lengths=(8, 16, 32, 64),
                 sweep_batch=4, decode_steps=4, chunk_size=16, min_phase_s=0, smoke=True)


def emit_line(record: dict[str, Any]) -> None:
    """A child's result line: the parent keeps the last line of each phase."""
    print(json.dumps(record), flush=True)


def device_bytes() -> int | None:
    """JAX's bytes in use on the first device (None where it does not say, e.g. CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats["bytes_in_use"])


# Children: each runs one phase in its own process ------------------------------


def child_prepare(w: Workload, workdir: str) -> None:
    """Random bfloat16 weights (the reference initialisers), saved as a Hugging Face checkpoint."""
    import jax
    import jax.numpy as jnp

    from benchmarks import common
    from griffin_batch.model import checkpoint, griffin

    start = time.perf_counter()
    config = w.config()
    init = jax.jit(griffin.init_params, static_argnums=(0, 2))  # on device, in one program
    params = init(config, jax.random.PRNGKey(0), jnp.bfloat16)
    checkpoint.save_checkpoint(os.path.join(workdir, HF_CHECKPOINT), config,
                               jax.device_get(params), format="hf")
    device = jax.local_devices()[0]
    emit_line({"phase": "prepare", "seconds": time.perf_counter() - start,
               "params": common.param_count(params), "device": device.device_kind,
               **common.environment()})


def _engine_run(w: Workload, engine, batch: int) -> dict[str, Any]:
    from benchmarks import common
    from griffin_batch.model import griffin

    prompts = common.token_prompts(batch, w.prompt_tokens, engine.config.vocab_size, seed=batch)
    _, warm_s = common.run_engine(engine, common.requests(prompts, 2 * w.decode_steps))
    _, seconds = common.run_engine(engine, common.requests(prompts, w.new_tokens))
    return {"phase": "engine", "batch": batch, "seconds": seconds,
            "tokens_per_s": batch * w.new_tokens / seconds, "warm_up_s": warm_s,
            "cache_bytes_per_slot": griffin.cache_bytes(engine.cache) // batch,
            "device_bytes_in_use": device_bytes(), "compiles": engine.compile_counts()}


def _sweep(w: Workload, engine, deadline: float) -> dict[str, Any]:
    """Decode tokens/s in the windows ending at each of ``w.lengths``; stops at ``deadline``."""
    from benchmarks import common

    batch, ends = w.sweep_batch, sorted(w.lengths)
    prompts = common.token_prompts(batch, w.prompt_tokens, engine.config.vocab_size, seed=7)
    windows: list[dict[str, Any]] = []
    record = {"phase": "sweep", "batch": batch, "windows": windows, "complete": False}
    generated, mark = 0, None
    for chunk in engine.stream(common.requests(prompts, ends[-1])):
        if chunk.request_id != "0":
            continue
        generated += len(chunk.tokens)
        now = time.perf_counter()
        if mark is None:  # the first chunk: prefill is over
            mark = (generated, now)
        while len(windows) < len(ends) and generated >= ends[len(windows)]:
            start_tokens, start_s = mark
            windows.append({"length": ends[len(windows)], "start": start_tokens,
                            "end": generated,
                            "tokens_per_s": batch * (generated - start_tokens) / (now - start_s)})
            mark = (generated, now)
            emit_line(record)
        if time.time() > deadline:
            record["stopped_at_tokens"] = generated
            break
    else:
        record["complete"] = len(windows) == len(ends)
    emit_line(record)
    return record


# Ring slots per block tried for each kernel: its default and the powers of two beside it.
ATTENTION_BLOCKS = {"pallas_gpu": (32, 64, 128), "pallas_tpu": (128, 256, 512)}


def _attention_check(config, batch: int = 8, repeats: int = 20) -> dict[str, Any]:
    """Which decode attention the engine uses here; for a Pallas kernel (never run on a GPU
    before this benchmark's first run), its difference from the XLA formulation on the
    model's decode shapes (8 rows of random lengths, bfloat16), then microseconds per call
    of XLA's formulation and of the kernel at each of ``ATTENTION_BLOCKS`` on ``batch`` rows
    of full-size rings with lengths drawn from 1 to the ring (rows at every position, as
    continuous batching has them): the figures that set the kernel's default block and
    show whether the auto choice of the kernel over XLA holds on this device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from griffin_batch.kernels.decode_attention import api, reference

    impl = api.resolve_implementation()
    record: dict[str, Any] = {"phase": "attention", "implementation": impl}
    if not api.is_kernel(impl):
        return record
    rng = np.random.default_rng(0)
    s, h = config.attention_window_size + 1, config.head_dim

    def inputs(rows: int, low: int):
        q, keys, values = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
                           for shape in ((rows, config.num_heads, h), (rows, s, h), (rows, s, h)))
        return q, keys, values, jnp.asarray(rng.integers(low, s + 1, rows), jnp.int32)

    q, keys, values, lengths = inputs(8, 0)
    got = api.decode_attention(q, keys, values, lengths, implementation=impl)
    want = reference.attend(q, keys, values, lengths)
    record["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(
        got.astype(jnp.float32) - want.astype(jnp.float32))))

    args = inputs(batch, 1)
    kernel = impl.removesuffix("_interpret")
    candidates = {"xla": ("xla", None)}
    candidates.update({f"{kernel}/{b}": (impl, b) for b in ATTENTION_BLOCKS[kernel]})
    us = {}
    for name, (implementation, block) in candidates.items():
        fn = jax.jit(functools.partial(api.decode_attention, implementation=implementation,
                                       block_size=block))
        fn(*args).block_until_ready()  # compile
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        out.block_until_ready()
        us[name] = round((time.perf_counter() - start) / repeats * 1e6, 1)
    record.update(us=us, rows=batch, best=min(us, key=us.get))
    return record


def child_engine(w: Workload, workdir: str, deadline: float) -> None:
    """Our engine at every batch, largest first, then the length sweep on the sweep batch's."""
    from benchmarks import common
    from griffin_batch.model import checkpoint

    config, params = checkpoint.load_checkpoint(os.path.join(workdir, HF_CHECKPOINT))
    try:
        emit_line(_attention_check(config, batch=max(w.batches)))
    except Exception as e:  # noqa: BLE001 - a kernel failing here must not cost the engine runs
        emit_line({"phase": "attention", "error": _failure(e)})
    engines = {}
    for batch in sorted(w.batches, reverse=True):
        if deadline - time.time() < w.min_phase_s:
            emit_line({"phase": "engine", "batch": batch, "skipped": "time budget"})
            continue
        try:
            engines[batch] = engine = common.make_engine(
                config, params, num_slots=batch, prefill_batch=batch,
                decode_steps=w.decode_steps, chunk_size=w.chunk_size)
            emit_line(_engine_run(w, engine, batch))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other batches still run
            emit_line({"phase": "engine", "batch": batch, "error": _failure(e)})
            engines.pop(batch, None)
        if batch != w.sweep_batch:
            engines.pop(batch, None)  # frees its state for the next engine
    if w.sweep_batch not in engines or deadline - time.time() < w.min_phase_s:
        emit_line({"phase": "sweep", "batch": w.sweep_batch, "skipped": "time budget"})
        return
    _sweep(w, engines[w.sweep_batch], deadline)


def child_hf(w: Workload, workdir: str, deadline: float) -> None:
    """transformers' RecurrentGemmaForCausalLM.generate at every batch, largest first."""
    import torch
    import transformers

    from benchmarks import common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.RecurrentGemmaForCausalLM.from_pretrained(
        os.path.join(workdir, HF_CHECKPOINT))
    # .to(dtype): from_pretrained's dtype keyword differs between transformers versions.
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for batch in sorted(w.batches, reverse=True):
        if deadline - time.time() < w.min_phase_s:
            emit_line({"phase": "hf", "batch": batch, "skipped": "time budget"})
            continue
        prompts = common.token_prompts(batch, w.prompt_tokens, model.config.vocab_size,
                                       seed=batch)
        try:
            common.hf_generate(model, prompts, 2)  # warm-up: kernels, allocator, as the engine's
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            max_time = max(1.0, deadline - time.time())
            out, seconds = common.timed(
                lambda p=prompts, t=max_time: common.hf_generate(model, p, w.new_tokens, t))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other batches still run
            emit_line({"phase": "hf", "batch": batch, "error": _failure(e)})
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        record = {"phase": "hf", "batch": batch, "seconds": seconds,
                  "new_tokens": int(out.shape[1]), "truncated": out.shape[1] < w.new_tokens,
                  "tokens_per_s": batch * out.shape[1] / seconds,
                  "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "torch": torch.__version__, "transformers": transformers.__version__}
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            record.update(device_bytes_in_use=peak,
                          hf_peak_bytes_per_slot=(peak - weight_bytes) // batch)
        emit_line(record)


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


# The parent: preflight, phases under deadlines, one JSON line ---------------


def run_phase(name: str, w: Workload, workdir: str, deadline: float) -> list[dict[str, Any]]:
    """Runs one child phase; returns its JSON lines, those printed before a kill included."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}", f"--workdir={workdir}",
           f"--deadline={deadline}"] + (["--smoke"] if w.smoke else [])
    timeout = max(1.0, deadline - time.time() + GRACE_S)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        stdout, stderr, failed = proc.stdout, proc.stderr, proc.returncode != 0
        error = f"exit status {proc.returncode}" if failed else None
    except subprocess.TimeoutExpired as e:
        stdout, stderr = _text(e.stdout), _text(e.stderr)
        error = f"killed after {timeout:.0f} s (time budget)"
    lines = [json.loads(s) for s in stdout.splitlines() if s.startswith("{")]
    if error:
        print(f"[{name}] {error}; its stderr ends:\n{stderr[-3000:]}", file=sys.stderr, flush=True)
        lines.append({"phase": name, "error": error, "stderr_tail": stderr[-500:]})
    return lines


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def by_batch(lines: list[dict[str, Any]], phase: str, key: str) -> dict[str, Any]:
    """``{batch: line[key]}`` over a phase's lines that have ``key``."""
    return {str(x["batch"]): x[key] for x in lines if x.get("phase") == phase and key in x}


def summarize(w: Workload, lines: list[dict[str, Any]], missing: list[str]) -> dict[str, Any]:
    """The one JSON line, from every phase's lines."""
    prepare = next((x for x in lines if x.get("phase") == "prepare" and "params" in x), {})
    engine = by_batch(lines, "engine", "tokens_per_s")
    hf = by_batch(lines, "hf", "tokens_per_s")
    sweep = next((x for x in reversed(lines) if x.get("phase") == "sweep"), {})
    by_length = {str(win["length"]): win["tokens_per_s"] for win in sweep.get("windows", [])}
    late = [win["tokens_per_s"] for win in sweep.get("windows", [])
            if win["length"] >= w.lengths[1]]
    flat = min(late) / max(late) if len(late) == len(w.lengths) - 1 else None
    vs_hf = {b: engine[b] / hf[b] for b in engine if b in hf}
    top = str(max(w.batches))
    cache = by_batch(lines, "engine", "cache_bytes_per_slot")
    attention = next((x for x in lines if x.get("phase") == "attention"), {})
    return {
        "bench": "gpu", "smoke": w.smoke, "model": "recurrentgemma-2b shapes, random weights"
        if not w.smoke else "testing.tiny_config", "dtype": "bfloat16",
        "params": prepare.get("params"), "device": prepare.get("device"),
        "backend": prepare.get("backend"), "jax": prepare.get("jax"),
        "prompt_tokens": w.prompt_tokens, "new_tokens": w.new_tokens,
        "batches": list(w.batches), "engine_tokens_per_s": engine, "hf_tokens_per_s": hf,
        "vs_hf": vs_hf, "hf_truncated": by_batch(lines, "hf", "truncated"),
        "sweep_batch": w.sweep_batch, "tokens_per_s_by_output_length": by_length,
        "sweep_complete": sweep.get("complete", False), "flat_2k_8k": flat,
        "cache_bytes_per_slot": next(iter(cache.values()), None),
        "device_bytes_in_use": {"engine": by_batch(lines, "engine", "device_bytes_in_use"),
                                "hf": by_batch(lines, "hf", "device_bytes_in_use")},
        "hf_peak_bytes_per_slot": by_batch(lines, "hf", "hf_peak_bytes_per_slot"),
        "engine_compiles": by_batch(lines, "engine", "compiles"),
        "decode_attention": attention.get("implementation"),
        "decode_attention_max_abs_diff_vs_xla": attention.get("max_abs_diff_vs_xla"),
        "decode_attention_us": attention.get("us"),
        "decode_attention_best": attention.get("best"),
        "targets": {"vs_hf_at_largest_batch_at_least_3": vs_hf[top] >= 3 if top in vs_hf
                    else None,
                    "flat_2k_8k_within_10pct": flat >= 0.9 if flat is not None else None},
        "skipped": {x["phase"] + (f":{x['batch']}" if "batch" in x else ""):
                    x.get("skipped") or x.get("error")
                    for x in lines if "skipped" in x or "error" in x},
        "missing_modules": missing,
        "torch": next((x["torch"] for x in lines if "torch" in x), None),
        "transformers": next((x["transformers"] for x in lines if "transformers" in x), None),
    }


def write_result(result: dict[str, Any]) -> None:
    """Prints the JSON line and writes it to ``$OUT/gpu.json`` when ``OUT`` is set.

    The parent imports no JAX (``benchmarks.common`` would), so that a missing
    module is still reported in this line.
    """
    line = json.dumps(result)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu.json"), "w") as f:
            f.write(line + "\n")


def main_parent(w: Workload, budget_s: float, keep: str | None) -> int:
    start = time.time()
    missing = tree_import.missing_modules(REQUIRED_MODULES)
    if missing:
        print(f"missing Python modules: {', '.join(missing)}. Nothing can be downloaded on the "
              "GPU machine: vendor them into .gpu_deps/ here (pip install --no-deps --target "
              ".gpu_deps <names>); gpu.sh puts that folder on PYTHONPATH.", file=sys.stderr)
        result = summarize(w, [], missing)
        result["wall_s"] = time.time() - start
        write_result(result)
        return 2
    workdir = keep or tempfile.mkdtemp(prefix="bench_gpu_")
    deadline = start + budget_s
    # transformers gets the last quarter at least; the engine phase ends its sweep before that.
    engine_deadline = deadline - budget_s / 4
    lines: list[dict[str, Any]] = []
    phase_s = {}
    try:
        for name, phase_deadline in (("prepare", engine_deadline), ("engine", engine_deadline),
                                     ("hf", deadline)):
            print(f"[{name}] {time.time() - start:.0f} s in", file=sys.stderr, flush=True)
            if phase_deadline - time.time() < max(w.min_phase_s, 1.0):
                lines.append({"phase": name, "skipped": "time budget"})
                continue
            began = time.time()
            lines += run_phase(name, w, workdir, phase_deadline)
            phase_s[name] = round(time.time() - began, 1)
            if name == "prepare" and not any("params" in x for x in lines):
                break  # no checkpoint: nothing else can run
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summarize(w, lines, missing)
    result.update(phase_s=phase_s, wall_s=time.time() - start)
    write_result(result)
    return 0 if all(x.get("error") is None for x in lines) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config and lengths (CPU)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="the whole run's time limit, seconds")
    parser.add_argument("--keep-workdir", help="use this work directory and keep it")
    parser.add_argument("--child", choices=("prepare", "engine", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    w = SMOKE if args.smoke else FULL
    if args.child is None:
        return main_parent(w, args.budget_s, args.keep_workdir)
    tree_import.ensure_importable()
    if args.child == "prepare":
        child_prepare(w, args.workdir)
    elif args.child == "engine":
        child_engine(w, args.workdir, args.deadline)
    else:
        child_hf(w, args.workdir, args.deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
