"""The driver's progress bar: rows done, generated tokens per second, ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import tqdm


class Progress:
    """A tqdm bar over input rows, advanced as shards commit.

    Args:
      total_rows: Rows in the whole job.
      done_rows: Rows already committed (resumed jobs).
      stream: Where the bar goes (stderr, so stdout stays for results).
      clock: Monotonic clock.
    """

    def __init__(
        self,
        total_rows: int,
        done_rows: int = 0,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        stream = stream or sys.stderr
        interactive = hasattr(stream, "isatty") and stream.isatty()
        self._bar = tqdm.tqdm(
            total=total_rows,
            initial=done_rows,
            unit="row",
            file=stream,
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=0.5 if interactive else 10.0,
            desc="generate",
        )
        self._interactive = interactive
        self._clock = clock
        self._start = clock()
        self.tokens = 0
        self._workers = ""

    def advance(self, rows: int, tokens: int) -> None:
        """Counts a committed shard."""
        self.tokens += tokens
        self._postfix()
        self._bar.update(rows)

    def workers(self, ready: int, starting: int) -> None:
        """Shows the pool's live workers (it grows and shrinks with the cluster)."""
        text = f"{ready} worker(s)" + (f" +{starting} starting" if starting else "")
        if text != self._workers:
            self._workers = text
            self._postfix()

    def _postfix(self) -> None:
        self._bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tok/s, {self._workers}".rstrip(", "),
                                  refresh=False)

    def tokens_per_s(self) -> float:
        elapsed = self._clock() - self._start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def refresh(self) -> None:
        """Redraws the bar (elapsed time and ETA move between commits); terminals only."""
        if self._interactive:
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
