"""ItBit's successor Paxos, serving the ITBIT code, through its public WebSocket feeds.

Two connections per market, no subscribe messages: the path names the market
(``BTCUSD``, the catalog's native id).

- ``wss://ws.paxos.com/marketdata/{market}``: a ``SNAPSHOT`` of the whole
  book (bids descending, asks ascending, ``{"price", "amount"}`` strings,
  ``final_snapshot`` on its last part), then one ``UPDATE`` per changed level:
  ``side`` ``BUY`` or ``SELL``, the level's new amount, 0 when it left.
- ``wss://ws.paxos.com/executiondata/{market}``: one message per execution
  (``price``, ``amount``, ``executed_at`` in RFC 3339 with nanoseconds,
  ``match_number``); the first is the market's last execution before the
  connection, which is history.

Paxos numbers neither feed, names no taker side, and sends no heartbeats
(the protocol's pings catch a dead connection, the watchdog a silent one). A
book that crosses is rebuilt; a lost update is not otherwise visible.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from caspian.sources.live.adapter import Adapter
from caspian.sources.live.native import (
    Level,
    NativeConnection,
    iso_ms,
    levels,
    sessions,
    trade,
)

if TYPE_CHECKING:
    from caspian.sources.live.ccxt_pro import SymbolSessions
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

_PATHS = {"book": "/marketdata/", "trades": "/executiondata/"}

#: match_number is Paxos's own execution id, which it asks clients to dedupe by.
ADAPTER = Adapter("paxos", info_fields=("match_number",))


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    return sessions(source, exchange, ADAPTER, PaxosConnection.from_urls)


class PaxosConnection(NativeConnection):
    """One market's ``marketdata`` and ``executiondata`` feeds."""

    name = "Paxos"
    base_url = "wss://ws.paxos.com"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self._snapshot: tuple[list[Level], list[Level]] | None = None
        #: Executions before this (ms) happened before the connection.
        self._trades_from_ms: int | None = None

    def address(self, channel: str, symbol: str) -> str:
        return self.ws_url + _PATHS[channel] + symbol

    def subscriptions(self, channel: str, symbol: str) -> list[Any]:
        if channel == "trades":
            # Called before connecting: the replayed execution is older still.
            self._trades_from_ms = time.time_ns() // 1_000_000
        return []

    def handle(self, client: Any, message: Any) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "SNAPSHOT":
            bids, asks = self._snapshot or ([], [])
            bids += levels(message.get("bids"), "amount")
            asks += levels(message.get("asks"), "amount")
            if str(message.get("final_snapshot")).lower() == "true":
                self._snapshot = None
                self.replace_book(bids, asks, None)
            else:
                self._snapshot = (bids, asks)
        elif kind == "UPDATE":
            level = [(float(message["price"]), float(message["amount"]))]
            side = message.get("side")
            if side == "BUY":
                self.change_book(level, (), None)
            elif side == "SELL":
                self.change_book((), level, None)
        elif "match_number" in message:
            executed_ms = iso_ms(message.get("executed_at"))
            since = self._trades_from_ms
            if executed_ms is not None and since is not None and executed_ms < since:
                return
            self.add_trades(
                [
                    trade(
                        message.get("match_number"),
                        executed_ms,
                        message.get("price"),
                        message.get("amount"),
                        None,
                        message,
                    )
                ]
            )
