"""Bithumb's public WebSocket (``wss://ws-api.bithumb.com/websocket/v1``).

This is the API ccxt.pro calls generation 2 and uses by default. A client
sends one JSON array per subscription: ``[{"ticket": ...}, {"type":
"orderbook" | "trade", "codes": ["KRW-BTC"], ...}, {"format": ...}]``. There
is no acknowledgement; data follows, first the state at the time of the
request (``"stream_type": "SNAPSHOT"``), then the stream (``"REALTIME"``),
unless the request sets ``is_only_realtime`` or ``is_only_snapshot``:

- ``orderbook``: every message holds the whole top of the book, up to 30
  ``orderbook_units`` pairing the n-th best ask with the n-th best bid;
  one is sent whenever that top changes.
- ``trade``: one trade per message; the snapshot is the latest trade.
  ``ask_bid`` is the taker's side (``BID`` when they bought).

There are no server heartbeats: clients ping at the WebSocket level.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now

#: Units of an orderbook message when the request names no count.
UNITS = 30


class BithumbMock(MockExchange):
    """The ``orderbook`` and ``trade`` streams of one market."""

    def __init__(self, code: str = "KRW-BTC") -> None:
        super().__init__()
        self.code = code
        self._sequential_ids = itertools.count(17_256_234_567_890_000)
        #: The latest trade, the ``trade`` snapshot of a new subscriber.
        self.last_trade = self._trade(99.0, 0.25, "ASK", ms_now() - 2_000, "SNAPSHOT")

    async def on_message(self, connection: ServerConnection, message: Any) -> None:
        if not (
            isinstance(message, list)
            and all(isinstance(part, dict) for part in message)
            and message
            and "ticket" in message[0]
        ):
            await self._error(connection, "WRONG_FORMAT")
            return
        for request in message[1:]:
            kind = request.get("type")
            if kind is None:
                # ``format`` and the like.
                continue
            if kind not in ("orderbook", "trade") or request.get("codes") != [self.code]:
                await self._error(connection, "INVALID_PARAM")
                continue
            if not request.get("is_only_snapshot"):
                self.subscribed(connection, kind)
            if request.get("is_only_realtime"):
                continue
            if kind == "orderbook":
                await self.send(connection, self._book(*self.top(UNITS), "SNAPSHOT"))
            else:
                await self.send(connection, self.last_trade)

    async def _error(self, connection: ServerConnection, name: str) -> None:
        await self.send(connection, {"error": {"name": name, "message": name}})

    def _book(self, bids: list[Level], asks: list[Level], stream_type: str) -> Message:
        units = []
        for i in range(max(len(bids), len(asks))):
            # A side shorter than the other pads its part of the unit with zeros.
            ask_price, ask_size = asks[i] if i < len(asks) else (0.0, 0.0)
            bid_price, bid_size = bids[i] if i < len(bids) else (0.0, 0.0)
            units.append(
                {
                    "ask_price": ask_price,
                    "bid_price": bid_price,
                    "ask_size": ask_size,
                    "bid_size": bid_size,
                }
            )
        return {
            "type": "orderbook",
            "code": self.code,
            "total_ask_size": round(sum(size for _, size in asks), 8),
            "total_bid_size": round(sum(size for _, size in bids), 8),
            "orderbook_units": units,
            "level": 0,
            "timestamp": ms_now(),
            "stream_type": stream_type,
        }

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        before = self.top(UNITS)
        self.apply(bids, asks)
        after = self.top(UNITS)
        if after != before:
            await self.publish("orderbook", self._book(*after, "REALTIME"))

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes the top as it would be with the changes, which the book does not take."""
        saved = dict(self.bids), dict(self.asks)
        self.apply(bids, asks)
        book = self._book(*self.top(UNITS), "REALTIME")
        self.bids, self.asks = saved
        await self.publish("orderbook", book)

    def _trade(
        self, price: float, volume: float, ask_bid: str, timestamp: int, stream_type: str
    ) -> Message:
        at = datetime.fromtimestamp(timestamp / 1000, UTC)
        return {
            "type": "trade",
            "code": self.code,
            "trade_price": price,
            "trade_volume": volume,
            "ask_bid": ask_bid,
            "prev_closing_price": 98.0,
            "change": "RISE" if price > 98.0 else "FALL",
            "change_price": abs(price - 98.0),
            "trade_date": at.strftime("%Y-%m-%d"),
            "trade_time": at.strftime("%H:%M:%S"),
            "trade_timestamp": timestamp,
            "sequential_id": next(self._sequential_ids),
            "timestamp": ms_now(),
            "stream_type": stream_type,
        }

    async def trade(self, price: float, volume: float, side: str) -> Message:
        """A trade, ``side`` the taker's."""
        ask_bid = "BID" if side == "buy" else "ASK"
        self.last_trade = self._trade(price, volume, ask_bid, ms_now(), "REALTIME")
        await self.publish("trade", self.last_trade)
        return self.last_trade
