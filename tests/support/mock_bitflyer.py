"""bitFlyer Lightning's Realtime API (``wss://ws.lightstream.bitflyer.com/json-rpc``), as published.

JSON-RPC 2.0 over WebSocket, served at ``/json-rpc``. A client sends
``{"jsonrpc": "2.0", "method": "subscribe", "params": {"channel": ...}, "id": n}``
and gets ``{"jsonrpc": "2.0", "id": n, "result": true}``, then
``{"jsonrpc": "2.0", "method": "channelMessage", "params": {"channel": ...,
"message": ...}}`` notifications. Channels, per product code:

- ``lightning_board_snapshot_{code}``: ``{"mid_price", "bids", "asks"}`` with
  every level as ``{"price", "size"}``, in no promised order; sent on
  subscribing and whenever :meth:`BitflyerMock.snapshot` is called;
- ``lightning_board_{code}``: the same layout holding changed levels only,
  size 0 for a level that left;
- ``lightning_ticker_{code}``: best levels and volumes (accepted, not served here);
- ``lightning_executions_{code}``: lists of executions.

Nothing is numbered and there are no heartbeats.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from datetime import UTC, datetime

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange

KINDS = (
    "lightning_board_snapshot",
    "lightning_board",
    "lightning_ticker",
    "lightning_executions",
)


def exec_date() -> str:
    """bitFlyer's execution time: UTC with seven decimal places and a Z."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}0Z"


def acceptance_id() -> str:
    """An order acceptance id in bitFlyer's layout (``JRF20181210-133622-783108``)."""
    return datetime.now(UTC).strftime("JRF%Y%m%d-%H%M%S-") + f"{random.randrange(10**6):06d}"


class BitflyerMock(MockExchange):
    """One product's channels on bitFlyer's JSON-RPC WebSocket."""

    price_places = 0

    def __init__(self, product_code: str = "BTC_JPY") -> None:
        super().__init__()
        self.product_code = product_code
        #: Changes sent on a board subscription before the snapshot, as bitFlyer may.
        self.before_snapshot: list[Message] = []
        self._execution_ids = itertools.count(2_462_118_130)
        self._shuffle = random.Random(5)

    def _notification(self, kind: str, message: object) -> Message:
        return {
            "jsonrpc": "2.0",
            "method": "channelMessage",
            "params": {"channel": f"{kind}_{self.product_code}", "message": message},
        }

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        request_id = message.get("id")
        channel = str(message.get("params", {}).get("channel", ""))
        suffix = f"_{self.product_code}"
        kind = channel.removesuffix(suffix) if channel.endswith(suffix) else ""
        if (
            message.get("jsonrpc") != "2.0"
            or message.get("method") != "subscribe"
            or kind not in KINDS
        ):
            await self.send(
                connection,
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "error": {"code": -32602, "message": "Invalid params"},
                },
            )
            return
        self.subscribed(connection, kind)
        await self.send(connection, {"jsonrpc": "2.0", "id": request_id, "result": True})
        if kind == "lightning_board_snapshot":
            for change in self.before_snapshot:
                await self.send(connection, self._notification("lightning_board", change))
            await self.send(
                connection, self._notification("lightning_board_snapshot", self._board())
            )

    def _rows(self, levels: Iterable[Level]) -> list[Message]:
        return [{"price": price, "size": size} for price, size in levels]

    def _mid(self) -> float:
        bids, asks = self.top(1)
        if bids and asks:
            return (bids[0][0] + asks[0][0]) / 2
        return 0.0

    def _board(self) -> Message:
        bids, asks = list(self.bids.items()), list(self.asks.items())
        # bitFlyer promises no order within a snapshot.
        self._shuffle.shuffle(bids)
        self._shuffle.shuffle(asks)
        return {"mid_price": self._mid(), "bids": self._rows(bids), "asks": self._rows(asks)}

    async def snapshot(self) -> None:
        """Publishes the whole board, as bitFlyer does from time to time."""
        await self.publish(
            "lightning_board_snapshot",
            self._notification("lightning_board_snapshot", self._board()),
        )

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        change = {"mid_price": self._mid(), "bids": self._rows(bids), "asks": self._rows(asks)}
        await self.publish("lightning_board", self._notification("lightning_board", change))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        self.apply(bids, asks)

    def execution(self, price: float, size: float, side: str) -> Message:
        return {
            "id": next(self._execution_ids),
            "side": side,
            "price": price,
            "size": size,
            "exec_date": exec_date(),
            "buy_child_order_acceptance_id": acceptance_id(),
            "sell_child_order_acceptance_id": acceptance_id(),
        }

    async def trades(self, executions: list[Message]) -> None:
        await self.publish(
            "lightning_executions", self._notification("lightning_executions", executions)
        )

    async def trade(self, price: float, size: float, side: str) -> Message:
        """One execution; ``side`` is the taker's, ``BUY`` or ``SELL`` (empty in an itayose)."""
        execution = self.execution(price, size, side)
        await self.trades([execution])
        return execution
