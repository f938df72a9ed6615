"""Real exchanges through ccxt.pro: ``CASPIAN_SOURCE=live:GEMINI,KRAKEN,...``.

BitMEX, which ccxt no longer ships, is streamed by :class:`BitmexConnection`,
a small client of BitMEX's realtime API offering the part of ccxt.pro's
exchange interface a feed uses, so that it runs through the same sessions,
watchdog, checks and metrics as the others.

::

    source = LiveSource(["KRAKEN", "GDAX"], catalog.get)
    task = asyncio.create_task(source.run(sink))
    source.watch("FX-BTC/USD=KRAKEN")

Each watched symbol is a *feed* with its own ccxt.pro exchange object, hence
its own upstream connection. That costs a connection per symbol, and buys
what the service needs most: releasing a symbol closes its connection (most
ccxt.pro exchanges cannot unsubscribe), and a resync or a reconnect of one
symbol never disturbs another. Markets are loaded once per exchange and
shared by its feeds.

A feed runs *sessions*: connect, subscribe the book and the trades, stream
until something goes wrong, then tear everything down and start again after
an exponential backoff with jitter. A session ends on

- a dropped connection or any other error ccxt raises (``disconnect``,
  ``error``);
- the watchdog: no message at all, heartbeats included, for
  ``stall_timeout_s`` (``stall``). The exchanges whose feeds carry heartbeats
  (Kraken, Gemini, Coinbase, where the heartbeat channel is subscribed for
  this, and BitMEX, which answers the client's pings) never trip it on a
  quiet market; on the others a market quieter than the timeout costs a
  needless resubscribe;
- a book that cannot be trusted (``checksum``, ``sequence``, ``crossed``):
  ccxt's own checks (Binance's and HTX's update ids, OKX's and Bitfinex's
  checksums, ...) and those of :mod:`caspian.sources.integrity` (Kraken's
  checksum, Deribit's change ids, a crossed book everywhere) or BitMEX's
  own (a change to a level it never announced).

When a session ends the symbol's three streams go ``disconnected`` at once,
which makes the gateway drop the book; the next session's first book goes out
as a snapshot, then ``connected``, then diffs. Every end is counted in
``caspian_resyncs_total`` by reason and logged.

ccxt.pro hands over its whole local book on every update; a feed keeps the
top ``depth`` levels it last emitted and emits only the levels that changed
(size 0 for a level that left the top), so the gateway's book equals ccxt's
top ``depth`` after every event. Level1 BBO is the top of that book: quote
channels are throttled or batched differently from the depth channel on
several exchanges, and a BBO taken from a second channel could disagree with
the Level2 book clients hold.

Tests and proxies point ccxt at other servers with ``urls``, or the
``CASPIAN_LIVE_URLS`` environment variable holding the same JSON: per
Caspian exchange code, values merged into the ccxt exchange's ``urls``, e.g.
``{"GDAX": {"api": {"ws": "ws://127.0.0.1:9000", "public": "http://127.0.0.1:9000"}}}``.
BitMEX takes the same ``{"api": {"ws": ...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import ccxt.pro
import orjson
from ccxt.base.errors import ChecksumError, InvalidNonce, NetworkError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from caspian.catalog.product import ProductSpec
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Level, StatusEvent, TradeEvent
from caspian.metrics import RESYNCS, STREAM_STATE, UPSTREAM_RECONNECTS
from caspian.sources.base import EventSink, Source
from caspian.sources.integrity import (
    BookCheck,
    DeribitSequence,
    IntegrityError,
    KrakenChecksum,
    crossed,
    decimals,
)
from caspian.timefmt import now_us

log = logging.getLogger(__name__)

LIVE_URLS_ENV = "CASPIAN_LIVE_URLS"

_STREAMS = (Stream.DEPTH, Stream.TRADE, Stream.BBO)

#: Trades older than the session by more than this are the history some
#: exchanges replay on subscribing, already sent in an earlier session.
_HISTORY_TOLERANCE_MS = 10_000

#: BitMEX asks clients to ping once 5 s pass without a message; pinging every
#: 5 s does that without tracking the silence.
_BITMEX_PING_S = 5.0
_BITMEX_WS = "wss://ws.bitmex.com/realtime"

WatchBook = Callable[[Any, str, int | None], Awaitable[Any]]
MakeCheck = Callable[[Mapping[str, Any]], BookCheck]
#: Makes a feed's exchange object without ccxt, from the URL overrides and the
#: watchdog's silence limit.
NativeExchange = Callable[[Mapping[str, Any], float], Any]


async def _watch_order_book(exchange: Any, symbol: str, limit: int | None) -> Any:
    return await exchange.watch_order_book(symbol, limit)


async def _coinbase_book(exchange: Any, symbol: str, limit: int | None) -> Any:
    """Coinbase's ``level2_batch`` channel, with heartbeats.

    ccxt subscribes to ``level2``, which Coinbase Exchange now serves to
    authenticated connections only; ``level2_batch`` is the public channel
    with the same messages, batched every 50 ms, and ccxt's handler for
    ``level2`` applies them under the same message hash.
    """
    market = exchange.market(symbol)
    message_hash = "level2:" + market["id"]
    request = {
        "type": "subscribe",
        "product_ids": [market["id"]],
        "channels": ["level2_batch", "heartbeat"],
    }
    subscription = {
        "messageHash": message_hash,
        "symbol": market["symbol"],
        "marketId": market["id"],
        "limit": limit,
    }
    book = await exchange.watch(
        exchange.urls["api"]["ws"], message_hash, request, message_hash, subscription
    )
    return book.limit()


def _kraken_check(market: Mapping[str, Any]) -> BookCheck:
    precision = market.get("precision") or {}
    return KrakenChecksum(
        str(market["symbol"]),
        decimals(precision.get("price"), 8),
        decimals(precision.get("amount"), 8),
    )


def _deribit_check(market: Mapping[str, Any]) -> BookCheck:
    return DeribitSequence(str(market["id"]))


def _gemini_without_history(message: Any) -> Any:
    """Gemini's first ``l2_updates`` message replays recent trades with the book."""
    if (
        isinstance(message, dict)
        and message.get("type") == "l2_updates"
        and "auction_events" in message
    ):
        return {**message, "trades": []}
    return message


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
        self.urls = _merged({"api": {"ws": _BITMEX_WS}}, urls)
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
        self._bids: dict[float, float] = {}
        self._asks: dict[float, float] = {}
        self._book_ms: int | None = None
        self._has_book = False
        self._book_changed = False
        self._trades: list[dict[str, Any]] = []

    async def watch_order_book(self, symbol: str, limit: int | None = None) -> dict[str, Any]:
        await self._subscribe(f"orderBookL2:{symbol}")
        while not self._book_changed:
            await self._next()
        self._book_changed = False
        bids = sorted(self._bids.items(), reverse=True)[:limit]
        asks = sorted(self._asks.items())[:limit]
        return {"bids": bids, "asks": asks, "timestamp": self._book_ms}

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
            self._bids.clear()
            self._asks.clear()
            self._has_book = True
        elif not self._has_book:
            # Changes to a book not received yet.
            return
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
            levels = self._bids if side == "Buy" else self._asks
            if action == "delete":
                del self._ids[row["id"]]
                levels.pop(price, None)
            else:
                levels[price] = float(row["size"])
            stamp = _ms(row.get("timestamp"))
            if stamp is not None:
                self._book_ms = stamp
        self._book_changed = True
        self._notify()


