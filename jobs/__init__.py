"""The batch generation job: config, metadata-only planner, manifest, driver and command line.

Run it with ``python -m jobs.generate``; see ``jobs.generate`` for the options.
"""

from jobs import config, driver, manifest, planner, progress, scheduler

# ``jobs.generate`` (the command line) is left out so ``python -m jobs.generate`` runs it fresh.
__all__ = ["config", "driver", "manifest", "planner", "progress", "scheduler"]
