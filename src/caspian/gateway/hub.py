"""Market state per watched symbol, and the fan-out of updates to subscribers.

Subscriptions that want the same view of a symbol (type, levels,
conflation) form a group. A group computes each update once and serializes
it once; per client only the ``{"requestId":"…",`` prefix differs, so the
cost of a delivery is a concatenation and a write.

Level2 invariant (CONTRACT.md section 4): a client that applies every message
of its subscription in order holds exactly the group's last sent top-N view.
A group therefore remembers the view it last sent, sends the net change from
it, and gives a newcomer that very view as its first whole top-N.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from caspian.book import EMPTY_VIEW, BookView, LevelChange, OrderBook, diff_views
from caspian.codes import MessageType, Stream, StreamState, SubscriptionType
from caspian.events import BookEvent, Event, QuoteEvent, StatusEvent, TradeEvent
from caspian.gateway.session import Subscription
from caspian.metrics import MESSAGES, SUBSCRIPTIONS
from caspian.timefmt import format_us, now_us

log = logging.getLogger(__name__)

_CONNECTED = StreamState.CONNECTED.value
_DISCONNECTED = StreamState.DISCONNECTED.value


class Subscriber(Protocol):
    """A client connection as the hub sees it."""

    def deliver(self, prefix: bytes, tail: bytes) -> None:
        """Send ``prefix + tail`` as one message; never raises, a closed one drops it."""


def _tail(message: dict[str, Any]) -> bytes:
    """The serialized message without its opening brace, to follow a requestId prefix."""
    return orjson.dumps(message)[1:]


class SymbolState:
    """What the gateway knows of one symbol: its book, Level1 fields and stream states."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.book = OrderBook()
        #: False until a snapshot arrives, and again after depth disconnects:
        #: a diff without a known base is dropped, never applied.
        self.book_ready = False
        self.streams = {stream: _DISCONNECTED for stream in Stream}
        self.depth_ts: int | None = None
        self.depth_exchange_ts: int | None = None
        #: Set once the source publishes quotes: BBO then comes from them, not the book.
        self.quotes = False
        #: Streams whose state the source declares with status events; for the
        #: others, arriving data is the only sign of life there is.
        self.declared: set[Stream] = set()
        self.l1: dict[str, Any] = {}
        self.l1_version = 0
        self._l1_tail: tuple[int, bytes] | None = None
        self.level2: dict[tuple[int, str], Level2Group] = {}
        self.level1: dict[str, Level1Group] = {}

    def empty(self) -> bool:
        return not self.level2 and not self.level1

    def l1_tail(self) -> bytes:
        cached = self._l1_tail
        if cached is not None and cached[0] == self.l1_version:
            return cached[1]
        tail = _tail(
            {
                "type": MessageType.LEVEL1.value,
                "bboStream": self.streams[Stream.BBO],
                "tradeStream": self.streams[Stream.TRADE],
                "payload": self.l1,
            }
        )
        self._l1_tail = (self.l1_version, tail)
        return tail

    def l2_tail(self, changes: Iterable[LevelChange], ts: int | None = None) -> bytes:
        message: dict[str, Any] = {"type": MessageType.LEVEL2.value}
        if self.depth_exchange_ts is not None:
            message["exchangeTimestamp"] = format_us(self.depth_exchange_ts)
        message["caspianTimestamp"] = format_us(self.depth_ts or ts or now_us())
        message["depthStream"] = self.streams[Stream.DEPTH]
        message["payload"] = [
            {"price": price, "size": size, "side": side} for price, size, side in changes
        ]
        return _tail(message)


