"""The batch generation job: config, metadata-only planner, manifest, driver and command line.

Run it with ``griffin-batch generate`` (``griffin_batch.jobs.cli``) or
``python -m griffin_batch.jobs.generate``; see ``griffin_batch.jobs.generate`` for the options.
"""

import lazy_loader

# Submodules import on first use, so importing one does not pay for the others (Ray, pandas,
# JAX's dtypes): the command line starts in a fraction of a second. The command line itself
# (``cli``, ``generate``) is not listed: ``python -m griffin_batch.jobs.generate`` runs it fresh.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submodules=[
    "config", "driver", "manifest", "planner", "progress", "scheduler",
])
