"""bitFlyer Lightning, which ccxt.pro does not stream, through its JSON-RPC 2.0 WebSocket.

``wss://ws.lightstream.bitflyer.com/json-rpc``: a client sends
``{"jsonrpc": "2.0", "method": "subscribe", "params": {"channel": ...}, "id": n}``
and gets ``channelMessage`` notifications. Channels are named by bitFlyer's
product codes, the catalog's native ids (``BTC_JPY``, ``FX_BTC_JPY``,
``ETH_BTC``):

- ``lightning_board_snapshot_{code}``: the whole board, sent on subscribing
  and again from time to time, its levels in no promised order;
- ``lightning_board_{code}``: changes, each level's new total size (0 when it
  left the board); during an itayose (call auction) executed market orders
  come as levels of price 0, which are not levels of the board;
- ``lightning_executions_{code}``: lists of executions with the taker's
  ``side`` (empty during an itayose) and both orders' acceptance ids.

bitFlyer numbers nothing, so a lost change cannot be seen as a gap. What it
does publish is used: every snapshot replaces the book, which heals a lost
change within one snapshot period; changes that arrive before the first
snapshot are superseded by it; a crossed book is refused by the feed and
rebuilt. The ticker channel repeats the board's best levels
and is not subscribed. bitFlyer sends no heartbeats: the protocol's pings
catch a dead connection, the watchdog a silent one.
"""

from __future__ import annotations

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

#: The original API's example of bitFlyer's exchangeSpecificInfo: the side,
#: then both orders' acceptance ids.
ADAPTER = Adapter(
    "bitflyer", info_fields=("buy_child_order_acceptance_id", "sell_child_order_acceptance_id")
)


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    return sessions(source, exchange, ADAPTER, BitflyerConnection.from_urls)


def _levels(rows: Any) -> list[Level]:
    # Price 0: market orders executed in an itayose, not resting orders.
    return [level for level in levels(rows, "size") if level[0] > 0]


class BitflyerConnection(NativeConnection):
    """One product's board and executions on bitFlyer's JSON-RPC 2.0 WebSocket."""

    name = "bitFlyer"
    base_url = "wss://ws.lightstream.bitflyer.com"
    path = "/json-rpc"

    def subscriptions(self, channel: str, symbol: str) -> list[Any]:
        if channel == "book":
            # Changes first: those sent before the snapshot are dropped, and
            # none sent after it may be missed.
            names = [f"lightning_board_{symbol}", f"lightning_board_snapshot_{symbol}"]
        else:
            names = [f"lightning_executions_{symbol}"]
        return [
            {
                "jsonrpc": "2.0",
                "method": "subscribe",
                "params": {"channel": name},
                "id": self.request_id(name),
            }
            for name in names
        ]

    def handle(self, client: Any, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if "error" in message:
            what = self.requested(message.get("id"))
            raise RuntimeError(f"bitFlyer refused {what}: {message['error']}")
        if message.get("method") != "channelMessage":
            return
        params = message.get("params")
        if not isinstance(params, dict):
            return
        channel, data = str(params.get("channel", "")), params.get("message")
        if not isinstance(data, dict | list):
            return
        if channel.startswith("lightning_board_snapshot_") and isinstance(data, dict):
            self.replace_book(_levels(data.get("bids")), _levels(data.get("asks")), None)
        elif channel.startswith("lightning_board_") and isinstance(data, dict):
            # Before the first snapshot this fills no book the session reads,
            # and the snapshot then replaces it.
            self.change_book(_levels(data.get("bids")), _levels(data.get("asks")), None)
        elif channel.startswith("lightning_executions_") and isinstance(data, list):
            self.add_trades(
                [
                    trade(
                        row.get("id"),
                        iso_ms(row.get("exec_date")),
                        row.get("price"),
                        row.get("size"),
                        row.get("side"),
                        row,
                    )
                    for row in data
                    if isinstance(row, dict)
                ]
            )
