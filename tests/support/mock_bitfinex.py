"""Bitfinex's public WebSocket API v2 (``wss://api-pub.bitfinex.com/ws/2``).

A connection opens with an ``info`` event. A client subscribes with
``{"event": "subscribe", "channel": "book" | "trades", "symbol": "tBTCUSD",
...}`` and gets ``{"event": "subscribed", "chanId": n, ...}``; from then on
the channel's messages are arrays headed by ``n``:

- ``book`` (precision ``P0``): a snapshot of the best ``len`` levels a side
  (25 unless asked for 100), ``[n, [[price, count, amount], ...]]``, bids
  first, asks with negative amounts; then one level per message,
  ``[n, [price, count, amount]]``, count 0 removing it. The client's book
  is the top ``len``: a level leaving that window is removed, one entering
  it is sent, as on Bitfinex.
- ``trades``: a snapshot of the latest trades ``[n, [[id, mts, amount,
  price], ...]]`` (newest first; the amount is negative when the taker
  sold), then each trade twice, ``[n, "te", [...]]`` and ``[n, "tu", [...]]``.
- ``[n, "hb"]``: the channel's heartbeat.

After ``{"event": "conf", "flags": 131072}`` the connection also gets
``[n, "cs", checksum]`` after each change of the book: the signed CRC32 of
the top 25 bids and asks interleaved (bid price, bid amount, ask price,
ask amount, ...), joined by colons, numbers written as Bitfinex writes
them.
"""

from __future__ import annotations

import itertools
import uuid
import zlib
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now

#: The ``conf`` flag asking for book checksums.
CHECKSUM_FLAG = 131_072
#: Levels a side the checksum covers, whatever the subscribed length.
CHECKSUM_LEVELS = 25


def js_number(value: float) -> int | float:
    """A number as Bitfinex's JSON has it: integral values without a fraction."""
    return int(value) if value == int(value) else value


def js_text(value: float) -> str:
    """A number as JavaScript prints it (``100``, ``99.5``, ``0.00001``)."""
    return format(Decimal(repr(float(value))).normalize(), "f")


def bitfinex_checksum(bids: list[Level], asks: list[Level]) -> int:
    """Bitfinex's book checksum, written from its documentation."""
    parts: list[str] = []
    for i in range(CHECKSUM_LEVELS):
        if i < len(bids):
            parts += [js_text(bids[i][0]), js_text(bids[i][1])]
        if i < len(asks):
            parts += [js_text(asks[i][0]), js_text(-asks[i][1])]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - 2**32 if crc >= 2**31 else crc


class BitfinexMock(MockExchange):
    """The ``book`` (P0) and ``trades`` channels of one trading pair."""

    def __init__(self, symbol: str = "tBTCUSD", heartbeat_s: float = 0.1) -> None:
        super().__init__(heartbeat_s)
        self.symbol = symbol
        #: Channel ids by channel; Bitfinex numbers them per subscription.
        self.chan_ids = {"book": 17_082, "trades": 17_083}
        #: Book levels a side each connection subscribed to.
        self._lengths: dict[ServerConnection, int] = {}
        self._checksummed: set[ServerConnection] = set()
        self._trade_ids = itertools.count(1_128_060_969)

    async def on_connect(self, connection: ServerConnection) -> None:
        await self.send(
            connection,
            {
                "event": "info",
                "version": 2,
                "serverId": str(uuid.uuid4()),
                "platform": {"status": 1},
            },
        )

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        event = message.get("event")
        if event == "conf":
            flags = int(message.get("flags", 0))
            if flags & CHECKSUM_FLAG:
                self._checksummed.add(connection)
            await self.send(connection, {"event": "conf", "status": "OK", "flags": flags})
            return
        channel = message.get("channel")
        if event != "subscribe" or channel not in self.chan_ids:
            await self.send(connection, {"event": "error", "msg": "unknown event", "code": 10000})
            return
        if message.get("symbol") != self.symbol:
            await self.send(
                connection,
                {
                    "event": "error",
                    "msg": "symbol: invalid",
                    "code": 10300,
                    "channel": channel,
                    "symbol": message.get("symbol"),
                },
            )
            return
        chan_id = self.chan_ids[channel]
        subscribed: Message = {
            "event": "subscribed",
            "channel": channel,
            "chanId": chan_id,
            "symbol": self.symbol,
            "pair": self.symbol[1:],
        }
        if channel == "book":
            length = int(message.get("len", 25))
            self._lengths[connection] = length
            subscribed |= {
                "prec": message.get("prec", "P0"),
                "freq": message.get("freq", "F0"),
                "len": str(length),
            }
        self.subscribed(connection, channel)
        await self.send(connection, subscribed)
        if channel == "book":
            bids, asks = self.top(self._lengths[connection])
            rows = [self._row(p, s) for p, s in bids] + [self._row(p, -s) for p, s in asks]
            await self.send(connection, [chan_id, rows])
        else:
            # The latest trades, newest first: history to a new subscriber.
            old = self._trade(99.0, -0.25, ms_now() - 2_000)
            await self.send(connection, [chan_id, [old]])

    def heartbeats(self, channels: set[str]) -> list[Any]:
        return [[self.chan_ids[channel], "hb"] for channel in sorted(channels)]

    @staticmethod
    def _row(price: float, amount: float, count: int = 1) -> list[int | float]:
        return [js_number(price), count, js_number(amount)]

    def checksum(self) -> int:
        return bitfinex_checksum(*self.top(CHECKSUM_LEVELS))

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Changes the book, then sends each connection the levels its window saw change."""
        # Closed connections are forgotten here, the base class tells no one of them.
        self._lengths = {c: n for c, n in self._lengths.items() if c in self.connections}
        self._checksummed &= self.connections
        windows = {connection: self.top(n) for connection, n in self._lengths.items()}
        self.apply(bids, asks)
        chan_id = self.chan_ids["book"]
        for connection, (old_bids, old_asks) in windows.items():
            new_bids, new_asks = self.top(self._lengths[connection])
            rows = self._window_changes(old_bids, new_bids, 1) + self._window_changes(
                old_asks, new_asks, -1
            )
            for row in rows:
                await self.send(connection, [chan_id, row])
            if rows and connection in self._checksummed:
                await self.send(connection, [chan_id, "cs", self.checksum()])

    def _window_changes(
        self, old: list[Level], new: list[Level], sign: int
    ) -> list[list[int | float]]:
        before, after = dict(old), dict(new)
        removed = [self._row(p, sign, count=0) for p in before if p not in after]
        changed = [self._row(p, sign * s) for p, s in new if before.get(p) != s]
        return removed + changed

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change on the exchange whose messages never arrive."""
        self.apply(bids, asks)

    def _trade(self, price: float, amount: float, mts: int) -> list[int | float]:
        return [next(self._trade_ids), mts, js_number(amount), js_number(price)]

    async def trade(self, price: float, amount: float, side: str) -> list[int | float]:
        """A trade, ``side`` the taker's; Bitfinex signs the amount with it."""
        row = self._trade(price, amount if side == "buy" else -amount, ms_now())
        chan_id = self.chan_ids["trades"]
        await self.publish("trades", [chan_id, "te", row])
        await self.publish("trades", [chan_id, "tu", row])
        return row
