"""The generation worker's contract, in-process with the real engine on the demo model."""

import concurrent.futures
import hashlib
import re

import fsspec
import jax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from griffin_batch import model
from griffin_batch.actors import output, rows, shards, worker
from griffin_batch.cluster import faults
from griffin_batch.model import requests
from griffin_batch.model.engine_config import EngineConfig

MAX_TOKENS = 8
MAX_PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def gen_worker(jax_cache) -> worker.GenerationWorker:
    return worker.GenerationWorker(
        worker.ModelSpec(
            engine=EngineConfig(num_slots=4, decode_steps=8, max_prompt_tokens=MAX_PROMPT_TOKENS)
        )
    )


def _spec(path: str, num_rows: int, shard_id: str = "00000") -> shards.ShardSpec:
    return shards.ShardSpec(
        shard_id=shard_id,
        path=path,
        file_key="in.parquet",
        row_groups=(0,),
        offset=0,
        num_rows=num_rows,
        first_row=0,
    )


def _options(out: str, **kw) -> shards.ShardOptions:
    base = dict(sampling=requests.SamplingParams(max_tokens=MAX_TOKENS), output_dir=out)
    return shards.ShardOptions(**{**base, **kw})


def test_ready_describes_the_worker(gen_worker):
    info = gen_worker.ready()
    assert info["platform"] == "cpu" and info["devices"] >= 1
    assert info["name"] == "local"


def test_process_shard_writes_every_row_once(
    tmp_path, write_parquet, prompts, demo_model, gen_worker
):
    too_long = "word " * (2 * MAX_PROMPT_TOKENS)
    column = [*prompts[:5], None, "", too_long]
    path = write_parquet(
        str(tmp_path / "in.parquet"),
        {"prompt": column, "id": [f"r{i}" for i in range(len(column))]},
    )
    out = str(tmp_path / "out")
    fsspec.filesystem("file").makedirs(out)
    result = gen_worker.process_shard(_spec(path, len(column), "00007"), _options(out))

    assert result.output_path == f"{out}/part-00007.parquet"  # where the driver will put it
    assert not fsspec.filesystem("file").exists(result.output_path)  # the worker never writes it
    name = result.attempt_path.removeprefix(f"{out}/{output.ATTEMPTS_DIR}/")
    assert re.fullmatch(r"part-00007\.a0-[0-9a-f]{8}\.parquet", name)
    with open(result.attempt_path, "rb") as f:
        data = f.read()
    assert (result.size, result.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    table = pq.read_table(result.attempt_path)
    assert table.schema == output.output_schema(False)
    d = table.to_pydict()
    assert d["id"] == [f"r{i}" for i in range(len(column))]
    assert d["finish_reason"][5:] == ["error"] * 3
    assert d["error"][5:7] == ["prompt is null", "prompt is empty"]
    assert "over the limit of 64" in d["error"][7]
    assert (result.rows, result.samples, result.error_rows) == (8, 8, 3)
    assert result.completion_tokens == sum(d["num_completion_tokens"])

    config, params, tokenizer = demo_model
    expected = model.sample(
        config, params, tokenizer, prompts[:5], max_tokens=MAX_TOKENS, num_slots=4, decode_steps=8
    )
    assert d["completion_tokens"][:5] == [c.tokens for c in expected]
    assert d["completion"][:5] == [c.text for c in expected]
    assert all(d["completion"][:5]) and set(d["finish_reason"][:5]) <= {"stop", "length"}


def test_samples_per_row_and_chat(tmp_path, write_parquet, prompts, gen_worker):
    path = write_parquet(str(tmp_path / "in.parquet"), {"prompt": prompts[:2]})
    spec = _spec(path, 2)
    sampled = _options(
        str(tmp_path),
        with_sample_index=True,
        commit_on_driver=True,
        sampling=requests.SamplingParams(max_tokens=MAX_TOKENS, n=3, temperature=1.0, seed=5),
    )
    result = gen_worker.process_shard(spec, sampled)
    table = pq.read_table(pa.BufferReader(result.payload))
    assert table.column("sample_index").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert table.column("id").to_pylist() == ["in.parquet#0"] * 3 + ["in.parquet#1"] * 3
    assert not fsspec.filesystem("file").exists(result.attempt_path)  # the driver writes it
    assert result.sha256 == hashlib.sha256(result.payload).hexdigest()

    plain = gen_worker(rows.read_rows(spec, sampled), spec, _options(""))
    chat = gen_worker(rows.read_rows(spec, sampled), spec, _options("", chat=True))
    assert all(
        c > p
        for c, p in zip(
            chat.column("num_prompt_tokens").to_pylist(),
            plain.column("num_prompt_tokens").to_pylist(),
            strict=True,
        )
    )


def test_concurrent_shards_share_one_engine(tmp_path, write_parquet, prompts, gen_worker):
    out = str(tmp_path / "out")
    fsspec.filesystem("file").makedirs(out)
    paths = [
        write_parquet(str(tmp_path / f"in{i}.parquet"), {"prompt": prompts[i:] + prompts[:i]})
        for i in range(3)
    ]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(
                lambda i: gen_worker.process_shard(
                    _spec(paths[i], len(prompts), f"0000{i}"), _options(out)
                ),
                range(3),
            )
        )
    tables = [pq.read_table(r.attempt_path) for r in results]
    by_prompt = [
        dict(zip(prompts[i:] + prompts[:i], t.column("completion_tokens").to_pylist(), strict=True))
        for i, t in enumerate(tables)
    ]
    assert by_prompt[0] == by_prompt[1] == by_prompt[2]  # batch mates do not matter


