"""Shared setup of the engine benchmarks: the reference workload, baselines, timing, memory.

Reference workload: random parameters (reference-like scales), vocab 8000,
width 512, 6 blocks (recurrent, recurrent, attention) x 2, 4 heads, window
2048, MLP 3x, float32. Prompts are token ids (BOS then random ids), and the
tokenizer is ``IdTokenizer``: no stop tokens, so every sample runs to its
``max_tokens`` in every implementation, and decoding still exercises the
engine's text path.

Baselines:
  * DeepMind's reference sampler, driven through its own jitted prompt and
    sample functions with token arrays (its ``__call__`` wants a SentencePiece
    vocabulary of the model's size).
  * transformers' ``RecurrentGemmaForCausalLM`` with the same weights, written
    and read back through our Hugging Face checkpoint writer.
  * ``GlobalAttentionLM``: a minimal transformer of the same width and depth with
    a growing KV cache, to contrast memory and speed over long outputs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from griffin_batch.model import testing
from griffin_batch.model.config import GriffinConfig, griffin_pattern
from griffin_batch.model.engine import Engine, EngineConfig, ring_buckets
from griffin_batch.model.requests import Request, SamplingParams

BOS = 2


def workload_config(**overrides: Any) -> GriffinConfig:
    """The reference workload's model (see the module docstring)."""
    fields: dict[str, Any] = dict(
        vocab_size=8000,
        width=512,
        mlp_expanded_width=3 * 512,
        num_heads=4,
        lru_width=512,
        block_types=griffin_pattern(6),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=2048,
        logits_soft_cap=30.0,
    )
    fields.update(overrides)
    return GriffinConfig(**fields)


def workload_params(config: GriffinConfig, seed: int = 0) -> dict[str, Any]:
    """Random float32 parameters with the reference's scales, as jax arrays."""
    return jax.tree.map(jnp.asarray, testing.random_params(config, seed=seed))


def token_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: BOS, then random non-special ids."""
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(4, vocab_size, length - 1).tolist()] for _ in range(count)]


class IdTokenizer:
    """Stands in for a SentencePiece model on token-id workloads: id i decodes to "<i>".

    It has no stop tokens, so every sample generates exactly ``max_tokens``.
    """

    bos_id, eos_id, pad_id = BOS, 1, 0
    stop_token_ids: tuple[int, ...] = ()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise TypeError("IdTokenizer workloads use token-id prompts")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def stream_decoder(self) -> _IdStreamDecoder:
        return _IdStreamDecoder(self)


class _IdStreamDecoder:
    def __init__(self, tokenizer: IdTokenizer):
        self._tok = tokenizer

    def push(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

    def flush(self) -> str:
        return ""


# Our engine ------------------------------------------------------------------


def make_engine(config: GriffinConfig, params, **engine_config: Any) -> Engine:
    return Engine(config, params, IdTokenizer(config.vocab_size), EngineConfig(**engine_config))


def requests(prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int]) -> list[Request]:
    """Greedy requests; ``max_tokens`` is one value or one per prompt."""
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    return [
        Request(request_id=str(i), prompt=list(p), params=SamplingParams(max_tokens=int(m)))
        for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))
    ]


def run_engine(engine: Engine, reqs: Sequence[Request]) -> tuple[dict[str, list[int]], float]:
    """Serves ``reqs`` to completion; returns (tokens by request id, seconds)."""
    start = time.perf_counter()
    completions = list(engine.generate(reqs))
    seconds = time.perf_counter() - start
    errors = [c.error for c in completions if c.finish_reason == "error"]
    if errors or len(completions) != len(reqs):
        raise RuntimeError(f"{len(reqs)} requests, {len(completions)} completions: {errors[:3]}")
    return {c.request_id: c.tokens for c in completions}, seconds


def warm_up_engine(engine: Engine, max_position: int, prompt_len: int = 16) -> None:
    """Compiles every program a workload up to ``max_position`` can use, before timing.

    Group sizes 1, 2, 4, ... up to ``prefill_batch`` with ``prompt_len``-token
    prompts, then one request per attention-ring bucket (a prompt that ends
    inside the bucket, decoded for two calls), then ``Engine.compile_decode``.
    """
    ec, config = engine.engine_config, engine.config
    vocab = config.vocab_size
    size = 1
    while size <= min(ec.prefill_batch, ec.num_slots):
        run_engine(engine, requests(token_prompts(size, prompt_len, vocab, seed=size), 2))
        size *= 2
    for bucket in ring_buckets(ec.min_ring, config.attention_window_size):
        length = max(prompt_len, min(bucket, max_position) - 2 * ec.decode_steps - 2)
        run_engine(engine, requests(token_prompts(1, length, vocab), 2 * ec.decode_steps))
        if bucket >= min(max_position, config.attention_window_size):
            break
    # Decode over every slot and over each smaller batch, at every ring bucket.
    engine.compile_decode(max_position)


# DeepMind's reference sampler ------------------------------------------------


class _StubVocab:
    """The ids the reference sampler reads from its vocabulary when fed token arrays."""

    def pad_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return 1

    def bos_id(self) -> int:
        return BOS


def reference_sampler(config: GriffinConfig, params):
    from recurrentgemma import jax as rg

    model = rg.Griffin(testing.reference_config(config))
    return rg.Sampler(model=model, vocab=_StubVocab(), params=params)


def reference_generate(sampler, prompts: Sequence[Sequence[int]], steps: int) -> np.ndarray:
    """Greedy tokens [b, steps] from equal-length ``prompts``, never stopping at EOS."""
    tokens = jnp.asarray(np.array(prompts, np.int32))
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    state = sampler._compiled_prompt_processing_fn(
        sampler.params, tokens, None, lengths, steps, False, False
    )
    state = sampler._compiled_sample_fn(sampler.params, state, False)
    return np.asarray(state.tokens_buffer)


# transformers ----------------------------------------------------------------


def hf_model(config: GriffinConfig, params):
    """transformers' RecurrentGemmaForCausalLM (float32, eval) with ``params``."""
    import torch
    from transformers import RecurrentGemmaForCausalLM

    from griffin_batch.model import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf")
        checkpoint.save_checkpoint(path, config, jax.device_get(params), format="hf")
        model = RecurrentGemmaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_generate(model, prompts: Sequence[Sequence[int]], steps: int,
                max_time: float | None = None) -> np.ndarray:
    """Greedy tokens [b, steps] from equal-length ``prompts``; exactly ``steps`` each.

    ``max_time`` (seconds) stops generation early: then fewer than ``steps``
    columns come back. Runs on the model's device.
    """
    import torch

    ids = torch.tensor(np.array(prompts, np.int64), device=model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            max_time=max_time,
        )
    return out[:, ids.shape[1] :].cpu().numpy()


