"""Giving freed heap memory back to the operating system.

glibc's allocator keeps the pages of freed blocks for reuse, and a heap
fragmented by long-lived objects among short-lived ones never shrinks by
itself: after a burst of abuse (slow clients' backlogs, aborted request
bodies) the service's RSS stayed up by the size of the burst, all of it free.
``malloc_trim`` returns every wholly free page; it costs about a millisecond
when there is little to return, and some ten when a hundred MB is freed.
"""

from __future__ import annotations

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
