"""Row-level progress of a running shard: checkpoints a retried shard starts from.

While a shard runs, its worker writes checkpoints under
``<output>/_progress/<shard id>/`` (``shards.progress_url``). Checkpoint ``k`` is two files, written in
this order:

* ``<k>-<tag>.state.safetensors``: the fixed-size model state of every sample
  still decoding (``model.snapshots``), O(slots) whatever the prompt and
  output lengths (a prompt is kept as its digest, checked against the row on resume);
* ``<k>-<tag>.delta.safetensors``: what changed since checkpoint ``k - 1``
  (its ``parent``): each sample's new tokens, text and logprobs, and which
  samples finished. It names its state file with the file's sha256, so it is
  the checkpoint's commit marker.

A checkpoint therefore costs O(state + tokens since the previous one), never
O(all tokens so far). ``tag`` is random per attempt, so attempts never write
the same name; a retried attempt continues the chain it loaded. Only the two
newest state files of a chain are kept.

``ProgressStore.load`` follows parents from the newest delta back to the first
and takes the newest checkpoint whose whole chain reads back, matches the
model (``snapshots.model_fingerprint``) and whose state file matches its
checksum; anything else is skipped with a warning, falling back to older
checkpoints and, at worst, to the finished rows alone. It reads the deltas
twice, first to check them keeping only counts, then in order to rebuild the
outputs, handing each finished sample out as it ends: memory holds the
outputs of the samples still decoding, not the shard's. Sampling depends only
on (seed, sample index, token index), so any good checkpoint, from any
attempt, continues exactly as an uninterrupted run would.

Everything is arrays and JSON in safetensors files; nothing is unpickled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import fsspec
import ml_dtypes
import numpy as np
import safetensors.numpy

from griffin_batch.model import requests
from griffin_batch.model.engine import SlotSnapshot

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATES_KEPT = 2  # the newest state and one to fall back to
_META_KEY = "griffin_batch"
_NAME = re.compile(r"^(\d{8})-([0-9a-f]{8})\.(delta|state)\.safetensors$")

Key = tuple[str, int]  # (request id, sample index)


class ProgressError(ValueError):
    """A progress file that cannot be used (unreadable, foreign, inconsistent)."""


# Files: safetensors with a JSON header entry --------------------------------

def encode_file(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """Arrays and JSON as one safetensors file (bfloat16 travels as its bits)."""
    stored, dtypes = {}, {}
    for name, a in arrays.items():
        if a.dtype == ml_dtypes.bfloat16:
            stored[name], dtypes[name] = a.view(np.uint16), "bfloat16"
        else:
            stored[name] = a
    header = {**meta, "bfloat16": sorted(dtypes)}
    return safetensors.numpy.save(stored, metadata={_META_KEY: json.dumps(header)})


def decode_file(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of ``encode_file``.

    Raises:
      ProgressError: Not a safetensors file of ours (truncated, corrupt, foreign).
    """
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        meta = json.loads(header["__metadata__"][_META_KEY])
        arrays = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same: unusable
        raise ProgressError(f"not a readable progress file: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        raise ProgressError(f"unknown progress format {meta.get('version')!r}")
    for name in meta.get("bfloat16", []):
        if name not in arrays:
            raise ProgressError(f"array {name} is missing")
        arrays[name] = arrays[name].view(ml_dtypes.bfloat16)
    return arrays, meta


# What is written and what is read back ----------------------------------------

@dataclasses.dataclass
class SoFar:
    """A sample's output so far, appended to as chunks arrive.

    Text is kept as pieces (joined on demand) so that appending stays O(piece)
    however long the output.
    """

    tokens: list[int] = dataclasses.field(default_factory=list)
    pieces: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None
    num_prompt_tokens: int = 0
    chars: int = 0

    def extend(self, tokens: Sequence[int], text: str, logprobs: Sequence[float] | None) -> None:
        self.tokens.extend(tokens)
        if text:
            self.pieces.append(text)
            self.chars += len(text)
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(logprobs)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def mark(self) -> tuple[int, int, int]:
        """(tokens, pieces, chars) held now: where the next delta starts."""
        return len(self.tokens), len(self.pieces), self.chars


@dataclasses.dataclass
class Restored:
    """What a shard's newest good checkpoint holds.

    Attributes:
      finished: Samples that finished, as completions (empty when ``load`` handed
        them to its ``on_finished`` instead).
      decoding: Samples that were decoding: their snapshot and output so far.
      chain: The checkpoint chain it came from, oldest first (empty: nothing usable).
      finished_keys: (stored id, sample index) of every finished sample.
      finished_tokens: Generated tokens of the finished samples.
    """

    finished: list[requests.Completion]
    decoding: list[tuple[SlotSnapshot, SoFar]]
    chain: list[str]
    finished_keys: set[Key] = dataclasses.field(default_factory=set)
    finished_tokens: int = 0


@dataclasses.dataclass
class _Delta:
    """A checked delta file, without its tokens and text (``load`` reads them again)."""

    name: str
    seq: int
    parent: str | None
    state: dict[str, Any] | None
    # Per sample record: (key, tokens before, chars before, new tokens, new chars, finished).
    records: list[tuple[Key, int, int, int, int, bool]]


class ProgressStore:
    """One shard's checkpoints on any fsspec file system.

    Args:
      url: The shard's progress directory (``<output>/_progress/<shard id>``).
      fingerprint: ``snapshots.model_fingerprint`` of the model writing or reading.
      template: ``snapshots.cache_template`` of that model.
    """

    def __init__(self, url: str, fingerprint: str, template: Any):
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.path = self.path.rstrip("/")
        self.fingerprint = fingerprint
        self.template = template

    def _join(self, name: str) -> str:
        return f"{self.path}/{name}"

    # Writing --------------------------------------------------------------
    def write(self, seq: int, tag: str, parent: str | None,
              samples: Sequence[Mapping[str, Any]], delta_arrays: Mapping[str, np.ndarray],
              decoding: Sequence[SlotSnapshot]) -> str:
        """Writes checkpoint ``seq`` (state first, then the delta); returns the delta's name."""
        from griffin_batch.model import snapshots  # JAX: only where a worker runs

        base = f"{seq:08d}-{tag}"
        state = None
        if decoding:
            arrays, metas = {}, []
            for i, snap in enumerate(decoding):
                a, m = snapshots.to_data(snap, f"s{i}")
                arrays.update(a)
                metas.append(m)
            data = encode_file(arrays, {"version": FORMAT_VERSION,
                                        "fingerprint": self.fingerprint, "samples": metas})
            state = {"name": f"{base}.state.safetensors", "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
            self._put(state["name"], data)
        meta = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "seq": seq,
                "parent": parent, "state": state, "samples": list(samples)}
        name = f"{base}.delta.safetensors"
        self._put(name, encode_file(delta_arrays, meta))
        return name

    def _put(self, name: str, data: bytes) -> None:
        # One object per file: a reader sees all of it or nothing on object
        # stores; on local disks a torn file fails its parse or checksum.
        if not self.fs.exists(self.path):
            self.fs.makedirs(self.path, exist_ok=True)
        self.fs.pipe_file(self._join(name), data)

    def remove_state(self, delta_name: str) -> None:
        """Deletes the state file of a checkpoint (a newer one supersedes it)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._join(delta_name.replace(".delta.", ".state.")))

    def remove(self) -> None:
        """Deletes the shard's progress (after it committed)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=True)

    # Reading --------------------------------------------------------------
    def load(self, on_finished: Callable[[requests.Completion], None] | None = None
             ) -> Restored:
        """The newest checkpoint that fully checks out; see the module docstring.

        Every delta file is read and checked once, keeping only its counts, to
        choose the checkpoint; the chosen chain is then read again in order,
        so memory holds the outputs of the samples still decoding, never all
        of the shard's.

        Args:
          on_finished: Takes each finished sample as the chain is replayed
            (then ``Restored.finished`` stays empty).

        Raises:
          ProgressError: A file of the chosen chain changed between the two reads.
        """
        deltas = self._scan_deltas()
        heads = sorted(deltas.values(), key=lambda d: d.seq, reverse=True)
        fallback: list[_Delta] | None = None
        for head in heads:
            try:
                chain = self._chain(head, deltas)
                counts, finished = _count(chain)
            except ProgressError as e:
                log.warning("progress %s: skipping checkpoint %s: %s", self.path, head.name, e)
                continue
            try:
                states = self._read_state(head, counts, finished)
            except ProgressError as e:
                log.warning("progress %s: state of %s is unusable (%s); trying an older one",
                            self.path, head.name, e)
                fallback = fallback or chain  # finished rows still count: the rest restarts
                continue
            return self._replay(chain, states, on_finished)
        return self._replay(fallback, [], on_finished) if fallback else Restored([], [], [])

    def _scan_deltas(self) -> dict[str, _Delta]:
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return {}
        out = {}
        for name in sorted(n for n in names if (m := _NAME.match(n)) and m.group(3) == "delta"):
            try:
                out[name] = self._scan(name)
            except (ProgressError, OSError) as e:
                log.warning("progress %s: ignoring %s: %s", self.path, name, e)
        return out

    def _scan(self, name: str) -> _Delta:
        arrays, meta = self._read_delta(name)
        records = []
        for i, s in enumerate(meta.get("samples", [])):
            try:
                key = (str(s["request_id"]), int(s["sample_index"]))
                records.append((key, int(s["tokens_before"]), int(s["chars_before"]),
                                arrays.get(f"tokens/{i}", np.zeros(0)).size, len(str(s["text"])),
                                s.get("finish") is not None))
            except (KeyError, TypeError, ValueError) as e:
                raise ProgressError(f"malformed sample record: {e}") from None
        return _Delta(name, meta["seq"], meta.get("parent"), meta.get("state"), records)

    def _read_delta(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = decode_file(self.fs.cat_file(self._join(name)))
        if meta.get("fingerprint") != self.fingerprint:
            raise ProgressError("written by another model (fingerprint differs)")
        if meta.get("seq") != int(_NAME.match(name).group(1)):
            raise ProgressError("its sequence number differs from its name")
        return arrays, meta

    def _replay(self, chain: Sequence[_Delta], states: Sequence[SlotSnapshot],
                on_finished: Callable[[requests.Completion], None] | None) -> Restored:
        """Reads the chain again in order, handing out finished samples as they end."""
        outputs: dict[Key, SoFar] = {}
        restored = Restored([], [], [d.name for d in chain])
        for delta in chain:
            try:
                arrays, meta = self._read_delta(delta.name)
            except (ProgressError, OSError) as e:
                raise ProgressError(f"{delta.name} changed while it was read: {e}") from None
            for i, s in enumerate(meta["samples"]):
                key = (str(s["request_id"]), int(s["sample_index"]))
                if key in restored.finished_keys:
                    continue
                out = outputs.setdefault(key, SoFar())
                _apply(out, s, arrays.get(f"tokens/{i}"), arrays.get(f"logprobs/{i}"))
                if s.get("finish") is None:
                    continue
                del outputs[key]
                done = requests.Completion(
                    request_id=key[0], sample_index=key[1], tokens=out.tokens, text=out.text,
                    finish_reason=s["finish"]["finish_reason"], error=s["finish"].get("error"),
                    num_prompt_tokens=out.num_prompt_tokens, logprobs=out.logprobs)
                restored.finished_keys.add(key)
                restored.finished_tokens += len(done.tokens)
                if on_finished is None:
                    restored.finished.append(done)
                else:
                    on_finished(done)
        for snap in states:
            so_far = outputs.get((snap.request.request_id, snap.sample_index), SoFar())
            if len(so_far.tokens) != snap.generated:
                raise ProgressError(f"{chain[-1].name} changed while it was read")
            restored.decoding.append((snap, so_far))
        return restored

    @staticmethod
    def _chain(head: _Delta, deltas: Mapping[str, _Delta]) -> list[_Delta]:
        chain = [head]
        while (parent := chain[-1].parent) is not None:
            if parent not in deltas:
                raise ProgressError(f"its parent {parent} is missing or unreadable")
            if deltas[parent].seq != chain[-1].seq - 1:
                raise ProgressError(f"parent {parent} is not the previous checkpoint")
            chain.append(deltas[parent])
        if chain[-1].seq != 1:
            raise ProgressError("its chain does not start at checkpoint 1")
        return chain[::-1]

    def _read_state(self, head: _Delta, counts: Mapping[Key, int],
                    finished: set[Key]) -> list[SlotSnapshot]:
        """The head's decoding samples, each checked against the tokens the chain records."""
        state = head.state
        if state is None:
            return []
        try:
            data = self.fs.cat_file(self._join(state["name"]))
        except (FileNotFoundError, KeyError, TypeError):
            raise ProgressError("its state file is missing") from None
        if len(data) != state.get("bytes") or hashlib.sha256(data).hexdigest() != state.get(
                "sha256"):
            raise ProgressError("its state file does not match its checksum")
        from griffin_batch.model import snapshots  # JAX: only where a worker runs

        arrays, meta = decode_file(data)
        out = []
        for i, m in enumerate(meta.get("samples", [])):
            try:
                snap = snapshots.from_data(arrays, m, f"s{i}", self.template)
            except snapshots.SnapshotError as e:
                raise ProgressError(str(e)) from None
            key = (snap.request.request_id, snap.sample_index)
            if key in finished or counts.get(key, 0) != snap.generated:
                raise ProgressError(f"sample {key} has {counts.get(key, 0)} tokens recorded, "
                                    f"its state {snap.generated}")
            out.append(snap)
        return out


def _count(chain: Sequence[_Delta]) -> tuple[dict[Key, int], set[Key]]:
    """Tokens each sample has after the chain, and which finished; checks they add up."""
    counts: dict[Key, int] = {}
    chars: dict[Key, int] = {}
    finished: set[Key] = set()
    for delta in chain:
        for key, before, chars_before, new, new_chars, done in delta.records:
            if key in finished:
                continue
            if before > counts.get(key, 0) or chars_before > chars.get(key, 0):
                raise ProgressError(f"{delta.name}: sample {key} continues past what was recorded")
            counts[key], chars[key] = before + new, chars_before + new_chars
            if done:
                finished.add(key)
    return counts, finished


def _apply(out: SoFar, record: Mapping[str, Any], tokens: np.ndarray | None,
           logprobs: np.ndarray | None) -> None:
    """Adds one delta record to a sample's output (a restarted sample overwrites from its start)."""
    before, chars = int(record["tokens_before"]), int(record["chars_before"])
    del out.tokens[before:]
    if chars < out.chars:
        out.pieces, out.chars = [out.text[:chars]], chars
    if out.logprobs is not None:
        del out.logprobs[before:]
    out.extend([] if tokens is None else tokens.astype(int).tolist(), str(record["text"]),
               None if logprobs is None else logprobs.astype(float).tolist())
    out.num_prompt_tokens = int(record["num_prompt_tokens"])


@dataclasses.dataclass
class ResumeWork:
    """A shard attempt's work, given its restored progress.

    Attributes:
      requests: Requests with no sample restored (run from their prompts).
      resumed: Decoding samples to continue, and single samples to run from
        their prompts (``pending`` snapshots: the other samples of a request
        with some restored), each with its output so far.
      finished: Restored finished samples, under this attempt's request ids.
      restored_tokens: Generated tokens taken from the checkpoint.
    """

    requests: list[requests.Request]
    resumed: list[tuple[SlotSnapshot, SoFar]]
    finished: list[requests.Completion]
    restored_tokens: int


class ResumePlan:
    """A shard's restored progress, matched to its requests as they are read, window by window.

    Stored samples are matched to this attempt's requests by row (their
    stored id); one whose request differs (another prompt or sampling
    parameters) is dropped with a warning and runs again. Finished samples
    that ``load`` already handed out (``Restored.finished_keys``) are only
    marked done here.

    Attributes:
      restored_tokens: Generated tokens taken from the checkpoint so far.
    """

    def __init__(self, restored: Restored):
        self._finished: dict[int, list[requests.Completion]] = collections.defaultdict(list)
        self._done: dict[int, set[int]] = collections.defaultdict(set)  # handed out already
        self._decoding: dict[int, list[tuple[SlotSnapshot, SoFar]]] = collections.defaultdict(
            list)
        for c in restored.finished:
            if c.request_id.isdigit():
                self._finished[int(c.request_id)].append(c)
        if not restored.finished:  # load() gave them to its on_finished
            for stored_id, sample_index in restored.finished_keys:
                if stored_id.isdigit():
                    self._done[int(stored_id)].add(sample_index)
        for snap, so_far in restored.decoding:
            if snap.request.request_id.isdigit():
                self._decoding[int(snap.request.request_id)].append((snap, so_far))
        self.restored_tokens = 0 if restored.finished else restored.finished_tokens

    def split(self, request_list: Sequence[requests.Request],
              row_of: Callable[[str], int]) -> ResumeWork:
        """What is done, what continues and what starts among ``request_list``."""
        finished, resumed, fresh, tokens = [], [], [], 0
        for request in request_list:
            row = row_of(request.request_id)
            taken: set[int] = set()
            for sample_index in self._done.pop(row, set()):
                if self._matches(request, str(row), sample_index):
                    taken.add(sample_index)
            for c in self._finished.pop(row, []):
                if self._matches(request, c.request_id, c.sample_index):
                    finished.append(dataclasses.replace(c, request_id=request.request_id))
                    taken.add(c.sample_index)
                    tokens += len(c.tokens)
            for snap, so_far in self._decoding.pop(row, []):
                if self._matches(request, snap.request.request_id, snap.sample_index, snap):
                    resumed.append((dataclasses.replace(snap, request=request), so_far))
                    taken.add(snap.sample_index)
                    tokens += len(so_far.tokens)
            if not taken:
                fresh.append(request)
                continue
            resumed += [(SlotSnapshot(request=request, sample_index=i, prompt_len=0, generated=0,
                                      last_token=0, cache=None, text_state=None, pending=True),
                         SoFar()) for i in range(request.params.n) if i not in taken]
        self.restored_tokens += tokens
        return ResumeWork(fresh, resumed, finished, tokens)

    @staticmethod
    def _matches(request: requests.Request, stored_id: str, sample_index: int,
                 stored: SlotSnapshot | None = None) -> bool:
        same = sample_index < request.params.n and (
            stored is None or (_same_prompt(stored, request.prompt)
                               and stored.request.params == request.params))
        if not same:
            log.warning("progress: stored sample %s/%d does not match this shard's rows; "
                        "running it again", stored_id, sample_index)
        return same


def _same_prompt(stored: SlotSnapshot, prompt: str | Sequence[int]) -> bool:
    """Whether a stored sample was started from ``prompt``.

    Stored states keep a digest of their prompt (hashing the row's prompt costs
    one pass over its text, no tokenizer); states written before that keep
    the prompt itself.
    """
    if stored.prompt_digest is not None:
        return requests.prompt_digest(prompt) == stored.prompt_digest
    return stored.request.prompt == prompt


def resume_work(request_list: Sequence[requests.Request], restored: Restored,
                row_of: Callable[[str], int]) -> ResumeWork:
    """``ResumePlan(restored).split(request_list, row_of)``: a whole shard at once."""
    return ResumePlan(restored).split(request_list, row_of)


# The writer's side: what to write next -----------------------------------------

class ShardCheckpointer:
    """Builds one shard attempt's checkpoints and remembers what is already stored.

    ``prepare`` runs where the outputs live (the engine thread, between decode
    rounds) and copies only what is new; ``write`` may run on another thread,
    one checkpoint at a time, and advances the stored marks once the files
    are in place. A failed write leaves the marks, so the next checkpoint
    carries its changes too.

    Args:
      store: The shard's progress store.
      restored: What the attempt started from (``store.load()``); its chain
        is continued.
      stored_id: Maps an engine request id to the id stored (ids that differ
        from attempt to attempt become ones that do not).
    """

    def __init__(self, store: ProgressStore, restored: Restored | None = None,
                 stored_id: Callable[[str], str] = str):
        self.store = store
        self._stored_id = stored_id
        self.tag = uuid.uuid4().hex[:8]
        chain = restored.chain if restored else []
        self.parent: str | None = chain[-1] if chain else None
        self.seq = len(chain)
        self._states = list(chain[-STATES_KEPT:])  # deltas whose state files may exist
        # Where storage ends per sample: (tokens, pieces, chars) of its SoFar.
        self._stored: dict[Key, tuple[int, int, int]] = {}
        self._done: set[Key] = set()
        self._done |= restored.finished_keys if restored else set()
        for snap, so_far in restored.decoding if restored else ():
            self._stored[(snap.request.request_id, snap.sample_index)] = so_far.mark()

    def prepare(self, finished: Iterable[requests.Completion],
                decoding: Iterable[tuple[SlotSnapshot, SoFar]]) -> Checkpoint | None:
        """The next checkpoint: what changed since the stored one (None: nothing did).

        Args:
          finished: The attempt's finished samples (those already stored are skipped).
          decoding: Decoding samples' snapshots (states copied off the device)
            and their outputs so far.
        """
        ckpt = Checkpoint(seq=self.seq + 1, parent=self.parent)
        for c in finished:
            key = (self._stored_id(c.request_id), c.sample_index)
            if key in self._done:
                continue
            before, _, chars = self._stored.get(key, (0, 0, 0))
            ckpt.add(key, before, chars, c.tokens[before:], c.text[chars:],
                     None if c.logprobs is None else c.logprobs[before:], c.num_prompt_tokens,
                     {"finish_reason": c.finish_reason, "error": c.error})
        for snap, so_far in decoding:
            key = (self._stored_id(snap.request.request_id), snap.sample_index)
            before, piece, chars = self._stored.get(key, (0, 0, 0))
            ckpt.add(key, before, chars, so_far.tokens[before:], "".join(so_far.pieces[piece:]),
                     None if so_far.logprobs is None else so_far.logprobs[before:],
                     so_far.num_prompt_tokens, None, mark=so_far.mark())
            ckpt.states.append(dataclasses.replace(
                snap, request=dataclasses.replace(snap.request, request_id=key[0])))
        changed = ckpt.done or any(m != self._stored.get(k) for k, m in ckpt.marks.items())
        return ckpt if changed else None

    def write(self, ckpt: Checkpoint) -> str:
        """Writes a prepared checkpoint and advances the stored marks; returns its name."""
        name = self.store.write(ckpt.seq, self.tag, ckpt.parent, ckpt.records, ckpt.arrays,
                                ckpt.states)
        self.seq, self.parent = ckpt.seq, name
        self._stored.update(ckpt.marks)
        for key in ckpt.done:
            self._stored.pop(key, None)
        self._done |= ckpt.done
        self._states.append(name)
        while len(self._states) > STATES_KEPT:
            self.store.remove_state(self._states.pop(0))
        return name


@dataclasses.dataclass
class Checkpoint:
    """One prepared checkpoint: delta records and arrays, decoding states, new marks."""

    seq: int
    parent: str | None
    records: list[dict] = dataclasses.field(default_factory=list)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    states: list[SlotSnapshot] = dataclasses.field(default_factory=list)
    marks: dict[Key, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    done: set[Key] = dataclasses.field(default_factory=set)

    def add(self, key: Key, before: int, chars: int, tokens: Sequence[int], text: str,
            logprobs: Sequence[float] | None, num_prompt_tokens: int, finish: dict | None,
            mark: tuple[int, int, int] | None = None) -> None:
        i = len(self.records)
        self.arrays[f"tokens/{i}"] = np.asarray(tokens, np.int32)
        if logprobs is not None:
            self.arrays[f"logprobs/{i}"] = np.asarray(logprobs, np.float32)
        self.records.append({
            "request_id": key[0], "sample_index": key[1], "tokens_before": before,
            "chars_before": chars, "text": text, "num_prompt_tokens": num_prompt_tokens,
            "finish": finish})
        if finish is not None:
            self.done.add(key)
        else:
            self.marks[key] = mark
