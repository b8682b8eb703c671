"""Generation workers: the actor that turns Parquet shards into output files.

Modules: ``worker`` (the actor class), ``rows`` (rows in, rows out),
``columns`` (input values per row: prompts, ids, sampling overrides, seeds),
``batching`` (one engine stream shared by concurrent shards), ``output`` (the
output schema and atomic publication), ``shards`` (values exchanged with the driver).
"""

from griffin_batch.actors import batching, columns, output, rows, shards, worker

__all__ = ["batching", "columns", "output", "rows", "shards", "worker"]