# A global-attention transformer for contrast ---------------------------------


@functools.partial(jax.jit, static_argnames=("num_heads", "steps"), donate_argnames=("cache",))
def _transformer_decode(params, cache, tokens, position, *, num_heads, steps):
    """``steps`` greedy steps of a pre-norm MQA transformer; cache [layers, 2, b, cap, h]."""
    embed = params["embed"]
    head_dim = cache.shape[-1]
    capacity = cache.shape[3]

    def norm(x, scale):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)

    def step(carry, _):
        cache, tok, pos = carry
        x = embed[tok] * math.sqrt(embed.shape[1])  # [b, d]
        for i, layer in enumerate(params["layers"]):
            h = norm(x, layer["norm1"])
            q = (h @ layer["q"]).reshape(h.shape[0], num_heads, head_dim)
            k, v = h @ layer["k"], h @ layer["v"]  # [b, h]
            cache = cache.at[i, 0, :, pos].set(k).at[i, 1, :, pos].set(v)
            logits = jnp.einsum("bnh,bsh->bns", q, cache[i, 0]) * head_dim**-0.5
            logits = jnp.where(jnp.arange(capacity) <= pos, logits, -1e30)
            out = jnp.einsum("bns,bsh->bnh", jax.nn.softmax(logits, -1), cache[i, 1])
            x = x + out.reshape(x.shape) @ layer["o"]
            h = norm(x, layer["norm2"])
            x = x + (jax.nn.gelu(h @ layer["gate"]) * (h @ layer["up"])) @ layer["down"]
        logits = norm(x, params["final_norm"]) @ embed.T
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        return (cache, nxt, pos + 1), nxt

    (cache, _, _), out = jax.lax.scan(step, (cache, tokens, position), None, length=steps)
    return cache, out.T


