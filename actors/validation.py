"""What a job asks of its samples: a check of each finished text, and how often to draw again.

A ``Validation`` travels in ``ShardOptions.validation``. The worker checks every
sample of a shard once its first pass is done and draws each rejected one again
(``actors.redraw``), with a seed that is a pure function of the row's seed and
the attempt (``redraw_seed``): a retried or resumed shard draws the same samples.

The check is any picklable callable from the completion's text to None (it
passes) or why it fails; the jobs layer supplies it (``jobs.synth_checks``
validates JSON against a schema), so this layer knows no format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from griffin_batch.actors import columns

Check = Callable[[str], "str | None"]
"""A completion's text -> None when it passes, else why it does not (one line)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Validation:
    """How a shard's samples are checked and redrawn.

    Attributes:
      check: The check; None: nothing is checked (``valid`` is null) and nothing
        is redrawn, but rows still record their seed and one attempt.
      max_attempts: Most draws of one sample, the first included (>= 1).
    """

    check: Check | None = None
    max_attempts: int = 1

    def __post_init__(self):
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")


def redraw_seed(seed: int, attempt: int) -> int:
    """The seed of draw ``attempt`` (2, 3, ...) of a sample first drawn with ``seed``.

    A hash of both, so that the draws of one sample, and the samples of
    different rows, never share a stream.
    """
    return columns.row_seed(seed, f"redraw {attempt}")
