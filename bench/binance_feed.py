"""A local Binance for ``bench_live.py``: its spot market-data protocol on loopback.

The market is generated before anything runs (:func:`generate`), seeded, as
one sequence of depth events over ``symbols`` books of about 1,000 levels a
side: each event changes 1 to 5 levels, three quarters of them among the best
20 of their side, so that most events change the top 20. The sequence is cut
into steps, each at its own rate; a step's events and the books they leave
are fixed in advance, so every consumer gets exactly the same events and
the benchmark knows the top 20 each of them should hold after each step.

The server (:class:`FeedProcess`, a forked process so that it does not share
the consumer's core) speaks what Binance clients expect on one port:

- REST ``GET /api/v3/depth?symbol=BTCUSDT&limit=1000`` (``lastUpdateId``,
  ``bids``, ``asks``), taken from the book as the events sent so far left it;
  ``GET .../exchangeInfo`` with the spot symbols (and none for the futures
  APIs, which ccxt also loads);
- WebSocket on any path: combined streams (each event wrapped in
  ``{"stream": name, "data": ...}``) when the path ends in ``/stream`` or the
  query names ``streams=a/b``, raw ones otherwise (``/ws``, ``/ws/...``,
  ``/stream/ws``); a stream named in the path or the query is subscribed at
  once, and ``SUBSCRIBE``/``UNSUBSCRIBE`` requests (in text frames, or binary
  ones, which are counted) are answered ``{"result": null, "id": ...}``.
  ``<symbol>@depth`` and ``<symbol>@depth@100ms`` carry ``depthUpdate``
  events whose update ids chain (each event's ``U`` is the previous ``u`` plus
  one); other streams (trades) are accepted and stay silent.

After the generated events, :meth:`FeedProcess.trickle` makes up a few more
as it goes, for a consumer a step left behind: whether fresh events bring it
back.

It is written on raw asyncio protocols, with the events serialized in
advance and frames batched per connection and millisecond, so that 80,000
events a second cost it well under its core. Every event sent in one
millisecond carries that millisecond as its ``E`` and goes out in one write
per connection; the server records when, to the microsecond, each
millisecond's write happened, so that a consumer's latency can be taken from
the actual send, not from ``E``'s truncated milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import multiprocessing
import os
import random
import signal
import time
import urllib.parse
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson
from sortedcontainers import SortedList

from loadgen import Placement

#: Base assets of the symbols, quoted in USDT; the first seven are Caspian's
#: built-in Binance spot products.
BASES = (
    "BTC", "ETH", "ADA", "DOGE", "LTC", "TRX", "XRP", "BNB", "SOL", "DOT",
    "LINK", "AVAX", "MATIC", "ATOM", "UNI", "FIL", "NEAR", "APT", "ARB", "OP",
    "ETC", "BCH", "XLM", "AAVE", "ALGO", "ICP", "INJ", "SUI", "SEI", "TIA",
)  # fmt: skip
QUOTE = "USDT"
#: Levels a side the books hover around, and the REST snapshot's default.
DEPTH = 1000
TOP = 20
#: Prices are in ticks of 0.01, sizes in lots of 0.00001 (Binance's BTCUSDT).
PRICE_PLACES = 2
SIZE_PLACES = 5
_LOT = 10**SIZE_PLACES
_TICK = 10**PRICE_PLACES
#: Changes per event: 1 to 5, fewer more often.
_CHANGES = [1] * 35 + [2] * 25 + [3] * 20 + [4] * 12 + [5] * 8
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_EVENT_HEAD = b'{"e":"depthUpdate","E":'


def market_id(base: str) -> str:
    return f"{base}{QUOTE}"


def price_text(ticks: int) -> str:
    """Binance writes 8 decimals: ``30000.01000000``."""
    whole, part = divmod(ticks, _TICK)
    return f"{whole}.{part:02d}000000"


def size_text(lots: int) -> str:
    whole, part = divmod(lots, _LOT)
    return f"{whole}.{part:05d}000"


# -- the generated market -----------------------------------------------------------

#: One symbol's best 20 bids and asks, (price ticks, lots), best first.
Top = tuple[list[tuple[int, int]], list[tuple[int, int]]]


@dataclass
class Step:
    """Events ``start`` to ``stop`` (exclusive), sent at ``rate`` events a second."""

    rate: float
    start: int
    stop: int
    #: Per symbol, after the step's last event: the best 20 bids and asks as
    #: (price ticks, lots), best first, and the last update id.
    tops: list[Top] = field(default_factory=list)
    last_ids: list[int] = field(default_factory=list)

    @property
    def events(self) -> int:
        return self.stop - self.start

    @property
    def seconds(self) -> float:
        return self.events / self.rate


@dataclass
class Market:
    """The initial books and every event, ready to send."""

    ids: list[str]
    #: Initial books, price ticks -> lots, and the update id they stand at.
    bids: list[dict[int, int]]
    asks: list[dict[int, int]]
    first_ids: list[int]
    #: Per event: its symbol's index, its last update id ``u``, whether it
    #: changed the top 20 of its symbol, and its JSON after ``"E":``.
    symbol: array[int] = field(default_factory=lambda: array("H"))
    last_id: array[int] = field(default_factory=lambda: array("q"))
    top_changed: array[int] = field(default_factory=lambda: array("B"))
    body: list[bytes] = field(default_factory=list)
    #: Per event, its changes at ``offsets[i]:offsets[i + 1]`` of ``changes``:
    #: pairs of a price (positive for a bid, negated for an ask) and lots (0 removes).
    changes: array[int] = field(default_factory=lambda: array("q"))
    offsets: array[int] = field(default_factory=lambda: array("Q", [0]))
    steps: list[Step] = field(default_factory=list)

    @property
    def events(self) -> int:
        return len(self.body)


class _Book:
    """One symbol's book while generating: prices kept sorted, so that the n-th best is cheap."""

    def __init__(self, rng: random.Random, mid: int) -> None:
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        price = mid - 1 - rng.randrange(3)
        for _ in range(DEPTH):
            self.bids[price] = _lots(rng.random())
            price -= 1 + rng.randrange(3)
        price = mid + 1 + rng.randrange(3)
        for _ in range(DEPTH):
            self.asks[price] = _lots(rng.random())
            price += 1 + rng.randrange(3)
        # Bids sorted by negated price, so that index 0 is the best of either side.
        self.bid_prices = SortedList(-price for price in self.bids)
        self.ask_prices = SortedList(self.asks)

    def nth(self, bid: bool, index: int) -> int:
        """The price of the ``index``-th best level (0: the best) of a side."""
        if bid:
            return -int(self.bid_prices[index])
        return int(self.ask_prices[index])

    def set(self, bid: bool, price: int, lots: int) -> None:
        levels = self.bids if bid else self.asks
        if lots:
            if price not in levels:
                (self.bid_prices.add(-price) if bid else self.ask_prices.add(price))
            levels[price] = lots
        else:
            del levels[price]
            (self.bid_prices.remove(-price) if bid else self.ask_prices.remove(price))

    def top(self) -> Top:
        bids = [(-int(p), self.bids[-int(p)]) for p in self.bid_prices.islice(0, TOP)]
        asks = [(int(p), self.asks[int(p)]) for p in self.ask_prices.islice(0, TOP)]
        return bids, asks


