"""``griffin-batch cancel OUTPUT``: stop the job running on an output, resumably.

    griffin-batch cancel gs://bucket/completions/run-1

Leaves a request in the output's manifest; the running driver (on any machine)
sees it within seconds, lets no new shard start, has each busy worker write a
progress checkpoint of its shards and stop, records ``cancelled`` in
``_summary.json`` and exits 130. ``--resume`` finishes the job from there.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import lifecycle, manifest, stages

DESCRIPTION = "stop the job running on an output directory; --resume finishes it later"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the command's arguments to ``p``."""
    p.add_argument("output", metavar="OUTPUT", help="the running job's --output directory URL")


def run(args: argparse.Namespace, prog: str = "griffin-batch cancel") -> int:
    """Asks the driver to stop; returns 0 once asked, 2 when no job runs there."""
    try:
        lease = manifest.request_cancel(  # a staged job's (summarize) running stage
            stages.current(args.output), lifecycle.cancel_record(socket.gethostname(), os.getpid()))
    except (config_lib.JobInputError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"asked the driver on {lease.get('host')} (pid {lease.get('pid')}) to stop; "
          f"`griffin-batch status {args.output}` shows when it has")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="griffin-batch cancel", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
