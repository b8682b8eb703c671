"""Samples a check rejects, drawn again before their shard's file is written.

Once a shard's first pass is done, every finished sample is in its spill
(``actors.spill``). ``redraw`` checks each with the job's ``Validation``,
submits every rejected one again to the worker's engine as a request of one
sample whose seed is ``validation.redraw_seed(first seed, attempt)``, and
repeats until each passes or has had ``max_attempts`` draws. The result is the
spill's table with each redrawn sample's last draw in place of its first, and
the columns ``output.VALIDATION_FIELDS``: the seed that drew it, its attempts,
whether it passed, and why not.

Why here, in the worker, before the file is written: the shard attempt still
ends in one file that the driver commits once, so exactly-once holds as for any
job, and a retried or resumed shard draws the same seeds, hence the same
samples. Redraws write no progress checkpoints of their own: a worker lost
during them costs the redraws, never the first pass's checkpointed samples.

The result is written to a local Arrow IPC file one batch at a time and read
back memory-mapped, as the spill is: the shard's outputs never sit in memory,
only the rejected samples' prompts and their latest draws.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from griffin_batch.actors import batching, output, rows, shards, spill
from griffin_batch.actors import validation as validation_lib
from griffin_batch.model import requests

Key = tuple[int, int]  # (row within the shard, sample index)

SCHEMA = pa.schema([*spill.SCHEMA, *output.VALIDATION_FIELDS])
"""The samples with what their checks found (``spill.SCHEMA`` and ``output.VALIDATION_FIELDS``)."""

_BATCH_ROWS = 256


@dataclasses.dataclass
class _Verdicts:
    """What is known of each sample that is not a plain first draw that passed."""

    seeds: dict[int, int]  # row -> its first seed
    attempts: dict[Key, int] = dataclasses.field(default_factory=dict)  # > 1 only
    redraw_seeds: dict[Key, int] = dataclasses.field(default_factory=dict)
    failing: dict[Key, str] = dataclasses.field(default_factory=dict)  # still rejected: why
    unchecked: set[Key] = dataclasses.field(default_factory=set)  # error rows
    latest: dict[Key, requests.Completion] = dataclasses.field(default_factory=dict)


def requests_again(spec: shards.ShardSpec, options: shards.ShardOptions, attempt: int,
                   table: pa.Table | None, chat: Callable[[str], str] | None
                   ) -> Iterator[requests.Request]:
    """The shard's requests as its first pass made them, prepared again a window at a time."""
    first = 0
    for window in rows.iter_windows(spec, options, table):
        yield from rows.prepare(window, spec, options, attempt, chat, first=first).requests
        first += window.num_rows


def redraw(loop: batching.EngineLoop, samples: pa.Table, validation: validation_lib.Validation,
           first_requests: Iterable[requests.Request], *, tag: str, directory: str) -> pa.Table:
    """Checks a shard's samples, draws rejected ones again, and adds what was found.

    Args:
      loop: The worker's engine loop.
      samples: Every finished sample of the shard (``spill.SCHEMA``; rejected
        rows' error samples included).
      validation: The check and the most draws per sample.
      first_requests: The shard's requests as first run (``requests_again``):
        each row's prompt and first seed.
      tag: Unique to the shard attempt; part of the redraws' request ids.
      directory: A local directory for the result's file (the caller removes it).

    Returns:
      ``samples`` with each redrawn sample's last draw in place of its first, in
      ``SCHEMA`` (memory-mapped).

    Raises:
      WorkerLost: The engine stopped or the worker is draining.
    """
    check = validation.check
    verdicts = _Verdicts(seeds={})
    for batch in samples.to_batches(_BATCH_ROWS):
        for row, index, text, reason in zip(*(batch.column(c).to_pylist() for c in (
                "row", "sample_index", "text", "finish_reason")), strict=True):
            if reason == "error" or check is None:
                verdicts.unchecked.add((row, index))
            elif (why := check(text)) is not None:
                verdicts.failing[(row, index)] = why
    rejected_rows = {row for row, _ in verdicts.failing}
    prompts: dict[int, requests.Request] = {}
    for request in first_requests:
        row = rows.row_of(request.request_id)
        verdicts.seeds[row] = request.params.seed
        if row in rejected_rows:
            prompts[row] = request
    for attempt in range(2, validation.max_attempts + 1):
        if not verdicts.failing:
            break
        _draw_again(loop, verdicts, prompts, check, attempt, tag)
    return _write(samples, verdicts, os.path.join(directory, "redrawn.arrow"))