def _lots(uniform: float) -> int:
    # Mostly small orders, a few large: 0.00001 to about 3.
    return 1 + int(uniform * uniform * 3 * _LOT)


def generate(symbols: int, rates: Sequence[float], seconds: Sequence[float], seed: int) -> Market:
    """The market: ``symbols`` books and one step of events per (rate, seconds)."""
    if not 1 <= symbols <= len(BASES):
        raise ValueError(f"between 1 and {len(BASES)} symbols")
    rng = random.Random(seed)
    books = [_Book(rng, rng.randrange(100 * _TICK, 60_000 * _TICK)) for _ in range(symbols)]
    ids = [market_id(base) for base in BASES[:symbols]]
    first_ids = [rng.randrange(10**9, 4 * 10**9) for _ in range(symbols)]
    market = Market(
        ids,
        [dict(book.bids) for book in books],
        [dict(book.asks) for book in books],
        list(first_ids),
    )
    next_ids = [first + 1 for first in first_ids]
    heads = [f',"s":"{name}","U":'.encode() for name in ids]
    for rate, duration in zip(rates, seconds, strict=True):
        start = market.events
        for _ in range(round(rate * duration)):
            index = int(rng.random() * symbols)
            _event(market, rng.random, books[index], index, heads[index], next_ids)
        step = Step(rate, start, market.events)
        step.tops = [book.top() for book in books]
        step.last_ids = [next_id - 1 for next_id in next_ids]
        market.steps.append(step)
    return market


