"""Giving freed heap memory back to the operating system.

glibc's allocator keeps the pages of freed blocks for reuse, and a heap
fragmented by long-lived objects among short-lived ones never shrinks by
itself: after a burst of abuse (slow clients' backlogs, aborted request
bodies) the service's RSS stayed up by the size of the burst, all of it free.
``malloc_trim`` returns every wholly free page; it costs about a millisecond
when there is little to return, and some ten when a hundred MB is freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # musl and other C libraries have no malloc_trim.
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_free_heap() -> bool:
    """Returns the heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class Trimmer:
    """Returns the heap's free pages soon after a large free, not at the minute's pass.

    A slow client's backlog, up to ``CASPIAN_MAX_QUEUE_BYTES``, is freed at once when
    it reads on, leaves, or is cut with 3007; left to the collector's full pass, a
    minute later, that memory showed as a rising floor in the soak. Frees are
    summed until ``threshold`` bytes, then one trim follows after ``delay_s``
    (frees that come together share it), and never sooner than ``every_s`` after
    the last, since each costs the loop milliseconds.
    """

    def __init__(
        self,
        threshold: int = 1 << 20,
        delay_s: float = 1.0,
        every_s: float = 10.0,
        trim: Callable[[], bool] = release_free_heap,
    ) -> None:
        self._threshold = threshold
        self._delay_s = delay_s
        self._every_s = every_s
        self._trim = trim
        self._freed = 0
        self._last: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        #: Bytes reported freed, and trims run, since the start.
        self.freed_total = 0
        self.trims = 0

    def freed(self, size: int) -> None:
        """``size`` bytes were just let go of; call from the event loop."""
        self.freed_total += size
        self._freed += size
        if self._freed < self._threshold or self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + self._delay_s
        if self._last is not None:
            when = max(when, self._last + self._every_s)
        self._handle = loop.call_at(when, self._run)

    def _run(self) -> None:
        self._handle = None
        self._freed = 0
        self._last = asyncio.get_running_loop().time()
        self.trims += 1
        self._trim()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
