"""HitBTC's public WebSocket API v3 (``wss://api.hitbtc.com/api/3/ws/public``).

A client sends ``{"method": "subscribe", "ch": ..., "params": {"symbols":
[...]}, "id": n}`` and gets ``{"result": {"ch": ..., "subscriptions": [...]},
"id": n}``, then notifications ``{"ch": ..., "snapshot" | "update": {symbol:
...}}``. ``orderbook/full`` sends the whole book, then the changed levels
(quantity 0 removes one); each of its messages carries the symbol's sequence
number ``s``, which this mock raises by one per message, so that a lost
update shows as a jump. ``trades`` sends a snapshot of the last ``params.limit`` trades
(none by default), then each trade. There are no server heartbeats: clients
ping at the WebSocket level.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now


class HitbtcMock(MockExchange):
    """The ``orderbook/full`` and ``trades`` channels of one symbol."""

    price_places = 2
    size_places = 5

    def __init__(self, symbol: str = "BTCUSDT") -> None:
        super().__init__()
        self.symbol = symbol
        self.sequence = 27_617_207
        self._trade_ids = itertools.count(1_555_634_969)
        #: Trades before any test's, which a trades snapshot may replay.
        self.history = [self._trade(99.0, 0.25, "sell", ms_now() - 60_000)]

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        channel = message.get("ch")
        params = message.get("params") or {}
        if message.get("method") != "subscribe" or channel not in ("orderbook/full", "trades"):
            await self._error(connection, message, -32601, "Method not found")
            return
        if params.get("symbols") != [self.symbol]:
            await self._error(connection, message, 2001, "Symbol not found")
            return
        self.subscribed(connection, channel)
        await self.send(
            connection,
            {"result": {"ch": channel, "subscriptions": [self.symbol]}, "id": message.get("id")},
        )
        if channel == "orderbook/full":
            bids, asks = self.top(10_000)
            await self.send(connection, self._book("snapshot", bids, asks))
        else:
            limit = int(params.get("limit", 0))
            replayed = self.history[-limit:] if limit else []
            await self.send(connection, {"ch": "trades", "snapshot": {self.symbol: replayed}})

    async def _error(
        self, connection: ServerConnection, message: Message, code: int, text: str
    ) -> None:
        await self.send(
            connection,
            {
                "jsonrpc": "2.0",
                "error": {"code": code, "message": text, "description": str(message.get("ch"))},
                "id": message.get("id"),
            },
        )

    def _book(self, kind: str, bids: Iterable[Level], asks: Iterable[Level]) -> Message:
        return {
            "ch": "orderbook/full",
            kind: {
                self.symbol: {
                    "t": ms_now(),
                    "s": self.sequence,
                    "a": [[self.price(p), self.size(q)] for p, q in asks],
                    "b": [[self.price(p), self.size(q)] for p, q in bids],
                }
            },
        }

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        self.sequence += 1
        await self.publish("orderbook/full", self._book("update", bids, asks))

    def _trade(self, price: float, qty: float, side: str, timestamp: int) -> Message:
        return {
            "t": timestamp,
            "i": next(self._trade_ids),
            "p": self.price(price),
            "q": self.size(qty),
            "s": side,
        }

    async def trade(self, price: float, qty: float, side: str) -> Message:
        """A trade; ``side`` is the taker's."""
        row = self._trade(price, qty, side, ms_now())
        self.history.append(row)
        await self.publish("trades", {"ch": "trades", "update": {self.symbol: [row]}})
        return row
