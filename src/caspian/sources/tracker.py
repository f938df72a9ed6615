"""What a newcomer to a symbol needs: its stream states, whole book, last quote and trade.

Whoever hands events on to late joiners (a replay watched mid-file, the NATS
bus answering a gateway's snapshot request) keeps one of these, so that the
joiner starts from a whole snapshot of that moment, never from a diff with no
base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caspian.book import OrderBook
from caspian.codes import Stream, StreamState
from caspian.events import BookEvent, Event, QuoteEvent, StatusEvent, TradeEvent

#: Deepest book handed to a joiner; deeper levels are kept but not sent.
CATCH_UP_LEVELS = 10_000


@dataclass
class _SymbolState:
    book: OrderBook = field(default_factory=OrderBook)
    has_book: bool = False
    book_ts: int = 0
    book_exchange_ts: int | None = None
    last_trade: TradeEvent | None = None
    last_quote: QuoteEvent | None = None
    streams: dict[Stream, StatusEvent] = field(default_factory=dict)


class SymbolTracker:
    def __init__(self) -> None:
        self._symbols: dict[str, _SymbolState] = {}

    def track(self, event: Event) -> None:
        state = self._symbols.get(event.symbol)
        if state is None:
            state = self._symbols[event.symbol] = _SymbolState()
        if isinstance(event, BookEvent):
            if event.snapshot:
                state.book.apply_snapshot(event.bids, event.asks)
                state.has_book = True
            elif state.has_book:
                state.book.apply_diff(event.bids, event.asks)
            state.book_ts = event.ts
            state.book_exchange_ts = event.exchange_ts
        elif isinstance(event, TradeEvent):
            state.last_trade = event
        elif isinstance(event, QuoteEvent):
            state.last_quote = event
        else:
            state.streams[event.stream] = event
            if event.stream is Stream.DEPTH and event.state is StreamState.DISCONNECTED:
                state.has_book = False

    def catch_up(self, symbol: str) -> list[Event]:
        """Events that bring a newcomer to the symbol's current state; [] if unknown."""
        state = self._symbols.get(symbol)
        if state is None:
            return []
        events: list[Event] = list(state.streams.values())
        if state.has_book:
            view = state.book.top(CATCH_UP_LEVELS)
            events.append(
                BookEvent(
                    symbol,
                    state.book_ts,
                    True,
                    list(view.bids),
                    list(view.asks),
                    state.book_exchange_ts,
                )
            )
        if state.last_quote is not None:
            events.append(state.last_quote)
        if state.last_trade is not None:
            events.append(state.last_trade)
        return events

    def forget(self, symbol: str) -> None:
        self._symbols.pop(symbol, None)

    def clear(self) -> None:
        self._symbols.clear()
