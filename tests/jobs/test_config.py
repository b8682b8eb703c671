"""Job config: grouped, frozen, and inconsistent options named by their flags."""

import dataclasses

import pytest

from griffin_batch.jobs import config as config_lib
from griffin_batch.jobs import driver, generate
from griffin_batch.model.engine_config import EngineConfig

IO = config_lib.IOConfig(inputs=("in.parquet",), output="out")


def _job(**groups) -> config_lib.JobConfig:
    return config_lib.JobConfig(io=groups.pop("io", IO), **groups)


def test_defaults_validate_and_are_frozen():
    job = _job()
    job.validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.io.output = "elsewhere"
    assert job.sampling.params().max_tokens == 256


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"io": dataclasses.replace(IO, inputs=())}, "--input is required"),
        ({"io": dataclasses.replace(IO, shard_rows=0)}, "--shard-rows must be positive"),
        (
            {"io": dataclasses.replace(IO, keep_columns=("completion",))},
            r"--keep-columns \['completion'\] collide with output columns",
        ),
        ({"model": config_lib.ModelConfig(checkpoint="ckpt")}, "--checkpoint needs --tokenizer"),
        (
            {"sampling": config_lib.SamplingConfig(temperature=-1.0)},
            "--temperature must be a finite number >= 0, got -1.0",
        ),
        ({"sampling": config_lib.SamplingConfig(n=0)}, "--n must be an integer in"),
        ({"sampling": config_lib.SamplingConfig(top_k=0)}, "--top-k must be an integer in"),
        ({"model": config_lib.ModelConfig(dtype="bf16")},
         "--dtype must be one of bfloat16, float32, got 'bf16'"),
        (
            {"cluster": config_lib.ClusterConfig(workers=2, max_workers=3)},
            "--workers excludes --min-workers/--max-workers",
        ),
        (
            {"cluster": config_lib.ClusterConfig(min_workers=3, max_workers=2)},
            r"--min-workers \(3\) is larger than --max-workers \(2\)",
        ),
        ({"cluster": config_lib.ClusterConfig(accelerator="npu")}, "--accelerator"),
        (
            {"resume": config_lib.ResumeConfig(resume=True, overwrite=True)},
            "--resume and --overwrite exclude each other",
        ),
    ],
)
def test_inconsistent_options_are_named(groups, message):
    with pytest.raises(config_lib.JobInputError, match=message):
        _job(**groups).validate()


def test_fingerprint_holds_only_output_deciding_options():
    a = _job(cluster=config_lib.ClusterConfig(workers=1))
    b = _job(cluster=config_lib.ClusterConfig(workers=8), model=config_lib.ModelConfig(engine=EngineConfig(num_slots=4)))
    assert a.fingerprint() == b.fingerprint()
    c = _job(sampling=config_lib.SamplingConfig(max_tokens=9))
    assert (
        c.fingerprint()["sampling"]["max_tokens"] == 9 != a.fingerprint()["sampling"]["max_tokens"]
    )


@pytest.mark.parametrize(
    ("cluster", "low", "high"),
    [
        (config_lib.ClusterConfig(), 1, None),  # one per host present, growing as nodes join
        (config_lib.ClusterConfig(workers=3), 3, 3),
        (config_lib.ClusterConfig(min_workers=2, max_workers=8), 2, 8),
        (config_lib.ClusterConfig(max_workers=8), 1, 8),
    ],
)
def test_worker_options_become_the_pools_bounds(cluster, low, high):
    policy = _job(cluster=cluster).scaling()
    assert (policy.min_workers, policy.max_workers) == (low, high)


def test_engine_sizing_errors_name_the_flag():
    with pytest.raises(ValueError, match=r"EngineConfig.num_slots \(--slots\) must be positive"):
        EngineConfig(num_slots=0)
    with pytest.raises(config_lib.JobInputError, match="--chunk-size must be positive, got 0"):
        generate.config_from_args(
            generate.build_parser().parse_args(["--input", "x", "--output", "y", "--chunk-size", "0"])
        )


def test_engine_defaults_have_one_source():
    """The CLI, the job config and the worker spec all take the engine's defaults from EngineConfig."""
    args = generate.build_parser().parse_args(["--input", "x", "--output", "y"])
    job = generate.config_from_args(args)
    assert job.model.engine == EngineConfig()
    assert driver.worker.ModelSpec().engine == EngineConfig()
    spec = driver.resolve_model(job.model, say=lambda _: None)
    assert spec.engine == EngineConfig()
    custom = generate.config_from_args(
        generate.build_parser().parse_args(
            ["--input", "x", "--output", "y", "--slots", "8", "--max-prompt-tokens", "99"]
        )
    )
    assert custom.model.engine == EngineConfig(num_slots=8, max_prompt_tokens=99)


@pytest.mark.parametrize(
    ("shard_rows", "n", "slots", "flag", "expected"),
    [
        (1, 1, 32, None, 33),  # one-row shards: a slot's worth each, plus the next
        (8, 1, 32, None, 5),
        (4, 2, 32, None, 5),  # n samples per row take n slots
        (1024, 1, 32, None, 2),  # big shards: the next one queued behind the current
        (1, 1, 32, 3, 3),  # --max-in-flight wins
    ],
)
def test_workers_hold_enough_shards_to_fill_their_slots(shard_rows, n, slots, flag, expected):
    job = _job(
        io=dataclasses.replace(IO, shard_rows=shard_rows),
        sampling=config_lib.SamplingConfig(n=n),
        model=config_lib.ModelConfig(engine=EngineConfig(num_slots=slots)),
        cluster=config_lib.ClusterConfig(max_in_flight=flag),
    )
    assert job.shards_in_flight() == expected