def _draw_again(loop: batching.EngineLoop, verdicts: _Verdicts,
                prompts: dict[int, requests.Request], check: validation_lib.Check,
                attempt: int, tag: str) -> None:
    """One more draw of every sample still rejected, checked as it comes back."""
    asked: dict[str, tuple[Key, int]] = {}
    work = []
    for row, index in sorted(verdicts.failing):
        first = prompts[row]
        seed = validation_lib.redraw_seed(verdicts.seeds[row], attempt)
        # The row stays last in the id (``rows.row_of``); the rest keeps it unique.
        rid = f"{tag}.{attempt}.{index}:{row}"
        asked[rid] = ((row, index), seed)
        work.append(requests.Request(request_id=rid, prompt=first.prompt, params=dataclasses.replace(
            first.params, seed=seed, n=1)))
    batch = loop.submit(batching.Batch(work))
    try:
        done = batch.wait()
    finally:
        loop.release(batch)
    for completion in done:
        key, seed = asked[completion.request_id]
        verdicts.attempts[key] = attempt
        verdicts.redraw_seeds[key] = seed
        verdicts.latest[key] = completion
        if completion.finish_reason == "error":  # nothing to check, nothing to gain
            del verdicts.failing[key]
            verdicts.unchecked.add(key)
            continue
        why = check(completion.text)
        if why is None:
            del verdicts.failing[key]
        else:
            verdicts.failing[key] = why


def _write(samples: pa.Table, verdicts: _Verdicts, path: str) -> pa.Table:
    """The samples with their last draws and verdicts, through a local IPC file."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for batch in samples.to_batches(_BATCH_ROWS):
            keys = list(zip(batch.column("row").to_pylist(),
                            batch.column("sample_index").to_pylist(), strict=True))
            first = [k not in verdicts.latest for k in keys]
            kept = batch.filter(pa.array(first, pa.bool_()))
            if kept.num_rows:
                writer.write_batch(_with_verdicts(kept, [k for k, f in zip(keys, first,
                                                                           strict=True) if f],
                                                  verdicts))
        redrawn = sorted(verdicts.latest)
        for start in range(0, len(redrawn), _BATCH_ROWS):
            keys = redrawn[start:start + _BATCH_ROWS]
            done = [verdicts.latest[k] for k in keys]
            base = pa.record_batch([
                pa.array([r for r, _ in keys], pa.int64()),
                pa.array([i for _, i in keys], pa.int32()),
                pa.array([c.tokens for c in done], pa.list_(pa.int32())),
                pa.array([c.text for c in done], pa.string()),
                pa.array([c.finish_reason for c in done], pa.string()),
                pa.array([int(c.num_prompt_tokens) for c in done], pa.int32()),
                pa.array([c.error for c in done], pa.string()),
            ], schema=spill.SCHEMA)
            writer.write_batch(_with_verdicts(base, keys, verdicts))
    return pa.ipc.open_file(pa.memory_map(path)).read_all()


def _with_verdicts(batch: pa.RecordBatch, keys: list[Key], verdicts: _Verdicts
                   ) -> pa.RecordBatch:
    seeds = [verdicts.redraw_seeds.get(k, verdicts.seeds.get(k[0])) for k in keys]
    valid = [None if k in verdicts.unchecked else k not in verdicts.failing for k in keys]
    extra = [
        pa.array(seeds, pa.uint64()),
        pa.array([verdicts.attempts.get(k, 1) for k in keys], pa.int32()),
        pa.array(valid, pa.bool_()),
        pa.array([verdicts.failing.get(k) for k in keys], pa.string()),
    ]
    return pa.record_batch([*batch.columns, *extra], schema=SCHEMA)
