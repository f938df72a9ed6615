"""Local stand-ins for exchanges' public market-data APIs, in their published message formats.

Each mock is one ``websockets`` server on 127.0.0.1: WebSocket connections
get the exchange's subscribe acknowledgements, book snapshots and updates,
trades and heartbeats; plain HTTP requests to the same port get the few REST
answers ccxt asks for (market lists, Binance's depth snapshot). Tests drive a
mock explicitly: set its book, publish updates and trades, and break it the
ways exchanges break (drop the connections, fall silent, lose a message,
send a crossed level).

The mocks keep their own book and compute their own checksums, without
Caspian's code, so a test comparing the source's book with a mock's compares
two independent implementations.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Coroutine, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

Message = dict[str, Any]
Level = tuple[float, float]


def iso_now() -> str:
    """An ISO 8601 UTC time with microseconds and a Z, as Coinbase and Kraken write them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ms_now() -> int:
    return time.time_ns() // 1_000_000


def plain(value: float) -> str:
    """A number as a plain decimal string, as Korbit, Coinone and Paxos write it: ``"0.00499"``."""
    return format(Decimal(repr(value)).normalize(), "f")


def _set_levels(side: dict[float, float], levels: Iterable[Level]) -> None:
    for price, size in levels:
        if size == 0:
            side.pop(price, None)
        else:
            side[price] = size


