"""Korbit, which ccxt dropped, through its v2 public WebSocket.

``wss://ws-api.korbit.co.kr/v2/public`` (Korbit, now Digital X, keeps serving
this address): a client sends a JSON array of requests,
``[{"method": "subscribe", "type": "orderbook", "symbols": ["btc_krw"],
"requestId": 1}]``, and gets ``{"status": "success", "requestId": 1}`` or
``{"status": "fail", "code": "INVALID_SYMBOL", ...}``. Data messages carry
``type``, ``symbol``, the server's ``timestamp`` and ``data``; the first of
each subscription has ``"snapshot": true``. Symbols are the catalog's native
ids (``btc_krw``).

- ``orderbook``: every message is the whole top 30 of each side (price and
  qty strings), at most about every 100 ms; ``data.timestamp`` is the book's
  time. There are no changes to apply and no sequence: Korbit warns that
  public messages may be dropped under load, and the next message repairs
  the book whole.
- ``trade``: lists of trades (``tradeId``, ``timestamp``, ``price``, ``qty``,
  ``isBuyerTaker``); the snapshot on subscribing is the latest trade, history.

The ticker channel repeats the book's best prices without sizes and is not
subscribed. The server pings every 30 s at the protocol level, invisible to
the watchdog, so a book quiet for ``stall_timeout_s`` costs a resubscribe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caspian.sources.live.adapter import Adapter
from caspian.sources.live.native import NativeConnection, levels, sessions, trade

if TYPE_CHECKING:
    from caspian.sources.live.ccxt_pro import SymbolSessions
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

_CHANNELS = {"book": "orderbook", "trades": "trade"}

ADAPTER = Adapter("korbit")


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    return sessions(source, exchange, ADAPTER, KorbitConnection.from_urls)


def _side(buyer_is_taker: Any) -> str | None:
    if not isinstance(buyer_is_taker, bool):
        return None
    return "buy" if buyer_is_taker else "sell"


def _ms(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


class KorbitConnection(NativeConnection):
    """One pair's ``orderbook`` and ``trade`` channels on Korbit's public WebSocket."""

    name = "Korbit"
    base_url = "wss://ws-api.korbit.co.kr"
    path = "/v2/public"

    def subscriptions(self, channel: str, symbol: str) -> list[Any]:
        kind = _CHANNELS[channel]
        request_id = self.request_id(kind)
        # Korbit takes requests only inside an array.
        return [
            [{"method": "subscribe", "type": kind, "symbols": [symbol], "requestId": request_id}]
        ]

    def handle(self, client: Any, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if message.get("status") == "fail":
            what = self.requested(message.get("requestId"))
            code, reason = message.get("code", ""), message.get("message", "")
            raise RuntimeError(f"Korbit refused {what}: {code} {reason}".rstrip())
        kind, data = message.get("type"), message.get("data")
        if kind == "orderbook" and isinstance(data, dict):
            self.replace_book(
                levels(data.get("bids"), "qty"),
                levels(data.get("asks"), "qty"),
                _ms(data.get("timestamp")),
            )
        elif kind == "trade" and isinstance(data, list) and not message.get("snapshot"):
            self.add_trades(
                [
                    trade(
                        row.get("tradeId"),
                        _ms(row.get("timestamp")),
                        row.get("price"),
                        row.get("qty"),
                        _side(row.get("isBuyerTaker")),
                        row,
                    )
                    for row in data
                    if isinstance(row, dict)
                ]
            )
