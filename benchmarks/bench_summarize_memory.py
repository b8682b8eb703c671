"""Does a summarize worker's memory grow with the document? Peak RSS for an 8k- and a 128k-token one.

Prints ONE JSON line:
    {"bench": "summarize_memory", "small_tokens": 8192, "large_tokens": 128000,
     "small": {"peak_rss_mib": ..., "growth_mib": ..., "seconds": ...}, "large": {...},
     "peak_ratio": ..., "flat_within_10pct": true, ...}

Workload: ``summarize --mode single`` as a worker runs it, without Ray: the
document (Python's own documentation, from ``pydoc_data``, repeated to length)
is staged by the job's own ``DocumentsStage`` into Parquet, and one
``GenerationWorker`` (bundled demo model, 4 slots, ``--chunk-size 512``,
greedy, 8 new tokens) runs the shard with ``process_shard``: reading,
tokenizing, chunked prefill, progress checkpoints every second, spill and the
output file. Each document runs in a fresh process, after a warm-up document
whose prefill chunks have the same shapes (nothing compiles while measured).

Measured per document: the process's peak RSS (``ru_maxrss``: loading, warm-up
and the document), and the growth of RSS while the document runs above its
level just before (sampled every 10 ms). ``peak_ratio`` is large / small.

Usage (from the repository root): python benchmarks/bench_summarize_memory.py [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CHUNK = 512


def _document(tok, tokens: int) -> str:
    """Text of exactly ``tokens`` tokens (as the tokenizer counts a document), from Python's docs."""
    from pydoc_data import topics

    corpus = "\n\n".join(topics.topics.values())
    ids = tok.encode(corpus, add_bos=False)
    while len(ids) < tokens + 64:
        ids = ids + ids
    text = tok.decode(ids[:tokens])
    while len(tok.encode(text, add_bos=False)) > tokens:  # a re-encoding may merge differently
        text = text[:-1]
    return text


def _shard(tmp: str, name: str, text: str, tok):
    from griffin_batch.actors import shards
    from griffin_batch.jobs import config as config_lib
    from griffin_batch.jobs import summary_inputs, summary_staging
    from griffin_batch.model import requests

    path = f"{tmp}/{name}.txt"
    with open(path, "w") as f:
        f.write(text)
    stage = summary_staging.DocumentsStage(summary_inputs.sources([path], None, None),
                                           summary_staging.Prompts(), tok, {})
    config = config_lib.JobConfig(io=config_lib.IOConfig(inputs=(path,), output=f"{tmp}/out"))
    _, plan, staged = stage.stage(config, common.log)
    [spec] = plan.shards
    spec = dataclasses.replace(spec, path=staged.local[spec.path], shard_id=name)
    options = shards.ShardOptions(
        prompt_column=summary_staging.PROMPT, id_column=summary_staging.ID,
        keep_columns=(summary_staging.DOCUMENT_TOKENS,), error_column=summary_staging.ERROR,
        sampling=requests.SamplingParams(max_tokens=8), output_dir=f"{tmp}/out",
        checkpoint_every_s=1.0)
    return spec, options, staged


def one(tokens: int) -> dict:
    """Runs one document of ``tokens`` tokens in this process; returns its figures."""
    from griffin_batch.actors import worker
    from griffin_batch.model import demo, tokenizer
    from griffin_batch.model.engine_config import EngineConfig

    tok = tokenizer.load_tokenizer(demo.demo_tokenizer_path())
    w = worker.GenerationWorker(worker.ModelSpec(engine=EngineConfig(
        num_slots=4, decode_steps=8, chunk_size=CHUNK, max_prompt_tokens=140_000)))
    with tempfile.TemporaryDirectory() as tmp:
        # Same last prefill chunk as the document's: every program compiles here.
        spec, options, warm = _shard(tmp, "warm", _document(tok, tokens % CHUNK + CHUNK), tok)
        w.process_shard(spec, options)
        warm.cleanup()
        spec, options, staged = _shard(tmp, "doc", _document(tok, tokens), tok)
        base = common.rss_mb()
        start = time.perf_counter()
        with common.RssPeak(0.01) as peak:
            result = w.process_shard(spec, options)
        seconds = time.perf_counter() - start
        staged.cleanup()
    if result.error_rows:
        raise RuntimeError(f"the document came back as an error row: {result}")
    return {"tokens": tokens, "prompt_tokens": result.prompt_tokens,
            "peak_rss_mib": round(common.peak_rss_mb(), 1),
            "growth_mib": round(peak.peak - base, 1), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="2k and 16k tokens instead")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one)))
        return {}
    sizes = (2048, 16_384) if a.small else (8192, 128_000)
    runs = []
    for tokens in sizes:
        runs.append(common.run_child(__file__, ["--one", str(tokens)]))
        common.log(f"{tokens} tokens: {runs[-1]}")
    small, large = runs
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    result = {"bench": "summarize_memory", "small_tokens": sizes[0], "large_tokens": sizes[1],
              "chunk_size": CHUNK, "small": small, "large": large,
              "peak_ratio": round(ratio, 3), "flat_within_10pct": abs(ratio - 1) <= 0.10,
              "growth_ratio": round(large["growth_mib"] / max(small["growth_mib"], 0.1), 2)}
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
