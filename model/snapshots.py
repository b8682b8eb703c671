"""Engine snapshots as data: named arrays plus JSON, checked before use.

A ``SlotSnapshot`` of a decoding sample is one slot's fixed-size model state
(a cache pytree of one row) plus a few numbers, the request and the text
stream's state. On storage it becomes

* arrays: the cache leaves, named by their path in the cache pytree
  (``<prefix>/<path>``), in their own dtype;
* JSON: the request, positions, the text state, and the model fingerprint.

The request is stored without its prompt: a decoding sample needs only the
prompt's length (``prompt_len``, its position), so its JSON holds
``requests.prompt_digest`` of the prompt instead, and a stored sample stays
the same size however long its document. Whoever restores it supplies the
request again (the input row), checked against that digest. Snapshots
written before this (with the whole prompt) are still read.

Nothing is pickled, and nothing here trusts what it reads: arrays must match
the engine's own cache template leaf by leaf (name, shape, dtype), and the
fingerprint must equal the engine's (same architecture, dtype and tokenizer),
or ``SnapshotError`` says what differs.

Chunks not yet handed out (``SlotSnapshot.undelivered``) are the caller's to
keep: stored progress records a sample's tokens and text separately, so
``to_data`` leaves them out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from griffin_batch.model import griffin, requests
from griffin_batch.model.config import GriffinConfig
from griffin_batch.model.engine import SlotSnapshot
from griffin_batch.model.requests import Request, SamplingParams

FORMAT_VERSION = 1

_DIGEST = re.compile(r"(text|ids):[0-9a-f]{64}")


class SnapshotError(ValueError):
    """Stored snapshot data that does not fit the engine reading it."""


def model_fingerprint(config: GriffinConfig, dtype: Any, tokenizer_proto: bytes) -> str:
    """A hash of what a snapshot's state depends on: architecture, dtype, tokenizer.

    Weights are not part of it (hashing them would cost a pass over the
    checkpoint); a job's resume check already pins the checkpoint path.
    """
    record = {
        "version": FORMAT_VERSION,
        "config": json.loads(config.to_json()),
        "dtype": np.dtype(dtype).name,
        "tokenizer": hashlib.sha256(tokenizer_proto).hexdigest(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def request_to_json(request: Request, *, prompt_digest: str | None = None) -> dict[str, Any]:
    """A request as JSON-able data.

    Args:
      request: The request.
      prompt_digest: Stored in place of the prompt when given (``requests.prompt_digest``).
    """
    params = dataclasses.asdict(request.params)
    params["stop"], params["stop_token_ids"] = list(params["stop"]), list(params["stop_token_ids"])
    if prompt_digest is not None:
        return {"request_id": request.request_id, "prompt_digest": prompt_digest,
                "params": params}
    prompt = request.prompt if isinstance(request.prompt, str) else [int(t) for t in request.prompt]
    return {"request_id": request.request_id, "prompt": prompt, "params": params}


def stored_prompt_digest(data: Mapping[str, Any]) -> str | None:
    """The prompt digest a stored request holds instead of its prompt (None: it holds the prompt).

    Raises:
      SnapshotError: Both or neither of prompt and digest, or a malformed digest.
    """
    if not isinstance(data, Mapping):
        raise SnapshotError("not a stored request: not a JSON object")
    if ("prompt" in data) == ("prompt_digest" in data):
        raise SnapshotError("not a stored request: it must hold a prompt or a prompt_digest")
    if "prompt" in data:
        return None
    digest = data["prompt_digest"]
    if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise SnapshotError(f"not a stored request: prompt_digest {str(digest)[:80]!r} is not "
                            "'text:' or 'ids:' and 64 lowercase hex digits")
    return digest


def request_from_json(data: Mapping[str, Any]) -> Request:
    """Inverse of ``request_to_json`` (a request stored with a digest gets an empty prompt).

    Raises:
      SnapshotError: Missing or unknown fields, or values of the wrong type.
    """
    digest = stored_prompt_digest(data)
    try:
        params = dict(data["params"])
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        if set(params) - known:
            raise SnapshotError(f"unknown sampling fields {sorted(set(params) - known)}")
        params["stop"] = tuple(params.get("stop", ()))
        params["stop_token_ids"] = tuple(params.get("stop_token_ids", ()))
        prompt = "" if digest is not None else data["prompt"]
        if not isinstance(prompt, str) and (
                not isinstance(prompt, list) or any(type(t) is not int for t in prompt)):
            raise SnapshotError("prompt must be a string or a list of token ids")
        request_id = data["request_id"]
        if not isinstance(request_id, str):
            raise SnapshotError(f"request_id must be a string, got {request_id!r}")
        request = Request(request_id=request_id, prompt=prompt,
                          params=SamplingParams(**params))
        request.params.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"not a stored request: {e}") from None
    return request


def to_data(snap: SlotSnapshot, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and JSON of a decoding sample's snapshot (its prompt as a digest).

    Args:
      snap: A snapshot with a cache (a sample that was decoding).
      prefix: Names its arrays ``<prefix>/<cache path>``.
    """
    if snap.cache is None:
        raise ValueError("only a decoding sample's snapshot has state to store")
    arrays = {f"{prefix}/{name}": np.ascontiguousarray(leaf)
              for name, leaf in _named_leaves(snap.cache)}
    meta = {
        "request": request_to_json(snap.request, prompt_digest=snap.prompt_digest
                                   or requests.prompt_digest(snap.request.prompt)),
        "sample_index": snap.sample_index,
        "prompt_len": snap.prompt_len,
        "generated": snap.generated,
        "last_token": snap.last_token,
        "text_state": snap.text_state,
    }
    return arrays, meta


