"""``build_processor``: a callable ``Dataset -> Dataset`` that generates with Griffin.

In the manner of Ray Data LLM's processors: an optional ``preprocess`` row
function, the generation stage (``map_batches`` over an autoscaling pool of
``stage.GenerateStage`` actors, each holding the model once), then an optional
``postprocess`` row function. Nothing runs until the dataset is consumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from griffin_batch.cluster import hardware
from griffin_batch.data import config as config_lib
from griffin_batch.data import stage

RowFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Processor:
    """Applies preprocess, generation and postprocess to a dataset (see ``build_processor``).

    Attributes:
      config: The generation stage's configuration (validated).
      preprocess: Row function run before generation (``Dataset.map``), or None.
      postprocess: Row function run after it, or None.
      preprocess_map_kwargs: ``Dataset.map`` options of the preprocess step.
      postprocess_map_kwargs: ``Dataset.map`` options of the postprocess step.
    """

    config: config_lib.ProcessorConfig
    preprocess: RowFn | None = None
    postprocess: RowFn | None = None
    preprocess_map_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    postprocess_map_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, dataset):
        """The dataset with each row's completion (lazy, like every Ray Data transform).

        Args:
          dataset: A ``ray.data.Dataset`` with the prompt column (after ``preprocess``).

        Returns:
          A ``ray.data.Dataset``: each row's columns plus ``batches.OUTPUT_COLUMNS``,
          one row per sample (then ``postprocess``).
        """
        if self.preprocess is not None:
            dataset = dataset.map(self.preprocess, **self.preprocess_map_kwargs)
        dataset = dataset.map_batches(stage.GenerateStage, **self.map_batches_kwargs())
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess, **self.postprocess_map_kwargs)
        return dataset

    def map_batches_kwargs(self) -> dict[str, Any]:
        """The generation step's ``Dataset.map_batches`` options: pool, batches, resources."""
        import ray.data

        c = self.config
        low, high = c.pool_size()
        kwargs: dict[str, Any] = dict(
            batch_format="pyarrow",
            batch_size=c.rows_per_batch(),
            zero_copy_batch=True,
            fn_constructor_kwargs={"model": c.model_spec(), "options": c.row_options()},
            # Several batches per actor, each on its own thread, all feeding the
            # actor's one engine (``actors.batching.EngineLoop`` is thread-safe).
            compute=ray.data.ActorPoolStrategy(
                min_size=low, max_size=high,
                max_concurrent_calls_per_actor=c.max_concurrent_batches,
                enable_true_multi_threading=True),
            **placement(c).ray_options(),
        )
        if c.accelerator_type is not None:
            kwargs["accelerator_type"] = c.accelerator_type
        if c.runtime_env is not None:
            kwargs["runtime_env"] = c.runtime_env
        return kwargs


def placement(config: config_lib.ProcessorConfig) -> hardware.WorkerSpec:
    """What one actor reserves: as a ``generate`` job's worker (``cluster.hardware``).

    ``auto`` and a TPU share left unset look at the cluster's nodes, connecting to
    (or starting) Ray as Ray Data itself would when the dataset runs.
    """
    acc = hardware.Accelerator.parse(config.accelerator)
    needs_nodes = acc is hardware.Accelerator.AUTO or (
        acc is hardware.Accelerator.TPU and config.tpu_chips_per_worker is None)
    nodes = []
    if needs_nodes:
        import ray

        from griffin_batch.cluster import connect

        if not ray.is_initialized():
            ray.init()
        nodes = connect.nodes()
    return hardware.worker_spec(nodes, acc, gpus_per_worker=config.gpus_per_worker,
                                cpus_per_worker=config.cpus_per_worker,
                                tpu_chips=config.tpu_chips_per_worker)


def build_processor(
    config: config_lib.ProcessorConfig,
    preprocess: RowFn | None = None,
    postprocess: RowFn | None = None,
    preprocess_map_kwargs: dict[str, Any] | None = None,
    postprocess_map_kwargs: dict[str, Any] | None = None,
) -> Processor:
    """A processor generating with Griffin, as Ray Data LLM's ``build_processor``.

    Args:
      config: Model, engine, sampling, batch size and actor pool.
      preprocess: Turns each input row into one with the prompt column (and, if
        wanted, ``sampling_params``), e.g. ``lambda row: {"prompt": ...,
        "sampling_params": {"max_tokens": 64}}``. Its output is all the
        generation step sees.
      postprocess: Turns each output row into the row you keep.
      preprocess_map_kwargs: ``Dataset.map`` options (``num_cpus``, ...) of preprocess.
      postprocess_map_kwargs: ``Dataset.map`` options of postprocess.

    Returns:
      The processor; ``processor(dataset)`` returns the output dataset.

    Raises:
      ProcessorConfigError: An invalid option, named.
    """
    config.validate()
    return Processor(config, preprocess, postprocess, dict(preprocess_map_kwargs or {}),
                     dict(postprocess_map_kwargs or {}))