class GlobalAttentionLM:
    """A minimal decoder-only transformer with global multi-query attention.

    Same width, depth, heads and MLP as the Griffin workload, every block an
    attention block attending to the whole sequence. The KV cache holds every
    position and doubles its capacity when full, so memory grows with length
    and each step attends over the whole cache (masked beyond the position).
    Greedy only; the prompt is fed one token per step.
    """

    def __init__(
        self,
        config: GriffinConfig,
        batch: int,
        *,
        seed: int = 0,
        initial_capacity: int = 1024,
        steps: int = 32,
    ):
        rng = np.random.default_rng(seed)
        d, m, hd = config.width, config.mlp_expanded_width, config.head_dim

        def dense(n_in, n_out):
            return jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) / math.sqrt(n_in))

        self.params = {
            "embed": jnp.asarray(
                rng.standard_normal((config.vocab_size, d), np.float32) / math.sqrt(d)
            ),
            "final_norm": jnp.zeros((d,)),
            "layers": [
                dict(
                    norm1=jnp.zeros((d,)),
                    norm2=jnp.zeros((d,)),
                    q=dense(d, d),
                    k=dense(d, hd),
                    v=dense(d, hd),
                    o=dense(d, d),
                    gate=dense(d, m),
                    up=dense(d, m),
                    down=dense(m, d),
                )
                for _ in range(config.num_layers)
            ],
        }
        self.num_heads, self.steps, self.batch = config.num_heads, steps, batch
        self.cache = jnp.zeros((config.num_layers, 2, batch, initial_capacity, hd))
        self.position = 0
        self._compiled: dict[int, Any] = {}  # capacity -> executable (see compile_up_to)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def kv_bytes(self) -> int:
        return self.cache.size * self.cache.dtype.itemsize

    def _grow(self, needed: int) -> None:
        capacity = self.cache.shape[3]
        while capacity < needed:
            capacity *= 2
        if capacity != self.cache.shape[3]:
            pad = [(0, 0)] * 3 + [(0, capacity - self.cache.shape[3]), (0, 0)]
            self.cache = jnp.pad(self.cache, pad)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """``steps`` tokens per row after feeding ``tokens`` [b] at the current position."""
        self._grow(self.position + self.steps)
        args = (self.params, self.cache, jnp.asarray(tokens, jnp.int32), jnp.int32(self.position))
        compiled = self._compiled.get(self.cache.shape[3])
        if compiled is not None:
            self.cache, out = compiled(*args)
        else:
            self.cache, out = _transformer_decode(*args, num_heads=self.num_heads, steps=self.steps)
        self.position += self.steps
        return np.asarray(out)

    def restart(self) -> None:
        """Starts new sequences at position 0 (after an untimed warm-up call, say).

        The cache keeps its capacity; entries beyond the position are masked
        and each is overwritten before it is attended to.
        """
        self.position = 0

    def compile_up_to(self, length: int) -> None:
        """Compiles decode for every cache capacity up to ``length``, allocating nothing."""
        capacity = self.cache.shape[3]
        while True:
            cache = jax.ShapeDtypeStruct(
                self.cache.shape[:3] + (capacity,) + self.cache.shape[4:], self.cache.dtype
            )
            self._compiled[capacity] = _transformer_decode.lower(
                self.params,
                cache,
                jax.ShapeDtypeStruct((self.batch,), jnp.int32),
                jax.ShapeDtypeStruct((), jnp.int32),
                num_heads=self.num_heads,
                steps=self.steps,
            ).compile()
            if capacity >= length:
                return
            capacity *= 2


# Measurements ----------------------------------------------------------------


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def flops_per_token(params) -> float:
    """2 x parameters: every weight once per token; the tied embedding as output projection."""
    return 2.0 * param_count(params)


def peak_matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """Best float32 GFLOP/s of one n x n x n jnp.dot (the machine's matmul roofline)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _dense_weights(params) -> list[dict[str, Any]]:
    """Per block, the dense matrices a decode step reads, by role."""
    blocks = []
    for name in sorted((k for k in params if k.startswith("blocks.")),
                       key=lambda k: int(k.split(".")[1])):
        b = params[name]
        if "recurrent_block" in b:
            r = b["recurrent_block"]
            w = {"y": r["linear_y"]["kernel"], "x": r["linear_x"]["kernel"],
                 "out": r["linear_out"]["kernel"]}
        else:
            a = b["attention_block"]
            w = {"q": a["proj_q"]["kernel"], "k": a["proj_k"]["kernel"],
                 "v": a["proj_v"]["kernel"], "final": a["proj_final"]["kernel"]}
        m = b["mlp_block"]
        w.update(up0=m["ffw_up"]["w"][0], up1=m["ffw_up"]["w"][1], down=m["ffw_down"]["kernel"])
        blocks.append(w)
    return blocks


def _floor_step(x, blocks, embed):
    """One token of the model's dense matmuls only; jax or torch arrays alike."""
    for w in blocks:
        if "y" in w:
            x = x + ((x @ w["y"]) * (x @ w["x"])) @ w["out"]
        else:
            kv = ((x @ w["k"]) * (x @ w["v"])).sum(-1)[:, None]
            x = x + (x @ w["q"]) @ w["final"] + kv
        x = x + ((x @ w["up0"]) * (x @ w["up1"])) @ w["down"]
    # The next input depends on the logits without an argmax or a gather: those
    # are not matmuls, and their speed differs between frameworks.
    return (x @ embed.T)[:, : x.shape[1]]


