"""The live source: watched symbols, routed to one client per exchange."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from caspian.book import OrderBook
from caspian.sources.base import EventSink, Source
from caspian.sources.integrity import IntegrityError
from caspian.sources.live.feed import SymbolFeed
from caspian.sources.live.registry import BY_CODE, Exchange, parse_exchanges

if TYPE_CHECKING:
    from caspian.catalog.product import ProductSpec

log = logging.getLogger("caspian.sources.live")

LIVE_URLS_ENV = "CASPIAN_LIVE_URLS"


class ExchangeClient(Protocol):
    """Streams the watched symbols of one exchange into their feeds."""

    def watch(self, feed: SymbolFeed, spec: ProductSpec) -> None:
        """Starts streaming ``spec`` into ``feed``."""

    def unwatch(self, symbol: str) -> None:
        """Stops streaming ``symbol``; its feed was stopped already."""

    async def run(self) -> None:
        """Runs until cancelled, then releases every connection."""


class LiveSource(Source):
    """Streams watched catalog products of ``exchanges`` (Caspian codes) from the exchanges.

    ``product`` resolves a Caspian code. ``urls`` overrides an exchange's
    addresses (CONTRACT.md section 7; see :func:`urls_from_env`); ``markets``
    gives ccxt markets per exchange instead of loading them from the
    exchange. ``depth`` levels per side are kept; ``stall_timeout_s`` is the
    watchdog's silence limit; ``max_lag_s`` the delay behind the exchange
    past which a symbol's streams are shown ``disconnected``; reconnects wait
    ``backoff_initial_s``, doubling up to ``backoff_max_s``.
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
        max_lag_s: float = 2.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        seed: int | None = None,
    ) -> None:
        self.exchanges = parse_exchanges(",".join(exchanges))
        self._streamed = ",".join(self.exchanges)
        if min(depth, stall_timeout_s, backoff_initial_s, max_lag_s) <= 0:
            raise ValueError(
                "depth, stall_timeout_s, max_lag_s and backoff_initial_s must be positive"
            )
        if backoff_max_s < backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        self._product = product
        self.urls = {code.upper(): dict(value) for code, value in (urls or {}).items()}
        self.markets = {code.upper(): value for code, value in (markets or {}).items()}
        self.depth = depth
        self.stall_timeout_s = stall_timeout_s
        self.max_lag_s = max_lag_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rng = random.Random(seed)
        self._sink: EventSink | None = None
        self._watched: dict[str, ProductSpec] = {}
        self._feeds: dict[str, SymbolFeed] = {}
        #: Each watched symbol's book, kept across its feed's restarts: a gateway
        #: in this process reads it (publish_depth).
        self._books: dict[str, OrderBook] = {}
        #: Watched symbols whose gateway asked for a shallower top than ``depth``.
        self._published: dict[str, int] = {}
        self._clients: dict[str, tuple[ExchangeClient, asyncio.Task[None]]] = {}

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
        self._books[symbol] = OrderBook()
        if self._sink is not None:
            self._start(spec, self._sink)

    def publish_depth(self, symbol: str, depth: int) -> OrderBook | None:
        book = self._books.get(symbol)
        if book is None:
            return None
        self._published[symbol] = depth
        feed = self._feeds.get(symbol)
        if feed is not None:
            feed.publish(depth)
        return book

    def unserved(self, symbol: str) -> str | None:
        exchange = symbol.rpartition("=")[2]
        if exchange in self.exchanges:
            return None
        return f"{exchange} is not streamed live here (this service streams {self._streamed})"

    def unwatch(self, symbol: str) -> None:
        spec = self._watched.pop(symbol, None)
        if spec is None:
            return
        self._published.pop(symbol, None)
        del self._books[symbol]
        feed = self._feeds.pop(symbol, None)
        if feed is not None:
            feed.stop()
            self._clients[spec.exchange][0].unwatch(symbol)

    async def run(self, sink: EventSink) -> None:
        self._sink = sink
        for spec in self._watched.values():
            self._start(spec, sink)
        try:
            await asyncio.Future()
        finally:
            self._sink = None
            for feed in self._feeds.values():
                feed.stop()
            self._feeds.clear()
            tasks = [task for _, task in self._clients.values()]
            self._clients.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, spec: ProductSpec, sink: EventSink) -> None:
        feed = SymbolFeed(
            spec.exchange,
            spec.caspian_code,
            sink,
            depth=self.depth,
            max_lag_s=self.max_lag_s,
            book=self._books[spec.caspian_code],
        )
        feed.publish(self._published.get(spec.caspian_code, self.depth))
        self._feeds[spec.caspian_code] = feed
        running = self._clients.get(spec.exchange)
        if running is None:
            client = self._client(BY_CODE[spec.exchange])
            task = asyncio.create_task(client.run(), name=f"caspian-live-{spec.exchange}")
            self._clients[spec.exchange] = running = (client, task)
        running[0].watch(feed, spec)

    def _client(self, exchange: Exchange) -> ExchangeClient:
        """The client the registry names, imported on first use: ccxt.pro is slow to import."""
        assert exchange.client is not None
        module = importlib.import_module(f"caspian.sources.live.{exchange.client}")
        client: ExchangeClient = module.client(self, exchange)
        return client


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


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in extra.items():
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = merged(current, value)
        else:
            out[key] = value
    return out


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: in the upper half of ``initial * 2**attempt``, capped.

    The jitter spreads the reconnects of many symbols cut off by one outage.
    """
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 32))
    return rng.uniform(ceiling / 2.0, ceiling)


#: A connection with nothing read for this long has nothing left to read: a
#: feed held back for lag on it is current again.
DRAINED_S = 0.1


async def watchdog(
    source: LiveSource, last_message: Callable[[], float], tick: Callable[[float], None]
) -> None:
    """Ends a connection silent for ``stall_timeout_s`` (``stall``), heartbeats included.

    Until then it calls ``tick`` with the silence so far every
    ``max_lag_s / 4`` at most, for the client to tell its lagging feeds that
    the connection is drained (:meth:`SymbolFeed.drained`).
    """
    loop = asyncio.get_running_loop()
    timeout = source.stall_timeout_s
    interval = source.max_lag_s / 4
    while True:
        silent = loop.time() - last_message()
        if silent >= timeout:
            raise IntegrityError("stall", f"no message for {silent:.1f} s")
        tick(silent)
        await asyncio.sleep(min(timeout - silent, interval))


class Backoff:
    """The delays between one connection's attempts.

    A connection that streamed for ``backoff_max_s`` proves the exchange
    back: the next failure starts the backoff over.
    """

    def __init__(self, source: LiveSource) -> None:
        self._source = source
        self._attempt = 0

    async def wait(self, streamed_s: float) -> None:
        source = self._source
        if streamed_s >= source.backoff_max_s:
            self._attempt = 0
        delay = backoff_delay(
            self._attempt, source.backoff_initial_s, source.backoff_max_s, source.rng
        )
        self._attempt += 1
        await asyncio.sleep(delay)


async def close_quietly(closeable: Any) -> None:
    """Closes an exchange object or connection, logging instead of raising."""
    try:
        await closeable.close()
    except Exception:
        log.debug("closing %r failed", closeable, exc_info=True)
