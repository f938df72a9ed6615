"""The baseline of the stream benchmarks: the same job done the obvious way.

Same framework as ``caspian serve`` (uvicorn, a Starlette WebSocket endpoint
at ``/v1/stream``, the default asyncio loop) and the same market: the
built-in simulator with the same seed, rate and products. What differs is
the fan-out: for every event and every subscriber, this server builds the
message as a dict, serializes it with ``json.dumps`` and awaits
``websocket.send_text``. Level2 keeps each subscriber's last sent view and
sends the net change from it (``caspian.book.diff_views``).

The token is only checked for presence, and conflation is a throttle (an
update goes out on the first event at least one interval after the previous
one): enough for the load the benchmarks put on it, not a full server.

Run by the benchmarks as::

    python bench/naive_server.py --rate 20 --product FX-BTC/USD=GEMINI 0.01 0.00001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from caspian.book import EMPTY_VIEW, BookView, OrderBook, diff_views
from caspian.codes import CONFLATIONS
from caspian.events import BookEvent, Event, StatusEvent, TradeEvent
from caspian.server import listen_socket
from caspian.sources.simulator import SimProduct, Simulator
from caspian.timefmt import format_us


@dataclass(eq=False)
class Client:
    websocket: WebSocket
    subscriptions: dict[str, Subscription] = field(default_factory=dict)


@dataclass(eq=False)
class Subscription:
    client: Client
    request_id: str
    symbol: str
    level2: bool
    levels: int
    interval: float | None
    sent: BookView = EMPTY_VIEW
    last_sent: float = 0.0

    def due(self, now: float) -> bool:
        return self.interval is None or now - self.last_sent >= self.interval


@dataclass(eq=False)
class Market:
    book: OrderBook = field(default_factory=OrderBook)
    book_ready: bool = False
    streams: dict[str, str] = field(
        default_factory=lambda: {
            "bbo": "disconnected",
            "trade": "disconnected",
            "depth": "disconnected",
        }
    )
    depth_time: str | None = None
    depth_exchange_time: str | None = None
    level1: dict[str, Any] = field(default_factory=dict)
    subscribers: list[Subscription] = field(default_factory=list)


class NaiveServer:
    def __init__(self, products: list[SimProduct], rate: float, seed: int) -> None:
        by_symbol = {product.symbol: product for product in products}
        self.simulator = Simulator(by_symbol.get, seed=seed, rate=rate)
        self.markets = {product.symbol: Market() for product in products}
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    # -- market state ----------------------------------------------------

    def apply(self, event: Event) -> tuple[bool, bool]:
        """Apply an event to its market; whether Level1 and Level2 changed."""
        market = self.markets[event.symbol]
        if isinstance(event, StatusEvent):
            market.streams[event.stream.value] = event.state.value
            return event.stream.value != "depth", event.stream.value == "depth"
        if isinstance(event, TradeEvent):
            market.level1.update(
                tradePrice=event.price,
                tradeSize=event.size,
                tradeId=event.trade_id,
                tradeCaspianTimestamp=format_us(event.ts),
            )
            if event.exchange_ts is not None:
                market.level1["tradeExchangeTimestamp"] = format_us(event.exchange_ts)
            if event.info:
                market.level1["exchangeSpecificInfo"] = event.info
            return True, False
        if not isinstance(event, BookEvent):
            return False, False
        if event.snapshot:
            market.book.apply_snapshot(event.bids, event.asks)
            market.book_ready = True
        elif market.book_ready:
            market.book.apply_diff(event.bids, event.asks)
        else:
            return False, False
        market.depth_time = format_us(event.ts)
        market.depth_exchange_time = (
            format_us(event.exchange_ts) if event.exchange_ts is not None else None
        )
        bid, ask = market.book.best_bid(), market.book.best_ask()
        bbo = {
            "ask": ask[0] if ask else None,
            "askSize": ask[1] if ask else None,
            "bid": bid[0] if bid else None,
            "bidSize": bid[1] if bid else None,
        }
        level1 = market.level1
        if all(level1.get(key) == value for key, value in bbo.items()):
            return False, True
        level1.update(bbo)
        level1["bboCaspianTimestamp"] = market.depth_time
        if market.depth_exchange_time is not None:
            level1["bboExchangeTimestamp"] = market.depth_exchange_time
        return True, True

    def level1_message(self, market: Market, request_id: str) -> dict[str, Any]:
        return {
            "requestId": request_id,
            "type": "Level1",
            "bboStream": market.streams["bbo"],
            "tradeStream": market.streams["trade"],
            "payload": {key: value for key, value in market.level1.items() if value is not None},
        }

    def level2_message(
        self, market: Market, request_id: str, changes: list[tuple[float, float, str]]
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"requestId": request_id, "type": "Level2"}
        if market.depth_exchange_time is not None:
            message["exchangeTimestamp"] = market.depth_exchange_time
        if market.depth_time is not None:
            message["caspianTimestamp"] = market.depth_time
        message["depthStream"] = market.streams["depth"]
        message["payload"] = [
            {"price": price, "size": size, "side": side} for price, size, side in changes
        ]
        return message

    # -- fan-out -----------------------------------------------------------

    def sink(self, event: Event) -> None:
        self.events.put_nowait(event)

    async def dispatch(self) -> None:
        while True:
            event = await self.events.get()
            level1_changed, level2_changed = self.apply(event)
            market = self.markets[event.symbol]
            now = time.monotonic()
            views: dict[int, BookView] = {}
            for subscription in list(market.subscribers):
                if not subscription.due(now):
                    continue
                if subscription.level2:
                    if not level2_changed:
                        continue
                    view = views.get(subscription.levels)
                    if view is None:
                        view = views[subscription.levels] = market.book.top(subscription.levels)
                    changes = diff_views(subscription.sent, view)
                    if not changes:
                        continue
                    subscription.sent = view
                    message = self.level2_message(market, subscription.request_id, changes)
                elif level1_changed:
                    message = self.level1_message(market, subscription.request_id)
                else:
                    continue
                subscription.last_sent = now
                await self.send(subscription.client, message)

    async def send(self, client: Client, message: dict[str, Any]) -> None:
        try:
            await client.websocket.send_text(json.dumps(message))
        except Exception:
            self.drop(client)

    def drop(self, client: Client) -> None:
        for subscription in client.subscriptions.values():
            subscribers = self.markets[subscription.symbol].subscribers
            if subscription in subscribers:
                subscribers.remove(subscription)
        client.subscriptions.clear()

    # -- the endpoint ------------------------------------------------------

    async def stream(self, websocket: WebSocket) -> None:
        token = websocket.query_params.get("accessToken") or websocket.headers.get("authorization")
        await websocket.accept()
        if not token:
            await websocket.close(3000, "Access token not found")
            return
        client = Client(websocket)
        try:
            while True:
                await self.receive(client, await websocket.receive_text())
        except WebSocketDisconnect:
            pass
        finally:
            self.drop(client)

    async def receive(self, client: Client, text: str) -> None:
        request = json.loads(text)
        request_id = request.get("requestId", "N/A")
        if request.get("type") != "Subscribe":
            return
        payload = request.get("payload", {})
        symbol = payload.get("symbol")
        market = self.markets.get(symbol)
        code = 200
        if market is None:
            code = 202
        elif payload.get("type") not in ("Level1", "Level2"):
            code = 203
        elif request_id in client.subscriptions:
            code = 201
        await self.send(
            client,
            {
                "requestId": request_id,
                "type": "SubscribeResponse",
                "payload": {"code": code, "message": "All OK" if code == 200 else "Refused"},
            },
        )
        if market is None or code != 200:
            return
        subscription = Subscription(
            client,
            request_id,
            symbol,
            payload["type"] == "Level2",
            int(payload.get("numberOfLevels", 20)),
            CONFLATIONS.get(payload.get("conflation", "330ms"), 0.33),
        )
        client.subscriptions[request_id] = subscription
        market.subscribers.append(subscription)
        self.simulator.watch(symbol)
        if subscription.level2:
            subscription.sent = market.book.top(subscription.levels)
            message = self.level2_message(
                market, request_id, diff_views(EMPTY_VIEW, subscription.sent)
            )
        else:
            message = self.level1_message(market, request_id)
        subscription.last_sent = time.monotonic()
        await self.send(client, message)


def product(symbol: str, tick: str, lot: str) -> SimProduct:
    """A spot or perpetual product from its Caspian code, e.g. ``FX-BTC/USD=GEMINI``."""
    kind, _, rest = symbol.partition("-")
    pair = rest.split("=")[0]
    base, _, quote = pair.partition("/")
    return SimProduct(symbol, base, quote.split("-")[0], kind, float(tick), float(lot))


async def main(args: argparse.Namespace) -> None:
    server_state = NaiveServer([product(*one) for one in args.product], args.rate, args.seed)
    app = Starlette(routes=[WebSocketRoute("/v1/stream", server_state.stream)])
    # The same listener as Caspian's, so that both send without Nagle's algorithm.
    sock = listen_socket(args.host, args.port)
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, server_header=False
    )
    server = uvicorn.Server(config)
    tasks = [
        asyncio.create_task(server_state.simulator.run(server_state.sink)),
        asyncio.create_task(server_state.dispatch()),
    ]
    host, port = sock.getsockname()[:2]
    print(f"naive stream: ws://{host}:{port}/v1/stream", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in tasks:
            task.cancel()
        sock.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=20.0, help="book updates/s per symbol")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--product",
        nargs=3,
        action="append",
        required=True,
        metavar=("SYMBOL", "TICK", "LOT"),
        help="a product to simulate; repeat for more",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args(sys.argv[1:])))
