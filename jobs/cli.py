"""The ``griffin-batch`` command: one subcommand per job.

    griffin-batch generate --input prompts.parquet --output out/run-1

Each subcommand module provides ``add_arguments(parser)`` and ``run(args, prog)``;
``run`` returns the process exit status (see ``griffin_batch.jobs.generate``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Collection, Sequence

# name -> (module, one-line summary). Modules import on use (``build_parser``).
SUBCOMMANDS = {
    "generate": (
        "griffin_batch.jobs.generate",
        "generate completions for Parquet prompts on a Ray cluster",
    ),
    "synthesize": (
        "griffin_batch.jobs.synthesize",
        "generate synthetic data from a prompt template over combinations of variables",
    ),
    "summarize": (
        "griffin_batch.jobs.summarize",
        "summarize long documents (text files or a Parquet text column), whole or map-reduce",
    ),
    "status": ("griffin_batch.jobs.status", "print a job's state from its output directory"),
    "cancel": ("griffin_batch.jobs.cancel", "stop a running job; --resume finishes it"),
}


def _version() -> str:
    try:
        return importlib.metadata.version("griffin-batch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(commands: Collection[str] = tuple(SUBCOMMANDS)) -> argparse.ArgumentParser:
    """The ``griffin-batch`` parser with one subparser per job.

    Only the subparsers named in ``commands`` get their options (and import their
    modules): the modules pull in Ray, pandas and JAX's dtypes, about 2 s that
    ``griffin-batch --help`` and every ``status`` would otherwise pay.
    """
    parser = argparse.ArgumentParser(
        prog="griffin-batch",
        description="Batch text generation with Griffin / RecurrentGemma models on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"griffin-batch {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name not in commands:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=getattr(module, "DESCRIPTION", summary),
                           allow_abbrev=False)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``griffin-batch`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top-level options take no values, so the first word that is not an option is
    # the subcommand (argparse itself rejects one that is not in SUBCOMMANDS).
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser([command] if command else [])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top level and print its usage, not the subcommand's
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return module.run(args, prog=f"griffin-batch {args.command}")


if __name__ == "__main__":
    sys.exit(main())
