"""Exchanges streamed through ccxt.pro, one connection per watched symbol.

::

    sessions = SymbolSessions(source, "KRAKEN", adapter)
    sessions.watch(feed, spec)      # feed: the symbol's SymbolFeed

Each watched symbol has its own ccxt.pro exchange object, hence its own
upstream connection: releasing a symbol closes it (most ccxt.pro exchanges
cannot unsubscribe), and a resync of one symbol never disturbs another.
Markets are loaded once per exchange and shared.

A symbol runs *sessions*: connect, subscribe the book and the trades, stream
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
  ccxt's own checks and those of :mod:`caspian.sources.integrity`, which see
  every raw message right after ccxt applied it.

Every raw message goes through a hook around ccxt's ``handle_message``:
after ccxt applied it (and the checks passed), the top ``depth`` levels of
ccxt's book are compared with those last emitted, and what changed goes out
at once. So every change reaches the feed, not only the book ccxt holds when
a watcher happens to wake, and the comparison is one C-level equality of two
tuples when the message left the top alone. The first book of a session goes
out when ccxt first resolves the book watcher, as a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ccxt.pro
from ccxt.base.errors import ChecksumError, InvalidNonce, NetworkError
from websockets.exceptions import WebSocketException

from caspian.book import BookView
from caspian.sources.integrity import IntegrityError
from caspian.sources.live.adapter import Adapter
from caspian.sources.live.feed import SymbolFeed
from caspian.sources.live.source import DRAINED_S, Backoff, close_quietly, merged, watchdog
from caspian.timefmt import now_us

if TYPE_CHECKING:
    from caspian.catalog.product import ProductSpec
    from caspian.sources.live.registry import Exchange
    from caspian.sources.live.source import LiveSource

log = logging.getLogger("caspian.sources.live")

#: The top levels of a session's book and their exchange time in microseconds.
_ReadTop = Callable[[], tuple[BookView | None, int | None]]

#: Trades older than the session by more than this are the history some
#: exchanges replay on subscribing, already sent in an earlier session.
_HISTORY_TOLERANCE_MS = 10_000


def client(source: LiveSource, exchange: Exchange) -> SymbolSessions:
    assert exchange.adapter is not None
    return SymbolSessions(source, exchange.code, exchange.adapter)


class SymbolSessions:
    """The watched symbols of one exchange, each streamed by sessions of its own.

    ``new_exchange`` makes an exchange object for a session; by default a
    ccxt.pro one with the source's URL overrides. An object made otherwise
    (:mod:`caspian.sources.live.bitmex`) streams native ids, needs no
    markets, and shows its book through ``view(symbol, depth)``.
    """

    def __init__(
        self,
        source: LiveSource,
        code: str,
        adapter: Adapter,
        new_exchange: Callable[[], Any] | None = None,
    ) -> None:
        self.source = source
        self.code = code
        self.adapter = adapter
        self.native = new_exchange is not None
        self._new_exchange = new_exchange or self._ccxt_exchange
        self._loader: Any = None
        self._loading = asyncio.Lock()
        self._running: dict[str, tuple[_Symbol, asyncio.Task[None]]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def watch(self, feed: SymbolFeed, spec: ProductSpec) -> None:
        symbol = _Symbol(self, feed, spec.native_code if self.native else spec.native_code_v2)
        task = asyncio.create_task(symbol.run(), name=f"caspian-live-{spec.caspian_code}")
        self._running[spec.caspian_code] = (symbol, task)

    def unwatch(self, symbol: str) -> None:
        running = self._running.pop(symbol, None)
        if running is not None:
            running[1].cancel()

    async def run(self) -> None:
        try:
            await asyncio.Future()
        finally:
            tasks = [task for _, task in self._running.values()]
            self._running.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._loader is not None:
                self.close_later(self._loader)
            await asyncio.gather(*self._closing, return_exceptions=True)

    def new_exchange(self) -> Any:
        return self._new_exchange()

    def _ccxt_exchange(self) -> Any:
        exchange = getattr(ccxt.pro, self.adapter.ccxt_id)(
            {"enableRateLimit": True, "asyncio_loop": asyncio.get_running_loop()}
        )
        overrides = self.source.urls.get(self.code)
        if overrides:
            exchange.urls = merged(exchange.urls, overrides)
        return exchange

    async def loader(self) -> Any:
        """The exchange object holding the markets, loaded on first use."""
        async with self._loading:
            if self._loader is not None:
                return self._loader
            loader = self.new_exchange()
            try:
                markets = self.source.markets.get(self.code)
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
                self.close_later(loader)
                raise
            self._loader = loader
            return loader

    def close_later(self, exchange: Any) -> None:
        """Closes an exchange object in the background: ccxt lingers a moment on close."""
        task = asyncio.create_task(close_quietly(exchange))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


@dataclass(frozen=True, slots=True)
class _Ended:
    """Why a session ended: the resync metric's reason and what ccxt or a check raised."""

    reason: str
    cause: BaseException