def _event(
    market: Market,
    uniform: Callable[[], float],
    book: _Book,
    index: int,
    head: bytes,
    next_ids: list[int],
) -> None:
    """Adds one event of symbol ``index``: picks its changes, applies them, serializes it."""
    bid_levels: list[str] = []
    ask_levels: list[str] = []
    used: set[int] = set()
    changed_top = False
    changes = market.changes
    for _ in range(_CHANGES[int(uniform() * len(_CHANGES))]):
        bid = uniform() < 0.5
        count = len(book.bids if bid else book.asks)
        where = uniform()
        if where < 0.75:
            nth = int(uniform() * TOP)
        elif where < 0.93:
            nth = TOP + int(uniform() * 80)
        else:
            nth = 100 + int(uniform() * (count - 100))
        nth = min(nth, count - 1)
        price = book.nth(bid, nth)
        action = uniform()
        # Resize 60%, add 20%, remove 20%; but keep the depth near DEPTH.
        if action < 0.6:
            kind = "resize"
        elif action < 0.8:
            kind = "remove" if count > DEPTH + 50 else "add"
        else:
            kind = "add" if count < DEPTH - 50 else "remove"
        if kind == "add":
            # A new level between this one and the next better (or the other side's best).
            better = book.nth(bid, nth - 1) if nth else book.nth(not bid, 0)
            gap = abs(better - price)
            if gap >= 2:
                step = 1 + int(uniform() * (gap - 1))
                price = price + step if bid else price - step
            else:
                kind = "resize"
        lots = 0 if kind == "remove" else _lots(uniform())
        key = price if bid else -price
        if key in used:
            continue
        used.add(key)
        # Within the top 20 when at or better than the 20th best level, as it stands.
        if not changed_top:
            if count < TOP:
                changed_top = True
            else:
                threshold = book.nth(bid, TOP - 1)
                changed_top = price >= threshold if bid else price <= threshold
        book.set(bid, price, lots)
        changes.append(key)
        changes.append(lots)
        (bid_levels if bid else ask_levels).append(f'["{price_text(price)}","{size_text(lots)}"]')
    first = next_ids[index]
    last = first + len(used) - 1
    next_ids[index] = last + 1
    market.symbol.append(index)
    market.last_id.append(last)
    market.top_changed.append(changed_top)
    market.offsets.append(len(changes))
    market.body.append(
        head
        + f'{first},"u":{last},"b":[{",".join(bid_levels)}],"a":[{",".join(ask_levels)}]}}'.encode()
    )


def exchange_info(ids: Sequence[str]) -> dict[str, Any]:
    """``/api/v3/exchangeInfo`` for the spot symbols, in Binance's layout."""
    symbols = []
    for name in ids:
        symbols.append(
            {
                "symbol": name,
                "status": "TRADING",
                "baseAsset": name.removesuffix(QUOTE),
                "baseAssetPrecision": 8,
                "quoteAsset": QUOTE,
                "quotePrecision": 8,
                "quoteAssetPrecision": 8,
                "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8,
                "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
                "icebergAllowed": True,
                "ocoAllowed": True,
                "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False,
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": "0.01000000",
                        "maxPrice": "1000000.00000000",
                        "tickSize": "0.01000000",
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "minQty": "0.00001000",
                        "maxQty": "9000.00000000",
                        "stepSize": "0.00001000",
                    },
                ],
                "permissions": ["SPOT"],
            }
        )
    return {
        "timezone": "UTC",
        "serverTime": time.time_ns() // 1_000_000,
        "rateLimits": [],
        "exchangeFilters": [],
        "symbols": symbols,
    }


