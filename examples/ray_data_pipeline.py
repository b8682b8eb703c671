"""Griffin inside a Ray Data pipeline: read Parquet, generate, write Parquet.

    python examples/ray_data_pipeline.py --input examples/prompts.parquet --output out/ray-data

Runs the bundled demo model on a local Ray (or the cluster ``RAY_ADDRESS`` names),
on an autoscaling pool of one or two actors. Each output row is an input row's
``id`` and ``prompt`` with its ``completion``, ``finish_reason`` and ``error``
(a row with a bad prompt or sampling parameter gets the message there; the
others run). Rows may carry their own ``sampling_params`` struct column
(``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ``n``).
"""

from __future__ import annotations

import argparse

import ray

from griffin_batch import data
from griffin_batch.jobs import config as job_config
from griffin_batch.model.engine_config import EngineConfig

KEPT = ("id", "prompt", "completion", "finish_reason", "num_completion_tokens", "error")
"""The columns the postprocess step keeps (``id`` where the input has one)."""


def run(input_url: str, output_url: str, *, max_tokens: int = 32,
        concurrency: int | tuple[int, int] = (1, 2), engine: EngineConfig | None = None,
        filesystem=None) -> None:
    """Reads prompts from ``input_url``, generates, writes Parquet under ``output_url``.

    Args:
      input_url: Parquet file(s) with a ``prompt`` column (any URL Ray Data reads).
      output_url: Directory for the output files.
      max_tokens: Default tokens per completion (a row's ``sampling_params`` may differ).
      concurrency: Actors: ``n`` (1 to n) or ``(min, max)``.
      engine: Each actor's engine sizing (default: ``EngineConfig()``).
      filesystem: A pyarrow or fsspec file system for both URLs (None: from the URL).
    """
    config = data.ProcessorConfig(
        sampling=job_config.SamplingConfig(max_tokens=max_tokens),
        concurrency=concurrency,
        engine=engine or EngineConfig(),
    )
    # A lambda travels to Ray's workers by value, even when this file is imported
    # rather than run (the workers cannot import it by name).
    processor = data.build_processor(
        config, postprocess=lambda row: {k: row[k] for k in KEPT if k in row})
    dataset = ray.data.read_parquet(input_url, filesystem=filesystem)
    processor(dataset).write_parquet(output_url, filesystem=filesystem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="examples/prompts.parquet")
    parser.add_argument("--output", default="out/ray-data")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    run(args.input, args.output, max_tokens=args.max_tokens)
    for row in ray.data.read_parquet(args.output).take(3):
        print(row)


if __name__ == "__main__":
    main()