class _Session:
    """One upstream connection of a symbol, from connect to its first failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ended: asyncio.Future[_Ended] = loop.create_future()
        self.last_message = loop.time()
        self.start_ms = now_us() // 1000
        #: Set once the first book went out: later messages go out as diffs.
        self.streaming = False

    def end(self, reason: str, cause: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(_Ended(reason, cause))

    @property
    def over(self) -> bool:
        return self.ended.done()


class _Symbol:
    """Streams one symbol: sessions one after another until cancelled."""

    def __init__(self, sessions: SymbolSessions, feed: SymbolFeed, market_symbol: str) -> None:
        self._sessions = sessions
        self._feed = feed
        self._adapter = sessions.adapter
        #: What the exchange object calls the symbol.
        self._market_symbol = market_symbol

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._sessions.source)
        feed = self._feed
        while True:
            session = _Session(loop)
            started = loop.time()
            ended = await self._session(session)
            if ended is None:
                return
            feed.down(ended.reason, ended.cause, traceback=ended.reason == "error")
            await backoff.wait(loop.time() - started if session.streaming else 0.0)
            feed.reconnecting()

    async def _session(self, session: _Session) -> _Ended | None:
        """Runs one session; why it ended, or None when the symbol cannot be streamed."""
        sessions = self._sessions
        exchange = sessions.new_exchange()
        tasks: list[asyncio.Task[None]] = []
        try:
            if sessions.native:
                market: Mapping[str, Any] = {
                    "id": self._market_symbol,
                    "symbol": self._market_symbol,
                }
            else:
                try:
                    loader = await sessions.loader()
                except Exception as exc:
                    return _Ended(_reason(exc, self._adapter), exc)
                found = loader.markets.get(self._market_symbol) if loader.markets else None
                if found is None:
                    log.error(
                        "not streaming %s: %s has no market %r",
                        self._feed.symbol,
                        sessions.code,
                        self._market_symbol,
                    )
                    return None
                market = found
                exchange.set_markets_from_exchange(loader)
            read_top = self._reader_of(exchange)
            try:
                self._hook(exchange, session, market, read_top)
            except Exception as exc:
                # A symbol whose session cannot even start must say so and retry.
                return _Ended(_reason(exc, self._adapter), exc)
            tasks = [
                asyncio.create_task(
                    self._guard(session, self._books(exchange, session, read_top))
                ),
                asyncio.create_task(self._guard(session, self._trades(exchange, session))),
                asyncio.create_task(
                    self._guard(
                        session,
                        watchdog(sessions.source, lambda: session.last_message, self._tick),
                    )
                ),
            ]
            return await session.ended
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sessions.close_later(exchange)

    def _hook(
        self, exchange: Any, session: _Session, market: Mapping[str, Any], read_top: _ReadTop
    ) -> None:
        """Sees every raw message of the connection: the watchdog, the checks and the diffs."""
        handle = exchange.handle_message
        prepare = self._adapter.prepare
        settles = self._adapter.settles
        check = self._adapter.check(market) if self._adapter.check is not None else None
        loop = asyncio.get_running_loop()
        market_symbol = self._market_symbol
        feed = self._feed

        def on_message(client: Any, message: Any) -> None:
            if session.over:
                return
            session.last_message = loop.time()
            if prepare is not None:
                message = prepare(message)
            try:
                handle(client, message)
                if check is not None:
                    orderbooks = getattr(exchange, "orderbooks", None)
                    check(message, orderbooks.get(market_symbol) if orderbooks else None)
                if session.streaming and (settles is None or settles(message)):
                    top, exchange_ts = read_top()
                    if top is not None:
                        feed.view(top, exchange_ts)
            except Exception as exc:
                # An exception escaping here would stop ccxt's receive loop
                # for good, leaving a silent connection behind.
                session.end(_reason(exc, self._adapter), exc)

        exchange.handle_message = on_message

    def _reader_of(self, exchange: Any) -> _ReadTop:
        """Reads the top ``depth`` levels of the exchange object's book, with its time."""
        symbol = self._market_symbol
        depth = self._feed.depth
        native_view: Callable[[str, int], tuple[BookView | None, int | None]] | None = (
            getattr(exchange, "view", None) if self._sessions.native else None
        )

        def read_top() -> tuple[BookView | None, int | None]:
            if native_view is not None:
                top, stamp_ms = native_view(symbol, depth)
            else:
                book = exchange.orderbooks.get(symbol)
                if book is None:
                    return None, None
                top = BookView(
                    tuple([(level[0], level[1]) for level in book["bids"][:depth]]),
                    tuple([(level[0], level[1]) for level in book["asks"][:depth]]),
                )
                stamp_ms = book.get("timestamp")
            return top, None if stamp_ms is None else int(stamp_ms) * 1000

        return read_top

    def _tick(self, silent: float) -> None:
        if silent >= DRAINED_S:
            self._feed.drained()

    async def _guard(self, session: _Session, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            session.end(_reason(exc, self._adapter), exc)

    async def _books(self, exchange: Any, session: _Session, read_top: _ReadTop) -> None:
        """Subscribes the book, sends the first one, then surfaces ccxt's errors.

        The later books reach the feed from the message hook, one message at
        a time; waiting on the watcher still matters, as ccxt reports a lost
        connection or a failed check of its own through it.
        """
        watch = self._adapter.watch_book
        limit = self._adapter.book_limit
        while True:
            await watch(exchange, self._market_symbol, limit)
            if session.over:
                # ccxt applied the message that failed a check and woke us up
                # before the check ran: that book must not go out.
                return
            if session.streaming:
                continue
            top, exchange_ts = read_top()
            if top is None:
                continue
            self._feed.snapshot(top.bids, top.asks, exchange_ts)
            session.streaming = True

    async def _trades(self, exchange: Any, session: _Session) -> None:
        fields = self._adapter.info_fields
        id_field = self._adapter.trade_id_field
        oldest_ms = session.start_ms - _HISTORY_TOLERANCE_MS
        feed = self._feed
        while True:
            trades = await exchange.watch_trades(
                self._market_symbol, params=dict(self._adapter.trade_params)
            )
            if session.over:
                return
            for trade in trades:
                timestamp = trade.get("timestamp")
                price, amount = trade.get("price"), trade.get("amount")
                if price is None or amount is None:
                    log.debug("%s: a trade without price or size: %r", feed.symbol, trade)
                    continue
                if timestamp is not None and timestamp < oldest_ms:
                    continue
                trade_id = trade.get("id") if id_field is None else trade["info"].get(id_field)
                feed.trade(
                    float(price),
                    float(amount),
                    None if trade_id is None else str(trade_id),
                    trade_info(trade, fields),
                    int(timestamp) * 1000 if timestamp is not None else None,
                )


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


def trade_info(trade: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, str]:
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
                info[name] = "true" if value is True else "false" if value is False else str(value)
    return info
