"""Rates a connection is held to, and logs that cannot flood: pure, clock passed in."""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic


class TokenBucket:
    """``rate`` events a second on average, ``burst`` at once."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spends one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def ready(self, now: float) -> bool:
        """Whether a token is there, without spending it."""
        self._refill(now)
        return self._tokens >= 1.0

    def wait(self, now: float) -> float:
        """Seconds until a token is there."""
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self._rate)


class LogThrottle:
    """One log record per kind of failure per interval, then a count of the rest.

    A client can make the same error happen thousands of times a second; a
    traceback each would cost more than the error and bury everything else
    in the log. The first of a kind is logged in full; repeats within
    ``interval_s`` are only counted, and the next one logged after that says
    how many there were.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        #: kind -> (when it was last logged, repeats since)
        self._seen: dict[str, tuple[float, int]] = {}

    def _due(self, kind: str) -> int | None:
        """How many repeats went unlogged, when this one is to be logged; None otherwise."""
        now = self._clock()
        last = self._seen.get(kind)
        if last is not None and now - last[0] < self._interval:
            self._seen[kind] = (last[0], last[1] + 1)
            return None
        if len(self._seen) > 1_000:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        return 0 if last is None else last[1]

    def _emit(self, level: int, kind: str, message: str, exc_info: bool) -> None:
        repeats = self._due(kind)
        if repeats is None:
            return
        if repeats:
            message = f"{message} (and {repeats} more like it since the last such message)"
        self._log.log(level, "%s", message, exc_info=exc_info)

    def exception(self, kind: str, message: str) -> None:
        """Log ``message`` with the current exception's traceback, throttled."""
        self._emit(logging.ERROR, kind, message, True)

    def warning(self, kind: str, message: str) -> None:
        self._emit(logging.WARNING, kind, message, False)

    def info(self, kind: str, message: str) -> None:
        self._emit(logging.INFO, kind, message, False)
