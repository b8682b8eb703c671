"""Command line of the batch generation job, ``griffin-batch generate``.

    griffin-batch generate --input 'gs://bucket/prompts/*.parquet' --output gs://bucket/out \\
        --checkpoint gs://bucket/ckpt --tokenizer gs://bucket/tokenizer.model --max-tokens 256

``python -m griffin_batch.jobs.generate`` runs the same, and so does
``ray job submit -- griffin-batch generate ...`` (see the README).

Exit status: 0 all shards committed; 1 some shard failed (see _summary.json);
2 bad job input, no reachable cluster, or a worker that cannot start (a
missing package or checkpoint on its host: no retry fixes it); 3 the Ray
cluster stopped answering mid-run (its GCS or this machine's raylet accepted no
connection for 30 s, ``griffin_batch.cluster.faults.CLUSTER_LOST_TIMEOUT_S``;
committed shards are kept: rerun with --resume); 130 interrupted (rerun with
--resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from griffin_batch.actors import columns
from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver, manifest, show
from griffin_batch.model import dtypes, engine_config

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_BAD_INPUT, EXIT_CLUSTER_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


DESCRIPTION = (
    "Generate completions for Parquet prompts on every accelerator host of a "
    "Ray cluster; one output Parquet file per input shard, each row once."
)


def build_parser(prog: str = "griffin-batch generate") -> argparse.ArgumentParser:
    """The argument parser (options mirror ``griffin_batch.jobs.config.JobConfig``)."""
    # No prefixes: "--max-worker 4" must be an error, not --max-workers.
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the job's options to ``p`` (a parser or a ``griffin-batch`` subcommand)."""
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="URL_OR_GLOB",
        help="Parquet file, directory or glob (JSONL with --input-format openai-batch); "
        "any fsspec URL (repeatable)",
    )
    io.add_argument("--output", required=True, metavar="URL", help="output directory URL")
    io.add_argument("--prompt-column", default=config_lib.IOConfig.prompt_column,
                    help="input column of prompt text (default: %(default)s)")
    io.add_argument(
        "--id-column",
        help="row id column; given, every input must have it (default: 'id' where a file has "
        "it; rows without an id get '<file name>#<row index>')",
    )
    io.add_argument(
        "--allow-duplicate-ids",
        action="store_true",
        help="run even when row ids repeat (as text) across the inputs",
    )
    io.add_argument(
        "--keep-columns",
        type=_csv,
        default=(),
        metavar="A,B",
        help="input columns copied to the output",
    )
    io.add_argument(
        "--sampling-columns",
        type=_csv,
        default=(),
        metavar="FIELD[=COLUMN],...",
        help="input columns that set sampling per row: "
        f"{', '.join(columns.SAMPLING_FIELDS)}; no other column changes sampling",
    )
    io.add_argument(
        "--sampling-params-column",
        metavar="COLUMN",
        help="a struct column whose fields set sampling per row (as Ray Data LLM's sampling_params)",
    )
    io.add_argument("--shard-rows", type=int, default=config_lib.IOConfig.shard_rows,
                    help="most rows per output file, the unit of retry and resume "
                    "(default: %(default)s)")
    io.add_argument(
        "--input-format",
        choices=config_lib.INPUT_FORMATS,
        default=config_lib.IOConfig.input_format,
        help="parquet, or openai-batch: the inputs are OpenAI Batch API request files (JSONL: "
        "custom_id, url /v1/chat/completions, body with messages and sampling fields)",
    )
    io.add_argument(
        "--output-format",
        choices=config_lib.OUTPUT_FORMATS,
        default=config_lib.IOConfig.output_format,
        help="parquet, or openai-batch: also write output.jsonl and errors.jsonl (OpenAI Batch "
        "API output records, in input order) once every shard is committed",
    )
    io.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print the first N output rows when the job ends (the prompt too where "
        "--keep-columns copies it)",
    )
    add_job_arguments(p)


