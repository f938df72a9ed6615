"""What every market data source is to the rest of the service."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from caspian.events import Event

EventSink = Callable[[Event], None]


class Source(ABC):
    """Turns the outside world into normalized events.

    The gateway calls :meth:`watch` when a client first wants a symbol and
    :meth:`unwatch` after the last one left; a source must only spend work on
    watched symbols. :meth:`run` delivers events to ``sink`` until cancelled.
    """

    @abstractmethod
    async def run(self, sink: EventSink) -> None: ...

    @abstractmethod
    def watch(self, symbol: str) -> None: ...

    @abstractmethod
    def unwatch(self, symbol: str) -> None: ...

    def publish_depth(self, symbol: str, depth: int) -> bool:
        """Asks for the changes to the top ``depth`` levels of ``symbol``'s book only.

        True when the source does it: every book event of ``symbol`` after
        this call then carries exactly those changes (a snapshot: that top),
        until the next call; and when ``depth`` is deeper than before and the
        symbol's book is served, its new top went out as a snapshot during
        the call. False (the default) when its book events stay as they are.
        A gateway in the same process asks, so that it need not rank the
        levels again itself.
        """
        return False

    def unserved(self, symbol: str) -> str | None:
        """Why this source will never have events of ``symbol``; None when it may.

        A Subscribe to such a symbol is refused with the reason, rather than
        answered 200 and left ``disconnected`` for ever.
        """
        return None