def from_data(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], prefix: str,
              template: Any) -> SlotSnapshot:
    """Rebuilds a decoding sample's snapshot, checking it against ``template``.

    Args:
      arrays: Arrays by name (as ``to_data`` made them, among others).
      meta: The JSON ``to_data`` made.
      prefix: The prefix given to ``to_data``.
      template: ``cache_template(config, dtype)`` of the engine that will use it.

    Returns:
      The snapshot; one stored with a prompt digest (see the module docstring)
      has an empty ``request.prompt`` and ``prompt_digest`` set.

    Raises:
      SnapshotError: A missing, extra or misshapen array, or malformed JSON.
    """
    leaves = []
    for name, want in _named_leaves(template):
        got = arrays.get(f"{prefix}/{name}")
        if got is None:
            raise SnapshotError(f"snapshot {prefix} has no array {name}")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise SnapshotError(
                f"snapshot {prefix} array {name} is {got.dtype}{list(got.shape)}, the model's "
                f"state is {want.dtype}{list(want.shape)}")
        leaves.append(got)
    if not isinstance(meta, Mapping):
        raise SnapshotError(f"snapshot {prefix}: its record is not a JSON object")
    try:
        ints = {k: meta[k] for k in ("sample_index", "prompt_len", "generated", "last_token")}
        if any(type(v) is not int or v < 0 for v in ints.values()):
            raise SnapshotError(f"snapshot {prefix}: positions must be integers >= 0: {ints}")
        request = request_from_json(meta["request"])
        digest = stored_prompt_digest(meta["request"])
        if digest is not None and ints["prompt_len"] < 1:
            raise SnapshotError(f"snapshot {prefix}: a stored prompt has at least one token")
        text_state = meta["text_state"]
        if not isinstance(text_state, Mapping):
            raise SnapshotError(f"snapshot {prefix}: text_state must be an object")
    except KeyError as e:
        raise SnapshotError(f"snapshot {prefix} has no {e}") from None
    return SlotSnapshot(
        request=request, cache=jax.tree.unflatten(jax.tree.structure(template), leaves),
        text_state=dict(text_state), prompt_digest=digest, **ints)


def cache_template(config: GriffinConfig, dtype: Any) -> Any:
    """One slot's cache as numpy zeros: the shape and dtype stored state must have."""
    return jax.tree.map(np.asarray, griffin.init_cache(config, 1, dtype))


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat]
