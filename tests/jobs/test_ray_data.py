"""The Ray Data entry point ``griffin_batch.data``: config, rows to requests, the actor, a pipeline.

The pipeline test is the README's example script (``examples/ray_data_pipeline.py``)
run on the session's Ray cluster, reading and writing ``gs://`` on the GCS emulator.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from griffin_batch import data
from griffin_batch.actors import rows
from griffin_batch.data import batches, stage
from griffin_batch.jobs import config as job_config
from griffin_batch.model.engine_config import EngineConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
SLOTS, DECODE_STEPS, MAX_TOKENS = 4, 8, 8  # the job tests' sizes (conftest.py beside this file)
ENGINE = EngineConfig(num_slots=SLOTS, decode_steps=DECODE_STEPS)
SMALL = job_config.SamplingConfig(max_tokens=MAX_TOKENS)

PARAMS = pa.struct([("max_tokens", pa.int64()), ("temperature", pa.float64()),
                    ("seed", pa.int64())])


def _batch(prompts, params=None, **more) -> pa.Table:
    columns = {"prompt": pa.array(prompts, pa.string()), **more}
    if params is not None:
        columns["sampling_params"] = pa.array(params, PARAMS)
    return pa.table(columns)


# --- config -----------------------------------------------------------------------------------

def test_concurrency_is_an_int_or_a_min_max_pair():
    assert data.ProcessorConfig().pool_size() == (1, 1)
    assert data.ProcessorConfig(concurrency=3).pool_size() == (1, 3)
    assert data.ProcessorConfig(concurrency=(2, 4)).pool_size() == (2, 4)
    for bad in (0, (3, 2), (0, 1), (1, 2, 3), True, 1.5):
        with pytest.raises(data.ProcessorConfigError, match="ProcessorConfig.concurrency"):
            data.ProcessorConfig(concurrency=bad).validate()


def test_bad_options_are_named_and_defaults_come_from_the_job():
    config = data.ProcessorConfig(engine=ENGINE)
    assert config.rows_per_batch() == SLOTS  # one batch fills the engine's slots
    assert config.accelerator == job_config.ClusterConfig().accelerator
    assert config.sampling == job_config.SamplingConfig()
    for kwargs, message in (
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches must be positive"),
        ({"checkpoint": "gs://b/ckpt"}, "checkpoint needs a tokenizer"),
        ({"accelerator": "fpga"}, "ProcessorConfig.accelerator: unknown accelerator 'fpga'"),
        ({"sampling": job_config.SamplingConfig(top_p=2.0)}, "ProcessorConfig.sampling: top_p"),
        ({"sampling_columns": ("colour",)}, "'colour' is not a sampling field"),
    ):
        with pytest.raises(data.ProcessorConfigError, match=message):
            data.build_processor(data.ProcessorConfig(**kwargs))


@pytest.mark.ray
def test_the_generation_step_is_an_autoscaling_pool_of_threaded_actors(ray_address):
    processor = data.build_processor(data.ProcessorConfig(
        concurrency=(1, 2), max_concurrent_batches=3, engine=ENGINE, accelerator="auto"))
    kwargs = processor.map_batches_kwargs()
    pool = kwargs["compute"]
    assert (pool.min_size, pool.max_size, pool.max_concurrent_calls_per_actor) == (1, 2, 3)
    assert pool.enable_true_multi_threading
    assert kwargs["num_cpus"] == 1.0 and "num_gpus" not in kwargs  # the session cluster: CPUs
    assert kwargs["batch_size"] == SLOTS and kwargs["batch_format"] == "pyarrow"


# --- rows to requests ---------------------------------------------------------------------------

def test_rows_become_requests_with_their_own_sampling_and_bad_rows_become_errors():
    options = data.ProcessorConfig(sampling=SMALL).row_options()
    batch = _batch(
        ["one", "two", None, "four", "five"],
        [{"max_tokens": 3, "temperature": None, "seed": None},
         None,
         {"max_tokens": 2, "temperature": None, "seed": None},
         {"max_tokens": None, "temperature": -1.0, "seed": None},
         {"max_tokens": None, "temperature": 0.5, "seed": 7}],
        id=["a", "b", "c", "d", "e"])
    table = batches.for_worker(batch, options)
    prepared = rows.prepare(table, batches.batch_shard(batch.num_rows), options, attempt=0)

    by_row = {rows.row_of(r.request_id): r for r in prepared.requests}
    assert sorted(by_row) == [0, 1, 4]
    assert [by_row[0].prompt, by_row[0].params.max_tokens] == ["one", 3]
    assert by_row[1].params.max_tokens == MAX_TOKENS  # a null struct keeps the defaults
    assert (by_row[4].params.temperature, by_row[4].params.seed) == (0.5, 7)
    assert by_row[0].params.seed != by_row[1].params.seed  # streams seeded by the row's id
    errors = {rows.row_of(c.request_id): c.error for c in prepared.rejected}
    assert errors == {2: "prompt is null",
                      3: "sampling_params.temperature: temperature must be a finite number >= 0, "
                         "got -1.0"}
    assert prepared.ids == ["a", "b", "c", "d", "e"]


def test_a_batch_whose_sampling_params_are_all_null_runs_on_the_defaults():
    options = data.ProcessorConfig().row_options()
    batch = pa.table({"prompt": ["x", "y"], "sampling_params": pa.nulls(2)})
    table = batches.for_worker(batch, options)
    assert table.column_names == ["prompt"]
    prepared = rows.prepare(table, batches.batch_shard(2), options, attempt=0)
    assert len(prepared.requests) == 2 and not prepared.rejected


def test_batches_without_ids_get_distinct_request_ids_and_seeds():
    options = data.ProcessorConfig(sampling=SMALL).row_options()
    table = _batch(["same", "same"])
    a = rows.prepare(table, batches.batch_shard(2), options, attempt=0)
    b = rows.prepare(table, batches.batch_shard(2), options, attempt=0)
    ids = {r.request_id for r in [*a.requests, *b.requests]}
    seeds = {r.params.seed for r in [*a.requests, *b.requests]}
    assert len(ids) == 4 and len(seeds) == 4


@pytest.mark.parametrize("batch, message", [
    (pa.table({"text": ["x"]}), "no prompt column 'prompt'"),
    (pa.table({"prompt": ["x"], "completion": ["y"]}), r"\['completion'\] have the names of output"),
    (pa.table({"prompt": [1]}), "prompt column 'prompt' has type int64, expected text"),
    (pa.table({"prompt": ["x"], "sampling_params": [0.5]}), "expected a struct"),
])
def test_columns_that_cannot_serve_fail_the_batch_naming_the_column(batch, message):
    with pytest.raises(data.BatchColumnError, match=message):
        batches.for_worker(batch, data.ProcessorConfig().row_options())


def test_output_rows_are_the_input_rows_once_per_sample_in_order():
    batch = pa.table({"prompt": ["a", "b", "c"], "extra": [1, 2, 3]})
    generated = pa.table({
        **{f.name: pa.array([None] * 4, f.type) for f in batches.OUTPUT_FIELDS},
        "completion": ["a0", "a1", "b0", "c0"],
        "sample_index": pa.array([0, 1, 0, 0], pa.int32()),
    })
    out = batches.with_output(batch, generated)
    assert out.column_names == ["prompt", "extra", *data.OUTPUT_COLUMNS]
    assert out.select(["prompt", "extra", "completion"]).to_pylist() == [
        {"prompt": "a", "extra": 1, "completion": "a0"},
        {"prompt": "a", "extra": 1, "completion": "a1"},
        {"prompt": "b", "extra": 2, "completion": "b0"},
        {"prompt": "c", "extra": 3, "completion": "c0"}]
    with pytest.raises(rows.RowAccountingError, match="3 rows in, 2 came back"):
        batches.with_output(batch, generated.slice(0, 3))  # row c's sample is missing


# --- the actor, in this process -------------------------------------------------------------------

def test_an_actor_that_cannot_load_the_model_says_why_and_where(tmp_path):
    config = data.ProcessorConfig(checkpoint=str(tmp_path / "no-ckpt"),
                                  tokenizer=str(tmp_path / "no.model"))
    with pytest.raises(stage.ModelLoadError, match=r"could not load the model on .*no-ckpt"):
        stage.GenerateStage(config.model_spec(), config.row_options())


@pytest.mark.slow
def test_concurrent_batches_share_one_actor_engine(jax_cache, prompts):
    config = data.ProcessorConfig(sampling=SMALL, engine=ENGINE)
    actor = stage.GenerateStage(config.model_spec(), config.row_options())
    first = _batch(prompts[:5], [{"max_tokens": 2, "temperature": None, "seed": None},
                                 *[None] * 4])
    second = _batch([*prompts[5:], ""], id=pa.array([10, 11, 12, 13]))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out_first, out_second = pool.map(actor, [first, second])

    assert out_first.column("prompt").to_pylist() == prompts[:5]
    assert out_first.column("num_completion_tokens").to_pylist()[0] <= 2
    assert all(out_first.column("completion").to_pylist())
    assert out_second.column("id").to_pylist() == [10, 11, 12, 13]  # kept as it came
    assert out_second.column("error").to_pylist() == [None, None, None, "prompt is empty"]
    assert out_second.column("finish_reason").to_pylist()[3] == "error"
    # The same rows alone give the same text: batch mates never change a row's output.
    again = actor(second.slice(0, 1))
    assert again.column("completion")[0] == out_second.column("completion")[0]


# --- the pipeline on real Ray and GCS ---------------------------------------------------------------

def _example():
    spec = importlib.util.spec_from_file_location(
        "ray_data_pipeline", ROOT / "examples" / "ray_data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quiet_ray_data():
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    yield
    context.enable_progress_bars = before


@pytest.mark.ray
@pytest.mark.slow
def test_example_pipeline_reads_generates_and_writes_gcs(
        ray_address, gcs_server, write_parquet, prompts, quiet_ray_data):
    import gcsfs

    bucket = gcs_server.bucket("griffin-ray-data")
    # Passed explicitly: Ray Data's own gs:// client does not know the emulator, and
    # this one travels to Ray's workers with its endpoint.
    fs = gcsfs.GCSFileSystem(endpoint_url=gcs_server.endpoint, token="anon", project="test")
    params = [None, {"max_tokens": 2, "temperature": None, "seed": None},
              {"max_tokens": None, "temperature": float("nan"), "seed": None}, None, None]
    write_parquet(f"{bucket}/in/a.parquet", {
        "id": [f"a{i}" for i in range(5)], "prompt": prompts[:5],
        "sampling_params": pa.array(params, PARAMS)})
    write_parquet(f"{bucket}/in/b.parquet", {
        "id": ["b0", "b1", "b2", "b3"], "prompt": [*prompts[5:], None],
        "sampling_params": pa.array([None] * 4, PARAMS)})

    _example().run(f"{bucket}/in", f"{bucket}/out", max_tokens=MAX_TOKENS,
                   concurrency=(1, 2), engine=ENGINE, filesystem=fs)

    fs.invalidate_cache()
    files = fs.glob(f"{bucket.removeprefix('gs://')}/out/*.parquet")
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in files)
    got = {row["id"]: row for row in table.to_pylist()}
    counts = collections.Counter(table.column("id").to_pylist())
    assert sorted(counts) == sorted([f"a{i}" for i in range(5)] + ["b0", "b1", "b2", "b3"])
    assert set(counts.values()) == {1}, f"rows not exactly once: {counts}"
    assert table.column_names == ["id", "prompt", "completion", "finish_reason",
                                  "num_completion_tokens", "error"]
    assert got["a2"]["finish_reason"] == "error"
    assert got["a2"]["error"] == ("sampling_params.temperature: temperature must be a finite "
                                  "number, got nan")
    assert got["b3"]["error"] == "prompt is null"
    assert got["a1"]["num_completion_tokens"] <= 2
    ok = [r for k, r in got.items() if k not in ("a2", "b3")]
    assert all(r["completion"] and r["error"] is None for r in ok)
    assert all(r["num_completion_tokens"] <= MAX_TOKENS for r in ok)
    print({k: got[k]["completion"] for k in ("a0", "a1", "b0")})
