"""Generation workers: the actor that turns Parquet shards into output files.

Modules: ``worker`` (the actor class), ``rows`` (rows in, rows out),
``columns`` (input values per row: prompts, ids, sampling overrides, seeds),
``batching`` (one engine stream shared by concurrent shards), ``output`` (the
output schema and atomic publication), ``shards`` (values exchanged with the driver).
"""

import lazy_loader

# Submodules import on first use, so importing one does not pay for the others (Ray, pandas,
# JAX's dtypes): the command line starts in a fraction of a second.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submodules=[
    "batching", "columns", "output", "rows", "shards", "worker",
])
