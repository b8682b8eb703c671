"""A job's state, as hosted batch APIs name it, kept in ``_summary.json`` while the job runs.

``validating`` (inputs planned, workers starting) -> ``in_progress`` (a worker
is ready) -> ``finalizing`` (writing the summary, removing progress files) ->
``completed`` (every shard committed), ``partially_completed`` (some shards or
inputs failed, the rest committed), ``failed`` (the job stopped early: a worker
that cannot start, a lost cluster) or ``cancelled`` (``griffin-batch cancel``;
``--resume`` finishes it). ``request_counts`` counts input rows: ``completed``
ones have committed output, ``failed`` ones an error row or a failed shard.

Everything here reads and writes the output directory only, so ``griffin-batch
status`` works from any machine that can read it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from griffin_batch.model import requests

VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
PARTIALLY_COMPLETED = "partially_completed"
FAILED = "failed"
CANCELLED = "cancelled"
RUNNING = (VALIDATING, IN_PROGRESS, FINALIZING)
FINAL = (COMPLETED, PARTIALLY_COMPLETED, FAILED, CANCELLED)

SUMMARY_EVERY_S = 10.0
"""How often a running job rewrites ``_summary.json`` (and looks for a cancel request)."""


def final_status(*, cancelled: bool, stopped_early: bool, failed_shards: int,
                 unreadable_inputs: int) -> str:
    """How a job that has ended is named."""
    if cancelled:
        return CANCELLED
    if stopped_early:
        return FAILED
    if failed_shards or unreadable_inputs:
        return PARTIALLY_COMPLETED
    return COMPLETED


def request_counts(*, total: int, committed_rows: int, error_rows: int,
                   failed_shard_rows: int) -> dict[str, int]:
    """``total`` input rows, ``completed`` with output, ``failed`` with an error or lost shard."""
    return {"total": total, "completed": committed_rows - error_rows,
            "failed": error_rows + failed_shard_rows}


EARLIER_STAGES = "earlier_stages"
"""A staged job's last summary key (``summarize --mode map-reduce``): each earlier stage's
``STAGE_FIGURES``; the summary's own figures are its last stage's."""

STAGE_FIGURES = ("completion_tokens", "prompt_tokens", "wall_time_s", "tokens_per_s")


def describe(summary: Mapping[str, Any], now: float | None = None) -> list[str]:
    """What ``griffin-batch status`` prints: state, counts, speed and, while running, an ETA."""
    now = time.time() if now is None else now
    status = summary.get("status", "unknown")
    counts = summary.get("request_counts") or {}
    total = int(counts.get("total", summary.get("input_rows", 0)) or 0)
    done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
    lines = [f"status: {status}",
             f"rows: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed, "
             f"{total} in all ({100 * done / total if total else 100:.1f}% done)",
             f"shards: {_shards(summary)}",
             f"tokens: {summary.get('completion_tokens', 0)} at "
             f"{summary.get('tokens_per_s', 0.0)} tok/s"]
    if summary.get("unreadable_inputs"):  # their rows are in no count above
        lines.append(f"inputs: {summary['unreadable_inputs']} file(s) could not be read and their "
                     "rows are not counted above (see 'failures')")
    updated = summary.get("updated_at")
    if status in RUNNING and updated is not None:
        age = max(0.0, now - float(updated))
        lines.append(f"updated {age:.0f}s ago" + (
            " (the driver writes every few seconds: it may have stopped)"
            if age > 6 * SUMMARY_EVERY_S else ""))
        rate = summary.get("rows_per_s") or 0.0
        if rate > 0 and total > done:
            lines.append(f"eta: {_duration((total - done) / rate)} at {rate:.2f} rows/s")
    earlier = summary.get(EARLIER_STAGES)
    if isinstance(earlier, list) and earlier:  # read back from storage: numbers or skipped
        stages = [s for s in earlier if isinstance(s, Mapping)]
        tokens = sum(_number(s.get("completion_tokens")) for s in [summary, *stages])
        wall = sum(_number(s.get("wall_time_s")) for s in [summary, *stages])
        names = ", ".join(str(s.get("stage")) for s in stages)
        lines.append(f"whole job: {int(tokens)} tokens in {wall:.1f}s over {len(stages) + 1} stages "
                     f"(before this last one: {names})")
    if summary.get("fatal"):
        lines.append(f"stopped: {summary['fatal']}")
    return lines


def _number(value: Any) -> float:
    return value if requests.is_number(value) else 0


def _shards(summary: Mapping[str, Any]) -> str:
    s = summary.get("shards") or {}
    return f"{s.get('committed', 0)} of {s.get('total', 0)} committed, {s.get('failed', 0)} failed"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def cancel_record(host: str, pid: int) -> bytes:
    """The contents of a cancel request (``manifest.CANCEL_FILE``)."""
    return json.dumps({"requested_at": round(time.time(), 3), "host": host, "pid": pid}).encode()
