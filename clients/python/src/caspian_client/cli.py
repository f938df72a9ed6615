"""Terminal commands: ``caspian-watch``, ``caspian-tail``, ``caspian-exchanges`` and
``caspian-products``.

Each takes the service and the login from ``--url``/``--key-id``/``--secret``
(or ``--user``/``--password``) or from the environment, as ``Client`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from caspian_client.book import Book, Level2Update
from caspian_client.client import Client
from caspian_client.errors import CaspianError
from caspian_client.models import Level1, format_timestamp
from caspian_client.stream import Connected, Disconnected, Event, Reconnecting, Stream

CONFLATIONS = ["None", "250ms", "330ms", "500ms", "1s", "3s", "5s"]
SYMBOL_TYPES = ["Caspian", "Pseudo", "Tora"]


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    service = parser.add_argument_group("service (default: CASPIAN_URL, CASPIAN_KEY_ID, ...)")
    service.add_argument("--url", help="the service, e.g. http://127.0.0.1:8080")
    service.add_argument("--key-id", help="API key id (CASPIAN_KEY_ID)")
    service.add_argument("--secret", help="API key secret (CASPIAN_KEY_SECRET)")
    service.add_argument("--user", help="user name, for a Credential login (CASPIAN_USER)")
    service.add_argument("--password", help="that user's password (CASPIAN_PASSWORD)")
    return parser


def _stream_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level2", action="store_true", help="depth (Level2) instead of Level1")
    parser.add_argument(
        "--levels", type=int, default=None, help="Level2 numberOfLevels (1-100; default 20)"
    )
    parser.add_argument("--conflation", choices=CONFLATIONS, help="update interval")
    parser.add_argument(
        "--symbol-type", choices=SYMBOL_TYPES, help="which code SYMBOL is (default Caspian)"
    )


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.url,
        key_id=args.key_id,
        secret=args.secret,
        user=args.user,
        password=args.password,
    )


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Runs a command: 0, or 1 with one ``error:`` line. Ctrl-C, the way to stop the
    stream commands, and a reader that went away (``| head``) end it quietly."""
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CaspianError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# -- reference data ----------------------------------------------------------


def exchanges_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("caspian-exchanges", "List the exchanges of a Caspian service.")
    parser.add_argument("--json", action="store_true", help="JSON as the API sends it")
    args = parser.parse_args(argv)

    async def main() -> None:
        async with _client(args) as client:
            exchanges = await client.exchanges()
        if args.json:
            _print_json([exchange.to_dict() for exchange in exchanges])
            return
        table = Table("code", "name", box=box.SIMPLE)
        for exchange in exchanges:
            table.add_row(exchange.code, exchange.name)
        Console().print(table)

    return _run(main)


def products_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("caspian-products", "List the products of exchanges of a Caspian service.")
    parser.add_argument("exchange", nargs="+", help="exchange codes, e.g. GEMINI")
    parser.add_argument("--json", action="store_true", help="JSON as the API sends it")
    args = parser.parse_args(argv)

    async def main() -> None:
        async with _client(args) as client:
            products = await client.products(args.exchange)
        if args.json:
            _print_json([product.to_dict() for product in products])
            return
        table = Table(
            "caspianCode", "pseudoCode", "toraCode", "type", "tickRule", "lotSize",
            "description", box=box.SIMPLE,
        )  # fmt: skip
        for product in products:
            tora = (
                f"{product.tora_code}.{product.tora_market}"
                if product.tora_code and product.tora_market
                else ""
            )
            table.add_row(
                product.caspian_code,
                product.pseudo_code or "",
                tora,
                product.type or "",
                product.tick_rule or "",
                product.lot_size or "",
                product.description or "",
            )
        # Piped, the table is as wide as it needs, not cut to 80 columns.
        console = Console() if sys.stdout.isatty() else Console(width=250)
        console.print(table)

    return _run(main)


# -- streams -------------------------------------------------------------------


def _subscribe(stream: Stream, args: argparse.Namespace, symbol: str) -> Any:
    if args.level2:
        return stream.level2(
            symbol, levels=args.levels, symbol_type=args.symbol_type, conflation=args.conflation
        )
    return stream.level1(symbol, symbol_type=args.symbol_type, conflation=args.conflation)


def _level2_json(update: Level2Update) -> dict[str, Any]:
    book = update.book
    result: dict[str, Any] = {
        "symbol": book.symbol,
        "type": "Level2",
        "whole": update.whole,
        "depthStream": book.depth_stream,
        "bids": [[level.price, level.size] for level in book.bids],
        "asks": [[level.price, level.size] for level in book.asks],
        "changes": [[c.side, c.price, c.size] for c in update.changes],
    }
    for name, value in (
        ("caspianTimestamp", book.caspian_timestamp),
        ("exchangeTimestamp", book.exchange_timestamp),
    ):
        if value is not None:
            result[name] = format_timestamp(value)
    return result


def tail_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "caspian-tail",
        "Print a Caspian stream as JSON lines: each Level1 update as the merged current "
        "state, each Level2 update as the whole kept book and the change. Connection "
        "events go to stderr.",
    )
    parser.add_argument("symbol", nargs="+", help="symbols, e.g. FX-BTC/USD=GEMINI")
    _stream_options(parser)
    args = parser.parse_args(argv)

    async def main() -> None:
        async with _client(args) as client, client.stream() as stream:

            async def report() -> None:
                async for event in stream.events():
                    if isinstance(event, Connected | Disconnected | Reconnecting):
                        print(event, file=sys.stderr, flush=True)

            async def follow(symbol: str) -> None:
                async for update in _subscribe(stream, args, symbol):
                    if isinstance(update, Level1):
                        _print_json({"type": "Level1", **update.to_dict()})
                    else:
                        _print_json(_level2_json(update))

            reporter = asyncio.create_task(report())
            try:
                await asyncio.gather(*(follow(symbol) for symbol in args.symbol))
            finally:
                reporter.cancel()

    return _run(main)


