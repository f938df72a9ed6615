"""Failed-login limiting, per key id, user name and client address."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic


class LoginLimiter:
    """Counts failures in a sliding window; at the limit a subject is locked.

    A subject is locked while ``max_failures`` of its failures fall within the
    last ``window_s`` seconds, so the lock lifts when the oldest of those is
    ``window_s`` old: at most ``max_failures`` tries per window. A success does
    not erase failures: otherwise an attacker who knows one valid login could
    reset the counter of an address at will.
    """

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        clock: Callable[[], float] = monotonic,
        max_subjects: int = 100_000,
    ) -> None:
        self._max = max_failures
        self._window = window_s
        self._clock = clock
        self._max_subjects = max_subjects
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, subject: str, now: float) -> deque[float] | None:
        times = self._failures.get(subject)
        if times is None:
            return None
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[subject]
            return None
        return times

    def retry_after(self, subjects: Iterable[str]) -> int:
        """Seconds to wait before any of ``subjects`` may try again; 0 when none is locked."""
        now = self._clock()
        wait = 0.0
        for subject in subjects:
            times = self._recent(subject, now)
            if times is not None and len(times) >= self._max:
                wait = max(wait, times[-self._max] + self._window - now)
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, subjects: Iterable[str]) -> None:
        now = self._clock()
        for subject in subjects:
            times = self._recent(subject, now)
            if times is None:
                if len(self._failures) >= self._max_subjects:
                    self._prune(now)
                times = self._failures.setdefault(subject, deque(maxlen=self._max))
            times.append(now)

    def _prune(self, now: float) -> None:
        # Bounded memory under a spray of distinct subjects: drop expired ones,
        # then the oldest half if that was not enough.
        for subject in list(self._failures):
            self._recent(subject, now)
        if len(self._failures) >= self._max_subjects:
            oldest = sorted(self._failures, key=lambda s: self._failures[s][-1])
            for subject in oldest[: len(oldest) // 2]:
                del self._failures[subject]