class MockExchange:
    """What every mock shares: the server, the book, subscriptions and failure modes."""

    #: Decimal places the exchange writes prices and sizes with.
    price_places = 2
    size_places = 8

    def __init__(self, heartbeat_s: float = 0.1) -> None:
        self.heartbeat_s = heartbeat_s
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        #: Every message received, in order.
        self.received: list[Message] = []
        #: Subscribe requests received per channel, over all connections.
        self.subscribes: Counter[str] = Counter()
        #: REST answers by path.
        self.rest: dict[str, Any] = {}
        self.connections: set[ServerConnection] = set()
        #: Set: WebSocket handshakes are answered 503, as by an exchange that is down.
        self.refusing = False
        #: WebSocket handshakes attempted, refused ones included.
        self.handshakes = 0
        #: Binary frames received: exchanges document text frames for requests.
        self.binary_frames = 0
        self._channels: dict[ServerConnection, set[str]] = {}
        self._stalled: set[ServerConnection] = set()
        self._server: Server | None = None
        self._changed = asyncio.Event()
        self._activity: list[asyncio.Task[None]] = []

    # -- server ------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._serve, "127.0.0.1", 0, process_request=self._http, ping_interval=None
        )
        self._activity = [asyncio.create_task(work) for work in self.activity()]

    async def stop(self) -> None:
        self.hush()
        await asyncio.gather(*self._activity, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            self.handshakes += 1
            if self.refusing:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "down for a while\n")
            return None
        parts = urlsplit(request.path)
        body = self.rest_answer(parts.path, parts.query)
        if body is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        payload = orjson.dumps(body)
        headers = Headers(
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        )
        return Response(200, "OK", headers, payload)

    def rest_answer(self, path: str, query: str) -> Any:
        return self.rest.get(path)

    async def _serve(self, connection: ServerConnection) -> None:
        self.connections.add(connection)
        self._channels[connection] = set()
        beat = asyncio.create_task(self._beat(connection))
        try:
            await self.on_connect(connection)
            async for raw in connection:
                if connection in self._stalled:
                    continue
                if isinstance(raw, bytes):
                    self.binary_frames += 1
                elif await self.on_text(connection, raw):
                    continue
                message = orjson.loads(raw)
                self.received.append(message)
                await self.on_message(connection, message)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()
            self.connections.discard(connection)
            self._channels.pop(connection, None)
            self._stalled.discard(connection)

    async def _beat(self, connection: ServerConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            for message in self.heartbeats(self._channels.get(connection, set())):
                await self.send(connection, message)

    # -- what subclasses speak ------------------------------------------------

    def activity(self) -> list[Coroutine[Any, Any, None]]:
        """What the exchange does by itself while it serves (a ticking market): nothing here."""
        return []

    def hush(self) -> None:
        """The market goes quiet: its own activity stops."""
        for task in self._activity:
            task.cancel()

    async def on_connect(self, connection: ServerConnection) -> None:
        """Messages the exchange sends unasked when a connection opens."""

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        raise NotImplementedError

    async def on_text(self, connection: ServerConnection, text: str) -> bool:
        """Answers a message that is not JSON (BitMEX's ``ping``); whether it was one."""
        return False

    def heartbeats(self, channels: set[str]) -> list[Message]:
        """The heartbeat messages of one beat for a connection subscribed to ``channels``."""
        return []

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Changes the book and publishes the change (size 0 removes a level)."""
        bids, asks = list(bids), list(asks)
        self.apply(bids, asks)
        await self.send_changes(bids, asks)

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes changes without applying them to the mock's own book."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------

    def subscribed(self, connection: ServerConnection, channel: str) -> None:
        self._channels[connection].add(channel)
        self.subscribes[channel] += 1

    async def send(self, connection: ServerConnection, message: Any) -> None:
        await self.send_text(connection, orjson.dumps(message).decode())

    async def send_text(self, connection: ServerConnection, text: str) -> None:
        if connection in self._stalled:
            return
        with contextlib.suppress(ConnectionClosed):
            await connection.send(text)

    async def publish(self, channel: str, message: Any) -> None:
        """Sends to every connection subscribed to ``channel``."""
        for connection, channels in list(self._channels.items()):
            if channel in channels:
                await self.send(connection, message)

    def price(self, value: float) -> str:
        return f"{value:.{self.price_places}f}"

    def size(self, value: float) -> str:
        return f"{value:.{self.size_places}f}"

    # -- the book ------------------------------------------------------------

    def set_book(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        self.bids = dict(bids)
        self.asks = dict(asks)

    def apply(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        _set_levels(self.bids, bids)
        _set_levels(self.asks, asks)

    def changed(
        self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()
    ) -> tuple[dict[float, float], dict[float, float]]:
        """The bids and asks as the changes would make them; the mock's own book stays."""
        new_bids, new_asks = dict(self.bids), dict(self.asks)
        _set_levels(new_bids, bids)
        _set_levels(new_asks, asks)
        return new_bids, new_asks

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        """The best ``n`` levels of each side, best first."""
        bids = sorted(self.bids.items(), reverse=True)[:n]
        asks = sorted(self.asks.items())[:n]
        return bids, asks

    # -- failures and waiting --------------------------------------------------

    def drop(self) -> None:
        """Cuts every connection at the TCP level, as a network failure does."""
        for connection in list(self.connections):
            connection.transport.abort()

    def stall(self) -> None:
        """Every open connection stays open but goes silent, and deaf."""
        self._stalled.update(self.connections)

    async def wait_subscribes(self, channel: str, count: int = 1, within: float = 10) -> None:
        """Waits until ``count`` subscribe requests for ``channel`` arrived in all."""
        async with asyncio.timeout(within):
            while self.subscribes[channel] < count:
                self._changed.clear()
                await self._changed.wait()


# -- Coinbase Exchange (GDAX) ----------------------------------------------------


class CoinbaseMock(MockExchange):
    """``wss://ws-feed.exchange.coinbase.com`` and the REST market list.

    Channels: ``level2_batch`` (snapshot, then ``l2update``), ``matches``
    (``last_match``, then ``match``) and ``heartbeat``, per product.
    """

    def __init__(self, product_id: str = "BTC-USD", heartbeat_s: float = 0.1) -> None:
        super().__init__(heartbeat_s)
        self.product_id = product_id
        self._trade_ids = itertools.count(1000)
        self._sequence = itertools.count(50_000)
        base, quote = product_id.split("-")
        self.rest["/products"] = [
            {
                "id": product_id,
                "base_currency": base,
                "quote_currency": quote,
                "quote_increment": "0.01",
                "base_increment": "0.00000001",
                "display_name": f"{base}/{quote}",
                "min_market_funds": "1",
                "margin_enabled": False,
                "post_only": False,
                "limit_only": False,
                "cancel_only": False,
                "status": "online",
                "status_message": "",
                "auction_mode": False,
            }
        ]
        self.rest["/currencies"] = [
            {
                "id": currency,
                "name": currency,
                "min_size": "0.00000001",
                "status": "online",
                "message": "",
                "max_precision": "0.00000001",
                "convertible_to": [],
                "details": {"type": "crypto"},
                "supported_networks": [],
            }
            for currency in (base, quote)
        ]

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if message.get("type") != "subscribe":
            await self.send(connection, {"type": "error", "message": "Failed to subscribe"})
            return
        products = message.get("product_ids", [])
        channels = [
            channel if isinstance(channel, str) else channel["name"]
            for channel in message.get("channels", [])
        ]
        if products != [self.product_id] or not channels:
            await self.send(
                connection,
                {"type": "error", "message": "Failed to subscribe", "reason": "bad request"},
            )
            return
        for channel in channels:
            self.subscribed(connection, channel)
        await self.send(
            connection,
            {
                "type": "subscriptions",
                "channels": [{"name": name, "product_ids": products} for name in channels],
            },
        )
        if "level2_batch" in channels:
            bids, asks = self.top(10_000)
            await self.send(
                connection,
                {
                    "type": "snapshot",
                    "product_id": self.product_id,
                    "bids": [[self.price(p), self.size(s)] for p, s in bids],
                    "asks": [[self.price(p), self.size(s)] for p, s in asks],
                },
            )
        if "matches" in channels:
            await self.send(connection, self._match(99.0, 0.5, "buy", "last_match"))

    def heartbeats(self, channels: set[str]) -> list[Message]:
        if "heartbeat" not in channels:
            return []
        return [
            {
                "type": "heartbeat",
                "sequence": next(self._sequence),
                "last_trade_id": 999,
                "product_id": self.product_id,
                "time": iso_now(),
            }
        ]

    def _changes(self, bids: Iterable[Level], asks: Iterable[Level]) -> list[list[str]]:
        return [["buy", self.price(p), self.size(s)] for p, s in bids] + [
            ["sell", self.price(p), self.size(s)] for p, s in asks
        ]

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes changes without applying them to the mock's own book."""
        await self.publish(
            "level2_batch",
            {
                "type": "l2update",
                "product_id": self.product_id,
                "changes": self._changes(bids, asks),
                "time": iso_now(),
            },
        )

    def _match(
        self,
        price: float,
        size: float,
        maker_side: str,
        kind: str = "match",
        at: str | None = None,
    ) -> Message:
        return {
            "type": kind,
            "trade_id": next(self._trade_ids),
            "maker_order_id": "ac928c66-ca53-498f-9c13-a110027a60e8",
            "taker_order_id": "132fb6ae-456b-4654-b4e0-d681ac05cea1",
            "side": maker_side,
            "size": self.size(size),
            "price": self.price(price),
            "product_id": self.product_id,
            "sequence": next(self._sequence),
            "time": at or iso_now(),
        }

    async def trade(
        self, price: float, size: float, maker_side: str, at: str | None = None
    ) -> Message:
        """A match (at ``at``, default now); Coinbase's ``side`` is the maker order's side."""
        message = self._match(price, size, maker_side, at=at)
        await self.publish("matches", message)
        return message


# -- Kraken (WebSocket v2) -------------------------------------------------------


def kraken_checksum(
    bids: list[Level], asks: list[Level], price_places: int, qty_places: int
) -> int:
    """Kraken's book checksum, written from its documentation with decimal strings."""
    price_step = Decimal(1).scaleb(-price_places)
    qty_step = Decimal(1).scaleb(-qty_places)

    def digits(value: float, step: Decimal) -> str:
        return str(Decimal(repr(value)).quantize(step)).replace(".", "").lstrip("0")

    text = ""
    for price, qty in asks[:10]:
        text += digits(price, price_step) + digits(qty, qty_step)
    for price, qty in bids[:10]:
        text += digits(price, price_step) + digits(qty, qty_step)
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


class KrakenMock(MockExchange):
    """``wss://ws.kraken.com/v2``: the ``book`` and ``trade`` channels, pings and heartbeats."""

    price_places = 1
    size_places = 8

    def __init__(self, symbol: str = "BTC/USD", heartbeat_s: float = 0.1) -> None:
        super().__init__(heartbeat_s)
        self.symbol = symbol
        self.depth = 10
        self._trade_ids = itertools.count(4_665_906)

    async def on_connect(self, connection: ServerConnection) -> None:
        await self.send(
            connection,
            {
                "channel": "status",
                "type": "update",
                "data": [
                    {
                        "api_version": "v2",
                        "connection_id": 12_393_906_104_898_154_338,
                        "system": "online",
                        "version": "2.0.8",
                    }
                ],
            },
        )

    def _ack(self, message: Message, result: Message) -> Message:
        now = iso_now()
        return {
            "method": message["method"],
            "result": result,
            "success": True,
            "time_in": now,
            "time_out": now,
            "req_id": message.get("req_id"),
        }

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        method = message.get("method")
        if method == "ping":
            await self.send(connection, self._ack(message, {}) | {"method": "pong"})
            return
        params = message.get("params", {})
        channel = params.get("channel")
        if method != "subscribe" or params.get("symbol") != [self.symbol]:
            await self.send(
                connection,
                {
                    "error": "Currency pair not supported",
                    "method": method,
                    "success": False,
                    "req_id": message.get("req_id"),
                },
            )
            return
        self.subscribed(connection, channel)
        if channel == "book":
            self.depth = int(params.get("depth", 10))
            await self.send(
                connection,
                self._ack(
                    message,
                    {
                        "channel": "book",
                        "depth": self.depth,
                        "snapshot": True,
                        "symbol": self.symbol,
                    },
                ),
            )
            bids, asks = self.top(self.depth)
            await self.send(connection, self._book("snapshot", bids, asks, with_time=False))
        elif channel == "trade":
            snapshot = bool(params.get("snapshot", True))
            await self.send(
                connection,
                self._ack(
                    message, {"channel": "trade", "snapshot": snapshot, "symbol": self.symbol}
                ),
            )
            if snapshot:
                # Kraken replays recent trades unless asked not to: history.
                old = self._trade(99.0, 0.25, "sell", iso_now())
                await self.send(connection, {"channel": "trade", "type": "snapshot", "data": [old]})

    def heartbeats(self, channels: set[str]) -> list[Message]:
        return [{"channel": "heartbeat"}] if channels else []

    def checksum(self) -> int:
        bids, asks = self.top(10)
        return kraken_checksum(bids, asks, self.price_places, self.size_places)

    def _book(
        self, kind: str, bids: list[Level], asks: list[Level], with_time: bool = True
    ) -> Message:
        data: Message = {
            "symbol": self.symbol,
            "bids": [{"price": p, "qty": s} for p, s in bids],
            "asks": [{"price": p, "qty": s} for p, s in asks],
            "checksum": self.checksum(),
        }
        if with_time:
            data["timestamp"] = iso_now()
        return {"channel": "book", "type": kind, "data": [data]}

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        self.apply(bids, asks)
        await self.publish("book", self._book("update", bids, asks))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """A change on the exchange whose message never arrives."""
        self.apply(bids, asks)

    def _trade(self, price: float, qty: float, side: str, timestamp: str) -> Message:
        return {
            "symbol": self.symbol,
            "side": side,
            "price": price,
            "qty": qty,
            "ord_type": "limit",
            "trade_id": next(self._trade_ids),
            "timestamp": timestamp,
        }

    async def trade(self, price: float, qty: float, side: str) -> Message:
        data = self._trade(price, qty, side, iso_now())
        await self.publish("trade", {"channel": "trade", "type": "update", "data": [data]})
        return data


# -- Binance (spot) -------------------------------------------------------------------


class BinanceMock(MockExchange):
    """``wss://stream.binance.com:9443/ws``: diff depth and trade streams, and ``/api/v3/depth``.

    Each depth event covers update ids ``U`` to ``u``; a client syncs them to
    the REST snapshot's ``lastUpdateId`` and must see no hole afterwards.
    """

    def __init__(self, market_id: str = "BTCUSDT") -> None:
        super().__init__()
        self.market_id = market_id
        self.update_id = 1_000
        #: Set: the depth snapshot is answered 404, as by a REST API in trouble.
        self.snapshots_refused = False
        self._trade_ids = itertools.count(12_345)

    def rest_answer(self, path: str, query: str) -> Any:
        if path == "/api/v3/depth" and not self.snapshots_refused:
            bids, asks = self.top(1000)
            return {
                "lastUpdateId": self.update_id,
                "bids": [[self.price(p), self.size(s)] for p, s in bids],
                "asks": [[self.price(p), self.size(s)] for p, s in asks],
            }
        return super().rest_answer(path, query)

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if message.get("method") != "SUBSCRIBE":
            return
        for stream in message.get("params", []):
            name, _, kind = stream.partition("@")
            if name != self.market_id.lower():
                await self.send(connection, {"error": {"code": 2, "msg": "Invalid request"}})
                return
            self.subscribed(connection, kind.partition("@")[0])
        await self.send(connection, {"result": None, "id": message.get("id")})

    def _depth(self, first: int, bids: list[Level], asks: list[Level]) -> Message:
        return {
            "e": "depthUpdate",
            "E": ms_now(),
            "s": self.market_id,
            "U": first,
            "u": self.update_id,
            "b": [[self.price(p), self.size(s)] for p, s in bids],
            "a": [[self.price(p), self.size(s)] for p, s in asks],
        }

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        first = self.update_id + 1
        self.apply(bids, asks)
        self.update_id += len(bids) + len(asks)
        await self.publish("depth", self._depth(first, bids, asks))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        self.apply(bids, asks)
        self.update_id += len(bids) + len(asks)

    async def burst(self, changes: Iterable[tuple[list[Level], list[Level]]]) -> None:
        """Publishes many updates made at one instant, as a busy exchange's burst arrives."""
        messages = []
        for bids, asks in changes:
            first = self.update_id + 1
            self.apply(bids, asks)
            self.update_id += len(bids) + len(asks)
            messages.append(self._depth(first, bids, asks))
        for message in messages:
            await self.publish("depth", message)

    async def trade(self, price: float, qty: float, buyer_is_maker: bool) -> Message:
        now = ms_now()
        message = {
            "e": "trade",
            "E": now,
            "s": self.market_id,
            "t": next(self._trade_ids),
            "p": self.price(price),
            "q": self.size(qty),
            "T": now,
            "m": buyer_is_maker,
            "M": True,
        }
        await self.publish("trade", message)
        return message


# -- Gemini (market data v2) ------------------------------------------------------------


class GeminiMock(MockExchange):
    """``wss://api.gemini.com/v2/marketdata``: the ``l2`` subscription (book and trades)."""

    def __init__(self, symbol: str = "BTCUSD", heartbeat_s: float = 0.1) -> None:
        super().__init__(heartbeat_s)
        self.symbol = symbol
        self._event_ids = itertools.count(122_258_166_738)

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if message.get("type") != "subscribe":
            return
        for subscription in message.get("subscriptions", []):
            if subscription.get("name") != "l2" or subscription.get("symbols") != [self.symbol]:
                await self.send(connection, {"result": "error", "reason": "InvalidJson"})
                return
            self.subscribed(connection, "l2")
            bids, asks = self.top(10_000)
            await self.send(
                connection,
                {
                    "type": "l2_updates",
                    "symbol": self.symbol,
                    "changes": self._changes(bids, asks),
                    # Gemini's first message replays recent trades: history.
                    "trades": [self._trade(99.0, 0.25, "buy", ms_now() - 2_000)],
                    "auction_events": [],
                },
            )

    def heartbeats(self, channels: set[str]) -> list[Message]:
        return [{"type": "heartbeat", "timestamp": ms_now()}] if channels else []

    def _changes(self, bids: Iterable[Level], asks: Iterable[Level]) -> list[list[str]]:
        return [["buy", self.price(p), self.size(s)] for p, s in bids] + [
            ["sell", self.price(p), self.size(s)] for p, s in asks
        ]

    def _trade(self, price: float, quantity: float, side: str, timestamp: int) -> Message:
        return {
            "type": "trade",
            "symbol": self.symbol,
            "event_id": next(self._event_ids),
            "timestamp": timestamp,
            "price": self.price(price),
            "quantity": self.size(quantity),
            "side": side,
        }

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        await self.publish(
            "l2",
            {"type": "l2_updates", "symbol": self.symbol, "changes": self._changes(bids, asks)},
        )

    async def trade(self, price: float, quantity: float, side: str) -> Message:
        message = self._trade(price, quantity, side, ms_now())
        await self.publish("l2", message)
        return message


# -- Deribit (JSON-RPC over WebSocket) -----------------------------------------------------


class DeribitMock(MockExchange):
    """``wss://www.deribit.com/ws/api/v2``: ``book.{instrument}.100ms`` and ``trades.…``.

    Book notifications chain by ``change_id``: each change names the one it
    follows in ``prev_change_id``.
    """

    price_places = 1
    size_places = 3

    def __init__(self, instrument: str = "BTC_USDT-PERPETUAL") -> None:
        super().__init__()
        self.instrument = instrument
        self.change_id = 1_550_694_837
        self._trade_seq = itertools.count(501_899)

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if message.get("method") != "public/subscribe":
            return
        channels = message.get("params", {}).get("channels", [])
        await self.send(
            connection,
            {"jsonrpc": "2.0", "id": message.get("id"), "result": channels, "testnet": False},
        )
        for channel in channels:
            kind, instrument, _ = channel.split(".")
            if instrument != self.instrument:
                continue
            self.subscribed(connection, kind)
            if kind == "book":
                bids, asks = self.top(10_000)
                await self.send(
                    connection,
                    self._notification(
                        "book",
                        {
                            "type": "snapshot",
                            "timestamp": ms_now(),
                            "instrument_name": self.instrument,
                            "change_id": self.change_id,
                            "bids": [["new", p, s] for p, s in bids],
                            "asks": [["new", p, s] for p, s in asks],
                        },
                    ),
                )

    def _notification(self, kind: str, data: Any) -> Message:
        return {
            "jsonrpc": "2.0",
            "method": "subscription",
            "params": {"channel": f"{kind}.{self.instrument}.100ms", "data": data},
        }

    @staticmethod
    def _actions(levels: Iterable[Level], book: dict[float, float]) -> list[list[Any]]:
        return [
            ["delete", p, 0] if s == 0 else ["change" if p in book else "new", p, s]
            for p, s in levels
        ]

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        data = {
            "type": "change",
            "timestamp": ms_now(),
            "prev_change_id": self.change_id,
            "instrument_name": self.instrument,
            "change_id": self.change_id + 1,
            "bids": self._actions(bids, self.bids),
            "asks": self._actions(asks, self.asks),
        }
        self.apply(bids, asks)
        self.change_id += 1
        await self.publish("book", self._notification("book", data))

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        self.apply(bids, asks)
        self.change_id += 1

    async def trade(self, price: float, amount: float, direction: str) -> Message:
        seq = next(self._trade_seq)
        data = {
            "trade_seq": seq,
            "trade_id": f"USDT-{seq}",
            "timestamp": ms_now(),
            "tick_direction": 2,
            "price": price,
            "mark_price": price - 0.5,
            "instrument_name": self.instrument,
            "index_price": price + 0.5,
            "direction": direction,
            "amount": amount,
        }
        await self.publish("trades", self._notification("trades", [data]))
        return data


# -- BitMEX (realtime API) -------------------------------------------------------------


class BitmexMock(MockExchange):
    """``wss://ws.bitmex.com/realtime``: the ``orderBookL2`` and ``trade`` tables.

    Levels are named by id, one per price as BitMEX derives them; updates
    and deletes carry the id and no price. There are no server heartbeats:
    the client sends ``ping`` and gets ``pong``.
    """

    def __init__(self, symbol: str = "XBTUSD") -> None:
        super().__init__()
        self.symbol = symbol
        #: ``ping`` messages received, over all connections.
        self.pings = 0
        #: Sent on each ``orderBookL2`` subscription just before its partial.
        self.before_partial: list[Message] = []

    @staticmethod
    def level_id(price: float) -> int:
        return 8_800_000_000 - round(price * 100)

    @staticmethod
    def timestamp() -> str:
        """BitMEX writes milliseconds."""
        return iso_now()[:-4] + "Z"

    async def on_connect(self, connection: ServerConnection) -> None:
        await self.send(
            connection,
            {
                "info": "Welcome to the BitMEX Realtime API.",
                "version": "2.0.0",
                "timestamp": self.timestamp(),
                "docs": "https://www.bitmex.com/app/wsAPI",
                "heartbeatEnabled": False,
                "limit": {"remaining": 179},
            },
        )

    async def on_text(self, connection: ServerConnection, text: str) -> bool:
        if text != "ping":
            return False
        self.pings += 1
        await self.send_text(connection, "pong")
        return True

    async def on_message(self, connection: ServerConnection, message: Message) -> None:
        if message.get("op") != "subscribe":
            await self.send(
                connection, {"status": 400, "error": "Unknown op", "meta": {}, "request": message}
            )
            return
        for topic in message.get("args", []):
            table, _, symbol = topic.partition(":")
            if symbol != self.symbol or table not in ("orderBookL2", "trade"):
                await self.send(
                    connection,
                    {
                        "status": 400,
                        "error": f"Unknown or expired symbol: {topic}",
                        "meta": {},
                        "request": message,
                    },
                )
                continue
            self.subscribed(connection, table)
            await self.send(connection, {"success": True, "subscribe": topic, "request": message})
            if table == "orderBookL2":
                for early in self.before_partial:
                    await self.send(connection, early)
                bids, asks = self.top(10_000)
                rows = self._rows("Buy", bids) + self._rows("Sell", asks)
            else:
                # The partial of ``trade`` is the last trade: history.
                rows = [self._trade(99.0, 0.25, "Sell")]
            await self.send(connection, self._table(table, "partial", rows))

    def _table(self, table: str, action: str, rows: list[Message]) -> Message:
        message: Message = {"table": table, "action": action, "data": rows}
        if action == "partial":
            message["keys"] = ["symbol", "id", "side"] if table == "orderBookL2" else []
            message["filter"] = {"symbol": self.symbol}
        return message

    def _rows(self, side: str, levels: Iterable[Level]) -> list[Message]:
        return [
            {
                "symbol": self.symbol,
                "id": self.level_id(p),
                "side": side,
                "size": s,
                "price": p,
                "timestamp": self.timestamp(),
            }
            for p, s in levels
        ]

    async def update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        bids, asks = list(bids), list(asks)
        messages = self._messages(bids, asks)
        self.apply(bids, asks)
        for message in messages:
            await self.publish("orderBookL2", message)

    async def send_changes(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        """Publishes changes the mock's book does not take: a corrupt feed."""
        for message in self._messages(list(bids), list(asks)):
            await self.publish("orderBookL2", message)

    def lose_update(self, bids: Iterable[Level] = (), asks: Iterable[Level] = ()) -> None:
        self.apply(bids, asks)

    def _messages(self, bids: list[Level], asks: list[Level]) -> list[Message]:
        """One message per action, as BitMEX sends them: delete, update, insert."""
        actions: dict[str, list[Message]] = {"delete": [], "update": [], "insert": []}
        for side, levels, book in (("Buy", bids, self.bids), ("Sell", asks, self.asks)):
            for price, size in levels:
                row: Message = {"symbol": self.symbol, "id": self.level_id(price)}
                if size == 0:
                    actions["delete"].append(row)
                elif price in book:
                    actions["update"].append({**row, "size": size, "timestamp": self.timestamp()})
                else:
                    actions["insert"] += self._rows(side, [(price, size)])
        return [
            self._table("orderBookL2", action, rows) for action, rows in actions.items() if rows
        ]

    def _trade(self, price: float, size: float, side: str) -> Message:
        return {
            "timestamp": self.timestamp(),
            "symbol": self.symbol,
            "side": side,
            "size": size,
            "price": price,
            "tickDirection": "PlusTick",
            "trdMatchID": str(uuid.uuid4()),
            "grossValue": round(size * 1e8 / price),
            "homeNotional": size / price,
            "foreignNotional": size,
            "trdType": "Regular",
        }

    async def trade(self, price: float, size: float, side: str) -> Message:
        row = self._trade(price, size, side)
        await self.publish("trade", self._table("trade", "insert", [row]))
        return row