@dataclass(frozen=True, slots=True)
class Adapter:
    """What differs between exchanges, on top of ccxt.pro's unified API."""

    #: None for an exchange streamed without ccxt, by ``native``.
    ccxt_id: str | None
    #: Depth asked of ccxt; None leaves the exchange's default (often full depth).
    book_limit: int | None = None
    watch_book: WatchBook = _watch_order_book
    trade_params: Mapping[str, Any] = field(default_factory=dict)
    #: Raw trade fields copied into TradeEvent.info, as the exchange names them.
    info_fields: tuple[str, ...] = ()
    check: MakeCheck | None = None
    #: Rewrites a raw message before ccxt sees it.
    prepare: Callable[[Any], Any] | None = None
    #: What ccxt's ChecksumError means here: some ccxt exchanges raise it on
    #: update-id gaps.
    checksum_reason: str = "checksum"
    native: NativeExchange | None = None

    def __post_init__(self) -> None:
        if (self.ccxt_id is None) == (self.native is None):
            raise ValueError("an adapter streams either through ccxt or natively")


#: The exchanges ccxt.pro streams, and BitMEX. Those given more than a ccxt id
#: were tested against local servers speaking their message formats.
ADAPTERS: dict[str, Adapter] = {
    "BINANCE": Adapter("binance", book_limit=1000, checksum_reason="sequence"),
    "BITFINEX": Adapter("bitfinex"),
    "BITHUMB": Adapter("bithumb"),
    # Native ids (XBTUSD) name its products, as there are no ccxt markets.
    "BITMEX": Adapter(None, info_fields=("tickDirection",), native=BitmexConnection),
    "BITSTAMP": Adapter("bitstamp"),
    "CEX": Adapter("cex"),
    "GDAX": Adapter(
        "coinbaseexchange",
        watch_book=_coinbase_book,
        info_fields=("maker_order_id", "taker_order_id", "sequence"),
    ),
    "COINONE": Adapter("coinone"),
    "DERIBIT": Adapter(
        "deribit",
        info_fields=("trade_seq", "tick_direction", "mark_price", "index_price"),
        check=_deribit_check,
    ),
    "GEMINI": Adapter("gemini", prepare=_gemini_without_history),
    "HITBTC": Adapter("hitbtc"),
    # ccxt renamed Huobi to HTX.
    "HUOBI": Adapter("htx", checksum_reason="sequence"),
    "KRAKEN": Adapter(
        "kraken",
        book_limit=100,
        # Kraken replays its last 50 trades on subscribing unless told not to.
        trade_params={"snapshot": False},
        info_fields=("ord_type",),
        check=_kraken_check,
    ),
    "KUCOIN": Adapter("kucoin"),
    "OKEX": Adapter("okx"),
    "POLONIEX": Adapter("poloniex"),
}