def matmul_floor_tokens_per_s(params, batch: int, steps: int = 32, repeats: int = 5
                              ) -> dict[str, float]:
    """Decode tokens/s of the model's weight matmuls alone, in JAX and in torch.

    Every dense weight of a decode step (projections, MLP, output embedding),
    chained so no step can start before the previous one ends, and nothing
    else: no attention over the cache, no recurrence, no sampling. No decoder
    of this model, ours or another, can step faster on this machine at this
    batch, so ``floor / other`` bounds the speed-up anyone can reach over
    ``other``.
    """
    import torch

    blocks = [{k: jnp.asarray(v) for k, v in w.items()} for w in _dense_weights(params)]
    embed = jnp.asarray(params["embedder"]["input_embedding"])
    width = embed.shape[1]

    @jax.jit
    def run(x, blocks, embed):  # weights as arguments, as in a real decoder, not constants
        return jax.lax.fori_loop(0, steps, lambda _, x: _floor_step(x, blocks, embed), x)

    x = jnp.ones((batch, width), embed.dtype)
    run(x, blocks, embed).block_until_ready()
    jax_s = min(timed(lambda: run(x, blocks, embed).block_until_ready())[1]
                for _ in range(repeats))

    t_blocks = [{k: torch.from_numpy(np.array(v)) for k, v in w.items()} for w in blocks]
    t_embed = torch.from_numpy(np.array(embed))

    def torch_run():
        with torch.no_grad():
            y = torch.ones(batch, width, dtype=t_embed.dtype)
            for _ in range(steps):
                y = _floor_step(y, t_blocks, t_embed)
        return y

    torch_run()
    torch_s = min(timed(torch_run)[1] for _ in range(repeats))
    return {"jax": batch * steps / jax_s, "torch": batch * steps / torch_s}


def rss_mb() -> float:
    """Resident memory of this process and its children, MiB."""
    import psutil  # here: the GPU benchmark imports this module where psutil may be missing

    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # it may have just exited
            total += child.memory_info().rss
    return total / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is KiB), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """Samples ``rss_mb`` every ``interval`` seconds on a thread; ``peak`` is the largest seen.

    Usage: ``with RssPeak() as watch: ...; watch.peak``.
    """

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def run_child(script: str, args: Sequence[str], timeout: float = 3600) -> dict[str, Any]:
    """Runs ``python script args`` and returns the JSON object of its last stdout line.

    Benchmarks measure memory in a fresh process each, so one model's
    allocations do not sit in the other's resident set.
    """
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def environment() -> dict[str, Any]:
    return {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
    }


def emit(result: dict[str, Any]) -> None:
    """Prints the benchmark's one JSON line (floats rounded for reading)."""

    def tidy(x):
        if isinstance(x, float):
            return float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: tidy(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [tidy(v) for v in x]
        return x

    print(json.dumps(tidy(result)), flush=True)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON line."""
    print(message, file=sys.stderr, flush=True)


# Jobs on a local Ray cluster ---------------------------------------------------


def share_compilation_cache(directory: str) -> None:
    """Points JAX's persistent compilation cache (this process and Ray's workers) at ``directory``.

    Call before ``ray.init``: workers inherit the environment, so a worker
    started later loads what an earlier one compiled, and timed jobs compare
    generation rather than compilation.
    """
    for name, value in (
        ("JAX_COMPILATION_CACHE_DIR", directory),
        ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
        ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1"),
    ):
        os.environ[name] = value


def job_seconds(summary: dict[str, Any]) -> float:
    """A job's generation time: first ready worker to last commit (``_summary.json``)."""
    return summary["generation_s"] - (summary["startup_s"] or 0.0)


def job_output(url: str) -> list[dict[str, Any]]:
    """Every committed output row of a job, in shard order."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    rows = []
    for part in sorted(fs.glob(f"{path.rstrip('/')}/part-*.parquet")):
        with fs.open(part, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def job_commits(url: str) -> dict[str, dict[str, Any]]:
    """A job's commit records (``_manifest/commits/<shard>.json``) by shard id."""
    import fsspec

    from griffin_batch.jobs import manifest

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    paths = fs.glob(f"{path.rstrip('/')}/{manifest.COMMITS_DIR}/*.json")
    return {p.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(data)
            for p, data in fs.cat(paths).items()} if paths else {}
