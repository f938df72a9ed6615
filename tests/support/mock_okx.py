"""OKX's public WebSocket API v5, as ``wss://ws.okx.com:8443/ws/v5/public`` speaks it.

Channels ``books`` (a snapshot of 400 levels a side on subscribing, then
updates) and ``trades``; the client's text ``ping`` gets ``pong``. Book
messages chain by ``seqId``/``prevSeqId`` and carry OKX's checksum of the top
25 levels after them, computed here from the mock's own book and written as
OKX writes numbers: plain decimals without trailing zeros (``"100"``,
``"0.00001"``).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterable
from decimal import Decimal

import orjson
from websockets.asyncio.server import ServerConnection

from tests.support.mock_exchanges import Level, Message, MockExchange, ms_now

PUBLIC_PATH = "/ws/v5/public"
#: OKX names each connection in its acknowledgements.
CONN_ID = "a4d3ae55"


def okx_text(value: float) -> str:
    """A number the way OKX writes it."""
    return format(Decimal(repr(value)).normalize(), "f")


def okx_checksum(bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> int:
    """OKX's checksum, written from its documentation: a signed CRC32 of ``bid:ask:...``."""
    pairs: list[str] = []
    for bid, ask in itertools.zip_longest(bids[:25], asks[:25]):
        if bid is not None:
            pairs.append(f"{bid[0]}:{bid[1]}")
        if ask is not None:
            pairs.append(f"{ask[0]}:{ask[1]}")
    unsigned = zlib.crc32(":".join(pairs).encode("utf-8"))
    signed: int = struct.unpack("<i", struct.pack("<I", unsigned))[0]
    return signed


class OkxMock(MockExchange):
    """OKX's public channels ``books`` and ``trades`` for one instrument."""

    def __init__(self, inst_id: str = "BTC-USDT") -> None:
        super().__init__()
        self.inst_id = inst_id
        self.seq_id = 18_923_100_541
        #: Set: book updates go without ``seqId``/``prevSeqId``, as from a relay
        #: that keeps only the fields it knows.
        self.unsequenced = False
        self._trade_ids = itertools.count(130_639_474)

    async def on_text(self, connection: ServerConnection, text: str) -> bool:
        if text != "ping":
            return False
        await self.send_text(connection, "pong")
        return True

    def _error(self, code: str, text: str) -> Message:
        return {"event": "error", "code": code, "msg": text, "connId": CONN_ID}

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if message.get("op") != "subscribe" or connection.request is None:
            request = orjson.dumps(message).decode()
            await self.send(connection, self._error("60012", f"Illegal request: {request}"))
            return
        path = connection.request.path
        for arg in message.get("args", []):
            channel, inst_id = arg.get("channel"), arg.get("instId")
            if path != PUBLIC_PATH or channel not in ("books", "trades") or inst_id != self.inst_id:
                text = f"Wrong URL or channel:{channel},instId:{inst_id} doesn't exist."
                await self.send(connection, self._error("60018", text))
                continue
            await self.send(connection, {"event": "subscribe", "arg": arg, "connId": CONN_ID})
            # Subscribed only now: no update may precede the snapshot built next.
            self.subscribed(connection, channel)
            if channel == "books":
                bids, asks = self.top(400)
                await self.send(connection, self._book("snapshot", bids, asks, -1))

    def _levels(self, levels: Iterable[Level]) -> list[list[str]]:
        # [price, size, liquidated orders (always "0"), orders at the price]
        return [[okx_text(p), okx_text(s), "0", "0" if s == 0 else "1"] for p, s in levels]

    def checksum(self) -> int:
        bids, asks = self.top(25)
        return okx_checksum(
            [(okx_text(p), okx_text(s)) for p, s in bids],
            [(okx_text(p), okx_text(s)) for p, s in asks],
        )

    def _book(
        self, action: str, bids: Iterable[Level], asks: Iterable[Level], previous: int
    ) -> Message:
        data: Message = {
            "asks": self._levels(asks),
            "bids": self._levels(bids),
            "ts": str(ms_now()),
            "checksum": self.checksum(),
        }
        if action == "snapshot" or not self.unsequenced:
            data["prevSeqId"] = previous
            data["seqId"] = self.seq_id
        return {
            "arg": {"channel": "books", "instId": self.inst_id},
            "action": action,
            "data": [data],
        }

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes changes, with the checksum of the mock's book as it stands."""
        previous = self.seq_id
        # OKX's sequence counts the engine's events, not the messages.
        self.seq_id += 3
        await self.publish("books", self._book("update", bids, asks, previous))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change on the exchange whose message never arrives."""
        self.apply(bids, asks)
        self.seq_id += 3

    async def trade(self, price: float, size: float, side: str) -> Message:
        """A trade; OKX's ``side`` is the taker's."""
        data = {
            "instId": self.inst_id,
            "tradeId": str(next(self._trade_ids)),
            "px": okx_text(price),
            "sz": okx_text(size),
            "side": side,
            "ts": str(ms_now()),
            "count": "2",
        }
        await self.publish(
            "trades", {"arg": {"channel": "trades", "instId": self.inst_id}, "data": [data]}
        )
        return data
