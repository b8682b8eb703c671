"""Command line of ``griffin-batch summarize``: summaries of long documents.

    griffin-batch summarize --input 'docs/*.md' --output out/summaries
    griffin-batch summarize --input gs://bucket/articles.parquet --text-column body \\
        --output gs://bucket/summaries --mode map-reduce --section-tokens 4096 --keep-sections \\
        --checkpoint gs://bucket/recurrentgemma-2b-it --tokenizer gs://bucket/tokenizer.model --chat

Output: ``part-<shard>.parquet`` files as ``generate`` writes them, one row per
document: ``id``, ``summary``, ``document_tokens``, the usual
token counts, ``finish_reason`` and ``error``, and ``sections`` (the section
summaries) with ``--keep-sections``. The model, sampling, cluster and
existing-output options are ``generate``'s; the exit status too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import generate, summary_job, summary_staging

DESCRIPTION = (
    "Summarize long documents (text files, or a Parquet text column) on a Ray cluster: each "
    "document whole, prefilled in chunks, or in sections whose summaries are summarized "
    "(--mode map-reduce)."
)

SHARD_ROWS = 64
"""Documents per shard by default: documents are long, and a worker reads a shard's at once."""


def build_parser(prog: str = "griffin-batch summarize") -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the command's options to ``p`` (a parser or a ``griffin-batch`` subcommand)."""
    io = p.add_argument_group("documents and output")
    io.add_argument("--input", action="append", required=True, metavar="URL_OR_GLOB",
                    help="text files (a file, a directory of .txt/.md files or a glob; one "
                    "document each, its path the id), or Parquet files with --text-column; any "
                    "fsspec URL (repeatable)")
    io.add_argument("--output", required=True, metavar="URL", help="output directory URL")
    io.add_argument("--text-column", metavar="COLUMN",
                    help="the inputs are Parquet: this column holds the documents")
    io.add_argument("--id-column", metavar="COLUMN",
                    help="with --text-column: the id column (default: 'id' where a file has "
                    "it, else '<file name>#<row>')")
    io.add_argument("--shard-rows", type=int, default=SHARD_ROWS,
                    help="most documents per output file")
    s = p.add_argument_group("summaries")
    s.add_argument("--instruction", default=summary_staging.DEFAULT_INSTRUCTION,
                   help="what the model is asked (default: %(default)r); with --chat it opens "
                   "the user turn, else it precedes the text, which ends with 'Summary:'")
    s.add_argument("--mode", choices=summary_job.MODES, default=summary_job.SINGLE,
                   help="single: each document whole in one request, prefilled in chunks at "
                   "constant memory; map-reduce: documents over --section-tokens are split on "
                   "paragraphs, the sections summarized, then their summaries")
    s.add_argument("--section-tokens", type=int,
                   default=summary_job.SummarizeConfig.section_tokens,
                   help="map-reduce: most tokens per section (and per group of summaries "
                   "combined)")
    s.add_argument("--keep-sections", action="store_true",
                   help="map-reduce: the output keeps each document's section summaries "
                   "(column 'sections')")
    generate.add_job_arguments(p, per_row=None, n_help="must be 1: one summary per document")


def summarize_config(a: argparse.Namespace) -> summary_job.SummarizeConfig:
    """The summarize options from parsed arguments."""
    return summary_job.SummarizeConfig(
        text_column=a.text_column, id_column=a.id_column, instruction=a.instruction,
        mode=a.mode, section_tokens=a.section_tokens, keep_sections=a.keep_sections, chat=a.chat)


def config_from_args(a: argparse.Namespace) -> config_lib.JobConfig:
    """The job's config (inputs, model, sampling, cluster, resume) from parsed arguments.

    Raises:
      JobInputError: An engine sizing option is out of range (named by its flag).
    """
    return generate.job_config_from_args(a, config_lib.IOConfig(
        inputs=tuple(a.input), output=a.output, shard_rows=a.shard_rows))


def main(argv: Sequence[str] | None = None, prog: str = "griffin-batch summarize") -> int:
    """Parses ``argv`` and runs the job; returns the exit status."""
    return run(build_parser(prog).parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "griffin-batch summarize") -> int:
    """Runs the job from parsed arguments; returns the exit status (``generate``'s)."""
    return generate.run_stages(
        lambda say, on_lost: summary_job.run(config_from_args(args), summarize_config(args),
                                             say=say, on_cluster_lost=on_lost),
        args.output, prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m griffin_batch.jobs.summarize"))
