"""A finished job's output as OpenAI Batch API output files: ``output.jsonl`` and ``errors.jsonl``.

Written by the driver once every shard is committed (``--output-format
openai-batch``), from the committed parts alone, in input order: one record per
request, its ``n`` samples as its choices. A request whose row is an error row
goes to ``errors.jsonl`` with ``response: null`` and ``error: {code, message}``
(the message names the line or field). Every id is a hash of the job (its saved
plan record, which a ``--resume`` keeps) and the request's place and
``custom_id``, so a resumed job writes the same bytes. A request's ``url``
decides its record's shape; a Parquet row (no ``url``) is a ``/v1/completions``
``text_completion``, or a ``chat.completion`` when ``--chat`` made its prompt a
user turn.

Each file is streamed to ``_temporary/`` and then moved to its name (a rename,
or a server-side copy on object stores): a crash mid-write leaves no partial
``output.jsonl``, and ``--resume`` rewrites both.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow.parquet as pq

from griffin_batch.actors import output
from griffin_batch.jobs import manifest, openai_requests, planner

ERROR_CODE = "invalid_request"
"""The ``error.code`` of a request that could not run (every error row is one)."""

_READ_COLUMNS = ("id", "completion", "finish_reason", "num_prompt_tokens",
                 "num_completion_tokens", "error")
_BATCH_ROWS = 4096


def job_key(plan_record: Mapping[str, Any]) -> str:
    """A job's identity: a hash of its saved plan record (creation time, options, plan)."""
    text = json.dumps(plan_record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _ident(key: str, kind: str, position: int, custom_id: str) -> str:
    # The position keeps ids apart when custom_ids repeat (--allow-duplicate-ids).
    h = hashlib.sha256(f"{key}\x00{kind}\x00{position}\x00{custom_id}".encode())
    return h.hexdigest()[:32]


def record(samples: Sequence[Mapping[str, Any]], *, key: str, position: int, created: int,
           default_model: str, chat_prompts: bool = False) -> tuple[dict[str, Any], bool]:
    """One request's output record from its output rows (one per sample, in sample order).

    Args:
      samples: Its rows of the output parts (``id``, ``completion``,
        ``finish_reason``, token counts, ``error``, and where present the kept
        ``custom_id``, ``model`` and ``url``).
      key: ``job_key`` of the job.
      position: The request's place in the job's input order.
      created: Unix time written as the completion's ``created``.
      default_model: ``model`` when the request named none.
      chat_prompts: The shape of a record whose row has no ``url`` (Parquet
        input): a ``chat.completion`` when the job wrapped prompts as user turns
        (``--chat``), else a ``text_completion`` (``/v1/completions``).

    Returns:
      The record, and whether it is an error (for ``errors.jsonl``).
    """
    first = samples[0]
    custom_id = first.get("custom_id", first["id"])
    error = next((s["error"] or "unknown error" for s in samples
                  if s["finish_reason"] == "error"), None)
    base = {"id": f"batch_req_{_ident(key, 'batch_req', position, str(custom_id))}",
            "custom_id": custom_id}
    if error is not None:
        return {**base, "response": None, "error": {"code": ERROR_CODE, "message": error}}, True
    url = first.get("url")
    chat = chat_prompts if url is None else url == openai_requests.CHAT_URL
    prompt_tokens = int(first["num_prompt_tokens"])
    completion_tokens = sum(int(s["num_completion_tokens"]) for s in samples)
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + _ident(key, "completion", position,
                                                          str(custom_id)),
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": first.get("model") or default_model,
        "choices": [_choice(i, s, chat) for i, s in enumerate(samples)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    response = {"status_code": 200,
                "request_id": _ident(key, "request", position, str(custom_id)), "body": body}
    return {**base, "response": response, "error": None}, False


def _choice(index: int, sample: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    reason = sample["finish_reason"]
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": sample["completion"]},
                "finish_reason": reason, "logprobs": None}
    return {"index": index, "text": sample["completion"], "finish_reason": reason,
            "logprobs": None}


def requests_of(out: manifest.OutputDir, plan: planner.JobPlan
                ) -> Iterator[list[dict[str, Any]]]:
    """Each request's output rows, in input order, read part by part from the committed parts."""
    pending: list[dict[str, Any]] = []
    for spec in plan.shards:
        path = f"{out.path}/{output.part_name(spec.shard_id)}"
        with out.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            # Staged columns only from staged inputs: a Parquet input's "model" column is data.
            kept = openai_requests.KEPT_COLUMNS if plan.sources else ()
            wanted = [c for c in (*_READ_COLUMNS, "sample_index", *kept)
                      if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(_BATCH_ROWS, columns=wanted):
                for row in batch.to_pylist():
                    # A part holds a row's samples together, in order: sample 0 starts a request.
                    if pending and row.get("sample_index", 0) == 0:
                        yield pending
                        pending = []
                    pending.append(row)
        if pending:  # a request never spans two parts
            yield pending
            pending = []


def write(out: manifest.OutputDir, plan: planner.JobPlan, default_model: str) -> tuple[int, int]:
    """Writes ``output.jsonl`` and ``errors.jsonl`` from the committed parts of ``plan``.

    Args:
      out: The job's output directory (every shard of ``plan`` committed).
      plan: The job's plan (parts are read in its order: input order).
      default_model: The model named in records whose request named none.

    Returns:
      (records in ``output.jsonl``, records in ``errors.jsonl``).
    """
    saved = out.plan_record()
    key = job_key(saved)
    created = int(datetime.datetime.fromisoformat(saved["created"]).timestamp())
    # From the saved options, as the rows were generated (a --resume must keep --chat).
    chat_prompts = bool(saved.get("options", {}).get("chat", False))
    temp_dir = f"{out.path}/{output.TEMP_DIR}"
    if output.has_atomic_rename(out.fs):
        out.fs.makedirs(temp_dir, exist_ok=True)
    temps = {name: f"{temp_dir}/{name}.{uuid.uuid4().hex}"
             for name in (manifest.BATCH_OUTPUT_FILE, manifest.BATCH_ERRORS_FILE)}
    counts = {name: 0 for name in temps}
    try:
        with out.fs.open(temps[manifest.BATCH_OUTPUT_FILE], "wb") as ok, \
                out.fs.open(temps[manifest.BATCH_ERRORS_FILE], "wb") as bad:
            for position, samples in enumerate(requests_of(out, plan)):
                rec, failed = record(samples, key=key, position=position, created=created,
                                     default_model=default_model, chat_prompts=chat_prompts)
                line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"
                (bad if failed else ok).write(line.encode("utf-8", errors="surrogatepass"))
                counts[manifest.BATCH_ERRORS_FILE if failed else manifest.BATCH_OUTPUT_FILE] += 1
        for name, temp in temps.items():
            output.promote(out.fs, temp, f"{out.path}/{name}")
    finally:
        for temp in temps.values():
            if out.fs.exists(temp):
                out.fs.rm_file(temp)
    return counts[manifest.BATCH_OUTPUT_FILE], counts[manifest.BATCH_ERRORS_FILE]
