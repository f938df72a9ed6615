"""KuCoin spot's classic public API: the WebSocket token, the level2 snapshot and the feed.

A client first asks ``POST /api/v1/bullet-public`` for a token and the
WebSocket servers (``instanceServers``: endpoint, ping interval), connects to
``endpoint?token=...&connectId=...``, gets ``welcome``, then subscribes
topics (``/market/level2:BTC-USDT``, ``/market/match:BTC-USDT``), each
acknowledged with ``ack``. It pings (``{"type": "ping"}``, answered
``pong``) within the ping interval; the server sends no heartbeat of its own.

``/market/level2`` carries no snapshot: changes only, each batch spanning the
book's sequence numbers ``sequenceStart`` to ``sequenceEnd``, every change
``[price, size, sequence]``. Clients align it with the REST snapshot
``GET /api/v1/market/orderbook/level2_100``, which carries its ``sequence``.
Trades (``trade.l3match``) take the liquidity they match from the book, with
the same sequence as the change they cause.

A real market never stops changing, and ccxt fetches the snapshot only once
it has cached a few updates: the mock keeps a far bid (at 1.0) coming and
going every ``activity_s`` unless that is None.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Coroutine, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now

#: Where the mock's market activity happens: far below any level a test uses.
FAR_BID = 1.0


class KucoinMock(MockExchange):
    """``POST /api/v1/bullet-public``, ``/market/level2`` and ``/market/match`` of one symbol."""

    price_places = 1
    size_places = 8

    def __init__(
        self,
        symbol: str = "BTC-USDT",
        activity_s: float | None = 0.05,
        ping_interval_ms: int = 18_000,
    ) -> None:
        super().__init__()
        self.symbol = symbol
        self.activity_s = activity_s
        self.ping_interval_ms = ping_interval_ms
        #: The book's last sequence number.
        self.sequence = 14_103_844
        self.token = secrets.token_urlsafe(24)
        #: ``ping`` messages received, over all connections.
        self.pings = 0
        self._trade_ids = itertools.count(11_067_996_711_960_577)
        # One level2 message at a time goes out to all connections, so that
        # every connection gets them in sequence order.
        self._publishing = asyncio.Lock()

    def activity(self) -> list[Coroutine[Any, Any, None]]:
        return [] if self.activity_s is None else [self._busy(self.activity_s)]

    async def _busy(self, period_s: float) -> None:
        """An order placed, then cancelled, far from the top, again and again."""
        for placed in itertools.cycle((True, False)):
            await asyncio.sleep(period_s)
            await self.update(bids=[(FAR_BID, 0.001 if placed else 0.0)])

    # -- REST ----------------------------------------------------------------------

    def rest_answer(self, path: str, query: str) -> Any:
        if path == "/api/v1/bullet-public":
            return self._ok(
                {
                    "token": self.token,
                    "instanceServers": [
                        {
                            "endpoint": f"{self.ws_url}/endpoint",
                            "encrypt": False,
                            "protocol": "websocket",
                            "pingInterval": self.ping_interval_ms,
                            "pingTimeout": 10_000,
                        }
                    ],
                }
            )
        if path in ("/api/v1/market/orderbook/level2_20", "/api/v1/market/orderbook/level2_100"):
            if parse_qs(query).get("symbol") != [self.symbol]:
                return {"code": "400100", "msg": "symbol not exists"}
            bids, asks = self.top(int(path.rpartition("_")[2]))
            return self._ok(
                {
                    "time": ms_now(),
                    "sequence": str(self.sequence),
                    "bids": [[self.price(p), self.size(s)] for p, s in bids],
                    "asks": [[self.price(p), self.size(s)] for p, s in asks],
                }
            )
        return super().rest_answer(path, query)

    @staticmethod
    def _ok(data: Any) -> Message:
        return {"code": "200000", "data": data}

    # -- WebSocket -----------------------------------------------------------------

    async def on_connect(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        query = parse_qs(urlsplit(connection.request.path).query)
        connect_id = query.get("connectId", [secrets.token_hex(6)])[0]
        if query.get("token") != [self.token]:
            await self.send(
                connection,
                {"id": connect_id, "type": "error", "code": 401, "data": "token is invalid"},
            )
            await connection.close()
            return
        await self.send(connection, {"id": connect_id, "type": "welcome"})

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        kind, request_id = message.get("type"), message.get("id")
        if kind == "ping":
            self.pings += 1
            pong = {"id": request_id, "type": "pong", "timestamp": time.time_ns() // 1000}
            await self.send(connection, pong)
            return
        if kind != "subscribe":
            await self._error(connection, request_id, 415, "type is not supported")
            return
        topic = str(message.get("topic", ""))
        prefix, _, symbols = topic.partition(":")
        channel = {"/market/level2": "level2", "/market/match": "match"}.get(prefix)
        if channel is None:
            await self._error(connection, request_id, 404, f"topic {topic} is not found")
            return
        if symbols.split(",") != [self.symbol]:
            await self._error(connection, request_id, 404, f"topic {topic} is not found")
            return
        if message.get("response"):
            await self.send(connection, {"id": request_id, "type": "ack"})
        # After the ack: the updates start with the subscription, after its answer.
        self.subscribed(connection, channel)

    async def _error(
        self, connection: ServerConnection, request_id: Any, code: int, text: str
    ) -> None:
        await self.send(connection, {"id": request_id, "type": "error", "code": code, "data": text})

    # -- the book ------------------------------------------------------------------

    def _changes(self, bids: Iterable[Level], asks: Iterable[Level]) -> Message:
        """The level2 message of these changes, each numbered with the next sequence."""
        start = self.sequence + 1
        changes: dict[str, list[list[str]]] = {"asks": [], "bids": []}
        for side, levels in (("asks", asks), ("bids", bids)):
            for price, size in levels:
                self.sequence += 1
                changes[side].append([self.price(price), self.size(size), str(self.sequence)])
        return {
            "type": "message",
            "topic": f"/market/level2:{self.symbol}",
            "subject": "trade.l2update",
            "data": {
                "changes": changes,
                "sequenceEnd": self.sequence,
                "sequenceStart": start,
                "symbol": self.symbol,
                "time": ms_now(),
            },
        }

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        async with self._publishing:
            message = self._changes(bids, asks)
            self.apply(bids, asks)
            await self.publish("level2", message)

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes changes, in sequence, that the mock's book does not take: a corrupt feed."""
        async with self._publishing:
            await self.publish("level2", self._changes(bids, asks))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change on the exchange whose message never arrives."""
        bids, asks = list(bids), list(asks)
        self.apply(bids, asks)
        self.sequence += len(bids) + len(asks)

    # -- trades --------------------------------------------------------------------

    async def trade(self, price: float, size: float, side: str) -> Message:
        """A taker's ``side`` order filling ``size`` at ``price`` against the resting orders there.

        KuCoin's ``side`` is the taker's. The match and the change it makes
        to the maker's level share their sequence number.
        """
        makers = self.asks if side == "buy" else self.bids
        left = round(makers.get(price, 0.0) - size, self.size_places)
        if left < 0:
            raise ValueError(f"not {size} resting at {price} to match a {side}")
        bids: list[Level] = [] if side == "buy" else [(price, left)]
        asks: list[Level] = [(price, left)] if side == "buy" else []
        async with self._publishing:
            book = self._changes(bids, asks)
            self.apply(bids, asks)
            data = {
                "makerOrderId": secrets.token_hex(12),
                "price": self.price(price),
                "sequence": str(self.sequence),
                "side": side,
                "size": self.size(size),
                "symbol": self.symbol,
                "takerOrderId": secrets.token_hex(12),
                "time": str(time.time_ns()),
                "tradeId": str(next(self._trade_ids)),
                "type": "match",
            }
            await self.publish(
                "match",
                {
                    "type": "message",
                    "topic": f"/market/match:{self.symbol}",
                    "subject": "trade.l3match",
                    "data": data,
                },
            )
            await self.publish("level2", book)
        return data
