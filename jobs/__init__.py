"""The batch generation job: config, metadata-only planner, manifest, driver and command line.

Run it with ``griffin-batch generate`` (``griffin_batch.jobs.cli``) or
``python -m griffin_batch.jobs.generate``; see ``griffin_batch.jobs.generate`` for the options.
"""

from griffin_batch.jobs import config, driver, manifest, planner, progress, scheduler

# The command line (``cli``, ``generate``) is left out so ``python -m griffin_batch.jobs.generate``
# runs it fresh, and importing the package stays free of argparse set-up.
__all__ = ["config", "driver", "manifest", "planner", "progress", "scheduler"]
