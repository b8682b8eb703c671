"""Whole multi-host TPU slices, reserved with Ray's TPU utilities in the background.

``ray.util.tpu.SlicePlacementGroup`` reserves a slice in two steps: the slice's
head resource (``TPU-<pod type>-head``, on the host with TPU worker id 0), then
a placement group with one bundle per host, all on hosts labelled with that
slice's name. Its constructor blocks until the head is reserved, which on an
autoscaling cluster means until a slice has been created: each reservation
runs on a daemon thread of its own, so the driver's loop never waits on one
(and a process that ends is never held up by one). A pending reservation is
demand for the autoscaler, as a pending worker is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import ray

from griffin_batch.cluster import hardware

log = logging.getLogger(__name__)


class _Reservation:
    def __init__(self, reserve: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.dropped = False  # no longer wanted: shut down when it arrives
        self._thread = threading.Thread(target=self._run, args=(reserve,), daemon=True,
                                        name="tpu-slice-reservation")
        self._thread.start()

    def _run(self, reserve: Callable[[], Any]) -> None:
        try:
            self.result = reserve()
        except BaseException as e:  # noqa: BLE001 - reported by SliceReservations.ready
            self.error = e
        self.done.set()
        if self.dropped and self.result is not None:
            _shutdown(self.result)


class SliceReservations:
    """Reserves whole slices of one shape on request; hands over the ones reserved.

    Args:
      shape: The slice (``hardware.tpu_slice``).
      reserve: Reserves one slice and returns its handle once its placement group
        is ready (default: ``ray.util.tpu.SlicePlacementGroup``); a handle has
        ``placement_group`` and ``shutdown()``.
    """

    def __init__(self, shape: hardware.TpuSlice, reserve: Callable[[], Any] | None = None):
        self.shape = shape
        self._reserve = reserve or self._reserve_with_ray
        self._pending: list[_Reservation] = []
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Slices asked for and not yet handed over."""
        return len(self._pending)

    def request(self, count: int) -> None:
        """Asks for ``count`` more slices."""
        self._pending.extend(_Reservation(self._reserve) for _ in range(max(count, 0)))

    def ready(self) -> list[Any]:
        """The slices reserved since the last call (handles with a ready placement group)."""
        done = [r for r in self._pending if r.done.is_set()]
        self._pending = [r for r in self._pending if not r.done.is_set()]
        handles = []
        for r in done:
            if r.error is not None:
                self.last_error = f"TPU slice reservation failed: {r.error!r}"
                log.warning("%s", self.last_error)
            else:
                handles.append(r.result)
        return handles

    def drop(self, keep: int = 0) -> None:
        """Gives up all but ``keep`` pending reservations (those that arrive later are released)."""
        for r in self._pending[keep:]:
            r.dropped = True
            if r.done.is_set() and r.result is not None:
                _shutdown(r.result)
        self._pending = self._pending[:keep]

    def _reserve_with_ray(self) -> Any:
        from ray.util.tpu import SlicePlacementGroup

        handle = SlicePlacementGroup(
            topology=self.shape.topology,
            accelerator_version=self.shape.version,
            chips_per_vm=self.shape.chips_per_host,
            head_reservation_timeout_s=None,  # until the autoscaler brings a slice
        )
        ray.get(handle.placement_group.ready())
        return handle


def _shutdown(handle: Any) -> None:
    try:
        handle.shutdown()
    except Exception:  # noqa: BLE001 - the placement groups go with the driver anyway
        log.exception("could not release a TPU slice reservation")