# -- the server ---------------------------------------------------------------------


def _frame_header(length: int, opcode: int = 1) -> bytes:
    """A server frame's header: final, unmasked."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")


#: Headers of text frames by payload length: events are small.
_HEADERS = [_frame_header(length) for length in range(4096)]


def _text_frame(payload: bytes) -> bytes:
    length = len(payload)
    return (_HEADERS[length] if length < 4096 else _frame_header(length)) + payload


def _unmask(payload: bytes, key: bytes) -> bytes:
    length = len(payload)
    repeated = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )


@dataclass
class StepRecord:
    """What the server did during one step."""

    #: One entry per millisecond that sent events: that millisecond (the
    #: events' ``E``), when its writes began (µs since the epoch), and the
    #: index of its first event.
    tick_ms: list[int]
    tick_us: list[int]
    tick_first: list[int]
    started_us: int
    ended_us: int
    #: Depth snapshots served (a consumer's resyncs), WebSocket handshakes,
    #: and the most bytes waiting in one connection's write buffer at a tick.
    snapshots: int
    handshakes: int
    max_backlog: int


class _Connection(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.websocket = False
        self.combined = False
        self.streams: set[str] = set()
        #: Event frames of the current tick, joined into one write.
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for stream in list(self.streams):
            self.server.unsubscribe(self, stream)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.websocket:
            self._http()
        if self.websocket:
            self._frames()

    # HTTP: REST answers, and the WebSocket handshake.
    def _http(self) -> None:
        while not self.websocket:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            target = parts[1] if len(parts) > 1 else "/"
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("upgrade", "").lower() == "websocket":
                self._upgrade(target, headers)
            else:
                self._rest(target, headers)

    def _upgrade(self, target: str, headers: dict[str, str]) -> None:
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
        # No Sec-WebSocket-Extensions: compression declined, as Binance does.
        self.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        self.websocket = True
        self.server.handshakes += 1
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query)
        path = parts.path.rstrip("/")
        self.combined = "streams" in query or path.endswith("/stream")
        names: list[str] = []
        for value in query.get("streams", []):
            names += value.split("/")
        last = path.rsplit("/", 1)[-1]
        if "@" in last:
            # /ws/btcusdt@depth: a raw stream named in the path.
            names.append(last)
        for name in names:
            self.server.subscribe(self, name)

    def _rest(self, target: str, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query))
        status, body = self.server.rest(parts.path, query)
        payload = orjson.dumps(body)
        close = headers.get("connection", "").lower() == "close"
        self.write(
            (
                f"HTTP/1.1 {status}\r\nContent-Type: application/json;charset=UTF-8\r\n"
                f"Content-Length: {len(payload)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
            ).encode()
            + payload
        )
        if close and self.transport is not None:
            self.transport.close()

    # WebSocket: the client's frames are masked and small.
    def _frames(self) -> None:
        data = self.buffer
        pos = 0
        while len(data) - pos >= 2:
            opcode = data[pos] & 0x0F
            masked = data[pos + 1] & 0x80
            length = data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            key = b""
            if masked:
                key = data[start : start + 4]
                start += 4
            if len(data) < start + length:
                break
            payload = data[start : start + length]
            if masked:
                payload = _unmask(payload, key)
            pos = start + length
            if opcode == 0x1:
                self._message(payload)
            elif opcode == 0x2:
                # JSON in a binary frame: answered as text, and counted.
                self.server.binary_requests += 1
                self._message(payload)
            elif opcode == 0x9:
                self.write(_frame_header(len(payload), 0xA) + payload)
            elif opcode == 0x8:
                self.write(_frame_header(len(payload), 0x8) + payload)
                if self.transport is not None:
                    self.transport.close()
                break
        self.buffer = data[pos:]

    def _message(self, payload: bytes) -> None:
        try:
            request = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.write(_text_frame(b'{"code":3,"msg":"Invalid JSON"}'))
            return
        if not isinstance(request, dict):
            return
        method, params, request_id = request.get("method"), request.get("params"), request.get("id")
        result: Any = None
        if method == "SUBSCRIBE" and isinstance(params, list):
            for name in params:
                self.server.subscribe(self, str(name))
        elif method == "UNSUBSCRIBE" and isinstance(params, list):
            for name in params:
                self.server.unsubscribe(self, str(name))
        elif method == "LIST_SUBSCRIPTIONS":
            result = sorted(self.streams)
        else:
            self.write(
                _text_frame(
                    orjson.dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": request_id})
                )
            )
            return
        self.write(_text_frame(orjson.dumps({"result": result, "id": request_id})))


class _Server:
    """The books as sent so far, the subscriptions, and the sending of steps."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.index = {name.lower(): i for i, name in enumerate(market.ids)}
        self.bids = [dict(book) for book in market.bids]
        self.asks = [dict(book) for book in market.asks]
        self.last_ids = list(market.first_ids)
        #: Per symbol: the connections subscribed to its depth, each with the
        #: prefix that wraps an event for a combined stream (None: raw).
        self.depth: list[list[tuple[_Connection, bytes | None]]] = [[] for _ in market.ids]
        self.connections: set[_Connection] = set()
        self.snapshots = 0
        self.handshakes = 0
        self.depth_subscribes = 0
        self.binary_requests = 0
        self._info = exchange_info(market.ids)

    def connection(self) -> _Connection:
        connection = _Connection(self)
        self.connections.add(connection)
        return connection

    def subscribe(self, connection: _Connection, name: str) -> None:
        if name in connection.streams:
            return
        connection.streams.add(name)
        symbol, _, kind = name.partition("@")
        index = self.index.get(symbol.lower())
        if index is not None and kind.partition("@")[0] == "depth":
            wrap = b'{"stream":"' + name.encode() + b'","data":' if connection.combined else None
            self.depth[index].append((connection, wrap))
            self.depth_subscribes += 1

    def unsubscribe(self, connection: _Connection, name: str) -> None:
        connection.streams.discard(name)
        index = self.index.get(name.partition("@")[0].lower())
        if index is not None:
            self.depth[index] = [entry for entry in self.depth[index] if entry[0] is not connection]
        if connection.transport is None:
            self.connections.discard(connection)

    def rest(self, path: str, query: dict[str, str]) -> tuple[str, Any]:
        if path.endswith("/depth"):
            index = self.index.get(query.get("symbol", "").lower())
            if index is None:
                return "400 Bad Request", {"code": -1121, "msg": "Invalid symbol."}
            limit = int(query.get("limit", "100"))
            self.snapshots += 1
            bids = sorted(self.bids[index].items(), reverse=True)[:limit]
            asks = sorted(self.asks[index].items())[:limit]
            return "200 OK", {
                "lastUpdateId": self.last_ids[index],
                "bids": [[price_text(p), size_text(q)] for p, q in bids],
                "asks": [[price_text(p), size_text(q)] for p, q in asks],
            }
        if path.endswith("/exchangeInfo"):
            # ccxt also loads the futures APIs' markets: there are none here.
            spot = path.startswith("/api/")
            return "200 OK", self._info if spot else {**self._info, "symbols": []}
        if path.endswith("/ping"):
            return "200 OK", {}
        if path.endswith("/time"):
            return "200 OK", {"serverTime": time.time_ns() // 1_000_000}
        return "404 Not Found", {"code": -1, "msg": f"no {path} here"}

    def subscriptions(self) -> dict[str, Any]:
        return {
            "depth": [len(connections) for connections in self.depth],
            "snapshots": self.snapshots,
            "handshakes": self.handshakes,
            "binary_requests": self.binary_requests,
            # Bytes written to connections and still in this process's buffers.
            "buffered": sum(
                connection.transport.get_write_buffer_size()
                for connection in self.connections
                if connection.transport is not None
            ),
        }

    async def run_step(self, number: int) -> StepRecord:
        market = self.market
        step = market.steps[number]
        record = StepRecord([], [], [], time.time_ns() // 1000, 0, 0, 0, 0)
        snapshots, handshakes = self.snapshots, self.handshakes
        began = time.perf_counter()
        sent = step.start
        last_ms = 0
        while sent < step.stop:
            now_ns = time.time_ns()
            now_ms = now_ns // 1_000_000
            if now_ms != last_ms:
                due = min(step.stop, step.start + int(step.rate * (time.perf_counter() - began)))
                if due > sent:
                    last_ms = now_ms
                    record.tick_ms.append(now_ms)
                    record.tick_us.append(now_ns // 1000)
                    record.tick_first.append(sent)
                    self._send(sent, due, b"%d" % now_ms)
                    record.max_backlog = max(
                        record.max_backlog,
                        max(
                            (c.transport.get_write_buffer_size() for c in self.connections
                             if c.transport is not None),
                            default=0,
                        ),
                    )  # fmt: skip
                    sent = due
            # To the next millisecond: one tick, one E, one write per connection.
            await asyncio.sleep((1_000_000 - time.time_ns() % 1_000_000) / 1e9)
        record.ended_us = time.time_ns() // 1000
        record.snapshots = self.snapshots - snapshots
        record.handshakes = self.handshakes - handshakes
        return record

    def _send(self, start: int, stop: int, stamp: bytes) -> None:
        market = self.market
        symbols, bodies, last_ids = market.symbol, market.body, market.last_id
        changes, offsets = market.changes, market.offsets
        depth, bids, asks = self.depth, self.bids, self.asks
        touched: set[_Connection] = set()
        head = _EVENT_HEAD + stamp
        for i in range(start, stop):
            index = symbols[i]
            targets = depth[index]
            if targets:
                _queue(targets, head + bodies[i], touched)
            book_bids, book_asks = bids[index], asks[index]
            for k in range(offsets[i], offsets[i + 1], 2):
                key, lots = changes[k], changes[k + 1]
                book = book_bids if key > 0 else book_asks
                price = key if key > 0 else -key
                if lots:
                    book[price] = lots
                else:
                    book.pop(price, None)
            self.last_ids[index] = last_ids[i]
        _flush(touched)

    async def trickle(self, rate: float, seconds: float, seed: int) -> Trickle:
        """Events made up as they go, at a low rate, after the generated ones.

        Each resizes one of the 5 best levels of a side, so each changes a
        top 20. After a step that left a consumer behind, they show whether
        it comes back once it is given fresh events.
        """
        rng = random.Random(seed)
        count = round(rate * seconds)
        record = StepRecord([], [], [], time.time_ns() // 1000, 0, 0, 0, 0)
        began = time.perf_counter()
        sent = 0
        last_ms = 0
        while sent < count:
            now_ns = time.time_ns()
            now_ms = now_ns // 1_000_000
            due = min(count, int(rate * (time.perf_counter() - began)))
            if now_ms != last_ms and due > sent:
                last_ms = now_ms
                record.tick_ms.append(now_ms)
                record.tick_us.append(now_ns // 1000)
                record.tick_first.append(sent)
                touched: set[_Connection] = set()
                head = _EVENT_HEAD + b"%d" % now_ms
                for _ in range(due - sent):
                    self._made_up(rng, head, touched)
                _flush(touched)
                sent = due
            await asyncio.sleep((1_000_000 - time.time_ns() % 1_000_000) / 1e9)
        record.ended_us = time.time_ns() // 1000
        tops = [
            (sorted(bids.items(), reverse=True)[:TOP], sorted(asks.items())[:TOP])
            for bids, asks in zip(self.bids, self.asks, strict=True)
        ]
        return Trickle(record, count, tops, list(self.last_ids))

    def _made_up(self, rng: random.Random, head: bytes, touched: set[_Connection]) -> None:
        index = rng.randrange(len(self.bids))
        bid = rng.random() < 0.5
        book = self.bids[index] if bid else self.asks[index]
        best = sorted(book, reverse=bid)[:5]
        price = best[rng.randrange(len(best))]
        lots = _lots(rng.random())
        book[price] = lots
        update = self.last_ids[index] + 1
        self.last_ids[index] = update
        level = f'[["{price_text(price)}","{size_text(lots)}"]]'
        body = (
            f',"s":"{self.market.ids[index]}","U":{update},"u":{update},'
            f'"b":{level if bid else "[]"},"a":{"[]" if bid else level}}}'
        )
        if self.depth[index]:
            _queue(self.depth[index], head + body.encode(), touched)


@dataclass
class Trickle:
    """What :meth:`_Server.trickle` sent, and the books it left (as ``Step`` holds them)."""

    record: StepRecord
    events: int
    tops: list[Top]
    last_ids: list[int]


def _queue(
    targets: list[tuple[_Connection, bytes | None]], raw: bytes, touched: set[_Connection]
) -> None:
    """Adds one event's frame to the pending writes of its subscribers."""
    for connection, wrap in targets:
        payload = raw if wrap is None else wrap + raw + b"}"
        length = len(payload)
        connection.pending.append(_HEADERS[length] if length < 4096 else _frame_header(length))
        connection.pending.append(payload)
        touched.add(connection)


def _flush(touched: set[_Connection]) -> None:
    """One write per connection for all the frames of a tick."""
    for connection in touched:
        connection.write(b"".join(connection.pending))
        connection.pending.clear()


async def _serve(market: Market, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    server = _Server(market)
    listener = await loop.create_server(server.connection, "127.0.0.1", 0)
    port: int = listener.sockets[0].getsockname()[1]
    done: asyncio.Future[None] = loop.create_future()
    running: set[asyncio.Task[None]] = set()

    def send(answer: object) -> None:
        # uvloop leaves the pipe non-blocking, and a long step's record is
        # larger than the pipe's buffer: the parent reads it once the step ends.
        os.set_blocking(pipe.fileno(), True)
        pipe.send(answer)

    async def step(number: int) -> None:
        send(await server.run_step(number))

    async def trickle(rate: float, seconds: float, seed: int) -> None:
        send(await server.trickle(rate, seconds, seed))

    def command() -> None:
        name, *args = pipe.recv()
        if name in ("step", "trickle"):
            task = loop.create_task(step(*args) if name == "step" else trickle(*args))
            running.add(task)
            task.add_done_callback(running.discard)
        elif name == "subscriptions":
            pipe.send(server.subscriptions())
        elif name == "exit" and not done.done():
            done.set_result(None)

    pipe.send(port)
    loop.add_reader(pipe.fileno(), command)
    await done
    listener.close()


def _main(market: Market, pipe: Connection, placement: Placement) -> None:
    placement.apply()
    # The benchmark's Ctrl-C is for the benchmark: it stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(market, pipe))
    else:
        uvloop.run(_serve(market, pipe))


class FeedProcess:
    """The server in a forked process (which inherits the market without copying it)."""

    def __init__(self, market: Market, placement: Placement) -> None:
        context = multiprocessing.get_context("fork")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_main, args=(market, child, placement), daemon=True, name="binance-feed"
        )
        self._process.start()
        child.close()
        if not self._pipe.poll(30):
            raise RuntimeError("the feed server did not start")
        self.port: int = self._pipe.recv()
        assert self._process.pid is not None
        self.pid: int = self._process.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def subscriptions(self) -> dict[str, Any]:
        self._pipe.send(("subscriptions",))
        answer: dict[str, Any] = self._pipe.recv()
        return answer

    def backlog(self) -> int:
        """Bytes sent to consumers and not read by them yet.

        Those in this server's buffers, in its sockets' send queues and in the
        consumers' receive queues (``/proc/net/tcp``): what a consumer has
        not taken off its socket, whatever it queues inside itself.
        """
        total = int(self.subscriptions()["buffered"])
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                sending, receiving = (int(value, 16) for value in fields[4].split(":"))
                if local_port == self.port:
                    total += sending
                elif remote_port == self.port:
                    total += receiving
        return total

    def start_step(self, number: int) -> None:
        self._pipe.send(("step", number))

    def wait_step(self) -> StepRecord:
        """Blocks until the step started last is sent whole."""
        record: StepRecord = self._pipe.recv()
        return record

    def trickle(self, rate: float, seconds: float, seed: int) -> Trickle:
        """Sends made-up events at ``rate`` for ``seconds`` (blocking); see ``_Server.trickle``."""
        self._pipe.send(("trickle", rate, seconds, seed))
        done: Trickle = self._pipe.recv()
        return done

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(("exit",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
