"""Reconnect delays: exponential, capped, with jitter (no I/O)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """The delay before each reconnect attempt: ``initial * factor**attempt`` capped at
    ``maximum``, each drawn at random from its upper ``jitter`` part, so that the many
    clients a server restart disconnects at once do not all come back at once."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter <= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self.attempt = 0

    def next_delay(self, at_least: float = 0.0) -> float:
        """The delay before the next attempt (never below ``at_least``, e.g. a server's
        Retry-After), counting the attempt."""
        ceiling = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return max(at_least, ceiling * (1 - self.jitter * self._rand()))

    def reset(self) -> None:
        self.attempt = 0