#: Why the other Caspian exchanges cannot be streamed.
UNSUPPORTED: dict[str, str] = {
    "BITFLYER": "ccxt.pro has no WebSocket support for bitFlyer (ccxt has its REST API only)",
    "BITTREX": "the exchange closed in December 2023",
    "BTCC": "the exchange closed the spot market the API knew in 2017; ccxt dropped it",
    "ITBIT": "itBit became Paxos; ccxt dropped it",
    "KORBIT": "ccxt dropped Korbit",
    "LIQUID": "the exchange closed in 2022 when FTX, its owner, collapsed; ccxt dropped it",
}


def parse_exchanges(text: str) -> list[str]:
    """``"gemini, KRAKEN"`` -> ``["GEMINI", "KRAKEN"]``; unknown or unsupported codes raise."""
    codes = [code.strip().upper() for code in text.split(",") if code.strip()]
    if not codes:
        raise ValueError("name the exchanges: live:EXCHANGE,...")
    for code in codes:
        if code in UNSUPPORTED:
            raise ValueError(f"cannot stream {code} live: {UNSUPPORTED[code]}")
        if code not in ADAPTERS:
            raise ValueError(f"unknown exchange {code!r}; live supports {', '.join(ADAPTERS)}")
    return codes


def urls_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, dict[str, Any]]:
    """The URL overrides of ``CASPIAN_LIVE_URLS``, empty when it is not set."""
    text = environ.get(LIVE_URLS_ENV, "").strip()
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{LIVE_URLS_ENV} is not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"{LIVE_URLS_ENV} must map exchange codes to objects")
    return {str(code).upper(): urls for code, urls in value.items()}


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = _merged(current, value)
        else:
            out[key] = value
    return out


def _reason(exc: BaseException, adapter: Adapter) -> str:
    if isinstance(exc, IntegrityError):
        return exc.reason
    # Before NetworkError: ccxt files both checks under it.
    if isinstance(exc, ChecksumError):
        return adapter.checksum_reason
    if isinstance(exc, InvalidNonce):
        return "sequence"
    if isinstance(exc, NetworkError | OSError | WebSocketException):
        return "disconnect"
    return "error"


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: in the upper half of ``initial * 2**attempt``, capped.

    The jitter spreads the reconnects of many symbols cut off by one outage.
    """
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 32))
    return rng.uniform(ceiling / 2.0, ceiling)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _levels(side: Iterable[Any], depth: int) -> dict[float, float]:
    levels: dict[float, float] = {}
    for level in side:
        if len(levels) >= depth:
            break
        levels[float(level[0])] = float(level[1])
    return levels


def _changes(old: Mapping[float, float], new: Mapping[float, float]) -> list[Level]:
    changes = [(price, size) for price, size in new.items() if old.get(price) != size]
    changes += [(price, 0.0) for price in old if price not in new]
    return changes


@dataclass(frozen=True, slots=True)
class _Ended:
    """Why a session ended: the resync metric's reason and what ccxt or a check raised."""

    reason: str
    cause: BaseException