class WatchView:
    """What ``caspian-watch`` shows: the latest update, the stream's state, the rate."""

    def __init__(self, symbol: str, level2: bool, levels: int) -> None:
        self.symbol = symbol
        self.level2 = level2
        self.levels = levels
        self.level1: Level1 | None = None
        self.book: Book | None = None
        self.connection = "connecting"
        self.last_reconnect: datetime | None = None
        self.reconnects = 0
        self._times: deque[float] = deque()

    def updated(self, update: Level1 | Level2Update) -> None:
        now = time.monotonic()
        self._times.append(now)
        while self._times and self._times[0] < now - 5:
            self._times.popleft()
        if isinstance(update, Level1):
            self.level1 = update
        else:
            self.book = update.book

    def event(self, event: Event) -> None:
        if isinstance(event, Connected):
            self.connection = "connected"
            if event.reconnect:
                self.reconnects += 1
                self.last_reconnect = datetime.now(UTC)
        elif isinstance(event, Disconnected):
            self.connection = f"disconnected: {event.code} {event.meaning}"
        elif isinstance(event, Reconnecting):
            self.connection = f"reconnecting in {event.delay:.1f} s (attempt {event.attempt})"

    def rate(self) -> float:
        if len(self._times) < 2:
            return 0.0
        span = max(time.monotonic() - self._times[0], 1.0)
        return len(self._times) / span

    def render(self) -> Group:
        title = Text(self.symbol, style="bold")
        body = self._ladder() if self.level2 else self._ticker()
        last = self.last_reconnect.strftime("%H:%M:%S UTC") if self.last_reconnect else "never"
        footer = Text(
            f"connection: {self.connection}   updates/s: {self.rate():.1f}   "
            f"reconnects: {self.reconnects} (last {last})   Ctrl-C quits"
        )
        return Group(title, body, footer)

    def _ticker(self) -> Table:
        table = Table("", "price", "size", "time (GMT)", box=box.SIMPLE)
        state = self.level1
        if state is None:
            table.add_row("waiting for data", "", "", "")
            return table

        def cell(value: float | None) -> str:
            return "" if value is None else f"{value:.12g}"

        def when(value: datetime | None) -> str:
            return "" if value is None else format_timestamp(value)[11:23]

        table.add_row(
            "bid", cell(state.bid), cell(state.bid_size), when(state.bbo_caspian_timestamp)
        )
        table.add_row(
            "ask", cell(state.ask), cell(state.ask_size), when(state.bbo_caspian_timestamp)
        )
        table.add_row(
            "trade",
            cell(state.trade_price),
            cell(state.trade_size),
            when(state.trade_caspian_timestamp),
        )
        table.caption = f"bboStream: {state.bbo_stream}   tradeStream: {state.trade_stream}"
        return table

    def _ladder(self) -> Table:
        table = Table("bid size", "", "bid", "ask", "", "ask size", box=box.SIMPLE)
        book = self.book
        if book is None:
            table.add_row("waiting for a whole book", "", "", "", "", "")
            return table
        sizes = [level.size for level in (*book.bids, *book.asks)] or [1.0]
        largest = max(sizes)

        def bar(size: float) -> str:
            return "█" * max(1, round(12 * size / largest))

        for row in range(max(len(book.bids), len(book.asks))):
            bid = book.bids[row] if row < len(book.bids) else None
            ask = book.asks[row] if row < len(book.asks) else None
            table.add_row(
                f"{bid.size:.12g}" if bid else "",
                Text(bar(bid.size), style="green", justify="right") if bid else "",
                f"{bid.price:.12g}" if bid else "",
                f"{ask.price:.12g}" if ask else "",
                Text(bar(ask.size), style="red") if ask else "",
                f"{ask.size:.12g}" if ask else "",
            )
        spread = (
            f"{book.best_ask.price - book.best_bid.price:.12g}"
            if book.best_bid and book.best_ask
            else "-"
        )
        table.caption = f"depthStream: {book.depth_stream}   spread: {spread}"
        return table


def watch_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("caspian-watch", "Watch one symbol of a Caspian stream live.")
    parser.add_argument("symbol", help="e.g. FX-BTC/USD=GEMINI")
    _stream_options(parser)
    args = parser.parse_args(argv)
    view = WatchView(args.symbol, args.level2, args.levels or 20)

    async def main() -> None:
        async with _client(args) as client, client.stream() as stream:
            # The alternate screen is left, and the cursor shown again, however this ends.
            with Live(view.render(), screen=True, auto_refresh=False) as live:

                async def report() -> None:
                    async for event in stream.events():
                        view.event(event)
                        live.update(view.render(), refresh=True)

                reporter = asyncio.create_task(report())
                view.connection = "connected"
                try:
                    async for update in _subscribe(stream, args, args.symbol):
                        view.updated(update)
                        live.update(view.render(), refresh=True)
                finally:
                    reporter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporter

    return _run(main)
