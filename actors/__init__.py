"""Generation workers: the actor that turns Parquet shards into output files.

Modules: ``worker`` (the actor class), ``rows`` (rows in, rows out),
``batching`` (one engine stream shared by concurrent shards), ``output`` (the
output schema and atomic publication), ``shards`` (values exchanged with the driver).
"""

from griffin_batch.actors import batching, output, rows, shards, worker

__all__ = ["batching", "output", "rows", "shards", "worker"]