def add_job_arguments(p: argparse.ArgumentParser, *,
                      per_row: str | None = "see --sampling-columns",
                      n_help: str = "samples per prompt") -> None:
    """Adds the model, sampling, cluster and existing-output options (shared with ``synthesize``).

    ``per_row`` says how rows set their own sampling (None: they cannot, as in a
    command without ``--sampling-columns``); ``n_help`` what ``--n`` counts there.
    """
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="checkpoint path or URL (default: bundled demo model)")
    m.add_argument("--tokenizer", help="SentencePiece tokenizer.model path or URL")
    m.add_argument("--preset", help="config preset for checkpoints without a config")
    m.add_argument("--dtype", help=f"{' or '.join(dtypes.DTYPES)} ({dtypes.DEFAULT_HELP})")
    m.add_argument(
        "--chat", action="store_true", help="wrap prompts in the instruction-tuned chat format"
    )
    for f in engine_config.job_options():  # defaults live in EngineConfig only
        m.add_argument(f.metadata["flag"], type=int, default=f.default, help=f.metadata["help"])
    s = p.add_argument_group(f"sampling (per row: {per_row})" if per_row else
                             "sampling (the same for every request)")
    sampling = config_lib.SamplingConfig  # the defaults' one source
    s.add_argument("--max-tokens", type=int, default=sampling.max_tokens,
                   help="most tokens generated per sample (default: %(default)s)")
    s.add_argument("--temperature", type=float, default=sampling.temperature,
                   help="0 (the default) is greedy: every sample of a prompt is the same")
    s.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (default: all)")
    s.add_argument("--top-p", type=float,
                   help="sample from the likeliest tokens of this total probability, in (0, 1] "
                   "(default: 1)")
    s.add_argument(
        "--seed",
        type=int,
        default=sampling.seed,
        help="job seed; each row's stream comes from (job seed, row id)"
        + (" unless the row sets a seed" if per_row else ""),
    )
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--n", type=int, default=sampling.n, help=n_help)
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--address",
        help="Ray address (default: join a reachable cluster, else "
        "start a local one; 'local' always starts one)",
    )
    c.add_argument("--workers", type=int, help="exact number of workers (min and max at once)")
    c.add_argument(
        "--min-workers",
        type=int,
        help="workers that must be ready before work starts (default 1); the job fails when "
        "fewer are after --wait-for-workers",
    )
    c.add_argument(
        "--max-workers",
        type=int,
        help="most workers at once (default: one per accelerator host present, growing as "
        "nodes join); on an autoscaling cluster, the size to scale toward",
    )
    c.add_argument(
        "--wait-for-workers",
        type=float,
        default=config_lib.ClusterConfig.wait_for_workers_s,
        metavar="SECONDS",
        help="how long to wait for --min-workers (the autoscaler creating nodes, models loading)",
    )
    c.add_argument(
        "--tpu-chips-per-worker",
        type=int,
        help="TPU chips per worker, one host's (default: the smallest TPU host's, else 4)",
    )
    cluster = config_lib.ClusterConfig
    c.add_argument("--accelerator", default=cluster.accelerator,
                   choices=["auto", "tpu", "gpu", "cpu"],
                   help="what workers run on (default: %(default)s, the hosts' own)")
    c.add_argument("--gpus-per-worker", type=float, default=cluster.gpus_per_worker,
                   help="GPUs per GPU worker (default: %(default)s; a host's count: one worker "
                   "per host)")
    c.add_argument("--cpus-per-worker", type=float, default=cluster.cpus_per_worker,
                   help="CPUs a CPU worker reserves (default: %(default)s)")
    c.add_argument(
        "--tpu-slice",
        metavar="POD_TYPE",
        help="reserve whole multi-host TPU slices of this type (e.g. v5p-16) with Ray's slice "
        "placement groups, one worker per host; the pool grows and shrinks by slices",
    )
    c.add_argument(
        "--forward-credentials",
        action="store_true",
        help="send this shell's storage credentials (AWS_* keys, GOOGLE_APPLICATION_CREDENTIALS, "
        "fsspec options with keys or tokens) to the workers; by default they use their node's "
        "own (metadata server, workload identity)",
    )
    c.add_argument(
        "--max-in-flight",
        type=int,
        help="shards held per worker at once (default: enough to fill its slots)",
    )
    c.add_argument("--max-preemptions", type=int, default=cluster.max_preemptions,
                   help="re-runs of a shard whose worker died, e.g. a preempted host "
                   "(default: %(default)s)")
    c.add_argument("--max-failures", type=int, default=cluster.max_failures,
                   help="re-runs of a shard that raised on a live worker (default: %(default)s)")
    c.add_argument(
        "--stall-timeout",
        type=float,
        default=config_lib.ClusterConfig.stall_timeout_s,
        metavar="SECONDS",
        help="replace a worker that holds shards and makes no progress for this long",
    )
    r = p.add_argument_group("existing output")
    r.add_argument("--resume", action="store_true", help="continue the job in --output")
    r.add_argument("--overwrite", action="store_true", help="replace what is in --output")
    r.add_argument(
        "--checkpoint-every",
        type=float,
        default=config_lib.ResumeConfig.checkpoint_every_s,
        metavar="SECONDS",
        help="write each running shard's progress this often (and when a worker is told to "
        "stop); a retried or resumed shard continues from it mid-sequence. 0: never",
    )


