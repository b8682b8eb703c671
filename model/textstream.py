"""Host-side text of one generating sequence: incremental decoding and stop strings.

State is bounded whatever the output length: the tokenizer's stream decoder
holds only an unfinished tail, and at most ``max(len(stop)) - 1`` characters
are held back in case they begin a stop string that the next token completes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


@dataclasses.dataclass
class TextStream:
    """Turns generated token ids into text pieces, cutting at the first stop string.

    Attributes:
      decoder: the tokenizer's incremental decoder (``push(ids) -> str``, ``flush() -> str``).
      stop: stop strings; the text is cut before the first one that appears.
      held: decoded text not yet handed out (could start a stop string).
      stopped: a stop string was found; no more text will be produced.
    """

    decoder: object
    stop: Sequence[str] = ()
    held: str = ""
    stopped: bool = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the text that is now final."""
        if self.stopped:
            return ""
        self.held += self.decoder.push(list(token_ids))
        return self._release(final=False)

    def finish(self) -> str:
        """Ends the stream (length limit or stop token); returns the remaining text."""
        if self.stopped:
            return ""
        self.held += self.decoder.flush()
        return self._release(final=True)

    def state(self) -> dict:
        """Everything that changes as tokens arrive, as JSON-able data.

        With the stop strings (part of the request) and a fresh decoder of the
        same tokenizer, ``load_state`` rebuilds the stream exactly; the
        tokenizer itself is never part of it.
        """
        return {"decoder": self.decoder.state(), "held": self.held, "stopped": self.stopped}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Restores ``state()`` output into this stream (a fresh one).

        Raises:
          ValueError: ``state`` does not have the shape ``state()`` gives.
        """
        held, stopped, decoder = state.get("held"), state.get("stopped"), state.get("decoder")
        if not isinstance(held, str) or not isinstance(stopped, bool) or not isinstance(
                decoder, Mapping):
            raise ValueError(f"not a text stream state: {state!r}")
        self.decoder.load_state(decoder)
        self.held, self.stopped = held, stopped

    def _release(self, *, final: bool) -> str:
        if self.stop:
            hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.held, self.stopped = self.held[: min(hits)], "", True
                return out
        if final or not self.stop:
            out, self.held = self.held, ""
            return out
        # Keep the longest suffix that is a proper prefix of some stop string.
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out
