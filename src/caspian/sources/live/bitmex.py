"""BitMEX, which ccxt no longer ships, through Caspian's own client of its realtime API.

:class:`BitmexConnection` is a :class:`~caspian.sources.live.native.NativeConnection`
on ``wss://ws.bitmex.com/realtime``: one connection per watched symbol, its
``orderBookL2`` and ``trade`` tables, and BitMEX's text pings as heartbeats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

import orjson

from caspian.sources.integrity import IntegrityError
from caspian.sources.live.adapter import Adapter
from caspian.sources.live.native import Level, NativeConnection, iso_ms, sessions, trade
from caspian.sources.live.source import merged

if TYPE_CHECKING:
    from caspian.sources.live.ccxt_pro import SymbolSessions
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

_TABLES = {"book": "orderBookL2", "trades": "trade"}

#: Native ids (XBTUSD) name its products, as there are no ccxt markets.
ADAPTER = Adapter("bitmex", info_fields=("tickDirection",))


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    return sessions(source, exchange, ADAPTER, BitmexConnection.from_urls)


class BitmexConnection(NativeConnection):
    """One symbol's ``orderBookL2`` and ``trade`` tables of BitMEX's realtime API.

    BitMEX's ``orderBookL2`` names levels by id: updates and deletes may
    carry the id alone, so the side and price of every id are kept.
    """

    name = "BitMEX"
    base_url = "wss://ws.bitmex.com/realtime"
    # BitMEX's text pings are the heartbeat the watchdog sees; the protocol's
    # own would not show as messages. It asks clients to ping once 5 s pass
    # without a message; pinging every 5 s does that without tracking the silence.
    ping_text = "ping"
    ping_s = 5.0

    def __init__(self, ws_url: str) -> None:
        super().__init__(ws_url)
        self._ids: dict[Any, tuple[str, float]] = {}

    @classmethod
    def from_urls(cls, urls: Mapping[str, Any]) -> Self:
        """From ``{"api": {"ws": url}}``: the whole address, path included, replaces BitMEX's."""
        return cls(str(merged({"api": {"ws": cls.base_url}}, urls)["api"]["ws"]))

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
                    trade(
                        row.get("trdMatchID"),
                        iso_ms(row.get("timestamp")),
                        row.get("price"),
                        row.get("size"),
                        row.get("side"),
                        row,
                    )
                    for row in rows
                ]
            )

    def _apply_book(self, action: Any, rows: list[dict[str, Any]]) -> None:
        if action == "partial":
            self._ids.clear()
        elif not self.has_book:
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
            stamp = iso_ms(row.get("timestamp"))
            if stamp is not None:
                ms = stamp
        if action == "partial":
            self.replace_book(bids, asks, ms)
        else:
            self.change_book(bids, asks, ms)
