"""One engine stream shared by every shard a worker holds, with their checkpoints.

A worker runs several ``process_shard`` calls at once (the driver keeps a
bounded number in flight), but one engine serves them all: each call submits
its work to an ``EngineLoop`` and waits for its own completions, while a
single thread keeps ``engine.stream`` fed. When one shard's requests run out,
the next shard's are already queued, so slots refill without draining the
batch between shards.

The request feed handed to the engine never blocks while the engine holds
unfinished samples: it yields ``NOTHING_YET`` instead, the engine goes on
decoding and asks again at its next admission, so work submitted while a long
sample decodes starts within one round. The feed blocks only when the engine
is idle, so it can never stall decoding; the stream never ends.

Checkpoints are taken on the engine thread between decode rounds, when no
computed chunk is waiting to be handed out (so the engine's snapshot and the
outputs gathered here agree), and written by one writer thread, one
checkpoint at a time: decoding pauses only for the copy of the slots' state
off the device and of the tokens new since the previous checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence

from griffin_batch.actors.progress import ShardCheckpointer, SoFar
from griffin_batch.actors.spill import SPILL_EVERY, CompletionSpill
from griffin_batch.cluster import faults
from griffin_batch.model import requests
from griffin_batch.model.engine import SlotSnapshot

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (request id, sample index)


class EngineAccountingError(RuntimeError):
    """The engine returned a completion twice or ended without one."""


class Batch:
    """The pending completions of one group of work (one shard attempt).

    Work is handed over all at once (``EngineLoop.submit``) or fed in pieces
    while it runs (``EngineLoop.open``, ``feed``, then ``close_input``), so a
    shard's prompts are read window by window instead of all up front.

    Args:
      request_list: Requests to run from their prompts (all ``params.n`` samples).
      resumed: Single samples to continue: a decoding sample's snapshot with its
        output so far, or a ``pending`` snapshot (one sample run from its prompt).
      finished: Samples already finished (from a checkpoint).
      checkpointer: Where this batch's progress goes (None: no checkpoints).
      checkpoint_every_s: Interval between its checkpoints.
      restored_tokens: Generated tokens ``resumed`` and ``finished`` carry.
      spill: Where finished samples go, a few at a time, instead of staying in
        ``completions`` (None: they stay).
    """

    def __init__(self, request_list: Sequence[requests.Request] = (),
                 resumed: Sequence[tuple[SlotSnapshot, SoFar]] = (),
                 finished: Sequence[requests.Completion] = (),
                 checkpointer: ShardCheckpointer | None = None,
                 checkpoint_every_s: float | None = None, restored_tokens: int = 0,
                 spill: CompletionSpill | None = None):
        self.restored_tokens = restored_tokens
        self.spill = spill
        self._lock = threading.Lock()
        self._recent: list[requests.Completion] = []  # finished, not yet spilled
        self._unstored: list[requests.Completion] = []  # finished, not yet checkpointed
        self.requests = list(request_list)  # the first piece of work (see EngineLoop.submit)
        self.resumed = list(resumed)
        self.request_ids: list[str] = []  # every id fed so far
        self.completions: list[requests.Completion] = [] if spill else list(finished)
        if spill is not None:
            spill.add(finished)
        self._count = len(finished)
        self._expected = self._count
        self._open = True  # more work may be fed
        self._queued = 0  # items fed and not yet taken by the engine
        self._seen: set[Key] = {(c.request_id, c.sample_index) for c in finished}
        self.checkpointer = checkpointer
        self.checkpoint_every_s = checkpoint_every_s
        self.next_checkpoint = (time.monotonic() + checkpoint_every_s
                                if checkpoint_every_s else float("inf"))
        self._error: BaseException | None = None
        self._done = threading.Event()

    def _expect(self, samples: int) -> None:
        with self._lock:
            self._expected += samples

    def close_input(self) -> None:
        """No more work will be fed: the batch is done once what was fed comes back."""
        with self._lock:
            self._open = False
            self._settle()

    def _settle(self) -> None:  # holding the lock
        if self._open or self._count < self._expected:
            return
        if self._recent:
            self.spill.add(self._recent)
            self._recent = []
        self._done.set()

    def _add(self, completion: requests.Completion) -> None:
        key = (completion.request_id, completion.sample_index)
        if key in self._seen:
            self._fail(EngineAccountingError(f"engine returned {key} twice"))
            return
        self._seen.add(key)
        with self._lock:
            self._count += 1
            if self.checkpointer is not None:
                self._unstored.append(completion)
            if self.spill is None:
                self.completions.append(completion)
            else:
                self._recent.append(completion)
                if len(self._recent) >= SPILL_EVERY:
                    self.spill.add(self._recent)
                    self._recent = []
            self._settle()

    def take_unstored(self) -> list[requests.Completion]:
        """Finished samples not yet handed to a checkpoint (handing them over forgets them).

        A checkpoint that then fails to write loses them from the progress
        record only: after a crash they are computed again, identically.
        """
        with self._lock:
            out, self._unstored = self._unstored, []
        return out

    def _fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[requests.Completion]:
        """Blocks until every sample came back; raises what stopped them otherwise."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self._expected - self._count} samples still running")
        if self._error is not None:
            raise self._error
        return self.completions


