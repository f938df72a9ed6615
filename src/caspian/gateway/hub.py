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

from caspian.book import OrderBook
from caspian.codes import MessageType, Stream, StreamState, SubscriptionType
from caspian.events import BookEvent, Event, Level, QuoteEvent, StatusEvent, TradeEvent
from caspian.gateway.session import Subscription
from caspian.metrics import MESSAGES, SUBSCRIPTIONS
from caspian.timefmt import format_us, now_us

log = logging.getLogger(__name__)

# Read once: looking up an enum member on its class costs several times a
# global's lookup, and the hot paths below read these on every event.
_CONNECTED = StreamState.CONNECTED.value
_DISCONNECTED = StreamState.DISCONNECTED.value
_BBO = Stream.BBO
_TRADE = Stream.TRADE
_DEPTH = Stream.DEPTH
_LEVEL1 = MessageType.LEVEL1.value
_LEVEL2 = MessageType.LEVEL2.value


class Subscriber(Protocol):
    """A client connection as the hub sees it."""

    def deliver(self, prefix: bytes, tail: bytes) -> None:
        """Send ``prefix + tail`` as one message; never raises, a closed one drops it."""


#: One level of a Level2 payload, ``{"price": …, "size": …, "side": "bid" | "ask"}``:
#: built as the change is found, so a message needs no second pass over its levels.
Entry = dict[str, float | str]


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
        #: The best levels Level1 last saw, as the book holds them.
        self.best_bid: Level | None = None
        self.best_ask: Level | None = None
        #: The deepest top-N subscribed, at least 1 so that changes to the
        #: best levels (Level1) are known too.
        self.depth = 1
        #: Whether ``book`` is the source's own (Source.publish_depth), which
        #: holds each event's changes when it arrives and is only read here;
        #: the events then carry exactly the changes to its top ``depth``.
        #: Otherwise the book is the hub's copy of a deeper top, which it ranks.
        self.shared = False

    def deepest(self) -> int:
        return max((group.levels for group in self.level2.values()), default=1)

    def empty(self) -> bool:
        return not self.level2 and not self.level1

    def l1_tail(self) -> bytes:
        cached = self._l1_tail
        if cached is not None and cached[0] == self.l1_version:
            return cached[1]
        tail = _tail(
            {
                "type": _LEVEL1,
                "bboStream": self.streams[_BBO],
                "tradeStream": self.streams[_TRADE],
                "payload": self.l1,
            }
        )
        self._l1_tail = (self.l1_version, tail)
        return tail

    def l2_tail(self, payload: list[Entry], ts: int | None = None) -> bytes:
        message: dict[str, Any] = {"type": _LEVEL2}
        if self.depth_exchange_ts is not None:
            message["exchangeTimestamp"] = format_us(self.depth_exchange_ts)
        message["caspianTimestamp"] = format_us(self.depth_ts or ts or now_us())
        message["depthStream"] = self.streams[_DEPTH]
        message["payload"] = payload
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
    """Subscriptions to one top-N of a symbol with one conflation.

    The group keeps its clients' copy of the book (the view last sent, as
    ``price -> size`` per side) and the changes to the top since then, each
    price's last state. An update is the net of the two, so a level that
    changed and changed back is not sent, and unconflated delivery costs a
    few dict operations per changed level, however deep the book.
    """

    def __init__(self, state: SymbolState, levels: int, interval: float | None) -> None:
        super().__init__(state, interval)
        self.levels = levels
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self._bid_changes: dict[float, float] = {}
        self._ask_changes: dict[float, float] = {}
        #: Set by a new snapshot: the next update carries the whole top-N.
        self.resync = False
        #: Set when the top changed in ways not known level by level: the
        #: next update is computed from the book's top-N.
        self.rescan = False
        self._snapshot_tail: bytes | None = None
        if state.book_ready:
            view = state.book.top(levels)
            self.bids = dict(view.bids)
            self.asks = dict(view.asks)

    def push(self, bids: list[Level], asks: list[Level]) -> None:
        """Changes to this group's top-N, as :meth:`OrderBook.apply_diff_top` gives them."""
        if bids:
            self._bid_changes.update(bids)
        if asks:
            self._ask_changes.update(asks)

    def send(self, bids: list[Level], asks: list[Level]) -> None:
        """An unconflated update: changes to this group's top-N, netted and sent at once.

        The same as :meth:`push` then :meth:`flush`, without the pending changes'
        dicts, which only conflation needs.
        """
        if self.resync or self.rescan or self._bid_changes or self._ask_changes:
            self.push(bids, asks)
            self.flush()
            return
        # Most diffs touch one side only.
        changes = _net(self.bids, bids, "bid") if bids else []
        if asks:
            changes += _net(self.asks, asks, "ask")
        if changes:
            self._snapshot_tail = None
            self.fan_out(self.state.l2_tail(changes))

    def snapshot_tail(self) -> bytes:
        """The last sent view as one whole top-N message, for a newcomer."""
        if self._snapshot_tail is None:
            changes: list[Entry] = [
                {"price": price, "size": size, "side": "bid"}
                for price, size in sorted(self.bids.items(), reverse=True)
            ]
            changes += [
                {"price": price, "size": size, "side": "ask"}
                for price, size in sorted(self.asks.items())
            ]
            self._snapshot_tail = self.state.l2_tail(changes)
        return self._snapshot_tail

    def flush(self) -> bool:
        self.dirty = False
        if self.resync or self.rescan:
            if not self.state.book_ready:
                # No book to read while depth is down (a source's shared book may
                # be empty meanwhile): the next snapshot resyncs the group anyway.
                return False
            changes = self._read_top(whole=self.resync)
            self.resync = self.rescan = False
        else:
            changes = _net(self.bids, self._bid_changes.items(), "bid")
            changes += _net(self.asks, self._ask_changes.items(), "ask")
            self._bid_changes.clear()
            self._ask_changes.clear()
        if not changes:
            return False
        self._snapshot_tail = None
        self.fan_out(self.state.l2_tail(changes))
        return True

    def _read_top(self, whole: bool) -> list[Entry]:
        """The change from the sent view to the book's top-N, every level of it when ``whole``."""
        self._bid_changes.clear()
        self._ask_changes.clear()
        view = self.state.book.top(self.levels)
        changes = _replace(self.bids, view.bids, "bid", whole)
        changes += _replace(self.asks, view.asks, "ask", whole)
        self.bids = dict(view.bids)
        self.asks = dict(view.asks)
        return changes

    def send_status(self) -> None:
        """A depth status change goes out at once, with no levels."""
        self.fan_out(self.state.l2_tail([]))


