"""Command line of the batch generation job.

    python -m jobs.generate --input 'gs://bucket/prompts/*.parquet' --output gs://bucket/out \\
        --checkpoint gs://bucket/ckpt --tokenizer gs://bucket/tokenizer.model --max-tokens 256

Runs the same under ``ray job submit --working-dir . -- python -m jobs.generate ...``.
Exit status: 0 all shards committed; 1 some shard failed (see summary.json);
2 bad job input or no reachable cluster (nothing started); 130 interrupted (rerun with --resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jobs import config as config_lib
from jobs import driver

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (options mirror ``jobs.config.JobConfig``)."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.generate",
        description="Generate completions for Parquet prompts on every accelerator host of a "
        "Ray cluster; one output Parquet file per input shard, each row once.",
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="URL_OR_GLOB",
        help="Parquet file, directory or glob; any fsspec URL (repeatable)",
    )
    io.add_argument("--output", required=True, metavar="URL", help="output directory URL")
    io.add_argument("--prompt-column", default="prompt")
    io.add_argument(
        "--id-column",
        default="id",
        help="row id column; without it ids are '<file name>#<row index>'",
    )
    io.add_argument(
        "--keep-columns",
        type=_csv,
        default=(),
        metavar="A,B",
        help="input columns copied to the output",
    )
    io.add_argument("--shard-rows", type=int, default=1024, help="most rows per output file")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="checkpoint path or URL (default: bundled demo model)")
    m.add_argument("--tokenizer", help="SentencePiece tokenizer.model path or URL")
    m.add_argument("--preset", help="config preset for checkpoints without a config")
    m.add_argument("--dtype", help="bfloat16 or float32 (default: as stored)")
    m.add_argument(
        "--chat", action="store_true", help="wrap prompts in the instruction-tuned chat format"
    )
    m.add_argument("--slots", type=int, default=32, help="sequences decoded together per worker")
    m.add_argument("--decode-steps", type=int, default=32)
    m.add_argument("--chunk-size", type=int, default=256)
    m.add_argument("--max-prompt-tokens", type=int, default=131_072)
    s = p.add_argument_group("sampling (input columns of the same names override per row)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--address",
        help="Ray address (default: join a reachable cluster, else "
        "start a local one; 'local' always starts one)",
    )
    c.add_argument("--workers", type=int, help="exact number of workers")
    c.add_argument("--min-workers", type=int)
    c.add_argument("--max-workers", type=int)
    c.add_argument("--accelerator", default="auto", choices=["auto", "tpu", "gpu", "cpu"])
    c.add_argument("--gpus-per-worker", type=float, default=1.0)
    c.add_argument("--cpus-per-worker", type=float, default=1.0)
    c.add_argument("--max-in-flight", type=int, default=2, help="shards queued per worker")
    c.add_argument("--max-preemptions", type=int, default=config_lib.ClusterConfig.max_preemptions)
    c.add_argument("--max-failures", type=int, default=config_lib.ClusterConfig.max_failures)
    r = p.add_argument_group("existing output")
    r.add_argument("--resume", action="store_true", help="continue the job in --output")
    r.add_argument("--overwrite", action="store_true", help="replace what is in --output")
    return p


def config_from_args(a: argparse.Namespace) -> config_lib.JobConfig:
    """Builds the job config from parsed arguments."""
    return config_lib.JobConfig(
        io=config_lib.IOConfig(
            inputs=tuple(a.input),
            output=a.output,
            prompt_column=a.prompt_column,
            id_column=a.id_column,
            keep_columns=tuple(a.keep_columns),
            shard_rows=a.shard_rows,
        ),
        model=config_lib.ModelConfig(
            checkpoint=a.checkpoint,
            tokenizer=a.tokenizer,
            preset=a.preset,
            dtype=a.dtype,
            chat=a.chat,
            slots=a.slots,
            decode_steps=a.decode_steps,
            chunk_size=a.chunk_size,
            max_prompt_tokens=a.max_prompt_tokens,
        ),
        sampling=config_lib.SamplingConfig(
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            seed=a.seed,
            stop=tuple(a.stop),
            n=a.n,
        ),
        cluster=config_lib.ClusterConfig(
            address=a.address,
            workers=a.workers,
            min_workers=a.min_workers,
            max_workers=a.max_workers,
            accelerator=a.accelerator,
            gpus_per_worker=a.gpus_per_worker,
            cpus_per_worker=a.cpus_per_worker,
            max_in_flight=a.max_in_flight,
            max_preemptions=a.max_preemptions,
            max_failures=a.max_failures,
        ),
        resume=config_lib.ResumeConfig(resume=a.resume, overwrite=a.overwrite),
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the job; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = driver.run(config_from_args(args), say=_say)
    except (config_lib.JobInputError, ConnectionError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"interrupted; committed shards are kept: rerun with --resume to finish {args.output}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    s = result.summary
    print(
        f"wrote {s['samples']} row(s) for {s['rows']} input row(s) in "
        f"{s['shards']['committed']} file(s) to {result.output}"
    )
    print(
        f"summary: {result.output.rstrip('/')}/summary.json "
        f"({s['completion_tokens']} tokens, {s['tokens_per_s']} tok/s, "
        f"{s['wall_time_s']}s)"
    )
    if not result.succeeded:
        print(
            f"{s['shards']['failed']} shard(s) failed; see summary.json 'failures'; "
            "rerun with --resume to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED_SHARDS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
