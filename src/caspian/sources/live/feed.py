"""One watched symbol as the live source emits it: its book, its streams, its lag.

Every client of an exchange, ccxt's or Caspian's own, hands its symbol's
book changes, trades and failures to a :class:`SymbolFeed`, which turns
them into normalized events by one set of rules:

- a book goes out as a snapshot of its top ``published`` levels (``depth``
  unless a gateway asked for fewer, :meth:`SymbolFeed.publish`), then the
  three streams ``connected``, then only the changes to that top; the book
  holds each event's changes by the time the event goes out;
- a crossed book is never sent: :meth:`SymbolFeed.snapshot`,
  :meth:`SymbolFeed.diff` and :meth:`SymbolFeed.view` raise
  :class:`IntegrityError` (``crossed``) instead, for the client to resync;
- a failure (``down``) sends the three streams ``disconnected`` at once,
  counts the resync by reason and logs it; the next book is a snapshot;
- a feed that falls behind the exchange is never served as ``connected``:
  each change's exchange time stamp is compared with the clock, and past
  ``max_lag_s`` the streams go ``disconnected`` (reason ``lag``) while the
  book goes on being kept; once the lag is back under half the bound, the
  whole top goes out again as a snapshot, then ``connected``; so it does
  when the client finds its connection drained (:meth:`SymbolFeed.drained`).

The lag is the delay of a change from the exchange's stamp to now, less the
smallest delay seen since the book was last synced: that floor absorbs a
constant skew between the exchange's clock and this one, which would
otherwise read as lag (or hide it), and leaves what grows, a backlog.

No I/O: the clock is passed in, and events go to the sink.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterable

from caspian.book import BookView, OrderBook, diff_views
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, Level, StatusEvent, TradeEvent
from caspian.metrics import LIVE_LAG, RESYNCS, STREAM_STATE, UPSTREAM_RECONNECTS
from caspian.sources.base import EventSink
from caspian.sources.integrity import IntegrityError
from caspian.timefmt import now_us

log = logging.getLogger("caspian.sources.live")

STREAMS = (Stream.DEPTH, Stream.TRADE, Stream.BBO)


class SymbolFeed:
    """Events of one watched symbol of ``exchange``, ``depth`` levels a side."""

    def __init__(
        self,
        exchange: str,
        symbol: str,
        sink: EventSink,
        *,
        depth: int,
        max_lag_s: float,
        clock: Callable[[], int] = now_us,
        book: OrderBook | None = None,
    ) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.depth = depth
        #: The top whose changes go out: a gateway in this process that serves
        #: fewer levels asks for its own, so that it need not rank them again.
        self.published = depth
        self._sink = sink
        self._clock = clock
        self._max_lag_us = int(max_lag_s * 1_000_000)
        #: The book as last received, whole for Caspian's own clients, its top
        #: ``depth`` for ccxt's (which keeps the rest itself).
        self.book = OrderBook() if book is None else book
        #: Whether a book was received since the last failure.
        self.synced = False
        #: Whether the streams are ``connected`` for clients.
        self.up = False
        #: Whether the feed runs more than the bound behind the exchange.
        self.lagging = False
        self.lag_us = 0
        self._floor_us: int | None = None
        self._stopped = False
        for stream in STREAMS:
            STREAM_STATE.labels(exchange, symbol, stream.value).set(0)
        # Read when /metrics is scraped: setting a gauge takes a lock, and the lag
        # changes with every event.
        LIVE_LAG.labels(exchange, symbol).set_function(lambda: self.lag_us / 1_000_000)

    # -- from the exchange's client --------------------------------------------

    def snapshot(
        self, bids: Iterable[Level], asks: Iterable[Level], exchange_ts: int | None = None
    ) -> None:
        """The whole book (microsecond ``exchange_ts``): it replaces the one held."""
        self.book.apply_snapshot(bids, asks)
        self._refuse_crossed()
        self.synced = True
        self.lagging = False
        self._floor_us = None
        self.lag_us = 0
        if exchange_ts is not None:
            self._lag(exchange_ts)
        self._send_top(exchange_ts)

    def diff(
        self, bids: Collection[Level], asks: Collection[Level], exchange_ts: int | None = None
    ) -> None:
        """Levels of the exchange's own diff (size 0 removes): the changes to the top go out."""
        bid_changes, ask_changes = self.book.apply_diff_top(bids, asks, self.published)
        self._refuse_crossed()
        self._changed(bid_changes, ask_changes, exchange_ts)

    def view(self, view: BookView, exchange_ts: int | None = None) -> None:
        """The top ``depth`` levels as a client library keeps them: the changes to the
        published top go out."""
        changes = diff_views(self.book.top(self.depth), view)
        if not changes:
            if exchange_ts is not None:
                self._lag(exchange_ts)
            return
        bid_changes, ask_changes = self.book.apply_diff_top(
            [(price, size) for price, size, side in changes if side == "bid"],
            [(price, size) for price, size, side in changes if side == "ask"],
            self.published,
        )
        self._refuse_crossed()
        self._changed(bid_changes, ask_changes, exchange_ts)

    def trade(
        self,
        price: float,
        size: float,
        trade_id: str | None,
        info: dict[str, str],
        exchange_ts: int | None,
    ) -> None:
        if self.up:
            ts = self._clock()
            self._emit(TradeEvent(self.symbol, ts, price, size, trade_id, info, exchange_ts))

    def down(self, reason: str, cause: BaseException | str, *, traceback: bool = False) -> None:
        """The book can no longer be trusted: streams ``disconnected``, counted and logged."""
        if self._stopped:
            return
        RESYNCS.labels(self.exchange, self.symbol, reason).inc()
        log.warning(
            "%s %s: resubscribing (%s): %s",
            self.exchange,
            self.symbol,
            reason,
            cause,
            exc_info=cause if traceback and isinstance(cause, BaseException) else None,
        )
        self.synced = False
        self.lagging = False
        self.book.clear()
        self._set_streams(StreamState.DISCONNECTED)

    def publish(self, depth: int) -> None:
        """From the next event on, the changes to the top ``depth`` (at most ``depth``) go out."""
        self.published = min(depth, self.depth)

    def reconnecting(self) -> None:
        """Counts a new upstream attempt after a failure, successful or not."""
        UPSTREAM_RECONNECTS.labels(self.exchange, self.symbol).inc()

    def stop(self) -> None:
        """Emits nothing more; the symbol's gauges go, so /metrics lists watched symbols only."""
        self._stopped = True
        for stream in STREAMS:
            with contextlib.suppress(KeyError):
                STREAM_STATE.remove(self.exchange, self.symbol, stream.value)
        with contextlib.suppress(KeyError):
            LIVE_LAG.remove(self.exchange, self.symbol)

    # -- rules -----------------------------------------------------------------

    def _refuse_crossed(self) -> None:
        """A crossed book is never served: the client resyncs instead."""
        if self.book.crossed():
            raise IntegrityError(
                "crossed", f"best bid {self.book.best_bid()} >= best ask {self.book.best_ask()}"
            )

    def _changed(
        self, bid_changes: list[Level], ask_changes: list[Level], exchange_ts: int | None
    ) -> None:
        if not self.synced:
            return
        now = self._clock() if exchange_ts is None else self._lag(exchange_ts)
        if self.lagging or not (bid_changes or ask_changes):
            return
        self._emit(BookEvent(self.symbol, now, False, bid_changes, ask_changes, exchange_ts))

    def _lag(self, exchange_ts: int) -> int:
        """Measures the lag of a change stamped ``exchange_ts``; returns the time now."""
        now = self._clock()
        if self._stopped:
            return now
        delay = now - exchange_ts
        if self._floor_us is None or delay < self._floor_us:
            self._floor_us = delay
        self.lag_us = lag = delay - self._floor_us
        if not self.lagging and lag > self._max_lag_us:
            self.lagging = True
            RESYNCS.labels(self.exchange, self.symbol, "lag").inc()
            log.warning(
                "%s %s: %.2f s behind the exchange, over the %.2f s bound: "
                "streams disconnected until it catches up",
                self.exchange,
                self.symbol,
                lag / 1_000_000,
                self._max_lag_us / 1_000_000,
            )
            self._set_streams(StreamState.DISCONNECTED)
        elif self.lagging and lag * 2 <= self._max_lag_us:
            self._catch_up(f"{lag / 1_000_000:.3f} s behind", exchange_ts)
            # A change that follows the whole book must not be stamped before it.
            return self._clock()
        return now

    def drained(self) -> None:
        """The client has read all its connection held: a feed held back for lag is current.

        Without this, a symbol that falls quiet right after a burst would stay
        ``disconnected`` until its next change.
        """
        if self.lagging and self.synced and not self._stopped:
            self.lag_us = 0
            self._catch_up("nothing left to read", None)

    def _catch_up(self, why: str, exchange_ts: int | None) -> None:
        self.lagging = False
        log.warning(
            "%s %s: caught up (%s): sending the whole book again", self.exchange, self.symbol, why
        )
        self._send_top(exchange_ts)

    def _send_top(self, exchange_ts: int | None) -> None:
        if self.lagging:
            return
        top = self.book.top(self.published)
        self._emit(
            BookEvent(self.symbol, self._clock(), True, list(top.bids), list(top.asks), exchange_ts)
        )
        if not self.up:
            self._set_streams(StreamState.CONNECTED)

    def _set_streams(self, state: StreamState) -> None:
        up = state is StreamState.CONNECTED
        if up == self.up and not up:
            return
        self.up = up
        ts = self._clock()
        for stream in STREAMS:
            STREAM_STATE.labels(self.exchange, self.symbol, stream.value).set(1 if up else 0)
            self._emit(StatusEvent(self.symbol, ts, stream, state))

    def _emit(self, event: Event) -> None:
        if self._stopped:
            return
        try:
            self._sink(event)
        except Exception:
            # One consumer's bug must not end the upstream session.
            log.exception("event sink failed on %r", event)
