"""Which source instances a gateway hears, and for how long it has not: pure, clock passed in.

Every source instance publishes a heartbeat with its epoch about three times
per ``timeout_s``. A gateway's feed of a symbol belongs to one epoch (the one
whose snapshot it joined); the feed is alive while that epoch was heard
within ``timeout_s``. A heartbeat is per instance, not per symbol, so a
symbol with no events for minutes is never taken for dead while its source
lives.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic


class SourceLiveness:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        #: epoch -> when it was last heard
        self._heard: dict[str, float] = {}

    def heard(self, epoch: str) -> None:
        self._heard[epoch] = self._clock()

    def alive(self, epoch: str | None, since: float) -> bool:
        """Whether ``epoch`` was heard within the timeout, counting from ``since`` at the
        earliest (when the feed joined it: its first heartbeat may still be on the way)."""
        last = max(self._heard.get(epoch, since) if epoch is not None else since, since)
        return self._clock() - last <= self.timeout_s

    def now(self) -> float:
        return self._clock()

    def sources(self) -> dict[str, float]:
        """Each epoch heard within the timeout, with the seconds since its last heartbeat.

        Epochs silent for ten timeouts are forgotten: a restarted source has a new one.
        """
        now = self._clock()
        for epoch in [e for e, at in self._heard.items() if now - at > 10 * self.timeout_s]:
            del self._heard[epoch]
        return {e: now - at for e, at in self._heard.items() if now - at <= self.timeout_s}