class _Group:
    """Subscriptions sharing one view; iterated often, changed rarely."""

    def __init__(self, state: SymbolState, interval: float | None) -> None:
        self.state = state
        self.interval = interval
        self.members: dict[Subscription, Subscriber] = {}
        self._targets: tuple[tuple[bytes, Subscriber], ...] | None = None
        self.dirty = False
        self.closed = False

    def add(self, subscription: Subscription, subscriber: Subscriber) -> None:
        self.members[subscription] = subscriber
        self._targets = None

    def remove(self, subscription: Subscription) -> bool:
        """Drop a member; True when the group is empty."""
        self.members.pop(subscription, None)
        self._targets = None
        return not self.members

    def fan_out(self, tail: bytes) -> None:
        targets = self._targets
        if targets is None:
            # A snapshot, so that a subscriber leaving during delivery does
            # not disturb the loop.
            targets = self._targets = tuple(
                (subscription.prefix, subscriber)
                for subscription, subscriber in self.members.items()
            )
        for prefix, subscriber in targets:
            subscriber.deliver(prefix, tail)
        MESSAGES.inc(len(targets))

    def flush(self) -> bool:
        """Sends what changed since the last update; whether anything was sent."""
        raise NotImplementedError


class Level2Group(_Group):
    def __init__(self, state: SymbolState, levels: int, interval: float | None) -> None:
        super().__init__(state, interval)
        self.levels = levels
        self.sent: BookView = state.book.top(levels) if state.book_ready else EMPTY_VIEW
        #: Set by a new snapshot: the next update carries the whole top-N.
        self.resync = False
        self._snapshot_tail: tuple[BookView, bytes] | None = None

    def snapshot_tail(self) -> bytes:
        """The last sent view as one whole top-N message, for a newcomer."""
        cached = self._snapshot_tail
        if cached is not None and cached[0] is self.sent:
            return cached[1]
        tail = self.state.l2_tail(_whole(EMPTY_VIEW, self.sent))
        self._snapshot_tail = (self.sent, tail)
        return tail

    def flush(self) -> bool:
        self.dirty = False
        view = self.state.book.top(self.levels)
        if self.resync:
            self.resync = False
            changes = _whole(self.sent, view)
        else:
            changes = diff_views(self.sent, view)
        if not changes:
            return False
        self.sent = view
        self.fan_out(self.state.l2_tail(changes))
        return True

    def send_status(self) -> None:
        """A depth status change goes out at once, with no levels."""
        self.fan_out(self.state.l2_tail(()))


class Level1Group(_Group):
    def __init__(self, state: SymbolState, interval: float | None) -> None:
        super().__init__(state, interval)
        self.sent_version = state.l1_version

    def flush(self) -> bool:
        self.dirty = False
        if self.sent_version == self.state.l1_version:
            return False
        self.sent_version = self.state.l1_version
        self.fan_out(self.state.l1_tail())
        return True


def _whole(old: BookView, new: BookView) -> list[LevelChange]:
    """Every level of ``new``, and size 0 for each level of ``old`` it no longer has."""
    changes: list[LevelChange] = [(price, size, "bid") for price, size in new.bids]
    changes += [(price, size, "ask") for price, size in new.asks]
    bids = {price for price, _ in new.bids}
    asks = {price for price, _ in new.asks}
    changes += [(price, 0.0, "bid") for price, _ in old.bids if price not in bids]
    changes += [(price, 0.0, "ask") for price, _ in old.asks if price not in asks]
    return changes


