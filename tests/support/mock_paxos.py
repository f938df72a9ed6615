"""Paxos's public WebSocket feeds (``wss://ws.paxos.com``), as published.

No subscribe messages: the path names the feed and the market.

- ``/marketdata/{market}``: on connecting, a ``SNAPSHOT`` of the whole book
  (bids descending, asks ascending, ``{"price", "amount"}`` strings,
  ``"final_snapshot": "true"`` on its last part; :attr:`PaxosMock.snapshot_parts`
  splits it), then one ``UPDATE`` per changed level with its ``side``
  (``BUY``/``SELL``) and new ``amount``, ``"0"`` when it left;
- ``/executiondata/{market}``: on connecting, the market's last execution,
  then each new one: ``market``, ``price``, ``amount``, ``executed_at``
  (RFC 3339 with nanoseconds) and ``match_number``.

A path naming another market is closed with 1008. No sequence numbers, no
JSON heartbeats.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, plain


def executed_at(seconds_ago: float = 0.0) -> str:
    """An RFC 3339 time with nanoseconds, as Paxos writes ``executed_at``."""
    ns = time.time_ns() - int(seconds_ago * 1e9)
    moment = datetime.fromtimestamp(ns // 1_000_000_000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ns % 1_000_000_000:09d}Z"


class PaxosMock(MockExchange):
    """One market's ``marketdata`` and ``executiondata`` feeds."""

    def __init__(self, market: str = "BTCUSD") -> None:
        super().__init__()
        self.market = market
        #: Messages the SNAPSHOT is split into.
        self.snapshot_parts = 1
        self._match_numbers = itertools.count(1_688_913)
        #: Replayed to each new executiondata connection: it happened a moment ago.
        self.last_execution = self.execution(99.5, 0.1, seconds_ago=1.0)

    async def on_connect(self, connection: ServerConnection) -> None:
        path = connection.request.path if connection.request is not None else ""
        feed, _, market = path.strip("/").partition("/")
        if feed not in ("marketdata", "executiondata") or market != self.market:
            await connection.close(1008, "unknown market")
            return
        self.subscribed(connection, feed)
        # Connecting is subscribing here: no request wakes wait_subscribes.
        self._changed.set()
        if feed == "executiondata":
            await self.send(connection, self.last_execution)
            return
        bids, asks = self.top(10_000)
        parts = self.snapshot_parts
        for part in range(parts):
            await self.send(
                connection,
                {
                    "type": "SNAPSHOT",
                    "market": self.market,
                    "bids": self._rows(bids[part::parts]),
                    "asks": self._rows(asks[part::parts]),
                    "final_snapshot": "true" if part == parts - 1 else "false",
                },
            )

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        """Paxos's public feeds take no requests."""

    @staticmethod
    def _rows(levels: Iterable[Level]) -> list[Message]:
        return [{"price": plain(p), "amount": plain(a)} for p, a in levels]

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        for side, levels in (("BUY", bids), ("SELL", asks)):
            for price, amount in levels:
                await self.publish(
                    "marketdata",
                    {
                        "type": "UPDATE",
                        "market": self.market,
                        "side": side,
                        "price": plain(price),
                        "amount": plain(amount),
                    },
                )

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        self.apply(bids, asks)

    def execution(self, price: float, amount: float, seconds_ago: float = 0.0) -> Message:
        return {
            "market": self.market,
            "price": plain(price),
            "amount": plain(amount),
            "executed_at": executed_at(seconds_ago),
            "match_number": str(next(self._match_numbers)),
        }

    async def trade(self, price: float, amount: float) -> Message:
        execution = self.execution(price, amount)
        self.last_execution = execution
        await self.publish("executiondata", execution)
        return execution
