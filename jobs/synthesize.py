"""Command line of synthetic data generation, ``griffin-batch synthesize``.

    griffin-batch synthesize --template prompt.jinja --vars topics.yaml --grid --n 4 \\
        --json-schema answer.schema.json --dedup near --output gs://bucket/synthetic/run-1

Prompts are a Jinja2 template rendered over each combination of variables;
each is sampled ``--n`` times, one output row per sample (``jobs.synth_job``).
The model, sampling, cluster and existing-output options are ``generate``'s,
and so are the exit statuses (``jobs.generate``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import generate, synth_dedup, synth_job

DESCRIPTION = (
    "Generate synthetic data: a Jinja2 template rendered over combinations of variables, "
    "--n samples each, optionally validated against a JSON schema (invalid samples drawn "
    "again) and deduplicated; one output row per sample, each row once."
)


def build_parser(prog: str = "griffin-batch synthesize") -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the command's options to ``p`` (a parser or a ``griffin-batch`` subcommand)."""
    defaults = synth_job.SynthConfig
    t = p.add_argument_group("prompts and output")
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--template", metavar="FILE",
                       help="Jinja2 template of the prompt (any fsspec URL); variables undefined "
                       "in a combination are errors")
    which.add_argument("--template-text", metavar="TEXT", help="the template itself")
    t.add_argument("--vars", metavar="URL",
                   help="the combinations: Parquet, CSV or JSONL (one per row), or YAML/JSON "
                   "(a list of mappings); without it, the template is rendered once")
    t.add_argument("--grid", action="store_true",
                   help="--vars is a YAML mapping of lists: render every combination of them")
    t.add_argument("--output", required=True, metavar="URL", help="output directory URL")
    t.add_argument("--shard-rows", type=int, default=config_lib.IOConfig.shard_rows,
                   help="most rows (samples) per output file")
    s = p.add_argument_group("validation and deduplication")
    s.add_argument("--json-schema", metavar="FILE",
                   help="each completion must be JSON valid under this schema; invalid ones are "
                   "drawn again with new seeds, up to --max-attempts")
    s.add_argument("--max-attempts", type=int, default=defaults.max_attempts,
                   help="most draws of a sample the schema rejects, the first included")
    s.add_argument("--dedup", choices=synth_dedup.MODES, default=defaults.dedup,
                   help="once every shard is committed, write the rows without exact (or also "
                   "near, by MinHash LSH) duplicate completions to <output>/_deduplicated/")
    s.add_argument("--dedup-threshold", type=float, default=defaults.dedup_threshold,
                   help="least estimated Jaccard similarity of a near duplicate (--dedup near)")
    # synth_staging fixes the sampling columns (the seed only): no --sampling-columns here.
    generate.add_job_arguments(p, per_row=None,
                               n_help="samples per combination, one output row each")


def config_from_args(a: argparse.Namespace
                     ) -> tuple[config_lib.JobConfig, synth_job.SynthConfig]:
    """The job and synthesize configs from parsed arguments.

    Raises:
      JobInputError: An option is out of range (named by its flag).
    """
    synth = synth_job.SynthConfig(
        template=a.template, template_text=a.template_text, vars=a.vars, grid=a.grid, n=a.n,
        dedup=a.dedup, dedup_threshold=a.dedup_threshold, json_schema=a.json_schema,
        max_attempts=a.max_attempts)
    io = config_lib.IOConfig(inputs=synth.sources(), output=a.output, shard_rows=a.shard_rows)
    return generate.job_config_from_args(a, io), synth


def main(argv: Sequence[str] | None = None, prog: str = "griffin-batch synthesize") -> int:
    """Parses ``argv`` and runs the job; returns the exit status."""
    return run(build_parser(prog).parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "griffin-batch synthesize") -> int:
    """Runs the job from parsed arguments; returns the exit status (``generate``'s)."""

    def build() -> tuple[config_lib.JobConfig, synth_job.SynthesizeJob]:
        config, synth = config_from_args(args)
        config.validate()  # the options first, then the files
        return config, synth_job.SynthesizeJob(synth)

    return generate.run_job(build, args.output, prog,
                            report=lambda result: _report(result.summary))


def _report(summary: Mapping[str, Any]) -> None:
    """Prints what validation and deduplication did."""
    checked = summary.get("validation")
    if checked and checked["valid"] + checked["invalid"]:
        print(f"validation: {checked['valid']} valid, {checked['invalid']} invalid row(s) "
              f"({checked['redrawn']} drawn again)")
    dedup = summary.get("dedup")
    if dedup and dedup.get("mode") != synth_dedup.NONE:
        print(f"dedup ({dedup['mode']}): {dedup['kept']} of {dedup['rows']} row(s) kept, "
              f"{dedup['removed_exact']} exact and {dedup['removed_near']} near duplicate(s) "
              f"removed: {summary['output'].rstrip('/')}/{dedup['output']}")


if __name__ == "__main__":
    sys.exit(main(prog="python -m griffin_batch.jobs.synthesize"))