class EngineLoop:
    """Serves work from many threads through one engine stream.

    Args:
      engine: A ``model.Engine`` (``stream``, ``snapshot``, ``between_rounds``, ``engine_config``).
    """

    def __init__(self, engine):
        self._engine = engine
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()  # Requests and SlotSnapshots
        self._owner: dict[str, Batch] = {}  # request id -> batch, until the batch is done
        self._batches: set[Batch] = set()  # batches fed and not yet released
        self._left: dict[str, int] = {}  # samples still owed by the engine, per request id
        self._outputs: dict[Key, SoFar] = {}  # output so far of samples being served
        self._fatal: BaseException | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "checkpoint-writer")
        self._writing: concurrent.futures.Future | None = None
        self._drain: tuple[threading.Event, str] | None = None
        # Items of one batch allowed to wait for the engine: twice what its
        # admission looks ahead at, so feeding never starves it.
        self.feed_ahead = 8 * engine.engine_config.num_slots
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> Batch:
        """Queues a batch's work (``batch.requests``, ``batch.resumed``) all at once; returns it.

        Raises:
          WorkerLost: The engine has stopped, or the worker is draining.
          ValueError: A request id is already being served.
        """
        self.feed(batch, batch.requests, batch.resumed)
        batch.close_input()
        return batch

    def feed(self, batch: Batch, request_list: Sequence[requests.Request],
             resumed: Sequence[tuple[SlotSnapshot, SoFar]] = ()) -> None:
        """Queues more of a batch's work behind the work already waiting.

        Blocks while more than ``feed_ahead`` of the batch's items wait for the
        engine, so a shard's prompts are held a window at a time.

        Raises:
          WorkerLost: The engine has stopped, or the worker is draining.
          ValueError: A request id is already being served.
        """
        items = [*request_list, *(snap for snap, _ in resumed)]
        ids = [*(r.request_id for r in request_list),
               *(snap.request.request_id for snap, _ in resumed)]
        with self._cond:
            while True:
                if self._fatal is not None:
                    raise faults.WorkerLost(f"engine stopped: {self._fatal!r}")
                if self._drain is not None:
                    raise faults.WorkerLost(f"worker is draining: {self._drain[1]}")
                if batch._queued <= self.feed_ahead:
                    break
                self._cond.wait()
            clash = [rid for rid in ids if self._owner.get(rid, batch) is not batch]
            if clash:
                raise ValueError(f"request ids already in flight: {clash[:5]}")
            for rid in ids:
                if rid not in self._owner:
                    batch.request_ids.append(rid)
                self._owner[rid] = batch
            for snap, so_far in resumed:
                if not snap.pending:
                    self._outputs[(snap.request.request_id, snap.sample_index)] = so_far
            batch._expect(sum(r.params.n for r in request_list) + len(resumed))
            batch._queued += len(items)
            self._batches.add(batch)
            self._queue.extend(items)
            self._cond.notify_all()

    def release(self, batch: Batch) -> None:
        """Forgets a finished batch's request ids."""
        with self._cond:
            self._batches.discard(batch)
            for rid in batch.request_ids:
                if self._owner.get(rid) is batch:
                    del self._owner[rid]

    def drain(self, reason: str, timeout_s: float) -> bool:
        """Checkpoints every batch at the next round boundary, then fails them all.

        Each batch's ``wait`` raises ``WorkerLost(reason)`` afterwards (the
        driver runs the shards elsewhere, from these checkpoints), and new
        work is refused. Returns whether the checkpoints were written within
        ``timeout_s``.
        """
        done = threading.Event()
        with self._cond:
            if self._drain is None:
                self._drain = (done, reason)
            done = self._drain[0]
            self._cond.notify_all()
        finished = done.wait(timeout_s)
        if not finished:
            log.warning("drain: checkpoints not written within %.0fs", timeout_s)
            self._fail_all(faults.WorkerLost(f"worker drained: {reason}"))
        return finished

    @property
    def queued(self) -> int:
        """Work items submitted and not yet taken by the engine."""
        with self._cond:
            return len(self._queue)

    @property
    def fatal(self) -> BaseException | None:
        """What stopped the engine, if it stopped."""
        return self._fatal

    # Engine thread ------------------------------------------------------------
    def _feed(self) -> Iterator:
        while True:
            with self._cond:
                # Block only while the engine is idle: nothing to stall.
                while not self._queue and not self._left and self._drain is None:
                    self._cond.wait()
                if self._drain is not None:
                    item = None
                elif not self._queue:
                    item = requests.NOTHING_YET  # never stall what the engine decodes
                else:
                    item = self._queue.popleft()
                    rid = (item.request.request_id if isinstance(item, SlotSnapshot)
                           else item.request_id)
                    count = 1 if isinstance(item, SlotSnapshot) else item.params.n
                    self._left[rid] = self._left.get(rid, 0) + count
                    owner = self._owner.get(rid)
                    if owner is not None:
                        owner._queued -= 1
                        self._cond.notify_all()  # a feeder may be waiting for room
            if item is None:  # draining: checkpoint at this round boundary, then end
                self._check_drain()
                return
            yield item

    def _run(self) -> None:
        try:
            while self._drain is None:
                with self._cond:
                    while not self._queue and self._drain is None:
                        self._cond.wait()
                for chunk in self._engine.stream(self._feed()):
                    self._on_chunk(chunk)
                    if self._engine.between_rounds:
                        if self._drain is not None:
                            self._check_drain()
                            break  # the engine stops; the process is about to go
                        self._maybe_checkpoint()
                self._fail_unfinished()
            self._check_drain()
        except BaseException as error:  # noqa: BLE001 - a dead engine fails every waiter
            log.exception("engine stopped")
            with self._cond:
                self._fatal = error
                self._queue.clear()
                self._cond.notify_all()  # feeders waiting for room
            self._fail_all(faults.WorkerLost(f"engine stopped: {error!r}"))

    def _on_chunk(self, chunk) -> None:
        key = (chunk.request_id, chunk.sample_index)
        so_far = self._outputs.get(key)
        if so_far is None:
            so_far = self._outputs[key] = SoFar()
        so_far.extend(chunk.tokens, chunk.text, chunk.logprobs)
        so_far.num_prompt_tokens = chunk.num_prompt_tokens
        if chunk.finish_reason is None:
            return
        del self._outputs[key]
        self._deliver(requests.Completion(
            request_id=chunk.request_id, sample_index=chunk.sample_index,
            tokens=so_far.tokens, text=so_far.text, finish_reason=chunk.finish_reason,
            num_prompt_tokens=chunk.num_prompt_tokens, error=chunk.error,
            logprobs=so_far.logprobs))

    def _deliver(self, completion: requests.Completion) -> None:
        rid = completion.request_id
        with self._cond:
            batch = self._owner.get(rid)
            if rid in self._left:
                self._left[rid] -= 1
                if self._left[rid] <= 0:
                    del self._left[rid]
        if batch is None:
            log.error("engine returned a completion for unknown request %r", rid)
            return
        batch._add(completion)

    # Checkpoints --------------------------------------------------------------
    def _maybe_checkpoint(self, *, force: bool = False) -> None:
        if self._writing is not None and not self._writing.done():
            if not force:
                return  # one write at a time: the next checkpoint carries this one's changes
            self._writing.result()
        now = time.monotonic()
        with self._cond:
            live = {id(b): b for b in self._batches if b.checkpointer is not None and not b.done}
        due = [b for b in live.values() if force or b.next_checkpoint <= now]
        if not due:
            return
        decoding: dict[int, list] = collections.defaultdict(list)
        for snap in self._engine.snapshot():
            if snap.cache is None:  # not started: it reruns from its prompt
                continue
            batch = self._owner.get(snap.request.request_id)
            key = (snap.request.request_id, snap.sample_index)
            if batch is not None and id(batch) in live:
                decoding[id(batch)].append((snap, self._outputs.get(key) or SoFar()))
        jobs = []
        for b in due:
            if b.checkpoint_every_s:
                b.next_checkpoint = now + b.checkpoint_every_s
            ckpt = b.checkpointer.prepare(b.take_unstored(), decoding[id(b)])
            if ckpt is not None:
                jobs.append((b.checkpointer, ckpt))
        if jobs:
            self._writing = self._writer.submit(_write_all, jobs)

    def _drain_pending(self) -> bool:
        return self._drain is not None and not self._drain[0].is_set()

    def _check_drain(self) -> None:
        """Once, when draining: writes every batch's checkpoint, then fails them all."""
        if not self._drain_pending():
            return
        event, reason = self._drain
        try:
            self._maybe_checkpoint(force=True)
            if self._writing is not None:
                self._writing.result()
        finally:
            with self._cond:
                self._queue.clear()
            self._fail_all(faults.WorkerLost(f"worker drained: {reason}"))
            event.set()

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            batches = set(self._batches)
        for b in batches:
            b._fail(error)

    def _fail_unfinished(self) -> None:
        with self._cond:
            owed, self._left = self._left, {}
            batches = {rid: self._owner.get(rid) for rid in owed}
        for rid, batch in batches.items():
            if batch is not None:
                batch._fail(
                    EngineAccountingError(f"engine finished without completing request {rid!r}")
                )


def _write_all(jobs) -> None:
    for checkpointer, ckpt in jobs:
        try:
            checkpointer.write(ckpt)
        except Exception:  # noqa: BLE001 - a lost checkpoint costs recomputation, not the shard
            log.exception("checkpoint %d of %s not written", ckpt.seq, checkpointer.store.path)