def test_inline_rows_from_a_process_local_file(write_parquet, prompts, gen_worker):
    url = write_parquet("memory://worker-test/in.parquet", {"prompt": prompts[:3]})
    spec = _spec(url, 3)
    options = _options("memory://worker-test/out", commit_on_driver=True)
    result = gen_worker.process_shard(spec, options, table=rows.read_rows(spec, options))
    assert pq.read_table(pa.BufferReader(result.payload)).num_rows == 3


def test_a_dead_engine_is_fatal(tmp_path, write_parquet, prompts):
    broken = worker.GenerationWorker(worker.ModelSpec(engine=EngineConfig(num_slots=4, decode_steps=8)))
    jax.tree.map(lambda x: x.delete(), broken.engine.params)  # as if the device went away
    path = write_parquet(str(tmp_path / "in.parquet"), {"prompt": prompts[:2]})
    with pytest.raises(faults.WorkerLost, match="engine stopped"):
        broken.process_shard(_spec(path, 2), _options(str(tmp_path)))
    with pytest.raises(faults.WorkerLost):  # and stays dead
        broken.process_shard(_spec(path, 2), _options(str(tmp_path)))


def test_a_shard_is_read_and_written_window_by_window(
    tmp_path, write_parquet, prompts, gen_worker, monkeypatch
):
    """Rows are read, fed to the engine and written a window at a time (here 3 rows; normally
    ``rows.WINDOW_ROWS``), and the file equals the in-memory path's: ids, kept columns, bad rows
    and several samples per row in input order."""
    monkeypatch.setattr(rows, "WINDOW_ROWS", 3)
    monkeypatch.setattr(gen_worker._loop, "feed_ahead", 2)  # the feeder waits for the engine
    column = [*prompts[:4], None, *prompts[4:7], "", prompts[7]]
    path = write_parquet(
        str(tmp_path / "in.parquet"),
        {"prompt": column, "topic": [f"t{i}" for i in range(len(column))]},
        row_group_size=4,  # windows also end at row-group ends
    )
    spec = shards.ShardSpec(  # all but the file's first row
        shard_id="00009", path=path, file_key="in.parquet", row_groups=(0, 1, 2), offset=1,
        num_rows=len(column) - 1, first_row=1)
    options = _options(
        str(tmp_path / "out"), keep_columns=("topic",), with_sample_index=True,
        sampling=requests.SamplingParams(max_tokens=MAX_TOKENS, n=2, temperature=1.0, seed=3),
    )
    fsspec.filesystem("file").makedirs(options.output_dir)
    result = gen_worker.process_shard(spec, options)
    got = pq.read_table(result.attempt_path)
    want = gen_worker(rows.read_rows(spec, options), spec, options)
    assert got.equals(want)
    assert got.column("topic").to_pylist()[::2] == [f"t{i}" for i in range(1, len(column))]
    assert pq.ParquetFile(result.attempt_path).num_row_groups >= 4
    assert (result.rows, result.samples, result.error_rows) == (9, 18, 4)  # 2 bad rows x 2
