"""The processor's actor: the job's generation worker behind Ray Data's ``map_batches``.

Ray Data creates these in an actor pool (``concurrency``) and calls each with
batches of rows. One actor loads the model once and runs one continuous-batching
engine (``actors.worker.GenerationWorker``); with ``max_concurrent_batches`` > 1
Ray Data calls it from several threads at once, and the worker's engine loop
(``actors.batching.EngineLoop``) feeds every batch's requests into the same
slots, so a new batch starts while the previous one's last rows decode.

Bad rows are data (``finish_reason`` ``error`` and the message in ``error``);
a model that cannot load, a dead engine or a batch whose columns cannot serve
(``batches.BatchColumnError``) raise, failing the dataset.
"""

from __future__ import annotations

import pyarrow as pa

from griffin_batch.actors import shards, worker
from griffin_batch.data import batches


class ModelLoadError(RuntimeError):
    """The actor could not load the model or tokenizer; names the cause and the host."""


class GenerateStage:
    """Generates the completions of a batch of rows (a Ray Data callable class).

    Args:
      model: What to load (``ProcessorConfig.model_spec``).
      options: How rows become requests (``ProcessorConfig.row_options``).

    Raises:
      ModelLoadError: Loading failed (a missing file, a bad checkpoint, no memory).
    """

    def __init__(self, model: worker.ModelSpec, options: shards.ShardOptions):
        self._worker = worker.GenerationWorker(model)
        where = self._worker.ready()  # raises WorkerLost for a cause a retry may clear
        if "start_error" in where:
            raise ModelLoadError(f"could not load the model on {where['hostname']}: "
                                 f"{where['start_error']}")
        self._options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch's rows with ``OUTPUT_COLUMNS`` added, one row per sample.

        Raises:
          BatchColumnError: The batch's columns cannot serve (every row would fail).
          WorkerLost: The engine has stopped.
          RowAccountingError: A row did not come back exactly once.
        """
        table = batches.for_worker(batch, self._options)
        generated = self._worker(table, batches.batch_shard(batch.num_rows), self._options)
        return batches.with_output(batch, generated)
