"""One memory budget for every decode in flight.

Each decode first reserves the bytes its header says it will hold at most
(:func:`service.preprocessing.plan_prepare`) and gives them back when the
decoder is done. Beyond the budget a request waits its turn, first come
first served, for at most ``wait_s``; then it is refused (:class:`DecodeBusy`,
the server's 503 ``decode_busy`` with Retry-After). An image that needs more
than the whole budget could never be decoded and is refused at once
(:class:`DecodeTooLarge`, 413 ``decode_too_large``).

Reservations are taken and returned on the event loop only (the server's one
thread that runs requests), so the books need no lock; a decode still running
in the pool when its request is cancelled keeps its bytes until it ends.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from dataclasses import dataclass

MB = 2**20


def limit_opencv_pixels(max_pixels: int) -> bool:
    """OpenCV's own pixel limit, a second line behind the header checks: it
    refuses to allocate an image its decoder reads as larger, whatever the
    header parser thought. OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when
    cv2 is imported, so this must run first; an operator's own value stays.
    Returns whether it is in time (cv2 not imported yet)."""
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max_pixels))
    return "cv2" not in sys.modules


def default_decode_memory(max_pixels: int) -> int:
    """16 bytes a pixel of the pixel budget (640 MB at 40 MP): two 40 MP
    16-bit colour PNGs at once, four 8-bit ones, one 16-bit colour TIFF in a
    single strip (its strip buffer doubles it)."""
    return 16 * max_pixels


class DecodeBusy(Exception):
    """The budget stayed full for longer than a request may wait."""


class DecodeTooLarge(Exception):
    """One image needs more than the whole budget."""


@dataclass
class _Waiter:
    nbytes: int
    future: asyncio.Future[None]


class DecodeBudget:
    def __init__(self, capacity: int, wait_s: float) -> None:
        if capacity < 1:
            raise ValueError("the decode memory budget must be positive")
        self.capacity = capacity
        self.wait_s = wait_s
        self.in_use = 0
        self.peak = 0  # the most reserved at once, for tests and benchmarks
        self._waiting: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, nbytes: int) -> Reservation:
        """Reserve ``nbytes``; call ``release()`` on the answer exactly once."""
        if nbytes > self.capacity:
            raise DecodeTooLarge(
                f"decoding this image needs up to {nbytes / MB:.0f} MB, more than the whole "
                f"decode memory budget of {self.capacity / MB:.0f} MB "
                "(INSPECTION_DECODE_MEMORY_BYTES)"
            )
        if not self._waiting and self.in_use + nbytes <= self.capacity:
            self._take(nbytes)
            return Reservation(self, nbytes)
        waiter = _Waiter(nbytes, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except TimeoutError:
            if waiter.future.done():  # granted just as the wait ran out: keep it
                return Reservation(self, nbytes)
            self._waiting.remove(waiter)
            waiter.future.cancel()
            self._grant()  # a smaller request behind this one may fit now
            raise DecodeBusy(
                f"{self.in_use / MB:.0f} MB of the {self.capacity / MB:.0f} MB decode memory "
                f"budget in use; this image needs {nbytes / MB:.0f} MB and waited "
                f"{time.monotonic() - started:.1f} s"
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(nbytes)  # granted, but nobody will use it
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
                waiter.future.cancel()
                self._grant()
            raise
        return Reservation(self, nbytes)

    def release(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._grant()

    def _take(self, nbytes: int) -> None:
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)

    def _grant(self) -> None:
        """Let waiters in, first come first served, while the head one fits."""
        while self._waiting and self.in_use + self._waiting[0].nbytes <= self.capacity:
            waiter = self._waiting.popleft()
            if waiter.future.done():  # cancelled while queued
                continue
            self._take(waiter.nbytes)
            waiter.future.set_result(None)


class Reservation:
    """Bytes taken from a :class:`DecodeBudget`; ``release`` gives them back once."""

    def __init__(self, budget: DecodeBudget, nbytes: int) -> None:
        self.budget, self.nbytes, self._released = budget, nbytes, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.budget.release(self.nbytes)
