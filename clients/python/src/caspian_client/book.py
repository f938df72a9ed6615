"""A Level2 book kept from a subscription's messages, never across a gap (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from caspian_client.models import Level2Message, LevelChange


@dataclass(frozen=True)
class PriceLevel:
    price: float
    size: float


@dataclass(frozen=True)
class Book:
    """The top of a book as the server holds it: bids best (highest) first, asks best
    (lowest) first."""

    symbol: str
    bids: tuple[PriceLevel, ...]
    asks: tuple[PriceLevel, ...]
    depth_stream: str | None
    exchange_timestamp: datetime | None
    caspian_timestamp: datetime | None

    @property
    def best_bid(self) -> PriceLevel | None:
        return self.bids[0] if self.bids else None

    @property
    def best_ask(self) -> PriceLevel | None:
        return self.asks[0] if self.asks else None

    def levels(self) -> dict[tuple[str, float], float]:
        """Every level as ``(side, price) -> size``: handy for comparing books."""
        return {("bid", level.price): level.size for level in self.bids} | {
            ("ask", level.price): level.size for level in self.asks
        }


@dataclass(frozen=True)
class Level2Update:
    """What a Level2 iterator yields: the book after ``message`` was applied.

    ``whole`` says the message was a whole top-N that replaced the book (the first
    one of a subscription, after every reconnect, and after the depth stream was
    disconnected upstream); otherwise it carried changes only.
    """

    book: Book
    message: Level2Message
    whole: bool

    @property
    def changes(self) -> tuple[LevelChange, ...]:
        return self.message.changes


class BookKeeper:
    """Applies one subscription's Level2 messages in order.

    After ``restart()`` (a new subscription, on a new connection) it waits for the
    next non-empty message, the whole top-N, and starts the book from it; nothing is
    yielded before, so a book is never built across a gap. After the server says the
    depth stream was disconnected, the next non-empty message is a whole top-N again
    and replaces the book.
    """

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self._bids: dict[float, float] = {}
        self._asks: dict[float, float] = {}
        self._whole_next = True
        self._started = False
        self._depth_stream: str | None = None
        self._exchange_timestamp: datetime | None = None
        self._caspian_timestamp: datetime | None = None

    @property
    def started(self) -> bool:
        return self._started

    def restart(self) -> None:
        self._bids.clear()
        self._asks.clear()
        self._whole_next = True
        self._started = False

    def apply(self, message: Level2Message) -> Level2Update | None:
        """The update to yield for ``message``, or None while waiting for a whole top-N."""
        if message.depth_stream is not None:
            if message.depth_stream != "connected" and self._depth_stream == "connected":
                self._whole_next = True
            self._depth_stream = message.depth_stream
        if message.exchange_timestamp is not None:
            self._exchange_timestamp = message.exchange_timestamp
        if message.caspian_timestamp is not None:
            self._caspian_timestamp = message.caspian_timestamp
        whole = False
        if self._whole_next and message.changes:
            self._bids.clear()
            self._asks.clear()
            self._whole_next = False
            self._started = True
            whole = True
        if not self._started:
            return None
        for change in message.changes:
            side = self._bids if change.side == "bid" else self._asks
            if change.size == 0:
                side.pop(change.price, None)
            else:
                side[change.price] = change.size
        return Level2Update(self.book(), message, whole)

    def book(self) -> Book:
        return Book(
            symbol=self.symbol,
            bids=tuple(PriceLevel(p, self._bids[p]) for p in sorted(self._bids, reverse=True)),
            asks=tuple(PriceLevel(p, self._asks[p]) for p in sorted(self._asks)),
            depth_stream=self._depth_stream,
            exchange_timestamp=self._exchange_timestamp,
            caspian_timestamp=self._caspian_timestamp,
        )
