"""Korbit's v2 public WebSocket (``wss://ws-api.korbit.co.kr/v2/public``), as published.

Served at ``/v2/public``. A client sends a JSON array of requests,
``[{"method": "subscribe", "type": "orderbook", "symbols": ["btc_krw"],
"requestId": 1}]``; a request with a ``requestId`` is answered
``{"status": "success", "requestId": 1}``, an unknown symbol
``{"status": "fail", "code": "INVALID_SYMBOL", ...}``, and anything but an
array ``{"status": "fail", "message": "invalid_format"}``. Data messages:

- ``orderbook``: the whole top 30 of each side in every message, bids
  descending and asks ascending, as ``{"price", "qty"}`` strings; the first
  after subscribing has ``"snapshot": true``, the later ones no such key;
- ``trade``: a list of trades; on subscribing, the latest one as a snapshot.

No sequence numbers, no checksum, no JSON heartbeats.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now, plain

DEPTH = 30


class KorbitMock(MockExchange):
    """The ``orderbook`` and ``trade`` channels of one pair."""

    def __init__(self, symbol: str = "btc_krw") -> None:
        super().__init__()
        self.symbol = symbol
        self._trade_ids = itertools.count(25_441_720, 3)
        #: The latest trade, sent as the trade snapshot on subscribing.
        self.last_trade: Message = self._trade(99.5, 0.1, buyer_is_taker=False)

    async def on_message(self, connection: ServerConnection, message: Any) -> None:
        if not isinstance(message, list):
            await self.send(connection, {"status": "fail", "message": "invalid_format"})
            return
        for request in message:
            await self._request(connection, request)

    async def _request(self, connection: ServerConnection, request: Any) -> None:
        request_id = request.get("requestId") if isinstance(request, dict) else None
        reply: Message = {"requestId": request_id} if request_id is not None else {}
        kind = request.get("type") if isinstance(request, dict) else None
        if kind not in ("orderbook", "trade", "ticker") or request.get("method") != "subscribe":
            await self.send(
                connection,
                {"status": "fail", "code": "INVALID_REQUEST", "message": "unknown_type", **reply},
            )
            return
        symbols = request.get("symbols")
        if symbols != [self.symbol]:
            await self.send(
                connection,
                {
                    "status": "fail",
                    "code": "INVALID_SYMBOL",
                    "message": f"The symbol does not exist ({','.join(map(str, symbols or []))})",
                    **reply,
                },
            )
            return
        self.subscribed(connection, kind)
        if reply:
            await self.send(connection, {"status": "success", **reply})
        if kind == "orderbook":
            await self.send(connection, self._orderbook(self.bids, self.asks, snapshot=True))
        elif kind == "trade":
            await self.send(connection, self._frame("trade", [self.last_trade], snapshot=True))

    def _frame(self, kind: str, data: Any, snapshot: bool = False) -> Message:
        frame: Message = {"symbol": self.symbol, "timestamp": ms_now(), "type": kind}
        if snapshot:
            frame["snapshot"] = True
        frame["data"] = data
        return frame

    def _orderbook(
        self, bids: dict[float, float], asks: dict[float, float], snapshot: bool = False
    ) -> Message:
        best_bids = sorted(bids.items(), reverse=True)[:DEPTH]
        best_asks = sorted(asks.items())[:DEPTH]
        return self._frame(
            "orderbook",
            {
                "timestamp": ms_now(),
                "asks": [{"price": plain(p), "qty": plain(q)} for p, q in best_asks],
                "bids": [{"price": plain(p), "qty": plain(q)} for p, q in best_bids],
            },
            snapshot,
        )

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes the top 30 with the changes, which the mock's own book may not have taken."""
        await self.publish("orderbook", self._orderbook(*self.changed(bids, asks)))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change whose message the server dropped under load."""
        self.apply(bids, asks)

    def _trade(self, price: float, qty: float, buyer_is_taker: bool) -> Message:
        return {
            "timestamp": ms_now(),
            "price": plain(price),
            "qty": plain(qty),
            "isBuyerTaker": buyer_is_taker,
            "tradeId": next(self._trade_ids),
        }

    async def trade(self, price: float, qty: float, side: str) -> Message:
        """A trade whose taker is on ``side`` (``buy`` or ``sell``)."""
        trade = self._trade(price, qty, buyer_is_taker=side == "buy")
        self.last_trade = trade
        await self.publish("trade", self._frame("trade", [trade]))
        return trade
