"""Griffin generation as a Ray Data processor: ``griffin_batch.data``.

In the manner of Ray Data LLM (``ray.data.llm``)::

    from griffin_batch import data

    processor = data.build_processor(data.ProcessorConfig(concurrency=(1, 4)))
    ds = processor(ray.data.read_parquet("gs://bucket/prompts/"))
    ds.write_parquet("gs://bucket/completions/")

Modules: ``config`` (``ProcessorConfig``), ``processor`` (``build_processor``,
``Processor``), ``stage`` (the actor Ray Data runs), ``batches`` (a batch's rows in
and out). The same worker, per-row parsing and engine as the ``generate`` job.
"""

from griffin_batch.data import batches, config, processor, stage
from griffin_batch.data.batches import OUTPUT_COLUMNS, BatchColumnError
from griffin_batch.data.config import ProcessorConfig, ProcessorConfigError
from griffin_batch.data.processor import Processor, build_processor

__all__ = [
    "OUTPUT_COLUMNS",
    "BatchColumnError",
    "Processor",
    "ProcessorConfig",
    "ProcessorConfigError",
    "batches",
    "build_processor",
    "config",
    "processor",
    "stage",
]