def _net(sent: dict[float, float], pending: Iterable[Level], side: str) -> list[Entry]:
    """Applies ``pending`` (each price once) to ``sent``; the changes that made a difference."""
    changes: list[Entry] = []
    for price, size in pending:
        if size > 0:
            if sent.get(price) != size:
                sent[price] = size
                changes.append({"price": price, "size": size, "side": side})
        elif sent.pop(price, None) is not None:
            changes.append({"price": price, "size": 0.0, "side": side})
    return changes


def _replace(
    sent: dict[float, float], levels: tuple[Level, ...], side: str, whole: bool
) -> list[Entry]:
    """The changes from ``sent`` to ``levels``: every level when ``whole``, else those that differ.

    Size 0 for each price of ``sent`` that ``levels`` lacks.
    """
    get = sent.get
    changes: list[Entry] = [
        {"price": price, "size": size, "side": side}
        for price, size in levels
        if whole or get(price) != size
    ]
    kept = {price for price, _ in levels}
    changes += [{"price": price, "size": 0.0, "side": side} for price in sent if price not in kept]
    return changes


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


class Hub:
    """The gateway: applies events to symbol states and fans updates out."""

    def __init__(
        self,
        watch: Callable[[str], None],
        unwatch: Callable[[str], None],
        unwatch_grace_s: float = 30.0,
        publish_depth: Callable[[str, int], OrderBook | None] | None = None,
    ) -> None:
        """``publish_depth`` asks the source for a symbol's top at the depth the
        hub serves (Source.publish_depth); without it the hub ranks every top itself."""
        self._watch = watch
        self._unwatch = unwatch
        self._publish_depth = publish_depth
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
            self._serve_depth(state, state.depth)
        release = self._releases.pop(symbol, None)
        if release is not None:
            release.cancel()
        SUBSCRIPTIONS.labels(subscription.type.value).inc()
        if subscription.type is SubscriptionType.LEVEL2:
            key = (subscription.levels, subscription.conflation)
            group2 = state.level2.get(key)
            if group2 is None:
                if subscription.levels > state.depth:
                    self._serve_depth(state, subscription.levels)
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
                if (depth := state.deepest()) != state.depth:
                    self._serve_depth(state, depth)
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

    def _serve_depth(self, state: SymbolState, depth: int) -> None:
        """The top ``depth`` of the symbol's book is what its clients need from now on."""
        state.depth = depth
        if self._publish_depth is None:
            return
        book = self._publish_depth(state.symbol, depth)
        if book is not None:
            state.book = book
            state.shared = True

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
        book = state.book
        bids: list[Level] = []
        asks: list[Level] = []
        if event.snapshot:
            if not state.shared:
                book.apply_snapshot(event.bids, event.asks)
            state.book_ready = True
        elif not state.book_ready:
            return
        elif state.shared:
            # The source's book holds these changes already, and they are the
            # changes to its top ``depth``: no ranking, no copy to keep.
            bids = event.bids
            asks = event.asks
        else:
            bids, asks = book.apply_diff_top(event.bids, event.asks, state.depth)
        state.depth_ts = event.ts
        state.depth_exchange_ts = event.exchange_ts
        status_changed = self._set_stream(state, _DEPTH, _CONNECTED)
        # A source sharing its book never sends it crossed (SymbolFeed refuses it).
        if not state.shared and book.crossed():
            log.warning("crossed book for %s from the source", state.symbol)
        top_changed = event.snapshot or bids or asks
        for group in state.level2.values():
            if event.snapshot:
                group.resync = True
            elif group.levels == state.depth:
                if group.interval is None and not status_changed:
                    group.send(bids, asks)
                    continue
                group.push(bids, asks)
            elif top_changed:
                # A shallower top's changes cannot be told from the deepest
                # one's: a level entering it may come from below.
                group.rescan = True
            # Back with a whole book: that book goes out at once, whatever the
            # conflation, carrying the new status, rather than a "connected"
            # with no levels and the book an interval later.
            if status_changed and not (event.snapshot and group.flush()):
                group.send_status()
            if top_changed:
                self._changed(group)
        if state.quotes or not (top_changed or state.streams[_BBO] != _CONNECTED):
            return
        best_bid = book.best_bid()
        best_ask = book.best_ask()
        # The book keeps the source's level tuples as they are, so the same
        # tuple is the same best level: most changes leave both in place.
        if (
            best_bid is not state.best_bid
            or best_ask is not state.best_ask
            or state.streams[_BBO] != _CONNECTED
        ):
            state.best_bid = best_bid
            state.best_ask = best_ask
            self._set_bbo(
                state,
                event,
                _BBO not in state.declared,
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
        status_changed = alive and self._set_stream(state, _BBO, _CONNECTED)
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
        status_changed = self._set_stream(state, _TRADE, _CONNECTED)
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
