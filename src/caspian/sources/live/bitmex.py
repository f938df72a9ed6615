"""BitMEX, which ccxt no longer ships, through Caspian's own client of its realtime API.

:class:`BitmexConnection` offers the part of a ccxt.pro exchange object that
:mod:`caspian.sources.live.ccxt_pro`'s sessions use, so BitMEX runs through
the same sessions, watchdog, checks and metrics as the ccxt exchanges: one
connection per watched symbol, its ``orderBookL2`` and ``trade`` tables.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from caspian.book import BookView, OrderBook
from caspian.sources.integrity import IntegrityError
from caspian.sources.live.adapter import Adapter
from caspian.sources.live.ccxt_pro import SymbolSessions
from caspian.sources.live.source import merged

if TYPE_CHECKING:
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

#: BitMEX asks clients to ping once 5 s pass without a message; pinging every
#: 5 s does that without tracking the silence.
_BITMEX_PING_S = 5.0
_BITMEX_WS = "wss://ws.bitmex.com/realtime"

#: Native ids (XBTUSD) name its products, as there are no ccxt markets.
ADAPTER = Adapter("bitmex", info_fields=("tickDirection",))


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    return SymbolSessions(
        source,
        exchange.code,
        ADAPTER,
        new_exchange=lambda: BitmexConnection(
            source.urls.get(exchange.code, {}), source.stall_timeout_s
        ),
    )


def _ms(timestamp: Any) -> int | None:
    """Milliseconds of one of BitMEX's ISO 8601 times (``2024-05-01T12:00:00.123Z``)."""
    if not isinstance(timestamp, str):
        return None
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


class BitmexConnection:
    """One symbol's ``orderBookL2`` and ``trade`` tables of BitMEX's realtime API.

    It behaves as the ccxt.pro exchanges do where a feed relies on it: it
    connects on the first watch and subscribes each table on its first
    watch, hands every raw message to ``handle_message`` (which the feed
    wraps), and a dropped connection raises from the watch calls.

    BitMEX's ``orderBookL2`` names levels by id: updates and deletes may
    carry the id alone, so the side and price of every id are kept.
    """

    def __init__(self, urls: Mapping[str, Any], stall_timeout_s: float) -> None:
        self.urls = merged({"api": {"ws": _BITMEX_WS}}, urls)
        self.handle_message: Callable[[Any, Any], None] = self._handle
        # A pong well within the watchdog's limit keeps a quiet market from tripping it.
        self._ping_s = min(_BITMEX_PING_S, stall_timeout_s / 3)
        self._ws: ClientConnection | None = None
        self._opening = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._topics: set[str] = set()
        self._failure: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        self._ids: dict[Any, tuple[str, float]] = {}
        self._book = OrderBook()
        self._book_ms: int | None = None
        self._has_book = False
        self._book_changed = False
        self._trades: list[dict[str, Any]] = []

    async def watch_order_book(self, symbol: str, limit: int | None = None) -> dict[str, Any]:
        await self._subscribe(f"orderBookL2:{symbol}")
        while not self._book_changed:
            await self._next()
        self._book_changed = False
        book = self._book
        top = book.top(limit if limit is not None else max(book.bid_count, book.ask_count))
        return {"bids": list(top.bids), "asks": list(top.asks), "timestamp": self._book_ms}

    def view(self, symbol: str, depth: int) -> tuple[BookView | None, int | None]:
        """The top ``depth`` levels of the book and its time in ms, as a session reads them."""
        return (self._book.top(depth) if self._has_book else None), self._book_ms

    async def watch_trades(
        self, symbol: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        await self._subscribe(f"trade:{symbol}")
        while not self._trades:
            await self._next()
        trades, self._trades = self._trades, []
        return trades

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    async def _subscribe(self, topic: str) -> None:
        if topic in self._topics:
            return
        self._topics.add(topic)
        ws = await self._open()
        await ws.send(orjson.dumps({"op": "subscribe", "args": [topic]}).decode())

    async def _open(self) -> ClientConnection:
        async with self._opening:
            if self._ws is None:
                # BitMEX's text pings are the heartbeat the watchdog sees; the
                # protocol's own would not show as messages.
                self._ws = await connect(
                    self.urls["api"]["ws"],
                    ping_interval=None,
                    close_timeout=1.0,
                    # A whole book of a busy contract exceeds the 1 MiB default.
                    max_size=2**24,
                )
                loop = asyncio.get_running_loop()
                self._tasks = [
                    loop.create_task(self._receive(self._ws)),
                    loop.create_task(self._ping(self._ws)),
                ]
            return self._ws

    async def _next(self) -> None:
        """Waits for the next message, raising once the connection has failed."""
        if self._failure is not None:
            raise self._failure
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_future()
        # Both watchers wait on one future: one of them being cancelled
        # must not cancel it for the other.
        await asyncio.shield(self._wake)
        if self._failure is not None:
            raise self._failure

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _receive(self, ws: ClientConnection) -> None:
        failure: BaseException = ConnectionError("BitMEX closed the connection")
        try:
            async for raw in ws:
                self.handle_message(self, "pong" if raw == "pong" else orjson.loads(raw))
        except Exception as exc:
            failure = exc
        self._failure = failure
        self._notify()

    async def _ping(self, ws: ClientConnection) -> None:
        # A failed send is the receiver's to report.
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self._ping_s)
                await ws.send("ping")

    def _handle(self, client: Any, message: Any) -> None:
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
            self._trades += [
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
            self._notify()

    def _apply_book(self, action: Any, rows: list[dict[str, Any]]) -> None:
        if action == "partial":
            self._ids.clear()
            self._book.clear()
            self._has_book = True
        elif not self._has_book:
            # Changes to a book not received yet.
            return
        bids: list[tuple[float, float]] = []
        asks: list[tuple[float, float]] = []
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
                self._book_ms = stamp
        self._book.apply_diff(bids, asks)
        self._book_changed = True
        self._notify()
