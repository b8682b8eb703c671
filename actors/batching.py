"""One engine stream shared by every shard a worker holds.

A worker runs several ``process_shard`` calls at once (the driver keeps a
bounded number in flight), but one engine serves them all: each call submits
its requests to an ``EngineLoop`` and waits for its own completions, while a
single thread keeps ``engine.generate`` fed. When one shard's requests run
out, the next shard's are already queued, so slots refill without draining
the batch between shards.

The request feed handed to the engine never blocks while the engine holds
unfinished requests: it yields ``NOTHING_YET`` instead, the engine goes on
decoding and asks again at its next admission, so a request submitted while a
long one decodes starts within one round. The feed blocks only when the
engine is idle, so it can never stall decoding; the stream never ends.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from griffin_batch.cluster import faults
from griffin_batch.model import requests

log = logging.getLogger(__name__)

Generate = Callable[[Iterable[requests.Request]], Iterator[requests.Completion]]


class EngineAccountingError(RuntimeError):
    """The engine returned a completion twice or ended without one."""


class Batch:
    """The pending completions of one submitted group of requests."""

    def __init__(self, request_list: Sequence[requests.Request]):
        self.request_ids = [r.request_id for r in request_list]
        self._expected = sum(r.params.n for r in request_list)
        self._seen: set[tuple[str, int]] = set()
        self.completions: list[requests.Completion] = []
        self._error: BaseException | None = None
        self._done = threading.Event()
        if not self._expected:
            self._done.set()

    def _add(self, completion: requests.Completion) -> None:
        key = (completion.request_id, completion.sample_index)
        if key in self._seen:
            self._fail(EngineAccountingError(f"engine returned {key} twice"))
            return
        self._seen.add(key)
        self.completions.append(completion)
        if len(self.completions) == self._expected:
            self._done.set()

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
            raise TimeoutError(f"{self._expected - len(self.completions)} samples still running")
        if self._error is not None:
            raise self._error
        return self.completions


class EngineLoop:
    """Serves requests from many threads through one ``generate`` stream.

    Args:
      generate: The engine's ``generate`` (requests in, completions out in
        finish order, each request's ``params.n`` samples).
    """

    def __init__(self, generate: Generate):
        self._generate = generate
        self._cond = threading.Condition()
        self._queue: collections.deque[requests.Request] = collections.deque()
        self._owner: dict[str, Batch] = {}  # request id -> batch, until the batch is done
        self._left: dict[str, int] = {}  # samples still owed by the engine, per pulled request
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request_list: Sequence[requests.Request]) -> Batch:
        """Queues requests behind those already waiting; returns their batch.

        Raises:
          WorkerLost: The engine has stopped.
          ValueError: A request id is already being served.
        """
        batch = Batch(request_list)
        with self._cond:
            if self._fatal is not None:
                raise faults.WorkerLost(f"engine stopped: {self._fatal!r}")
            clash = [r.request_id for r in request_list if r.request_id in self._owner]
            if clash:
                raise ValueError(f"request ids already in flight: {clash[:5]}")
            for r in request_list:
                self._owner[r.request_id] = batch
            self._queue.extend(request_list)
            self._cond.notify_all()
        return batch

    def release(self, batch: Batch) -> None:
        """Forgets a finished batch's request ids."""
        with self._cond:
            for rid in batch.request_ids:
                if self._owner.get(rid) is batch:
                    del self._owner[rid]

    @property
    def queued(self) -> int:
        """Requests submitted and not yet taken by the engine."""
        with self._cond:
            return len(self._queue)

    @property
    def fatal(self) -> BaseException | None:
        """What stopped the engine, if it stopped."""
        return self._fatal

    # Engine thread ------------------------------------------------------------
    def _feed(self) -> Iterator[requests.Request]:
        while True:
            with self._cond:
                while not self._queue and not self._left:
                    self._cond.wait()  # the engine is idle: nothing to stall
                if not self._queue:
                    item = requests.NOTHING_YET  # never stall what the engine decodes
                else:
                    item = self._queue.popleft()
                    self._left[item.request_id] = item.params.n
            yield item

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                for completion in self._generate(self._feed()):
                    self._deliver(completion)
                self._fail_unfinished()
        except BaseException as error:  # noqa: BLE001 - a dead engine fails every waiter
            log.exception("engine stopped")
            with self._cond:
                self._fatal = error
                batches = set(self._owner.values())
                self._queue.clear()
            for b in batches:
                b._fail(faults.WorkerLost(f"engine stopped: {error!r}"))

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

    def _fail_unfinished(self) -> None:
        with self._cond:
            owed, self._left = self._left, {}
            batches = {rid: self._owner.get(rid) for rid in owed}
        for rid, batch in batches.items():
            if batch is not None:
                batch._fail(
                    EngineAccountingError(f"engine finished without completing request {rid!r}")
                )