class Hub:
    """The gateway: applies events to symbol states and fans updates out."""

    def __init__(
        self,
        watch: Callable[[str], None],
        unwatch: Callable[[str], None],
        unwatch_grace_s: float = 30.0,
    ) -> None:
        self._watch = watch
        self._unwatch = unwatch
        self._grace_s = unwatch_grace_s
        self.symbols: dict[str, SymbolState] = {}
        self._releases: dict[str, asyncio.TimerHandle] = {}
        self._dirty: dict[float, list[_Group]] = {}
        self._tickers: dict[float, asyncio.TimerHandle] = {}

    # -- subscriptions -------------------------------------------------

    def add(self, subscription: Subscription, subscriber: Subscriber) -> None:
        """Start a subscription; its first update is sent at once."""
        symbol = subscription.product.caspian_code
        state = self.symbols.get(symbol)
        if state is None:
            state = self.symbols[symbol] = SymbolState(symbol)
            self._watch(symbol)
        release = self._releases.pop(symbol, None)
        if release is not None:
            release.cancel()
        SUBSCRIPTIONS.labels(subscription.type.value).inc()
        if subscription.type is SubscriptionType.LEVEL2:
            key = (subscription.levels, subscription.conflation)
            group2 = state.level2.get(key)
            if group2 is None:
                group2 = state.level2[key] = Level2Group(
                    state, subscription.levels, subscription.interval
                )
            group2.add(subscription, subscriber)
            subscriber.deliver(subscription.prefix, group2.snapshot_tail())
        else:
            group1 = state.level1.get(subscription.conflation)
            if group1 is None:
                group1 = state.level1[subscription.conflation] = Level1Group(
                    state, subscription.interval
                )
            group1.add(subscription, subscriber)
            subscriber.deliver(subscription.prefix, state.l1_tail())

    def remove(self, subscription: Subscription) -> None:
        symbol = subscription.product.caspian_code
        state = self.symbols.get(symbol)
        if state is None:
            return
        if subscription.type is SubscriptionType.LEVEL2:
            key2 = (subscription.levels, subscription.conflation)
            group2 = state.level2.get(key2)
            if group2 is None or subscription not in group2.members:
                return
            SUBSCRIPTIONS.labels(subscription.type.value).dec()
            if group2.remove(subscription):
                group2.closed = True
                del state.level2[key2]
        else:
            group1 = state.level1.get(subscription.conflation)
            if group1 is None or subscription not in group1.members:
                return
            SUBSCRIPTIONS.labels(subscription.type.value).dec()
            if group1.remove(subscription):
                group1.closed = True
                del state.level1[subscription.conflation]
        if state.empty() and symbol not in self._releases:
            if self._grace_s <= 0:
                self._release(symbol)
            else:
                loop = asyncio.get_running_loop()
                self._releases[symbol] = loop.call_later(self._grace_s, self._release, symbol)

    def _release(self, symbol: str) -> None:
        self._releases.pop(symbol, None)
        state = self.symbols.get(symbol)
        if state is not None and state.empty():
            del self.symbols[symbol]
            self._unwatch(symbol)

    def close(self) -> None:
        for handle in (*self._releases.values(), *self._tickers.values()):
            handle.cancel()
        self._releases.clear()
        self._tickers.clear()

    # -- events ----------------------------------------------------------

    def on_event(self, event: Event) -> None:
        state = self.symbols.get(event.symbol)
        if state is None:
            return
        if isinstance(event, BookEvent):
            self._on_book(state, event)
        elif isinstance(event, TradeEvent):
            self._on_trade(state, event)
        elif isinstance(event, QuoteEvent):
            self._on_quote(state, event)
        else:
            self._on_status(state, event)

    def _set_stream(self, state: SymbolState, stream: Stream, value: str) -> bool:
        if state.streams[stream] == value:
            return False
        state.streams[stream] = value
        return True

    def _on_book(self, state: SymbolState, event: BookEvent) -> None:
        if event.snapshot:
            state.book.apply_snapshot(event.bids, event.asks)
            state.book_ready = True
        elif state.book_ready:
            state.book.apply_diff(event.bids, event.asks)
        else:
            return
        state.depth_ts = event.ts
        state.depth_exchange_ts = event.exchange_ts
        status_changed = self._set_stream(state, Stream.DEPTH, _CONNECTED)
        if state.book.crossed():
            log.warning("crossed book for %s from the source", state.symbol)
        for group in state.level2.values():
            if event.snapshot:
                group.resync = True
            # Back with a whole book: that book goes out at once, whatever the
            # conflation, carrying the new status, rather than a "connected"
            # with no levels and the book an interval later.
            if status_changed and not (event.snapshot and group.flush()):
                group.send_status()
            self._changed(group)
        if not state.quotes:
            best_bid = state.book.best_bid()
            best_ask = state.book.best_ask()
            self._set_bbo(
                state,
                event,
                Stream.BBO not in state.declared,
                best_bid[0] if best_bid else None,
                best_bid[1] if best_bid else None,
                best_ask[0] if best_ask else None,
                best_ask[1] if best_ask else None,
            )

    def _on_quote(self, state: SymbolState, event: QuoteEvent) -> None:
        state.quotes = True
        self._set_bbo(state, event, True, event.bid, event.bid_size, event.ask, event.ask_size)

    def _set_bbo(
        self,
        state: SymbolState,
        event: BookEvent | QuoteEvent,
        alive: bool,
        bid: float | None,
        bid_size: float | None,
        ask: float | None,
        ask_size: float | None,
    ) -> None:
        """New best bid and offer; ``alive`` when their arrival proves the BBO stream is up."""
        l1 = state.l1
        status_changed = alive and self._set_stream(state, Stream.BBO, _CONNECTED)
        if (
            not status_changed
            and l1.get("ask") == ask
            and l1.get("askSize") == ask_size
            and l1.get("bid") == bid
            and l1.get("bidSize") == bid_size
        ):
            return
        for key, value in (
            ("ask", ask),
            ("askSize", ask_size),
            ("bid", bid),
            ("bidSize", bid_size),
        ):
            if value is None:
                l1.pop(key, None)
            else:
                l1[key] = value
        if event.exchange_ts is None:
            l1.pop("bboExchangeTimestamp", None)
        else:
            l1["bboExchangeTimestamp"] = format_us(event.exchange_ts)
        l1["bboCaspianTimestamp"] = format_us(event.ts)
        self._l1_changed(state, status_changed)

    def _on_trade(self, state: SymbolState, event: TradeEvent) -> None:
        status_changed = self._set_stream(state, Stream.TRADE, _CONNECTED)
        l1 = state.l1
        l1["tradePrice"] = event.price
        l1["tradeSize"] = event.size
        if event.exchange_ts is None:
            l1.pop("tradeExchangeTimestamp", None)
        else:
            l1["tradeExchangeTimestamp"] = format_us(event.exchange_ts)
        l1["tradeCaspianTimestamp"] = format_us(event.ts)
        if event.trade_id is None:
            l1.pop("tradeId", None)
        else:
            l1["tradeId"] = event.trade_id
        if event.info:
            l1["exchangeSpecificInfo"] = event.info
        else:
            l1.pop("exchangeSpecificInfo", None)
        self._l1_changed(state, status_changed)

    def _on_status(self, state: SymbolState, event: StatusEvent) -> None:
        state.declared.add(event.stream)
        if not self._set_stream(state, event.stream, event.state.value):
            return
        if event.stream is Stream.DEPTH:
            if event.state is StreamState.DISCONNECTED:
                state.book_ready = False
            if state.depth_ts is None:
                state.depth_ts = event.ts
            for group in state.level2.values():
                group.send_status()
        else:
            self._l1_changed(state, True)

    def _l1_changed(self, state: SymbolState, status_changed: bool) -> None:
        state.l1_version += 1
        for group in state.level1.values():
            if status_changed:
                group.flush()
            else:
                self._changed(group)

    # -- conflation ------------------------------------------------------

    def _changed(self, group: _Group) -> None:
        interval = group.interval
        if interval is None:
            group.flush()
            return
        if group.dirty:
            return
        group.dirty = True
        dirty = self._dirty.get(interval)
        if dirty is None:
            dirty = self._dirty[interval] = []
        dirty.append(group)
        if interval not in self._tickers:
            loop = asyncio.get_running_loop()
            self._tickers[interval] = loop.call_later(interval, self._tick, interval)

    def _tick(self, interval: float) -> None:
        """Flush every group of this interval that changed since its last update.

        The next tick is scheduled from now, after the flush, so consecutive
        updates of a group are never closer than the interval.
        """
        groups = self._dirty.pop(interval, [])
        for group in groups:
            if not group.closed:
                try:
                    group.flush()
                except Exception:
                    log.exception("flushing a conflated group of %s failed", group.state.symbol)
        if groups:
            loop = asyncio.get_running_loop()
            self._tickers[interval] = loop.call_later(interval, self._tick, interval)
        else:
            self._tickers.pop(interval, None)
