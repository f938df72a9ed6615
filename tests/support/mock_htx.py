"""HTX's (formerly Huobi's) spot market WebSocket API, as ``wss://api.huobi.pro`` speaks it.

``/feed`` serves ``market.$symbol.mbp.150``: incremental updates chained by
``seqNum``/``prevSeqNum``, each with both sides (an empty list for a side
without changes) and, when nothing changed in the last 100 ms, a blank one;
a ``req`` of the same topic on the same connection answers the book itself
with its ``seqNum``. ``/ws`` serves ``market.$symbol.trade.detail``. Every
frame the server sends is gzip-compressed JSON; the server pings
(``{"ping": ts}``) and closes a connection that leaves two pings unanswered
(``{"pong": ts}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
from collections.abc import Coroutine, Iterable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now

FEED_PATH = "/feed"
WS_PATH = "/ws"


class HtxMock(MockExchange):
    """HTX's spot ``mbp.150`` book and ``trade.detail`` trades of one symbol."""

    def __init__(self, symbol: str = "btcusdt", ping_s: float = 5.0) -> None:
        super().__init__()
        self.symbol = symbol
        self.ping_s = ping_s
        self.seq_num = 104_998_984_977
        #: ``pong`` answers received, over all connections.
        self.pongs = 0
        self._book_topic = f"market.{symbol}.mbp.150"
        self._trade_topic = f"market.{symbol}.trade.detail"
        self._unanswered: dict[ServerConnection, int] = {}
        self._trade_ids = itertools.count(102_090_727_790)
        self._tick_ids = itertools.count(105_004_645_372)
        # Numbers a message's seqNum and sends it as one step, so that the
        # blank updates of the ticker never overtake a change.
        self._sequencing = asyncio.Lock()

    def activity(self) -> list[Coroutine[Any, Any, None]]:
        return [self._tick()]

    async def send(self, connection: ServerConnection, message: Any) -> None:
        # HTX's legacy trade ids exceed 64 bits, which orjson refuses to write.
        await self.send_text(connection, json.dumps(message, separators=(",", ":")))

    async def send_text(self, connection: ServerConnection, text: str) -> None:
        """HTX gzips every frame it sends."""
        if connection in self._stalled:
            return
        with contextlib.suppress(ConnectionClosed):
            await connection.send(gzip.compress(text.encode()))

    def _error(self, request_id: Any, text: str) -> Message:
        return {
            "status": "error",
            "ts": ms_now(),
            "id": request_id,
            "err-code": "bad-request",
            "err-msg": text,
        }

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if "pong" in message:
            self.pongs += 1
            self._unanswered[connection] = 0
            return
        request_id = message.get("id")
        path = connection.request.path if connection.request is not None else ""
        topic = message.get("sub") or message.get("req")
        channel = {
            (self._book_topic, FEED_PATH): "mbp.150",
            (self._trade_topic, WS_PATH): "trade.detail",
        }.get((str(topic), path))
        if "sub" in message and channel is not None:
            await self.send(
                connection, {"id": request_id, "status": "ok", "subbed": topic, "ts": ms_now()}
            )
            self.subscribed(connection, channel)
        elif "req" in message and channel == "mbp.150":
            async with self._sequencing:
                bids, asks = self.top(150)
                data = {
                    "seqNum": self.seq_num,
                    "bids": [[p, s] for p, s in bids],
                    "asks": [[p, s] for p, s in asks],
                }
                await self.send(
                    connection,
                    {"id": request_id, "rep": topic, "status": "ok", "ts": ms_now(), "data": data},
                )
        else:
            await self.send(connection, self._error(request_id, f"invalid topic {topic}"))

    async def _tick(self) -> None:
        """The blank updates every 100 ms, and the pings."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self.ping_s
        while True:
            await asyncio.sleep(0.1)
            async with self._sequencing:
                await self._publish_book([], [])
            if loop.time() >= next_ping:
                next_ping += self.ping_s
                await self._ping()

    async def _ping(self) -> None:
        for gone in [c for c in self._unanswered if c not in self.connections]:
            del self._unanswered[gone]
        for connection in list(self.connections):
            if connection in self._stalled:
                continue
            if self._unanswered.get(connection, 0) >= 2:
                await connection.close()
                continue
            self._unanswered[connection] = self._unanswered.get(connection, 0) + 1
            await self.send(connection, {"ping": ms_now()})

    async def _publish_book(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        previous = self.seq_num
        # HTX's sequence counts the engine's events, not the messages.
        self.seq_num += 17
        tick = {
            "seqNum": self.seq_num,
            "prevSeqNum": previous,
            "bids": [[p, s] for p, s in bids],
            "asks": [[p, s] for p, s in asks],
        }
        await self.publish("mbp.150", {"ch": self._book_topic, "ts": ms_now(), "tick": tick})

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        async with self._sequencing:
            self.apply(bids, asks)
            await self._publish_book(bids, asks)

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes changes without applying them to the mock's own book."""
        async with self._sequencing:
            await self._publish_book(bids, asks)

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change on the exchange whose message never arrives."""
        self.apply(bids, asks)
        self.seq_num += 17

    async def trade(self, price: float, amount: float, direction: str) -> Message:
        """A trade; HTX's ``direction`` is the taker's side."""
        tick_id = next(self._tick_ids)
        now = ms_now()
        data = {
            # The legacy id, derived from the tick's; ``tradeId`` replaces it.
            "id": tick_id * 10**11 + 73_190_000_000,
            "ts": now,
            "tradeId": next(self._trade_ids),
            "amount": amount,
            "price": price,
            "direction": direction,
        }
        message = {
            "ch": self._trade_topic,
            "ts": now,
            "tick": {"id": tick_id, "ts": now, "data": [data]},
        }
        await self.publish("trade.detail", message)
        return data
