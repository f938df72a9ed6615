"""Coinone's public WebSocket (``wss://stream.coinone.co.kr``), in its published message format.

A client sends ``{"request_type": "SUBSCRIBE", "channel": ..., "topic":
{"quote_currency": "KRW", "target_currency": "BTC"}}`` per channel and gets
``SUBSCRIBED``, then ``DATA`` messages. ``ORDERBOOK`` sends the book once on
subscribing and again on every change, each time whole: the best levels of
each side, with no sequence number to follow (its ``id`` only grows). ``TRADE``
sends each trade as it happens, nothing from before. There are no server
heartbeats: the client sends ``{"request_type": "PING"}`` and gets ``PONG``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now, plain


class CoinoneMock(MockExchange):
    """The ``ORDERBOOK`` and ``TRADE`` channels of one market, and ``PING``."""

    def __init__(self, target: str = "BTC", quote: str = "KRW", depth: int = 15) -> None:
        super().__init__()
        self.target = target
        self.quote = quote
        #: Levels a side in each ORDERBOOK message.
        self.depth = depth
        self._message_ids = itertools.count(1)

    def _topic(self) -> Message:
        return {"quote_currency": self.quote, "target_currency": self.target}

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        request = message.get("request_type")
        if request == "PING":
            await self.send(connection, {"response_type": "PONG"})
            return
        channel = message.get("channel")
        if (
            request != "SUBSCRIBE"
            or channel not in ("ORDERBOOK", "TRADE")
            or message.get("topic") != self._topic()
        ):
            await self.send(
                connection,
                {"response_type": "ERROR", "error_code": 160012, "message": "Invalid Topic"},
            )
            return
        self.subscribed(connection, channel)
        await self.send(
            connection, {"response_type": "SUBSCRIBED", "channel": channel, "data": self._topic()}
        )
        if channel == "ORDERBOOK":
            await self.send(connection, self._orderbook(self.bids, self.asks))

    def _orderbook(self, bids: dict[float, float], asks: dict[float, float]) -> Message:
        now = ms_now()
        best_bids = sorted(bids.items(), reverse=True)[: self.depth]
        best_asks = sorted(asks.items())[: self.depth]
        return {
            "response_type": "DATA",
            "channel": "ORDERBOOK",
            "data": {
                **self._topic(),
                "timestamp": now,
                # Only ever larger: the time and a counter, as Coinone writes it.
                "id": f"{now}{next(self._message_ids) % 1000:03d}",
                # Coinone lists asks from the highest down, as its order book page shows them.
                "asks": [{"price": plain(p), "qty": plain(q)} for p, q in reversed(best_asks)],
                "bids": [{"price": plain(p), "qty": plain(q)} for p, q in best_bids],
            },
        }

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes the book with the changes, which the mock's own book may not have taken."""
        await self.publish("ORDERBOOK", self._orderbook(*self.changed(bids, asks)))

    async def trade(self, price: float, qty: float, seller_is_maker: bool) -> Message:
        """A trade; ``is_seller_maker`` true means a resting sell order met a buying taker."""
        now = ms_now()
        data = {
            **self._topic(),
            "id": f"{now}{next(self._message_ids) % 1000:03d}",
            "timestamp": now,
            "price": plain(price),
            "qty": plain(qty),
            "is_seller_maker": seller_is_maker,
        }
        await self.publish("TRADE", {"response_type": "DATA", "channel": "TRADE", "data": data})
        return data
