"""Bitstamp's WebSocket API v2 (``wss://ws.bitstamp.net``) and its REST order book.

A client sends ``{"event": "bts:subscribe", "data": {"channel": ...}}`` and
gets ``{"event": "bts:subscription_succeeded", "channel": ..., "data": {}}``;
then each message is ``{"event": ..., "channel": ..., "data": {...}}``:

- ``diff_order_book_<pair>`` (event ``data``): the levels that changed, as
  ``[price, amount]`` strings, amount 0 removing one, stamped with
  ``timestamp`` (s) and ``microtimestamp`` (µs). There is no snapshot on
  the channel: a client takes ``GET /api/v2/order_book/<pair>/``, whose
  ``microtimestamp`` is that of the last change it includes, and applies
  the changes stamped later.
- ``live_trades_<pair>`` (event ``trade``): each trade, ``type`` 0 when the
  taker bought, 1 when they sold.

There are no server heartbeats. A live market changes all the time, which
ccxt relies on: it asks for the REST book only after a few changes came.
So the mock's market keeps moving far below the top, every
``activity_s``, as long as it runs.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange

#: The level the market's own activity comes and goes at, far below any test's.
ACTIVITY_BID = (1.0, 0.1)


class BitstampMock(MockExchange):
    """The ``diff_order_book`` and ``live_trades`` channels and the REST book of one pair."""

    price_places = 2
    size_places = 8

    def __init__(self, pair: str = "btcusd", activity_s: float = 0.05) -> None:
        super().__init__()
        self.pair = pair
        self.activity_s = activity_s
        #: The ``microtimestamp`` of the last change published.
        self.micros = time.time_ns() // 1000
        self._trade_ids = itertools.count(108_637_852)
        self._order_ids = itertools.count(1_207_590_500_704_256)

    def activity(self) -> list[Coroutine[Any, Any, None]]:
        return [self._market()]

    async def _market(self) -> None:
        price, size = ACTIVITY_BID
        for present in itertools.cycle((True, False)):
            await asyncio.sleep(self.activity_s)
            await self.update(bids=[(price, size if present else 0.0)])

    def rest_answer(self, path: str, query: str) -> object:
        if path == f"/api/v2/order_book/{self.pair}/":
            bids, asks = self.top(10_000)
            return {
                "timestamp": str(self.micros // 1_000_000),
                "microtimestamp": str(self.micros),
                "bids": self._levels(bids),
                "asks": self._levels(asks),
            }
        return super().rest_answer(path, query)

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        channel = str((message.get("data") or {}).get("channel", ""))
        kind, _, pair = channel.rpartition("_")
        if (
            message.get("event") != "bts:subscribe"
            or kind not in ("diff_order_book", "live_trades")
            or pair != self.pair
        ):
            await self.send(
                connection,
                {
                    "event": "bts:error",
                    "channel": "",
                    "data": {"code": None, "message": "Bad subscription string."},
                },
            )
            return
        self.subscribed(connection, kind)
        await self.send(
            connection, {"event": "bts:subscription_succeeded", "channel": channel, "data": {}}
        )

    def _levels(self, levels: Iterable[Level]) -> list[list[str]]:
        return [[self.price(p), self.size(s)] for p, s in levels]

    def _stamp(self) -> int:
        """A ``microtimestamp`` later than every one before: ccxt orders changes by it."""
        self.micros = max(self.micros + 1, time.time_ns() // 1000)
        return self.micros

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        micros = self._stamp()
        await self.publish(
            "diff_order_book",
            {
                "data": {
                    "timestamp": str(micros // 1_000_000),
                    "microtimestamp": str(micros),
                    "bids": self._levels(bids),
                    "asks": self._levels(asks),
                },
                "channel": f"diff_order_book_{self.pair}",
                "event": "data",
            },
        )

    async def trade(self, price: float, amount: float, side: str) -> Message:
        """A trade, ``side`` the taker's."""
        micros = time.time_ns() // 1000
        buy_order, sell_order = next(self._order_ids), next(self._order_ids)
        data: Message = {
            "id": next(self._trade_ids),
            "timestamp": str(micros // 1_000_000),
            "amount": amount,
            "amount_str": self.size(amount),
            "price": price,
            "price_str": self.price(price),
            "type": 0 if side == "buy" else 1,
            "microtimestamp": str(micros),
            "buy_order_id": buy_order,
            "sell_order_id": sell_order,
        }
        await self.publish(
            "live_trades", {"data": data, "channel": f"live_trades_{self.pair}", "event": "trade"}
        )
        return data