class _Session:
    """One upstream connection of a feed, from connect to its first failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ended: asyncio.Future[_Ended] = loop.create_future()
        self.last_message = loop.time()
        self.start_ms = now_us() // 1000
        self.up = False

    def end(self, reason: str, cause: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(_Ended(reason, cause))

    @property
    def over(self) -> bool:
        return self.ended.done()


class LiveSource(Source):
    """Streams watched catalog products of ``exchanges`` (Caspian codes) from the exchanges.

    ``product`` resolves a Caspian code; its ``native_code_v2`` is the ccxt
    symbol (BitMEX, streamed without ccxt, takes its ``native_code``).
    ``urls`` overrides ccxt URLs per exchange (module docs); ``markets``
    gives ccxt markets per exchange instead of loading them from the
    exchange. ``depth`` levels per side are kept; ``stall_timeout_s`` is the
    watchdog's silence limit; reconnects wait ``backoff_initial_s``,
    doubling up to ``backoff_max_s``.
    """

    def __init__(
        self,
        exchanges: Iterable[str],
        product: Callable[[str], ProductSpec | None],
        *,
        urls: Mapping[str, Mapping[str, Any]] | None = None,
        markets: Mapping[str, Mapping[str, Any]] | None = None,
        depth: int = 100,
        stall_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        seed: int | None = None,
    ) -> None:
        self.exchanges = parse_exchanges(",".join(exchanges))
        if depth <= 0 or stall_timeout_s <= 0 or backoff_initial_s <= 0:
            raise ValueError("depth, stall_timeout_s and backoff_initial_s must be positive")
        if backoff_max_s < backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        self._product = product
        self._urls = {code.upper(): dict(value) for code, value in (urls or {}).items()}
        self._markets = {code.upper(): value for code, value in (markets or {}).items()}
        self.depth = depth
        self.stall_timeout_s = stall_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rng = random.Random(seed)
        self._sink: EventSink | None = None
        self._watched: dict[str, ProductSpec] = {}
        self._feeds: dict[str, tuple[_Feed, asyncio.Task[None]]] = {}
        self._loaders: dict[str, Any] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._watched)

    def watch(self, symbol: str) -> None:
        if symbol in self._watched:
            return
        spec = self._product(symbol)
        if spec is None:
            return
        if spec.exchange not in self.exchanges:
            log.debug("not streaming %s: %s is not a live exchange", symbol, spec.exchange)
            return
        self._watched[symbol] = spec
        if self._sink is not None:
            self._start(spec, self._sink)

    def unwatch(self, symbol: str) -> None:
        spec = self._watched.pop(symbol, None)
        if spec is None:
            return
        running = self._feeds.pop(symbol, None)
        if running is not None:
            feed, task = running
            feed.stop()
            task.cancel()
        _forget_streams(spec)

    async def run(self, sink: EventSink) -> None:
        self._sink = sink
        for spec in self._watched.values():
            self._start(spec, sink)
        try:
            await asyncio.Future()
        finally:
            self._sink = None
            for spec in self._watched.values():
                _forget_streams(spec)
            tasks = [task for _, task in self._feeds.values()]
            self._feeds.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for loader in self._loaders.values():
                self._close_later(loader)
            self._loaders.clear()
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _start(self, spec: ProductSpec, sink: EventSink) -> None:
        for stream in _STREAMS:
            STREAM_STATE.labels(spec.exchange, spec.caspian_code, stream.value).set(0)
        feed = _Feed(self, spec, ADAPTERS[spec.exchange], sink)
        task = asyncio.create_task(feed.run(), name=f"caspian-live-{spec.caspian_code}")
        self._feeds[spec.caspian_code] = (feed, task)

    def new_exchange(self, code: str) -> Any:
        """A ccxt.pro exchange object of ``code`` (or its native one) with the URL overrides."""
        adapter = ADAPTERS[code]
        overrides = self._urls.get(code)
        if adapter.ccxt_id is None:
            assert adapter.native is not None
            return adapter.native(overrides or {}, self.stall_timeout_s)
        exchange = getattr(ccxt.pro, adapter.ccxt_id)({"enableRateLimit": True})
        if overrides:
            exchange.urls = _merged(exchange.urls, overrides)
        return exchange

    async def loader(self, code: str) -> Any:
        """The exchange object holding ``code``'s markets, loaded on first use."""
        lock = self._loading.setdefault(code, asyncio.Lock())
        async with lock:
            loader = self._loaders.get(code)
            if loader is not None:
                return loader
            loader = self.new_exchange(code)
            try:
                markets = self._markets.get(code)
                if markets is not None:
                    # ccxt's handlers index markets by id as given, so partial
                    # ones (ccxt's own fixtures, say) are completed first.
                    loader.set_markets(
                        {
                            symbol: loader.safe_market_structure(market)
                            for symbol, market in markets.items()
                        }
                    )
                else:
                    await loader.load_markets()
            except BaseException:
                self._close_later(loader)
                raise
            self._loaders[code] = loader
            return loader

    def _close_later(self, exchange: Any) -> None:
        """Closes a ccxt exchange in the background: ccxt lingers a moment on close."""
        task = asyncio.create_task(_close(exchange))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _forget_streams(spec: ProductSpec) -> None:
    """Drops an unwatched symbol's gauges, so that /metrics lists watched symbols only."""
    for stream in _STREAMS:
        with contextlib.suppress(KeyError):
            STREAM_STATE.remove(spec.exchange, spec.caspian_code, stream.value)