def config_from_args(a: argparse.Namespace) -> config_lib.JobConfig:
    """Builds the job config from parsed arguments.

    Raises:
      JobInputError: An engine sizing option is out of range (named by its flag).
    """
    return job_config_from_args(a, config_lib.IOConfig(
        inputs=tuple(a.input),
        output=a.output,
        prompt_column=a.prompt_column,
        id_column=a.id_column,
        allow_duplicate_ids=a.allow_duplicate_ids,
        sampling_columns=tuple(a.sampling_columns),
        sampling_params_column=a.sampling_params_column,
        keep_columns=tuple(a.keep_columns),
        shard_rows=a.shard_rows,
        input_format=a.input_format,
        output_format=a.output_format,
    ))


def job_config_from_args(a: argparse.Namespace, io: config_lib.IOConfig) -> config_lib.JobConfig:
    """The job config of ``io`` and the options ``add_job_arguments`` added.

    Raises:
      JobInputError: An engine sizing option is out of range (named by its flag).
    """
    sizing = {f.name: getattr(a, engine_config.flag_dest(f)) for f in engine_config.job_options()}
    for f in engine_config.job_options():
        if sizing[f.name] <= 0:
            raise config_lib.JobInputError(
                f"{f.metadata['flag']} must be positive, got {sizing[f.name]}"
            )
    return config_lib.JobConfig(
        io=io,
        model=config_lib.ModelConfig(
            checkpoint=a.checkpoint,
            tokenizer=a.tokenizer,
            preset=a.preset,
            dtype=a.dtype,
            chat=a.chat,
            engine=engine_config.EngineConfig(**sizing),
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
            wait_for_workers_s=a.wait_for_workers,
            tpu_chips_per_worker=a.tpu_chips_per_worker,
            forward_credentials=a.forward_credentials,
            tpu_slice=a.tpu_slice,
            accelerator=a.accelerator,
            gpus_per_worker=a.gpus_per_worker,
            cpus_per_worker=a.cpus_per_worker,
            max_in_flight=a.max_in_flight,
            max_preemptions=a.max_preemptions,
            max_failures=a.max_failures,
            stall_timeout_s=a.stall_timeout,
        ),
        resume=config_lib.ResumeConfig(
            resume=a.resume, overwrite=a.overwrite, checkpoint_every_s=a.checkpoint_every
        ),
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, prog: str = "griffin-batch generate") -> int:
    """Parses ``argv`` and runs the job; returns the exit status."""
    return run(build_parser(prog).parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "griffin-batch generate") -> int:
    """Runs the job from parsed arguments; returns the exit status."""
    def show_rows(result: driver.JobResult) -> None:
        rows = show.first_rows(result.output, args.show, args.prompt_column)
        if rows:
            print(show.format_rows(rows))

    return run_job(lambda: (config_from_args(args), None), args.output, prog,
                   report=show_rows if args.show > 0 else None)


