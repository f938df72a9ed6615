"""Poloniex's v3 public WebSocket (``wss://ws.poloniex.com/ws/public``).

A client sends ``{"event": "subscribe", "channel": [...], "symbols": [...]}``
and gets the same back as the acknowledgement, then ``{"channel": ...,
"data": [...]}`` messages. ``book_lv2`` sends the book (``"action":
"snapshot"``), then the changed levels (``"action": "update"``, quantity 0
removes one); every message has an ``id`` and names the one before it in
``lastId``, so that a lost update shows as a ``lastId`` that is not the last
``id`` seen. ``trades`` sends each trade as it happens. There are no server
heartbeats: the client sends ``{"event": "ping"}`` and gets ``pong``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now


class PoloniexMock(MockExchange):
    """The ``book_lv2`` and ``trades`` channels of one symbol, and pings."""

    price_places = 2
    size_places = 6

    def __init__(self, symbol: str = "BTC_USDT") -> None:
        super().__init__()
        self.symbol = symbol
        self.book_id = 164_148_724
        self._trade_ids = itertools.count(62_486_976)

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        event = message.get("event")
        if event == "ping":
            await self.send(connection, {"event": "pong"})
            return
        channels = message.get("channel")
        if event != "subscribe" or not isinstance(channels, list):
            await self.send(connection, {"event": "error", "message": "Invalid request"})
            return
        if message.get("symbols") != [self.symbol]:
            await self.send(
                connection,
                {"event": "error", "message": f"Invalid symbols value {message.get('symbols')}"},
            )
            return
        for channel in channels:
            if channel not in ("book_lv2", "trades"):
                await self.send(
                    connection,
                    {"event": "error", "message": f'Invalid channel value ["{channel}"]'},
                )
                continue
            self.subscribed(connection, channel)
            await self.send(
                connection, {"event": "subscribe", "channel": channel, "symbols": [self.symbol]}
            )
            if channel == "book_lv2":
                bids, asks = self.top(10_000)
                await self.send(connection, self._book("snapshot", bids, asks))

    def _book(self, action: str, bids: Iterable[Level], asks: Iterable[Level]) -> Message:
        now = ms_now()
        return {
            "channel": "book_lv2",
            "data": [
                {
                    "symbol": self.symbol,
                    "createTime": now,
                    "asks": [[self.price(p), self.size(q)] for p, q in asks],
                    "bids": [[self.price(p), self.size(q)] for p, q in bids],
                    "lastId": self.book_id - 1,
                    "id": self.book_id,
                    "ts": now,
                }
            ],
            "action": action,
        }

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change on the exchange whose message never arrives."""
        self.apply(bids, asks)
        self.book_id += 1

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        self.book_id += 1
        await self.publish("book_lv2", self._book("update", bids, asks))

    async def trade(self, price: float, quantity: float, taker_side: str) -> Message:
        now = ms_now()
        row = {
            "symbol": self.symbol,
            "amount": self.price(price * quantity),
            "quantity": self.size(quantity),
            "takerSide": taker_side,
            "createTime": now,
            "price": self.price(price),
            "id": str(next(self._trade_ids)),
            "ts": now,
        }
        await self.publish("trades", {"channel": "trades", "data": [row]})
        return row
