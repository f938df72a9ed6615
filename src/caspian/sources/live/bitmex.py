"""BitMEX, which ccxt no longer ships, through Caspian's own client of its realtime API.

:class:`BitmexConnection` is a :class:`~caspian.sources.live.native.NativeConnection`
on ``wss://ws.bitmex.com/realtime``: one connection per watched symbol, its
``orderBookL2`` and ``trade`` tables, and BitMEX's text pings as heartbeats.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from caspian.sources.integrity import IntegrityError
from caspian.sources.live.adapter import Adapter
from caspian.sources.live.native import Level, NativeConnection, sessions
from caspian.sources.live.source import merged

if TYPE_CHECKING:
    from caspian.sources.live.ccxt_pro import SymbolSessions
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

#: BitMEX asks clients to ping once 5 s pass without a message; pinging every
#: 5 s does that without tracking the silence.
_BITMEX_PING_S = 5.0
_BITMEX_WS = "wss://ws.bitmex.com/realtime"
_TABLES = {"book": "orderBookL2", "trades": "trade"}

#: Native ids (XBTUSD) name its products, as there are no ccxt markets.
ADAPTER = Adapter("bitmex", info_fields=("tickDirection",))


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    return sessions(
        source, exchange, ADAPTER, lambda urls: BitmexConnection(urls, source.stall_timeout_s)
    )


def _ms(timestamp: Any) -> int | None:
    """Milliseconds of one of BitMEX's ISO 8601 times (``2024-05-01T12:00:00.123Z``)."""
    if not isinstance(timestamp, str):
        return None
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


class BitmexConnection(NativeConnection):
    """One symbol's ``orderBookL2`` and ``trade`` tables of BitMEX's realtime API.

    BitMEX's ``orderBookL2`` names levels by id: updates and deletes may
    carry the id alone, so the side and price of every id are kept.
    """

    name = "BitMEX"
    # BitMEX's text pings are the heartbeat the watchdog sees; the protocol's
    # own would not show as messages.
    ping_text = "ping"

    def __init__(self, urls: Mapping[str, Any], stall_timeout_s: float) -> None:
        super().__init__(str(merged({"api": {"ws": _BITMEX_WS}}, urls)["api"]["ws"]))
        # A pong well within the watchdog's limit keeps a quiet market from tripping it.
        self.ping_s = min(_BITMEX_PING_S, stall_timeout_s / 3)
        self._ids: dict[Any, tuple[str, float]] = {}

    def subscriptions(self, channel: str, symbol: str) -> list[Any]:
        return [{"op": "subscribe", "args": [f"{_TABLES[channel]}:{symbol}"]}]

    def decode(self, raw: str | bytes) -> Any:
        return "pong" if raw == "pong" else orjson.loads(raw)

    def handle(self, client: Any, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if "error" in message:
            raise RuntimeError(f"BitMEX refused {message.get('request')}: {message['error']}")
        table, action, rows = message.get("table"), message.get("action"), message.get("data")
        if not isinstance(rows, list):
            return
        if table == "orderBookL2":
            self._apply_book(action, rows)
        elif table == "trade" and action == "insert":
            # The partial sent on subscribing is history.
            self.add_trades(
                [
                    {
                        "id": row.get("trdMatchID"),
                        "timestamp": _ms(row.get("timestamp")),
                        "price": row.get("price"),
                        "amount": row.get("size"),
                        "side": row.get("side"),
                        "info": row,
                    }
                    for row in rows
                ]
            )

    def _apply_book(self, action: Any, rows: list[dict[str, Any]]) -> None:
        if action == "partial":
            self._ids.clear()
        elif not self._has_book:
            # Changes to a book not received yet.
            return
        bids: list[Level] = []
        asks: list[Level] = []
        ms: int | None = None
        for row in rows:
            if action in ("partial", "insert"):
                side, price = str(row["side"]), float(row["price"])
                self._ids[row["id"]] = (side, price)
            else:
                known = self._ids.get(row["id"])
                if known is None:
                    raise IntegrityError(
                        "sequence", f"{action} of level {row['id']}, which was never inserted"
                    )
                side, price = known
            levels = bids if side == "Buy" else asks
            if action == "delete":
                del self._ids[row["id"]]
                levels.append((price, 0.0))
            else:
                levels.append((price, float(row["size"])))
            stamp = _ms(row.get("timestamp"))
            if stamp is not None:
                ms = stamp
        if action == "partial":
            self.replace_book(bids, asks, ms)
        else:
            self.change_book(bids, asks, ms)