def run_job(
    build: Callable[[], tuple[config_lib.JobConfig, driver.Variant | None]],
    output: str,
    prog: str,
    report: Callable[[driver.JobResult], None] | None = None,
) -> int:
    """Runs the job ``build`` makes (a ``driver.Variant`` of it, if any); returns the exit status.

    Args:
      build: Makes the job's config and variant; may raise ``JobInputError``.
      output: The output directory, for the line an interruption prints.
      prog: The command's name, for its messages.
      report: Prints the variant's own figures before the job's last lines.
    """
    def call(say: driver.Say, on_cluster_lost: Callable[[driver.JobResult], None]
             ) -> driver.JobResult:
        config, variant = build()
        return driver.run(config, say=say, on_cluster_lost=on_cluster_lost, variant=variant)

    return run_stages(call, output, prog, report)


def run_stages(
    call: Callable[[driver.Say, Callable[[driver.JobResult], None]], driver.JobResult],
    output: str,
    prog: str,
    report: Callable[[driver.JobResult], None] | None = None,
) -> int:
    """Runs ``call(say, on_cluster_lost)``: one driver run or several in turn (a job in stages).

    ``call`` passes both on to every ``driver.run`` and returns the last result; it
    may raise ``JobInputError``. The messages and exit status are ``run_job``'s.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = call(_say, lambda stuck: _exit_stuck(stuck, prog))
    except (config_lib.JobInputError, ConnectionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"interrupted; committed shards are kept: rerun with --resume to finish {output}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if report is not None:
        report(result)
    return _report(result, prog)


def _report(result: driver.JobResult, prog: str) -> int:
    """Prints how the job ended (an error line first if it stopped early); returns the exit status."""
    s = result.summary
    if result.cluster_lost:
        print(
            f"{prog}: error: {result.fatal}; {s['shards']['committed']} of "
            f"{s['shards']['total']} shard(s) committed are kept: rerun with --resume "
            f"to finish {result.output}",
            file=sys.stderr,
        )
    elif result.cancelled:
        print(f"{prog}: {result.cancelled}", file=sys.stderr)
    elif result.fatal:
        print(f"{prog}: error: {result.fatal}", file=sys.stderr)
    errors = s.get("error_rows", 0)  # rows whose 'error' column says why: a job's result too
    print(
        f"wrote {s['samples']} output row(s)"
        + (f" ({errors} of them error rows: their 'error' column says why)" if errors else "")
        + f" for {s['rows']} of {s['input_rows']} input row(s), {s['shards']['committed']} of "
        f"{s['shards']['total']} shard file(s), to {result.output}"
    )
    print(
        f"summary: {result.output.rstrip('/')}/{manifest.SUMMARY_FILE} "
        f"({s['completion_tokens']} tokens, {s['tokens_per_s']} tok/s, "
        f"{s['wall_time_s']}s)"
    )
    if result.cluster_lost:
        return EXIT_CLUSTER_LOST
    if result.cancelled:
        return EXIT_INTERRUPTED
    if result.fatal:
        kept = s["shards"]["committed"]
        print(
            "stopped at the first worker that could not start (a retry cannot fix it); "
            + (f"fix the cause and rerun with --resume to keep the {kept} committed shard(s)"
               if kept else "nothing is committed: fix the cause and rerun, with --overwrite "
               "if the fix is another option (--resume keeps the options)"),
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if not result.succeeded:
        failed, unreadable = s["shards"]["failed"], s.get("unreadable_inputs", 0)
        why = ([f"{failed} shard(s) failed (rerun with --resume to retry them)"] if failed else [])
        if unreadable:  # a rerun reads them again only once they are fixed
            why.append(f"{unreadable} input file(s) could not be read, so their rows did not run")
        print(f"{'; '.join(why)}; see {manifest.SUMMARY_FILE} 'failures'", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return EXIT_OK


def _exit_stuck(result: driver.JobResult, prog: str) -> NoReturn:
    """Reports the job and ends the process, whose main thread waits inside Ray for a lost cluster.

    Called on the driver's watch thread (``driver.run``'s ``on_cluster_lost``), the
    summary already written. Nothing can unblock the main thread, and Ray's own exit
    would come later, with status 1 and no word of the job.
    """
    print(file=sys.stderr)  # ends the progress bar's line
    code = _report(result, prog)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(prog="python -m griffin_batch.jobs.generate"))
