"""Fixtures of the job tests: small job configs on the session's Ray cluster."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import planner
from griffin_batch.model.engine_config import EngineConfig

# Small everywhere: the engine compiles per shape, and 2 CPU cores run everything.
SLOTS, DECODE_STEPS, MAX_TOKENS = 4, 8, 8


@pytest.fixture
def job_config(ray_address) -> Callable[..., config_lib.JobConfig]:
    """``make(inputs, output, workers=1, shard_rows=4, **options)``: a small CPU job on the session cluster."""

    def make(
        inputs,
        output,
        *,
        workers=1,
        shard_rows=4,
        keep_columns=(),
        sampling_columns=(),
        sampling=None,
        resume=None,
        **cluster,
    ) -> config_lib.JobConfig:
        return config_lib.JobConfig(
            io=config_lib.IOConfig(
                inputs=tuple(inputs),
                output=output,
                shard_rows=shard_rows,
                keep_columns=tuple(keep_columns),
                sampling_columns=tuple(sampling_columns),
            ),
            model=config_lib.ModelConfig(
                engine=EngineConfig(num_slots=SLOTS, decode_steps=DECODE_STEPS)
            ),
            sampling=sampling or config_lib.SamplingConfig(max_tokens=MAX_TOKENS),
            cluster=config_lib.ClusterConfig(
                address=ray_address, workers=workers, accelerator="cpu", **cluster
            ),
            resume=resume or config_lib.ResumeConfig(),
        )

    return make


@pytest.fixture
def plan(tmp_path, write_parquet) -> planner.JobPlan:
    """A job plan of three shards of two rows (one local file)."""
    path = write_parquet(
        str(tmp_path / "in" / "a.parquet"), {"prompt": ["x"] * 6}, row_group_size=2
    )
    io = config_lib.IOConfig(inputs=(path,), output="unused", shard_rows=2)
    return planner.plan(io, config_lib.SamplingConfig())
