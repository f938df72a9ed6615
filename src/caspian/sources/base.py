"""What every market data source is to the rest of the service."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from caspian.book import OrderBook
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

    def publish_depth(self, symbol: str, depth: int) -> OrderBook | None:
        """Asks for the changes to the top ``depth`` levels of ``symbol``'s book only.

        A gateway in the source's process asks, so that it neither ranks the
        levels again nor keeps a copy of the book. When the source does it,
        it returns the book it keeps for ``symbol``, for the gateway to read
        and never to change: every book event of ``symbol`` after this call
        carries exactly the changes to that book's top ``depth`` (a snapshot
        marks it whole again), and the book already holds each event's
        changes when the event arrives. None (the default) when its events
        stay as they are. The answer, and the book, stay the same for as long
        as the symbol is watched.
        """
        return None

    def unserved(self, symbol: str) -> str | None:
        """Why this source will never have events of ``symbol``; None when it may.

        A Subscribe to such a symbol is refused with the reason, rather than
        answered 200 and left ``disconnected`` for ever.
        """
        return None
