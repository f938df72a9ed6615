"""What Caspian's own one-symbol WebSocket clients share (BitMEX, bitFlyer, Korbit, Paxos).

A :class:`NativeConnection` offers the part of a ccxt.pro exchange object
that :mod:`caspian.sources.live.ccxt_pro`'s sessions use, so an exchange
without ccxt.pro runs through the same sessions, watchdog, checks and
metrics as the ccxt exchanges: one connection per watched symbol, which
connects on the first watch, subscribes each channel on its first watch,
hands every raw message to ``handle_message`` (which the session wraps), and
raises from the watch calls once the connection failed.

A subclass names its address, how to subscribe, and parses messages into
:meth:`NativeConnection.replace_book`, :meth:`NativeConnection.change_book`
and :meth:`NativeConnection.add_trades`; one whose heartbeat is a text ping
sets :attr:`NativeConnection.ping_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Self

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from caspian.book import BookView, OrderBook
from caspian.sources.live.adapter import Adapter
from caspian.sources.live.ccxt_pro import SymbolSessions
from caspian.sources.live.registry import Exchange
from caspian.sources.live.source import LiveSource, merged

Level = tuple[float, float]


def sessions(
    source: LiveSource,
    exchange: Exchange,
    adapter: Adapter,
    connection: Callable[[Mapping[str, Any]], NativeConnection],
) -> SymbolSessions:
    """The sessions of an exchange whose connections ``connection`` makes from its URL overrides."""

    def new_connection() -> NativeConnection:
        made = connection(source.urls.get(exchange.code, {}))
        # A pong well within the watchdog's limit keeps a quiet market from tripping it.
        made.ping_s = min(made.ping_s, source.stall_timeout_s / 3)
        return made

    return SymbolSessions(source, exchange.code, adapter, new_exchange=new_connection)


def iso_ms(value: Any) -> int | None:
    """Milliseconds of an ISO 8601 time (``2019-03-04T05:50:53.7349458Z``); None if not a string."""
    if not isinstance(value, str):
        return None
    return int(datetime.fromisoformat(value).timestamp() * 1000)


def levels(rows: Any, size: str) -> list[Level]:
    """Levels of rows ``{"price": ..., size: ...}``, numbers or strings; none if not a list."""
    if not isinstance(rows, list):
        return []
    return [(float(row["price"]), float(row[size])) for row in rows]


def trade(
    trade_id: Any, ms: int | None, price: Any, amount: Any, side: str | None, info: Any
) -> dict[str, Any]:
    """One trade in ccxt's layout, as :meth:`NativeConnection.add_trades` takes it."""
    return {
        "id": trade_id,
        "timestamp": ms,
        "price": price,
        "amount": amount,
        "side": side,
        "info": info,
    }