async def _close(exchange: Any) -> None:
    try:
        await exchange.close()
    except Exception:
        log.debug("closing a ccxt exchange failed", exc_info=True)


class _Feed:
    """Streams one symbol: sessions one after another until cancelled."""

    def __init__(
        self, source: LiveSource, spec: ProductSpec, adapter: Adapter, sink: EventSink
    ) -> None:
        self._source = source
        self._spec = spec
        self._adapter = adapter
        self._sink = sink
        self._symbol = spec.caspian_code
        # What the exchange object calls the symbol.
        self._market_symbol = spec.native_code_v2 if adapter.native is None else spec.native_code
        self._labels = (spec.exchange, spec.caspian_code)
        self._up = False
        self._stopped = False
        self._bids: dict[float, float] = {}
        self._asks: dict[float, float] = {}
        self._book_sent = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        source = self._source
        attempt = 0
        while True:
            session = _Session(loop)
            started = loop.time()
            ended = await self._session(session)
            if ended is None:
                return
            self._down(ended)
            # A session that streamed for a while proves the exchange back:
            # the next failure starts the backoff over.
            if session.up and loop.time() - started >= source.backoff_max_s:
                attempt = 0
            delay = backoff_delay(
                attempt, source.backoff_initial_s, source.backoff_max_s, source.rng
            )
            attempt += 1
            await asyncio.sleep(delay)
            UPSTREAM_RECONNECTS.labels(*self._labels).inc()

    async def _session(self, session: _Session) -> _Ended | None:
        """Runs one session; why it ended, or None when the symbol cannot be streamed."""
        source = self._source
        code = self._spec.exchange
        exchange = source.new_exchange(code)
        tasks: list[asyncio.Task[None]] = []
        try:
            if self._adapter.native is None:
                try:
                    loader = await source.loader(code)
                except Exception as exc:
                    return _Ended(_reason(exc, self._adapter), exc)
                market = loader.markets.get(self._market_symbol) if loader.markets else None
                if market is None:
                    log.error(
                        "not streaming %s: %s has no market %r",
                        self._symbol,
                        code,
                        self._market_symbol,
                    )
                    return None
                exchange.set_markets_from_exchange(loader)
            else:
                market = {"id": self._market_symbol, "symbol": self._market_symbol}
            self._hook(exchange, session, market)
            tasks = [
                asyncio.create_task(self._guard(session, self._books(exchange, session))),
                asyncio.create_task(self._guard(session, self._trades(exchange, session))),
                asyncio.create_task(self._guard(session, self._watchdog(session))),
            ]
            return await session.ended
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            source._close_later(exchange)

    def _hook(self, exchange: Any, session: _Session, market: Mapping[str, Any]) -> None:
        """Sees every raw message of the connection: for the watchdog and the checks."""
        handle = exchange.handle_message
        prepare = self._adapter.prepare
        check = self._adapter.check(market) if self._adapter.check is not None else None
        loop = asyncio.get_running_loop()
        market_symbol = self._market_symbol

        def on_message(client: Any, message: Any) -> None:
            if session.over:
                return
            session.last_message = loop.time()
            if prepare is not None:
                message = prepare(message)
            try:
                handle(client, message)
                if check is not None:
                    check(message, exchange.orderbooks.get(market_symbol))
            except Exception as exc:
                # An exception escaping here would stop ccxt's receive loop
                # for good, leaving a silent connection behind.
                session.end(_reason(exc, self._adapter), exc)

        exchange.handle_message = on_message

    async def _guard(self, session: _Session, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            session.end(_reason(exc, self._adapter), exc)

    async def _watchdog(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._source.stall_timeout_s
        while True:
            silent = loop.time() - session.last_message
            if silent >= timeout:
                raise IntegrityError("stall", f"no message for {silent:.1f} s")
            await asyncio.sleep(timeout - silent)

    async def _books(self, exchange: Any, session: _Session) -> None:
        watch = self._adapter.watch_book
        limit = self._adapter.book_limit
        depth = self._source.depth
        while True:
            book = await watch(exchange, self._market_symbol, limit)
            if session.over:
                # ccxt applied the message that failed a check and woke us up
                # before the check ran: that book must not go out.
                return
            if crossed(book["bids"], book["asks"]):
                best_bid, best_ask = book["bids"][0][0], book["asks"][0][0]
                raise IntegrityError("crossed", f"best bid {best_bid} >= best ask {best_ask}")
            self._emit_book(book, depth, session)

    def _emit_book(self, book: Mapping[str, Any], depth: int, session: _Session) -> None:
        ts = now_us()
        timestamp = book.get("timestamp")
        exchange_ts = int(timestamp) * 1000 if timestamp is not None else None
        bids = _levels(book["bids"], depth)
        asks = _levels(book["asks"], depth)
        if not self._book_sent:
            self._book_sent = True
            session.up = True
            self._emit(
                BookEvent(
                    self._symbol, ts, True, list(bids.items()), list(asks.items()), exchange_ts
                )
            )
            self._set_streams(StreamState.CONNECTED, ts)
        else:
            bid_changes = _changes(self._bids, bids)
            ask_changes = _changes(self._asks, asks)
            if not bid_changes and not ask_changes:
                return
            self._emit(BookEvent(self._symbol, ts, False, bid_changes, ask_changes, exchange_ts))
        self._bids = bids
        self._asks = asks

    async def _trades(self, exchange: Any, session: _Session) -> None:
        fields = self._adapter.info_fields
        oldest_ms = session.start_ms - _HISTORY_TOLERANCE_MS
        while True:
            trades = await exchange.watch_trades(
                self._market_symbol, params=dict(self._adapter.trade_params)
            )
            if session.over:
                return
            ts = now_us()
            for trade in trades:
                timestamp = trade.get("timestamp")
                price, amount = trade.get("price"), trade.get("amount")
                if price is None or amount is None:
                    log.debug("%s: a trade without price or size: %r", self._symbol, trade)
                    continue
                if timestamp is not None and timestamp < oldest_ms:
                    continue
                self._emit(
                    TradeEvent(
                        self._symbol,
                        ts,
                        float(price),
                        float(amount),
                        None if trade.get("id") is None else str(trade["id"]),
                        _trade_info(trade, fields),
                        int(timestamp) * 1000 if timestamp is not None else None,
                    )
                )

    def _down(self, ended: _Ended) -> None:
        exchange, symbol = self._labels
        RESYNCS.labels(exchange, symbol, ended.reason).inc()
        log.warning(
            "%s %s: resubscribing (%s): %s",
            exchange,
            symbol,
            ended.reason,
            ended.cause,
            # The expected failures speak for themselves; the rest need their traceback.
            exc_info=ended.cause if ended.reason == "error" else None,
        )
        self._bids = {}
        self._asks = {}
        self._book_sent = False
        if self._up:
            self._set_streams(StreamState.DISCONNECTED, now_us())

    def _set_streams(self, state: StreamState, ts: int) -> None:
        self._up = state is StreamState.CONNECTED
        for stream in _STREAMS:
            STREAM_STATE.labels(*self._labels, stream.value).set(1 if self._up else 0)
            self._emit(StatusEvent(self._symbol, ts, stream, state))

    def stop(self) -> None:
        """Emits nothing more, though its tasks may still run until their cancellation lands.

        The symbol may be watched again at once, by a new feed whose events
        must not mix with this one's.
        """
        self._stopped = True

    def _emit(self, event: BookEvent | TradeEvent | StatusEvent) -> None:
        if self._stopped:
            return
        try:
            self._sink(event)
        except Exception:
            # One consumer's bug must not end the upstream session.
            log.exception("event sink failed on %r", event)


def _trade_info(trade: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, str]:
    """The taker's side as BUY or SELL, then the exchange's own fields that are present."""
    info: dict[str, str] = {}
    side = trade.get("side")
    if side:
        info["side"] = str(side).upper()
    raw = trade.get("info")
    if isinstance(raw, Mapping):
        for name in fields:
            value = raw.get(name)
            if value is not None:
                info[name] = _text(value)
    return info
