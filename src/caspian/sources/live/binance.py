"""Binance spot through Caspian's own client: diff depth after a REST snapshot.

One WebSocket connection carries up to 512 watched spot symbols (Binance
allows 1,024 streams a connection, a symbol takes two), and more symbols
open more connections; symbols are subscribed and unsubscribed on a
connection as they are watched and released
(``SUBSCRIBE``/``UNSUBSCRIBE`` of ``<symbol>@depth@100ms`` and
``<symbol>@trade`` on the raw-stream endpoint). A symbol's book is synced as
Binance documents it: its diff events are buffered while the REST snapshot
(``/depth``, 1,000 levels) is fetched, the events the snapshot already holds
are dropped, and from then on every event must start right after the last
one applied (``U`` = previous ``u`` + 1). A hole resyncs that symbol alone,
with reason ``sequence``; the connection and the other symbols go on.

Each event's levels go to the symbol's :class:`SymbolFeed` as the diff they
are, which sends on only what changed in the top levels, and its event time
``E`` measures the lag. Messages are handled as their bytes arrive
(:mod:`caspian.sources.live.wsclient`), at most ``wsclient.BATCH`` (32) in
one event-loop turn, so a burst on the connection cannot hold the loop.

Binance's dated futures and perpetual swaps (USDⓈ-M and COIN-M, other
hosts) stay on ccxt.pro (:mod:`caspian.sources.live.ccxt_pro`).

Addresses follow ccxt's layout for Binance (CONTRACT.md section 7):
``{"api": {"ws": {"spot": WS_URL}, "public": REST_URL}}``, where ``WS_URL``
is the raw-stream endpoint (``wss://stream.binance.com:9443/ws``) and
``REST_URL`` the API root ending in ``/api/v3``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import orjson

from caspian.events import Level
from caspian.sources.integrity import IntegrityError
from caspian.sources.live import wsclient
from caspian.sources.live.adapter import Adapter
from caspian.sources.live.feed import SymbolFeed
from caspian.sources.live.source import DRAINED_S, Backoff, merged, watchdog

if TYPE_CHECKING:
    from caspian.catalog.product import ProductSpec
    from caspian.sources.live.ccxt_pro import SymbolSessions
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

log = logging.getLogger("caspian.sources.live")

_URLS = {
    "api": {
        "ws": {"spot": "wss://stream.binance.com:9443/ws"},
        "public": "https://api.binance.com/api/v3",
    }
}
#: Levels of a REST snapshot: Binance's documented choice for a local book.
SNAPSHOT_LEVELS = 1000
#: Binance allows 1,024 streams a connection; a symbol takes two.
MAX_SYMBOLS = 512
#: Binance allows 5 messages a second from a client: control messages are spaced.
_CONTROL_GAP_S = 0.25
#: Streams per SUBSCRIBE message, well under Binance's message size limit.
_STREAMS_PER_REQUEST = 200
#: Concurrent REST snapshot requests: a reconnect of many symbols must not
#: spend the IP's request weight in one burst.
_SNAPSHOTS_AT_ONCE = 4
#: Diff events a symbol keeps while its snapshot is on its way: memory stays
#: bounded when the REST API is slow or down.
_MAX_BUFFERED = 10_000

#: Binance's derivatives through ccxt.pro, which checks their update ids.
DERIVATIVES = Adapter("binance", book_limit=1000, checksum_reason="sequence")


def client(source: LiveSource, exchange: Exchange) -> BinanceClient:
    return BinanceClient(source, exchange.code)


def _levels(raw: Iterable[Any]) -> list[Level]:
    return [(float(price), float(size)) for price, size, *_ in raw]


class _Diff(msgspec.Struct, tag_field="e", tag="depthUpdate"):
    """One ``depthUpdate`` event, read."""

    market_id: str = msgspec.field(name="s")
    first: int = msgspec.field(name="U")
    last: int = msgspec.field(name="u")
    #: The event time, in milliseconds.
    time_ms: int = msgspec.field(name="E")
    bids: list[Level] = msgspec.field(name="b")
    asks: list[Level] = msgspec.field(name="a")


class _Trade(msgspec.Struct, tag_field="e", tag="trade"):
    market_id: str = msgspec.field(name="s")
    price: float = msgspec.field(name="p")
    size: float = msgspec.field(name="q")
    trade_id: int = msgspec.field(name="t")
    time_ms: int = msgspec.field(name="T")
    buyer_is_maker: bool = msgspec.field(name="m", default=False)


#: The two events that make up the traffic, read straight into their types:
#: Binance writes prices and sizes as strings, which lax mode reads as floats,
#: in C. This took parsing from 4 to 1.2 µs a message against ``orjson.loads``
#: and converting each level in Python.
_EVENTS = msgspec.json.Decoder(_Diff | _Trade, strict=False)


class _Symbol:
    """One spot symbol on the connection: its feed and where its book stands."""

    __slots__ = ("buffer", "feed", "last_update", "market_id", "snapshot_task", "streams")

    def __init__(self, feed: SymbolFeed, market_id: str) -> None:
        self.feed = feed
        self.market_id = market_id
        name = market_id.lower()
        self.streams = (f"{name}@depth@100ms", f"{name}@trade")
        #: The last update id applied; None while the book is being synced.
        self.last_update: int | None = None
        #: Diff events received while the snapshot is on its way.
        self.buffer: list[_Diff] = []
        self.snapshot_task: asyncio.Task[None] | None = None


class BinanceClient:
    """Every watched Binance symbol: spot on shared connections, derivatives through ccxt."""

    def __init__(self, source: LiveSource, code: str) -> None:
        self.source = source
        self._code = code
        urls = merged(_URLS, source.urls.get(code, {}))
        self.ws_url: str = urls["api"]["ws"]["spot"]
        self._rest_url: str = urls["api"]["public"].rstrip("/")
        #: Spot connections, each carrying at most MAX_SYMBOLS symbols.
        self._connections: list[_SpotConnection] = []
        self._by_code: dict[str, _SpotConnection] = {}
        self._tasks: dict[_SpotConnection, asyncio.Task[None]] = {}
        self._running = False
        self._http: aiohttp.ClientSession | None = None
        self._snapshots = asyncio.Semaphore(_SNAPSHOTS_AT_ONCE)
        self._derivatives: SymbolSessions | None = None
        self._derivatives_task: asyncio.Task[None] | None = None

    # -- ExchangeClient ----------------------------------------------------------

    def watch(self, feed: SymbolFeed, spec: ProductSpec) -> None:
        if spec.type != "FX":
            self._derivative_sessions().watch(feed, spec)
            return
        connection = next((c for c in self._connections if len(c.symbols) < MAX_SYMBOLS), None)
        if connection is None:
            connection = _SpotConnection(self, len(self._connections) + 1)
            self._connections.append(connection)
            if self._running:
                self._start(connection)
        self._by_code[spec.caspian_code] = connection
        connection.add(_Symbol(feed, spec.native_code.replace("/", "").upper()))

    def unwatch(self, symbol: str) -> None:
        connection = self._by_code.pop(symbol, None)
        if connection is None:
            if self._derivatives is not None:
                self._derivatives.unwatch(symbol)
            return
        connection.remove(symbol)
        if not connection.symbols:
            # An idle connection is closed rather than kept: the next symbol
            # watched fills the first connection with room, or opens one.
            self._connections.remove(connection)
            task = self._tasks.pop(connection, None)
            if task is not None:
                task.cancel()

    async def run(self) -> None:
        self._running = True
        for connection in self._connections:
            self._start(connection)
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self._running = False
            tasks = [*self._tasks.values()]
            if self._derivatives_task is not None:
                tasks.append(self._derivatives_task)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._http is not None:
                await self._http.close()

    def _start(self, connection: _SpotConnection) -> None:
        self._tasks[connection] = asyncio.create_task(connection.run())

    def _derivative_sessions(self) -> SymbolSessions:
        if self._derivatives is None:
            from caspian.sources.live.ccxt_pro import SymbolSessions

            self._derivatives = SymbolSessions(self.source, self._code, DERIVATIVES)
            self._derivatives_task = asyncio.create_task(self._derivatives.run())
        return self._derivatives

    # -- REST snapshots, shared by the connections ------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    async def fetch(self, market_id: str) -> tuple[int, list[Level], list[Level]]:
        """The REST snapshot: its last update id and its levels; ValueError if unreadable.

        At most a few are fetched at once, so that a reconnect of many
        symbols does not spend the address's request weight in one burst.
        """
        url = f"{self._rest_url}/depth"
        params = {"symbol": market_id, "limit": str(SNAPSHOT_LEVELS)}
        async with self._snapshots, self.http.get(url, params=params) as response:
            response.raise_for_status()
            book = orjson.loads(await response.read())
        try:
            return int(book["lastUpdateId"]), _levels(book["bids"]), _levels(book["asks"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a depth snapshot ({exc!r}): {str(book)[:200]}") from None


class _SpotConnection:
    """One WebSocket to Binance's raw-stream endpoint and the symbols it carries."""

    def __init__(self, client: BinanceClient, number: int) -> None:
        self._client = client
        self._source = client.source
        #: Which of the client's connections this is, for the log.
        self.number = number
        #: Its symbols by Binance's id (BTCUSDT), the key of its messages.
        self.symbols: dict[str, _Symbol] = {}
        self._by_code: dict[str, _Symbol] = {}
        self._control: asyncio.Queue[tuple[str, tuple[str, ...]]] = asyncio.Queue()
        self._ws: wsclient.WebSocket | None = None
        self._last_message = 0.0
        self._connected_at: float | None = None
        #: Whether the last event read was within the lag bound.
        self._current = True
        self._last_complaint = 0.0
        self._loop_time: Callable[[], float] = time.monotonic

    def add(self, symbol: _Symbol) -> None:
        self.symbols[symbol.market_id] = symbol
        self._by_code[symbol.feed.symbol] = symbol
        if self._ws is not None:
            self._control.put_nowait(("SUBSCRIBE", symbol.streams))

    def remove(self, code: str) -> None:
        symbol = self._by_code.pop(code, None)
        if symbol is None:
            return
        self.symbols.pop(symbol.market_id, None)
        if symbol.snapshot_task is not None:
            symbol.snapshot_task.cancel()
        if self._ws is not None:
            self._control.put_nowait(("UNSUBSCRIBE", symbol.streams))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._source)
        try:
            while True:
                self._connected_at = None
                try:
                    await self._connection()
                except asyncio.CancelledError:
                    raise
                except IntegrityError as exc:
                    self._down(exc.reason, exc)
                except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                    # The socket's own errors do not say which address failed.
                    self._down("disconnect", f"{self._client.ws_url}: {str(exc) or repr(exc)}")
                except Exception as exc:
                    self._down("error", exc, traceback=True)
                connected = self._connected_at
                await backoff.wait(0.0 if connected is None else loop.time() - connected)
                for symbol in self.symbols.values():
                    symbol.feed.reconnecting()
        finally:
            for symbol in self.symbols.values():
                if symbol.snapshot_task is not None:
                    symbol.snapshot_task.cancel()

    # -- the connection ----------------------------------------------------------

    async def _connection(self) -> None:
        """Streams until the connection fails, which it raises."""
        # Whatever was queued for the last connection is in the full subscribe below.
        self._control = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._loop_time = loop.time
        # Binance pings every 20 s and wants the pong, which the client sends.
        ws = await wsclient.connect(self._client.ws_url, self._message, max_size=2**24)
        self._ws = ws
        self._connected_at = self._last_message = loop.time()
        tasks: list[asyncio.Future[None]] = [
            ws.closed,
            asyncio.create_task(self._send_control(ws)),
            asyncio.create_task(watchdog(self._source, lambda: self._last_message, self._tick)),
        ]
        try:
            streams = tuple(s for symbol in self.symbols.values() for s in symbol.streams)
            if streams:
                self._control.put_nowait(("SUBSCRIBE", streams))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            self._ws = None
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks[1:], return_exceptions=True)
            await ws.close()
            for symbol in self.symbols.values():
                if symbol.snapshot_task is not None:
                    symbol.snapshot_task.cancel()
                    symbol.snapshot_task = None

    async def _send_control(self, ws: wsclient.WebSocket) -> None:
        ids = 0
        while True:
            method, streams = await self._control.get()
            for start in range(0, len(streams), _STREAMS_PER_REQUEST):
                ids += 1
                params = list(streams[start : start + _STREAMS_PER_REQUEST])
                # A text frame, as Binance's API is documented with.
                request = {"method": method, "params": params, "id": ids}
                ws.send_text(orjson.dumps(request).decode())
                if method == "SUBSCRIBE":
                    self._sync_all(params)
                await asyncio.sleep(_CONTROL_GAP_S)

    def _sync_all(self, streams: list[str]) -> None:
        """Starts syncing the book of every symbol whose depth stream was just subscribed."""
        for stream in streams:
            name, _, kind = stream.partition("@")
            if not kind.startswith("depth"):
                continue
            symbol = self.symbols.get(name.upper())
            if symbol is not None:
                self._resync(symbol)

    def _message(self, raw: bytes) -> None:
        """One message from the connection, as its bytes arrive."""
        self._last_message = self._loop_time()
        try:
            event = _EVENTS.decode(raw)
        except msgspec.ValidationError as exc:
            self._other(raw, exc)
        except msgspec.DecodeError as exc:
            self._malformed(raw, exc, None)
        else:
            symbol = self.symbols.get(event.market_id)
            if symbol is not None:
                if isinstance(event, _Diff):
                    self._depth(symbol, event)
                else:
                    self._trade(symbol, event)

    def _other(self, raw: str | bytes, exc: msgspec.ValidationError) -> None:
        """Anything but a well-formed event: an answer to a request, or a broken event."""
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # Numbers past 64 bits, which msgspec reads and orjson refuses.
            message = None
        if not isinstance(message, dict):
            self._malformed(raw, exc, None)
        elif message.get("e") in ("depthUpdate", "trade"):
            symbol = message.get("s")
            self._malformed(raw, exc, self.symbols.get(symbol) if isinstance(symbol, str) else None)
        elif "error" in message:
            log.error("Binance refused a request: %s", message["error"])

    def _malformed(self, raw: str | bytes, exc: Exception, symbol: _Symbol | None) -> None:
        """A message Caspian cannot read: its symbol, if known, is rebuilt; the others go on.

        Logged at most once a second, so that a feed of garbage cannot flood the log.
        """
        if symbol is not None:
            symbol.feed.down("error", f"a message that cannot be read: {exc!r}")
            self._resync(symbol)
        now = asyncio.get_running_loop().time()
        if now - self._last_complaint >= 1.0:
            self._last_complaint = now
            log.warning("Binance sent a message that cannot be read (%r): %.200r", exc, raw)

    def _tick(self, silent: float) -> None:
        """Events go through the connection in order: once it is drained, or the last
        event read was current, every symbol held back for lag is current too."""
        if silent >= DRAINED_S or self._current:
            for symbol in self.symbols.values():
                symbol.feed.drained()

    # -- books and trades --------------------------------------------------------

    def _depth(self, symbol: _Symbol, event: _Diff) -> None:
        last = symbol.last_update
        if last is None:
            symbol.buffer.append(event)
            if len(symbol.buffer) > _MAX_BUFFERED:
                # The snapshot is slow in coming: the oldest events go, and the
                # snapshot, when it comes, must then be newer than the first kept.
                del symbol.buffer[: len(symbol.buffer) - _MAX_BUFFERED]
            return
        if event.last <= last:
            return
        if event.first > last + 1:
            symbol.feed.down(
                "sequence", f"update ids {event.first}-{event.last} follow {last}: a hole"
            )
            symbol.buffer.append(event)
            self._resync(symbol)
            return
        symbol.last_update = event.last
        try:
            symbol.feed.diff(event.bids, event.asks, event.time_ms * 1000)
            self._current = not symbol.feed.lagging
        except IntegrityError as exc:
            symbol.feed.down(exc.reason, exc)
            self._resync(symbol)

    def _trade(self, symbol: _Symbol, event: _Trade) -> None:
        symbol.feed.trade(
            event.price,
            event.size,
            str(event.trade_id),
            # The buyer being the maker means the taker sold.
            {"side": "SELL" if event.buyer_is_maker else "BUY"},
            event.time_ms * 1000,
        )

    def _resync(self, symbol: _Symbol) -> None:
        symbol.last_update = None
        if symbol.snapshot_task is None or symbol.snapshot_task.done():
            symbol.snapshot_task = asyncio.create_task(self._snapshot(symbol))

    async def _snapshot(self, symbol: _Symbol) -> None:
        """Fetches the REST snapshot and lines the buffered events up behind it."""
        delay = self._source.backoff_initial_s
        while symbol.last_update is None:
            try:
                last, bids, asks = await self._client.fetch(symbol.market_id)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("Binance %s: no snapshot (%s), retrying", symbol.market_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._source.backoff_max_s)
                continue
            pending = [event for event in symbol.buffer if event.last > last]
            if pending and pending[0].first > last + 1:
                # The snapshot is older than the first event kept: a newer one is needed.
                symbol.buffer = pending
                await asyncio.sleep(delay)
                continue
            symbol.buffer = []
            symbol.last_update = last
            try:
                symbol.feed.snapshot(bids, asks)
            except IntegrityError as exc:
                symbol.feed.down(exc.reason, exc)
                symbol.last_update = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._source.backoff_max_s)
                continue
            for event in pending:
                self._depth(symbol, event)

    def _down(self, reason: str, cause: BaseException | str, *, traceback: bool = False) -> None:
        for symbol in self.symbols.values():
            symbol.buffer = []
            symbol.last_update = None
            symbol.feed.down(reason, cause, traceback=traceback)