class NativeConnection:
    """One symbol's book and trades over its WebSocket connections, one per address."""

    #: Named in errors.
    name = "the exchange"
    #: The exchange's base address and the path :meth:`from_urls` keeps after it.
    base_url = ""
    path = ""
    #: A text message the exchange asks for every ``ping_s`` seconds (BitMEX's
    #: ``ping``; :func:`sessions` caps the interval at a third of the
    #: watchdog's limit): its answer is a message, which the watchdog sees, so
    #: it replaces the protocol's pings. None: the protocol's pings.
    ping_text: str | None = None
    ping_s = 5.0

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.handle_message: Callable[[Any, Any], None] = self.handle
        #: Open connections by address: most exchanges need one, Paxos two.
        self._sockets: dict[str, ClientConnection] = {}
        self._opening = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: set[str] = set()
        self._failure: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        self._book = OrderBook()
        self._book_ms: int | None = None
        self._has_book = False
        self._book_changed = False
        self._trades: list[dict[str, Any]] = []
        self._request_ids = itertools.count(1)
        self._requests: dict[int, str] = {}

    @classmethod
    def from_urls(cls, urls: Mapping[str, Any]) -> Self:
        """From ``{"api": {"ws": base}}`` (CONTRACT.md section 7): base replaced, path kept."""
        base = str(merged({"api": {"ws": cls.base_url}}, urls)["api"]["ws"])
        return cls(base.rstrip("/") + cls.path)

    # -- what subclasses speak --------------------------------------------------

    def address(self, channel: str, symbol: str) -> str:
        """Where ``channel`` (``"book"`` or ``"trades"``) of ``symbol`` streams."""
        return self.ws_url

    def subscriptions(self, channel: str, symbol: str) -> list[Any]:
        """The requests subscribing ``channel`` of ``symbol``, made before its address is opened."""
        raise NotImplementedError

    def decode(self, raw: str | bytes) -> Any:
        """One message as :meth:`handle` takes it."""
        return orjson.loads(raw)

    def handle(self, client: Any, message: Any) -> None:
        """Applies one parsed message; raising ends the session (a refused request, say)."""
        raise NotImplementedError

    def request_id(self, what: str) -> int:
        """A new request id, remembered with ``what`` it asks for, for errors to name."""
        request_id = next(self._request_ids)
        self._requests[request_id] = what
        return request_id

    def requested(self, request_id: Any) -> str:
        """What the request ``request_id`` asked for, as an error names it."""
        if isinstance(request_id, int) and request_id in self._requests:
            return self._requests[request_id]
        return "a request"

    # -- the book and trades, for subclasses ---------------------------------------

    def replace_book(self, bids: Iterable[Level], asks: Iterable[Level], ms: int | None) -> None:
        self._book.apply_snapshot(bids, asks)
        self._has_book = True
        self._book_updated(ms)

    @property
    def has_book(self) -> bool:
        """Whether a whole book has come (:meth:`replace_book`)."""
        return self._has_book

    def change_book(self, bids: Iterable[Level], asks: Iterable[Level], ms: int | None) -> None:
        self._book.apply_diff(bids, asks)
        self._book_updated(ms)

    def add_trades(self, trades: list[dict[str, Any]]) -> None:
        """Trades as :func:`trade` makes them."""
        if trades:
            self._trades += trades
            self._notify()

    def _book_updated(self, ms: int | None) -> None:
        if ms is not None:
            self._book_ms = ms
        self._book_changed = True
        self._notify()

    # -- what the sessions call -------------------------------------------------------

    async def watch_order_book(self, symbol: str, limit: int | None = None) -> dict[str, Any]:
        await self._subscribe("book", symbol)
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
        await self._subscribe("trades", symbol)
        while not self._trades:
            await self._next()
        trades, self._trades = self._trades, []
        return trades

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ws in self._sockets.values():
            await ws.close()

    # -- the connection -------------------------------------------------------------

    async def _subscribe(self, channel: str, symbol: str) -> None:
        if channel in self._channels:
            return
        self._channels.add(channel)
        requests = self.subscriptions(channel, symbol)
        ws = await self._open(self.address(channel, symbol))
        for request in requests:
            await ws.send(orjson.dumps(request).decode())

    async def _open(self, url: str) -> ClientConnection:
        async with self._opening:
            ws = self._sockets.get(url)
            if ws is None:
                pings: dict[str, Any] = {} if self.ping_text is None else {"ping_interval": None}
                try:
                    ws = self._sockets[url] = await connect(
                        url,
                        close_timeout=1.0,
                        # A whole book of a busy market may exceed the 1 MiB default.
                        max_size=2**24,
                        **pings,
                    )
                except (OSError, WebSocketException) as exc:
                    # The socket's own errors name neither the host nor the URL.
                    raise ConnectionError(f"{url}: {str(exc) or repr(exc)}") from exc
                loop = asyncio.get_running_loop()
                self._tasks.append(loop.create_task(self._receive(ws)))
                if self.ping_text is not None:
                    self._tasks.append(loop.create_task(self._ping(ws, self.ping_text)))
            return ws

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
        failure: BaseException = ConnectionError(f"{self.name} closed the connection")
        try:
            async for raw in ws:
                self.handle_message(self, self.decode(raw))
        except Exception as exc:
            failure = exc
        self._failure = failure
        self._notify()

    async def _ping(self, ws: ClientConnection, text: str) -> None:
        # A failed send is the receiver's to report.
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.ping_s)
                await ws.send(text)
