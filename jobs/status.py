"""``griffin-batch status OUTPUT``: a job's state from its output directory alone.

    griffin-batch status gs://bucket/completions/run-1

Reads ``_summary.json``, which a running driver rewrites every few seconds, so
it works from any machine that can read the output. Exit status 0 when the
job has completed, 3 while it runs, 1 otherwise (ended short, or no job there).
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec

from griffin_batch.jobs import lifecycle, manifest, stages

DESCRIPTION = "print a job's state, counts, speed and ETA from its output directory"
EXIT_COMPLETED, EXIT_NOT_COMPLETED, EXIT_RUNNING = 0, 1, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the command's arguments to ``p``."""
    p.add_argument("output", metavar="OUTPUT", help="the job's --output directory URL")
    p.add_argument("--json", action="store_true", help=f"print {manifest.SUMMARY_FILE} as it is")


def run(args: argparse.Namespace, prog: str = "griffin-batch status") -> int:
    """Prints the job's state; returns the exit status."""
    where = stages.current(args.output)  # a staged job's (summarize) running stage
    fs, path = fsspec.core.url_to_fs(where)
    try:
        summary = manifest.read_summary(fs, path)
    except FileNotFoundError:
        print(f"{prog}: error: no job in {args.output} (no {manifest.SUMMARY_FILE})", file=sys.stderr)
        return EXIT_NOT_COMPLETED
    except (OSError, ValueError) as e:
        print(f"{prog}: error: cannot read {args.output}/{manifest.SUMMARY_FILE}: {e}",
              file=sys.stderr)
        return EXIT_NOT_COMPLETED
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if where != args.output:
            print(f"stage: {where} (an earlier stage of the job)")
        print("\n".join(lifecycle.describe(summary)))
    status = summary.get("status")
    if status == lifecycle.COMPLETED:
        return EXIT_COMPLETED
    return EXIT_RUNNING if status in lifecycle.RUNNING else EXIT_NOT_COMPLETED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="griffin-batch status", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
