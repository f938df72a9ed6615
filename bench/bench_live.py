"""Live-ingest benchmark: Caspian's live Binance source against cryptofeed, in one run.

Run as ``python bench/bench_live.py`` (about 2 minutes; the first run also
installs cryptofeed into a virtual environment under /tmp, see
``--cryptofeed-python``). Every consumer reads the same local Binance
(``binance_feed.py``: REST depth snapshots and WebSocket diff-depth streams in
Binance's spot protocol, on 127.0.0.1) serving the same seeded market of
``--symbols`` books of about 1,000 levels a side, one consumer after the
other, each alone on its core:

- **caspian**, started as a user starts it: ``caspian serve`` with
  ``CASPIAN_SOURCE=live:BINANCE`` and ``CASPIAN_LIVE_URLS`` pointing Binance
  at the local server; one client (this script) opens one WebSocket to
  ``/v1/stream`` and subscribes Level2 (20 levels, conflation None) of every
  symbol, keeping each book as the protocol intends;
- **caspian-source**, Caspian's live source alone, what the service spends
  before its gateway: ``LiveSource(["BINANCE"], ...)`` in a process of its
  own, with the service's addresses, depth (100) and lag bound, watching
  every symbol, its sink recording only what the latency and the count
  need (no hub, no Level2, no client);
- **cryptofeed**, the peer: its ``Binance`` feed's ``L2_BOOK`` channel for the
  same symbols, with a callback that only counts, pointed at the local server
  by a subclass overriding its endpoints.

The server sends a warm-up step, then a ladder of rising rates (events a
second over all symbols), each step for ``--step-seconds``, then waits until
the consumer has caught up (at most ``--drain-seconds``). Per step it measures
the consumer process's CPU time per event (utime + stime from ``/proc``), the
events it consumed a second while the step lasted, and the latency from the
event's send to the client (Caspian: to this script's read of the Level2
message; its source alone: to its sink; cryptofeed: to its callback). Events
carry their send millisecond as ``E``; the server records the microsecond its
writes of each millisecond began, which is what latency is taken from. For
Caspian it also counts the Level2 updates received against the events that
changed a top 20, whether each client book equals the server's top 20 once
caught up, ``depthStream`` ``disconnected`` statuses and upstream resyncs (its
source alone: whether its books' top 20 equal the server's, and its depth
``disconnected`` statuses and resyncs). A consumer is saturated when it uses
95% of its core, consumes less than 95% of what is offered while the step
lasts, or has not caught up after it; its ladder stops at the first saturated
step at or above ``--compare-rate`` (the rate of the CPU comparison), or at
once if a backlog is left over. Ratios to cryptofeed come from the same run,
so that the drifting noise of a shared machine touches every consumer alike.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson

from binance_feed import BASES, QUOTE, TOP, FeedProcess, Market, StepRecord, Top, generate
from caspian.catalog.product import ProductSpec
from caspian.cli import run_loop
from caspian.timefmt import parse_us
from loadgen import (
    Placement,
    Server,
    _mask,
    _upgrade_request,
    authenticate,
    busy_cpu_seconds,
    caspian_command,
    caspian_env,
    create_key,
    machine,
    percentile,
    placements,
    start_caspian,
)

RATES = "2000,5000,10000,20000,40000,80000"
#: Saturated: the consumer's process uses this share of its core, or consumes
#: less than this share of the events offered while the step lasts.
SATURATED_CPU = 0.95
SATURATED_CONSUMED = 0.95
#: Where the benchmark keeps cryptofeed when the running Python lacks it.
CRYPTOFEED_VENV = Path(tempfile.gettempdir()) / "caspian-bench-cryptofeed"
#: How long a consumer's CPU is read with the feed quiet, before the warm-up.
IDLE_S = 2.0
#: After a step, a consumer is idle when it used less than this share of its
#: core over this long.
IDLE_PROBE_S = 0.5
IDLE_SHARE = 0.1
#: How often a consumer's catching up is checked after a step.
POLL_S = 0.02
#: The lag bound of ``caspian serve`` (CASPIAN_LIVE_MAX_LAG_S) unless ``--max-lag``.
LIVE_MAX_LAG_S = 2.0


def caspian_code(base: str) -> str:
    return f"FX-{base}/{QUOTE}=BINANCE"


# -- results -------------------------------------------------------------------------


@dataclass
class StepResult:
    consumer: str
    rate: float
    offered_per_s: float
    consumed_per_s: float
    cpu_us_per_event: float
    cpu_share: float  # of one core, while the step lasted
    core_share: float | None  # the consumer's pinned core, all causes
    load_share: float  # the feed server and the client script, of one core
    drained_s: float | None  # None: not caught up within --drain-seconds
    p50_ms: float
    p99_ms: float
    #: Caspian only (None for cryptofeed): Level2 updates received and events
    #: that changed a top 20 during the step.
    updates: int | None
    top_changes: int | None
    #: Symbols whose book, once caught up, equals the server's top 20.
    books_equal: int | None
    symbols: int
    disconnected: int | None
    #: Depth snapshots the server served during the step: the consumer's resyncs.
    snapshots: int
    resyncs: dict[str, int] = field(default_factory=dict)
    #: Caspian: p99 of the latency to the caspianTimestamp (its source's emit).
    ingest_p99_ms: float | None = None
    #: The consumer's CPU while it was waited for after the step (share of a core).
    after_cpu_share: float = 0.0
    #: When not caught up: seconds after the step until it had taken every
    #: event off its socket and gone idle (None: not within the wait).
    processed_s: float | None = None
    #: events/s consumed is an estimate from CPU time (see ``Bench.step``).
    consumed_estimated: bool = False
    #: Caspian: symbols whose depthStream is still disconnected at the end of the wait.
    stale: int | None = None
    saturated: bool = False

    def line(self) -> str:
        if self.drained_s is not None:
            drained = f"caught up {self.drained_s:.2f} s"
        else:
            drained = f"not caught up (CPU {self.after_cpu_share:.0%} meanwhile"
            if self.processed_s is not None:
                drained += f"; every event read and idle {self.processed_s:.2f} s"
            drained += ")"
        text = (
            f"{self.consumer:>14} {self.rate:8,.0f}/s: offered {self.offered_per_s:8,.0f}/s, "
            f"consumed {'~' if self.consumed_estimated else ''}{self.consumed_per_s:,.0f}/s, "
            f"{self.cpu_us_per_event:6.1f} µs/event, "
            f"CPU {self.cpu_share:4.0%}"
            + (f" (core {self.core_share:4.0%})" if self.core_share is not None else "")
            + f", load side {self.load_share:4.0%}, {drained} after the step, "
            f"latency p50 {self.p50_ms:7.2f} ms p99 {self.p99_ms:8.2f} ms"
        )
        if self.ingest_p99_ms is not None:
            text += f" (to caspianTimestamp p99 {self.ingest_p99_ms:.2f} ms)"
        if self.updates is not None:
            text += (
                f", L2 updates {self.updates:,} for {self.top_changes:,} top-20 changes, "
                f"books equal {self.books_equal}/{self.symbols}, "
                f"disconnected {self.disconnected}"
                + (f" (still {self.stale} at the end)" if self.stale else "")
            )
        elif self.books_equal is not None:
            text += f", books equal {self.books_equal}/{self.symbols}"
        if self.updates is None and self.disconnected is not None:
            text += f", disconnected {self.disconnected}" + (
                f" (still {self.stale} at the end)" if self.stale else ""
            )
        text += f", snapshots served {self.snapshots}"
        if self.resyncs:
            text += f", resyncs {self.resyncs}"
        return text + (" SATURATED" if self.saturated else "")


# -- timing of the events as sent ------------------------------------------------------


class SendTimes:
    """When the writes of each millisecond's events began, by that millisecond (their ``E``)."""

    def __init__(self) -> None:
        self.write_us: dict[int, int] = {}

    def add(self, record: StepRecord) -> None:
        self.write_us.update(zip(record.tick_ms, record.tick_us, strict=True))

    def latencies_ms(self, sent_ms: Sequence[int], received_us: Sequence[int]) -> list[float]:
        write_us = self.write_us
        return [
            (received - write_us[ms]) / 1000
            for ms, received in zip(sent_ms, received_us, strict=True)
            if ms in write_us
        ]


def event_ms_by_symbol(
    market: Market, record: StepRecord, start: int, stop: int
) -> list[list[int]]:
    """Per symbol, the ``E`` of each of its events in ``start:stop``, in order."""
    by_symbol: list[list[int]] = [[] for _ in market.ids]
    symbols = market.symbol
    firsts = [*record.tick_first, stop]
    for tick, ms in enumerate(record.tick_ms):
        for i in range(firsts[tick], firsts[tick + 1]):
            by_symbol[symbols[i]].append(ms)
    return by_symbol


def consumed_by_newest(
    market: Market,
    record: StepRecord,
    step: int,
    until_us: int,
    symbol: Sequence[int],
    sent_ms: Sequence[int],
    received_us: Sequence[int],
) -> int:
    """Events of the step whose ``E`` is at most the newest ``E`` read for their symbol by
    ``until_us``, from what a consumer read since the step began (in order: the
    symbol's index, its ``E``, when it was read).

    For a consumer that passes an event on only when it changed its top N:
    the count trails by the events of a symbol since its last change there.
    """
    info = market.steps[step]
    by_symbol = event_ms_by_symbol(market, record, info.start, info.stop)
    newest = [0] * len(by_symbol)
    for index, ms, received in zip(symbol, sent_ms, received_us, strict=True):
        if received > until_us:
            break
        newest[index] = max(newest[index], ms)
    return sum(bisect.bisect_right(times, ms) for times, ms in zip(by_symbol, newest, strict=True))


# -- consumer A: Caspian ---------------------------------------------------------------


class CaspianClient(asyncio.Protocol):
    """One WebSocket to ``/v1/stream`` with Level2 of every symbol; keeps every book.

    The frame reader is hand-written (server frames are unmasked), so that
    reading costs little of the core it shares with the feed server.
    """

    def __init__(self, url: str, codes: Sequence[str]) -> None:
        _, _, self._request = _upgrade_request(url)
        self._subscribes = [
            _mask(
                0x1,
                orjson.dumps(
                    {
                        "requestId": f"l2-{index}",
                        "type": "Subscribe",
                        "payload": {
                            "symbol": code,
                            "type": "Level2",
                            "numberOfLevels": TOP,
                            "conflation": "None",
                        },
                    }
                ),
            )
            for index, code in enumerate(codes)
        ]
        self.codes = list(codes)
        self.books: list[dict[tuple[str, float], float]] = [{} for _ in codes]
        self.states: list[str | None] = [None for _ in codes]
        #: The next non-empty update of a symbol is its whole top N (after the
        #: Subscribe, or after a disconnection), not a change.
        self._whole = [True for _ in codes]
        self.answers: dict[str, int] = {}
        #: Per change received (whole books excluded): symbol, its ``E``
        #: (exchangeTimestamp in ms, 0 if none), when it was read (µs), and
        #: its caspianTimestamp (µs).
        self.symbol = array("H")
        self.sent_ms = array("q")
        self.received_us = array("q")
        self.caspian_us = array("q")
        #: (read µs, symbol, state) of every depthStream change.
        self.statuses: list[tuple[int, int, str]] = []
        self.closes: list[int] = []
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._open = False
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"the stream closed: {exc}"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        now_us = time.time_ns() // 1000
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos = 0
        if not self._open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                failure = ConnectionError(data[: data.find(b"\r\n")].decode(errors="replace"))
                if not self.subscribed.done():
                    self.subscribed.set_exception(failure)
                self.close()
                return
            self._open = True
            assert self._transport is not None
            self._transport.write(b"".join(self._subscribes))
            pos = end + 4
        end = len(data)
        while end - pos >= 2:
            length = data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                start = pos + 4
                length = int.from_bytes(data[pos + 2 : start], "big")
            elif length == 127:
                start = pos + 10
                length = int.from_bytes(data[pos + 2 : start], "big")
            stop = start + length
            if stop > end:
                break
            opcode = data[pos] & 0x0F
            if opcode == 0x1:
                self._message(orjson.loads(data[start:stop]), now_us)
            elif opcode == 0x9 and self._transport is not None:
                self._transport.write(_mask(0xA, data[start:stop]))
            elif opcode == 0x8:
                code = int.from_bytes(data[start : start + 2], "big") if length >= 2 else 1005
                self.closes.append(code)
                self.close()
                return
            pos = stop
        if pos < end:
            self._buffer = data[pos:]

    def _message(self, message: dict[str, Any], now_us: int) -> None:
        kind = message.get("type")
        if kind == "Level2":
            index = int(message["requestId"][3:])
            state = message.get("depthStream")
            if state != self.states[index]:
                self.states[index] = state
                self.statuses.append((now_us, index, str(state)))
                if state == "disconnected":
                    self._whole[index] = True
            payload = message.get("payload") or []
            if not payload:
                return
            book = self.books[index]
            for level in payload:
                key = (level["side"], level["price"])
                if level["size"] == 0:
                    book.pop(key, None)
                else:
                    book[key] = level["size"]
            if self._whole[index]:
                self._whole[index] = False
                return
            stamp = message.get("exchangeTimestamp")
            self.symbol.append(index)
            self.sent_ms.append(parse_us(stamp) // 1000 if stamp else 0)
            self.received_us.append(now_us)
            self.caspian_us.append(parse_us(message["caspianTimestamp"]))
        elif kind == "SubscribeResponse":
            code = message.get("payload", {}).get("code")
            self.answers[message["requestId"]] = code
            if code != 200 and not self.subscribed.done():
                self.subscribed.set_exception(
                    RuntimeError(f"Subscribe {message['requestId']}: {message['payload']}")
                )
            elif len(self.answers) == len(self.codes) and not self.subscribed.done():
                self.subscribed.set_result(None)


def truth_books(tops: Sequence[Top]) -> list[dict[tuple[str, float], float]]:
    """The top 20 of every symbol (as ``Step.tops``), as a Caspian client's book holds it."""
    books = []
    for bids, asks in tops:
        book = {("bid", price / 100): lots / 100_000 for price, lots in bids}
        book.update({("ask", price / 100): lots / 100_000 for price, lots in asks})
        books.append(book)
    return books


def binance_markets(bases: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Caspian's built-in ccxt markets of Binance, plus spot ``BASE/USDT`` for each of
    ``bases`` they lack (made from BTC/USDT's), and the bases that were added."""
    from caspian.catalog.builtin import builtin_markets

    markets = dict(builtin_markets()["BINANCE"])
    template = markets[f"BTC/{QUOTE}"]
    missing = [base for base in bases if f"{base}/{QUOTE}" not in markets]
    for base in missing:
        market = json.loads(json.dumps(template))
        name = f"{base}{QUOTE}"
        market.update(
            id=name, symbol=f"{base}/{QUOTE}", base=base, baseId=base, lowercaseId=name.lower()
        )
        market["info"].update(symbol=name, baseAsset=base)
        markets[f"{base}/{QUOTE}"] = market
    return markets, missing


def markets_file(path: Path, bases: Sequence[str]) -> bool:
    """Writes ccxt markets for the Binance spot symbols the built-in catalog lacks.

    The file holds every built-in Binance market too: ``caspian serve`` seeds
    the built-in products only of exchanges that have none, so an import of
    the new symbols alone would leave the built-in ones out. False when
    nothing is missing.
    """
    markets, missing = binance_markets(bases)
    path.write_text(json.dumps(markets))
    return bool(missing)


def binance_products(bases: Sequence[str]) -> dict[str, ProductSpec]:
    """The spot products of ``bases`` by Caspian code, as the service's catalog holds them
    once ``markets_file``'s markets are imported."""
    from caspian.catalog.ccxt_markets import products_from_ccxt

    codes = {caspian_code(base) for base in bases}
    products = products_from_ccxt("BINANCE", binance_markets(bases)[0])
    return {product.caspian_code: product for product in products if product.caspian_code in codes}


def live_urls(feed_port: int, ws_path: str) -> dict[str, Any]:
    """``CASPIAN_LIVE_URLS`` pointing Binance at the local feed, in ccxt's urls layout
    (CONTRACT.md section 7): the spot raw-stream endpoint and the REST root. A
    source that loads markets through ccxt also asks the futures APIs, which
    must not leave the machine either."""
    http, ws = f"http://127.0.0.1:{feed_port}", f"ws://127.0.0.1:{feed_port}"
    return {
        "BINANCE": {
            "api": {
                "ws": {"spot": ws + ws_path},
                "public": http + "/api/v3",
                "fapiPublic": http + "/fapi/v1",
                "dapiPublic": http + "/dapi/v1",
            }
        }
    }


def _rest_json(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", token)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


_RESYNC = re.compile(r"^caspian_resyncs_total\{([^}]*)\} ([0-9.e+]+)$", re.M)


def resyncs(rest_url: str) -> dict[str, int]:
    """``caspian_resyncs_total`` summed by reason, from ``/metrics``."""
    base = rest_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, int] = {}
    for labels, value in _RESYNC.findall(text):
        reason = re.search(r'reason="([^"]*)"', labels)
        key = reason.group(1) if reason else "?"
        totals[key] = totals.get(key, 0) + round(float(value))
    return totals


class Consumer:
    """What the ladder needs of a consumer."""

    name = ""
    process: Server | None = None

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return self.process.cpu_seconds()

    async def start(self, feed: FeedProcess) -> None:
        raise NotImplementedError

    async def caught_up(
        self, tops: Sequence[Top], last_ids: Sequence[int]
    ) -> tuple[bool, int | None]:
        """Whether the consumer holds the books ``tops`` and ``last_ids`` describe.

        Also how many of its books equal them, if it tells.
        """
        raise NotImplementedError

    def mark(self) -> None:
        """The step starts: what comes from now on belongs to it."""

    def received(self) -> tuple[list[int], list[int]]:
        """``E`` and read time of what came since ``mark``."""
        raise NotImplementedError

    def consumed(self, record: StepRecord, step: int, until_us: int, drained: bool) -> int:
        """Events of the step consumed by ``until_us``."""
        raise NotImplementedError

    def extra(self, step: int, times: SendTimes) -> dict[str, Any]:
        return {}

    def stale(self) -> int | None:
        """Symbols whose stream the consumer marks disconnected, if it tells."""
        return None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Caspian(Consumer):
    name = "caspian"

    def __init__(self, args: argparse.Namespace, work: Path, market: Market, place: Placement):
        self.args = args
        self.work = work
        self.market = market
        self.place = place
        self.codes = [caspian_code(base) for base in BASES[: len(market.ids)]]
        self.client: CaspianClient | None = None
        self.rest_url = ""
        self._mark = 0
        self._status_mark = 0
        self._resyncs: dict[str, int] = {}
        self.data_dir = work / "caspian-data"

    def _prepare(self) -> dict[str, str]:
        """A fresh data directory with an API key and every symbol in the catalog."""
        self.data_dir.mkdir()
        key = create_key(self.data_dir)
        products = self.work / "binance-markets.json"
        if markets_file(products, BASES[: len(self.market.ids)]):
            command = [*caspian_command(), "products", "import", "--file", str(products)]
            command += ["--exchange", "BINANCE"]
            done = subprocess.run(
                command, env=caspian_env(self.data_dir, 1.0), capture_output=True, text=True
            )
            if done.returncode:
                raise RuntimeError(f"caspian products import failed: {done.stderr.strip()}")
            print(f"caspian: {done.stdout.strip()}", flush=True)
        return key

    async def start(self, feed: FeedProcess) -> None:
        loop = asyncio.get_running_loop()
        key = await loop.run_in_executor(None, self._prepare)
        urls = live_urls(feed.port, self.args.ws_path)
        env = {"CASPIAN_SOURCE": "live:BINANCE", "CASPIAN_LIVE_URLS": json.dumps(urls)}
        if self.args.max_lag is not None:
            env["CASPIAN_LIVE_MAX_LAG_S"] = str(self.args.max_lag)
        # start_caspian takes the rest of its environment from ours.
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            self.process = await loop.run_in_executor(
                None, start_caspian, self.data_dir, 1.0, self.place
            )
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        assert self.process.rest_url is not None
        self.rest_url = self.process.rest_url
        token = await loop.run_in_executor(None, authenticate, self.rest_url, key)
        for code in self.codes:
            quoted = urllib.parse.quote(code, safe="")
            try:
                await loop.run_in_executor(
                    None, _rest_json, f"{self.rest_url}/reference/products/{quoted}", token
                )
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"{code} is not in Caspian's catalog ({exc})") from None
        url = f"{self.process.stream_url}?accessToken={token}"
        host, port, _ = _upgrade_request(url)
        _, client = await loop.create_connection(lambda: CaspianClient(url, self.codes), host, port)
        self.client = client
        await asyncio.wait_for(client.subscribed, 30)
        self._resyncs = await loop.run_in_executor(None, resyncs, self.rest_url)

    def stderr_tail(self, lines: int = 15) -> str:
        logs = sorted(self.data_dir.glob("serve-*/stderr"))
        if not logs:
            return ""
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])

    async def caught_up(
        self, tops: Sequence[Top], last_ids: Sequence[int]
    ) -> tuple[bool, int | None]:
        assert self.client is not None
        truth = truth_books(tops)
        equal = sum(book == want for book, want in zip(self.client.books, truth, strict=True))
        return equal == len(truth), equal

    def mark(self) -> None:
        assert self.client is not None
        self._mark = len(self.client.symbol)
        self._status_mark = len(self.client.statuses)

    def received(self) -> tuple[list[int], list[int]]:
        assert self.client is not None
        return (
            list(self.client.sent_ms[self._mark :]),
            list(self.client.received_us[self._mark :]),
        )

    def consumed(self, record: StepRecord, step: int, until_us: int, drained: bool) -> int:
        """Caspian sends a symbol's update only when its top 20 changed: see
        :func:`consumed_by_newest`."""
        if drained:
            return self.market.steps[step].events
        assert self.client is not None
        client = self.client
        return consumed_by_newest(
            self.market,
            record,
            step,
            until_us,
            client.symbol[self._mark :],
            client.sent_ms[self._mark :],
            client.received_us[self._mark :],
        )

    def extra(self, step: int, times: SendTimes) -> dict[str, Any]:
        assert self.client is not None
        info = self.market.steps[step]
        # The part of the latency spent before the gateway: to caspianTimestamp.
        ingest = times.latencies_ms(
            self.client.sent_ms[self._mark :], self.client.caspian_us[self._mark :]
        )
        changes = sum(self.market.top_changed[info.start : info.stop])
        disconnected = sum(
            1
            for _, _, state in self.client.statuses[self._status_mark :]
            if state == "disconnected"
        )
        now = resyncs(self.rest_url)
        delta = {
            reason: count - self._resyncs.get(reason, 0)
            for reason, count in now.items()
            if count != self._resyncs.get(reason, 0)
        }
        self._resyncs = now
        return {
            "updates": len(self.client.symbol) - self._mark,
            "top_changes": changes,
            "disconnected": disconnected,
            "resyncs": delta,
            "ingest_p99_ms": percentile(ingest, 0.99),
        }

    def stale(self) -> int | None:
        assert self.client is not None
        return sum(state == "disconnected" for state in self.client.states)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        super().stop()


class RunnerConsumer(Consumer):
    """A consumer in a process of its own, run by this script with a ``--...-runner``
    flag; commands go to its stdin as lines, answers come back as JSON lines."""

    def __init__(self, work: Path, market: Market, place: Placement) -> None:
        self.work = work
        self.market = market
        self.place = place
        self.log = work / f"{self.name}.log"
        self._popen: subprocess.Popen[str] | None = None

    def _launch_runner(self, command: list[str]) -> None:
        with open(self.work / f"{self.name}.stderr", "w") as stderr:
            self._popen = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=self.work,
                preexec_fn=self.place.apply,
            )
        self.process = Server(self.name, cast(subprocess.Popen[bytes], self._popen), "", None)
        # The runner answers once it has loaded the symbols from the server.
        self._ask("status")

    def _ask(self, command: str) -> dict[str, Any]:
        assert self._popen is not None and self._popen.stdin and self._popen.stdout
        self._popen.stdin.write(command + "\n")
        self._popen.stdin.flush()
        line = self._popen.stdout.readline()
        if not line:
            errors = (self.work / f"{self.name}.stderr").read_text(errors="replace")
            raise RuntimeError(f"the {self.name} runner stopped:\n{errors[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(OSError):
                self._popen.send_signal(signal.SIGTERM)
        super().stop()

    def warnings(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines() if line]


# -- consumer B: cryptofeed ------------------------------------------------------------


def cryptofeed_python(choice: str | None) -> str:
    """A Python that can import cryptofeed: ``choice``, this one, or a venv made for it.

    The venv sees this Python's packages (``--system-site-packages``), so only
    cryptofeed and what it adds are installed, and nothing of Caspian's
    environment changes.
    """
    if choice:
        return choice
    if importlib.util.find_spec("cryptofeed") is not None:
        return sys.executable
    python = CRYPTOFEED_VENV / "bin" / "python"
    probe = [str(python), "-c", "import cryptofeed"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"installing cryptofeed into {CRYPTOFEED_VENV} (once)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(CRYPTOFEED_VENV)], check=True
    )
    subprocess.run([str(python), "-m", "pip", "install", "-q", "cryptofeed"], check=True)
    return str(python)


def cryptofeed_version(python: str) -> str:
    query = "from importlib.metadata import version; print(version('cryptofeed'))"
    done = subprocess.run([python, "-c", query], capture_output=True, text=True)
    return done.stdout.strip() or "?"


class Cryptofeed(RunnerConsumer):
    name = "cryptofeed"

    def __init__(self, python: str, work: Path, market: Market, place: Placement) -> None:
        super().__init__(work, market, place)
        self.python = python
        self._sent: list[int] = []
        self._received: list[int] = []
        self._tops: dict[str, Any] = {}

    async def start(self, feed: FeedProcess) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._launch, feed.port)

    def _launch(self, port: int) -> None:
        command = [self.python, str(Path(__file__).resolve()), "--cryptofeed-runner"]
        command += [str(port), "--symbols", str(len(self.market.ids))]
        command += ["--runner-log", str(self.log)]
        self._launch_runner(command)

    async def caught_up(
        self, tops: Sequence[Top], last_ids: Sequence[int]
    ) -> tuple[bool, int | None]:
        status = self._ask("status")
        done = all(
            status["sequence"].get(name) == last
            for name, last in zip(self.market.ids, last_ids, strict=True)
        )
        if not done:
            return False, None
        self._collect()
        got_tops = self._tops
        equal = 0
        for name, (bids, asks) in zip(self.market.ids, tops, strict=True):
            want_book = (
                [[price / 100, lots / 100_000] for price, lots in bids],
                [[price / 100, lots / 100_000] for price, lots in asks],
            )
            got = got_tops.get(name)
            equal += got is not None and (got[0], got[1]) == want_book
        return True, equal

    def _collect(self) -> None:
        dump = self._ask("dump")
        self._sent += dump["sent_ms"]
        self._received += dump["received_us"]
        self._tops = dump["tops"]

    def mark(self) -> None:
        self._collect()
        self._sent, self._received = [], []

    def received(self) -> tuple[list[int], list[int]]:
        return self._sent, self._received

    def consumed(self, record: StepRecord, step: int, until_us: int, drained: bool) -> int:
        if drained:
            return self.market.steps[step].events
        self._collect()
        return sum(1 for received in self._received if received <= until_us)


def run_cryptofeed(port: int, symbols: int, log: str) -> None:
    """The cryptofeed consumer's process (``--cryptofeed-runner``), in a Python that has it.

    cryptofeed is imported by name: it is not installed where mypy runs.
    Its ``Binance`` is subclassed with the local server's addresses. Its
    WebSocket connection insists on ``wss://``, and the local server speaks
    plain ``ws://`` like Caspian's source is given, so that neither pays for
    TLS: the address is rewritten where cryptofeed connects.
    Commands come on stdin, one a line; answers go to stdout as JSON lines.
    """
    cryptofeed: Any = importlib.import_module("cryptofeed")
    connection: Any = importlib.import_module("cryptofeed.connection")
    defines: Any = importlib.import_module("cryptofeed.defines")
    binance: Any = importlib.import_module("cryptofeed.exchanges.binance")
    plain_connect = connection.connect

    def connect(address: str, **options: Any) -> Any:
        return plain_connect(address.replace("wss://", "ws://", 1), **options)

    connection.connect = connect
    local = type(
        "LocalBinance",
        (binance.Binance,),
        {
            "websocket_endpoints": [connection.WebsocketEndpoint(f"wss://127.0.0.1:{port}")],
            "rest_endpoints": [
                connection.RestEndpoint(
                    f"http://127.0.0.1:{port}",
                    routes=connection.Routes(
                        "/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}"
                    ),
                )
            ],
        },
    )
    sent_ms = array("q")
    received_us = array("q")
    sequence: dict[str, int] = {}
    books: dict[str, Any] = {}

    async def on_book(book: Any, receipt: float) -> None:
        books[book.symbol] = book
        sequence[book.symbol] = book.sequence_number
        if book.delta is None:
            return  # the REST snapshot
        sent_ms.append(round(book.timestamp * 1000))
        received_us.append(time.time_ns() // 1000)

    def tops() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for symbol, book in books.items():
            sides = []
            for levels in (book.book.bids, book.book.asks):
                count = min(TOP, len(levels))
                sides.append([[float(p), float(q)] for p, q in map(levels.index, range(count))])
            out[symbol.replace("-", "")] = sides
        return out

    def command() -> None:
        line = sys.stdin.readline().strip()
        if line == "status":
            answer: dict[str, Any] = {
                "sequence": {symbol.replace("-", ""): u for symbol, u in sequence.items()}
            }
        elif line == "dump":
            answer = {
                "sent_ms": sent_ms.tolist(),
                "received_us": received_us.tolist(),
                "tops": tops(),
            }
            del sent_ms[:]
            del received_us[:]
        else:
            loop.stop()
            return
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    handler = cryptofeed.FeedHandler(
        config={"uvloop": True, "log": {"filename": log, "level": "WARNING"}}
    )
    names = [f"{base}-{QUOTE}" for base in BASES[:symbols]]
    handler.add_feed(
        local(symbols=names, channels=[defines.L2_BOOK], callbacks={defines.L2_BOOK: on_book})
    )
    # uvloop (which cryptofeed's handler installs) makes no loop unasked.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler.run(start_loop=False)
    loop.add_reader(sys.stdin.fileno(), command)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


# -- consumer C: Caspian's live source alone ---------------------------------------


class CaspianSource(RunnerConsumer):
    """Caspian's ``LiveSource`` for Binance in a process of its own, its sink a no-op.

    What the service spends before its gateway: the same source, addresses,
    depth and lag bound as ``caspian serve`` is given, without the hub, the
    Level2 views and the client. Commands and answers go as with cryptofeed's
    runner (``--source-runner``).
    """

    name = "caspian-source"

    def __init__(self, args: argparse.Namespace, work: Path, market: Market, place: Placement):
        super().__init__(work, market, place)
        self.args = args
        self._symbol: list[int] = []
        self._sent: list[int] = []
        self._received: list[int] = []
        self._statuses: list[tuple[int, int, str]] = []
        self._resyncs: dict[str, int] = {}
        self._dump_resyncs: dict[str, int] = {}

    async def start(self, feed: FeedProcess) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._launch, feed.port)
        self._resyncs = self._ask("dump")["resyncs"]

    def _launch(self, port: int) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--source-runner", str(port)]
        command += ["--symbols", str(len(self.market.ids)), "--ws-path", self.args.ws_path]
        command += ["--runner-log", str(self.log)]
        if self.args.max_lag is not None:
            command += ["--max-lag", str(self.args.max_lag)]
        self._launch_runner(command)

    async def caught_up(
        self, tops: Sequence[Top], last_ids: Sequence[int]
    ) -> tuple[bool, int | None]:
        """Every event applied, and no symbol held back for lag (its output is current)."""
        status = self._ask("status")
        done = status["down"] == 0 and all(
            status["last_update"].get(name) == last
            for name, last in zip(self.market.ids, last_ids, strict=True)
        )
        if not done:
            return False, None
        got_tops = self._ask("tops")
        equal = 0
        for name, (bids, asks) in zip(self.market.ids, tops, strict=True):
            want = [
                [[price / 100, lots / 100_000] for price, lots in bids],
                [[price / 100, lots / 100_000] for price, lots in asks],
            ]
            equal += got_tops.get(name) == want
        return True, equal

    def _collect(self) -> None:
        dump = self._ask("dump")
        self._symbol += dump["symbol"]
        self._sent += dump["sent_ms"]
        self._received += dump["received_us"]
        self._statuses += [(us, index, state) for us, index, state in dump["statuses"]]
        self._dump_resyncs = dump["resyncs"]

    def mark(self) -> None:
        self._collect()
        self._symbol, self._sent, self._received, self._statuses = [], [], [], []

    def received(self) -> tuple[list[int], list[int]]:
        self._collect()
        return self._sent, self._received

    def consumed(self, record: StepRecord, step: int, until_us: int, drained: bool) -> int:
        """The source emits a symbol's change only when its top 100 changed: see
        :func:`consumed_by_newest`."""
        if drained:
            return self.market.steps[step].events
        self._collect()
        return consumed_by_newest(
            self.market, record, step, until_us, self._symbol, self._sent, self._received
        )

    def extra(self, step: int, times: SendTimes) -> dict[str, Any]:
        self._collect()
        now = self._dump_resyncs
        delta = {
            reason: count - self._resyncs.get(reason, 0)
            for reason, count in now.items()
            if count != self._resyncs.get(reason, 0)
        }
        self._resyncs = now
        return {
            "disconnected": sum(state == "disconnected" for _, _, state in self._statuses),
            "resyncs": delta,
        }

    def stale(self) -> int | None:
        down: int = self._ask("status")["down"]
        return down


def run_source(port: int, symbols: int, ws_path: str, max_lag: float, log: str) -> None:
    """The caspian-source consumer's process (``--source-runner``).

    ``LiveSource(["BINANCE"], ...)`` as ``caspian serve`` makes it (depth 100,
    the default; the stdlib event loop, as ``caspian serve`` runs on), its
    sink recording, per change, only the symbol, its ``E`` (from the event's
    ``exchange_ts``) and when it came, as cryptofeed's callback does. The
    commands look into the source (last update id applied and book of each
    symbol) only when asked, between events.
    """
    import logging

    from caspian.codes import Stream, StreamState
    from caspian.events import BookEvent, Event, StatusEvent
    from caspian.metrics import RESYNCS
    from caspian.sources.live import LiveSource

    logging.basicConfig(
        filename=log, level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s"
    )
    bases = BASES[:symbols]
    products = binance_products(bases)
    codes = [caspian_code(base) for base in bases]
    index = {code: number for number, code in enumerate(codes)}
    symbol = array("H")
    sent_ms = array("q")
    received_us = array("q")
    statuses: list[tuple[int, int, str]] = []
    depth, disconnected = Stream.DEPTH, StreamState.DISCONNECTED

    def sink(event: Event) -> None:
        if type(event) is BookEvent:
            if not event.snapshot and event.exchange_ts is not None:
                symbol.append(index[event.symbol])
                sent_ms.append(event.exchange_ts // 1000)
                received_us.append(time.time_ns() // 1000)
        elif type(event) is StatusEvent and event.stream is depth:
            state = "disconnected" if event.state is disconnected else "connected"
            statuses.append((time.time_ns() // 1000, index[event.symbol], state))

    source = LiveSource(["BINANCE"], products.get, urls=live_urls(port, ws_path), max_lag_s=max_lag)

    def resyncs() -> dict[str, int]:
        totals: dict[str, int] = {}
        for metric in RESYNCS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    reason = sample.labels["reason"]
                    totals[reason] = totals.get(reason, 0) + round(sample.value)
        return totals

    def command(stop: asyncio.Event) -> None:
        line = sys.stdin.readline().strip()
        # The source's insides, read between events: nothing is added to its path.
        internals = cast(Any, source)
        feeds = internals._feeds
        answer: dict[str, Any]
        if line == "status":
            client = internals._clients.get("BINANCE")
            connections = client[0]._connections if client is not None else []
            books = {name: book for c in connections for name, book in c.symbols.items()}
            answer = {
                "last_update": {name: book.last_update for name, book in books.items()},
                "down": sum(1 for code in codes if code not in feeds or not feeds[code].up),
            }
        elif line == "tops":
            answer = {}
            for code in codes:
                if code in feeds:
                    top = feeds[code].book.top(TOP)
                    answer[products[code].native_code] = [
                        [list(level) for level in top.bids],
                        [list(level) for level in top.asks],
                    ]
        elif line == "dump":
            answer = {
                "symbol": symbol.tolist(),
                "sent_ms": sent_ms.tolist(),
                "received_us": received_us.tolist(),
                "statuses": statuses,
                "resyncs": resyncs(),
            }
            del symbol[:], sent_ms[:], received_us[:]
            statuses[:] = []
        else:
            stop.set()
            return
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(sink))
        for code in codes:
            source.watch(code)
        loop.add_reader(sys.stdin.fileno(), command, stop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # The loop caspian serve runs on (CASPIAN_EVENT_LOOP's default).
    run_loop("auto", main())


# -- the ladder ------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rates = [float(rate) for rate in args.rates.split(",")]
        self.consumer_place, self.load_place = placements(not args.no_pin, args.nice)
        self.load_place.apply()
        self.work = Path(tempfile.mkdtemp(prefix="caspian-bench-live-"))
        self.times = SendTimes()
        self.idle: dict[str, float] = {}
        self.recoveries: dict[str, str] = {}
        self.cryptofeed_version = "not run"
        began = time.perf_counter()
        rates = [args.warmup_rate, *self.rates]
        seconds = [args.warmup_seconds] + [args.step_seconds] * len(self.rates)
        self.market = generate(args.symbols, rates, seconds, args.seed)
        top = sum(self.market.top_changed) / self.market.events
        changes = (len(self.market.changes) // 2) / self.market.events
        print(
            f"generated {self.market.events:,} events over {args.symbols} symbols in "
            f"{time.perf_counter() - began:.1f} s: {changes:.2f} level changes per event, "
            f"{top:.0%} of them change a top {TOP}",
            flush=True,
        )

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    async def ladder(self, consumer: Consumer) -> list[StepResult]:
        args = self.args
        feed = FeedProcess(self.market, self.load_place)
        results: list[StepResult] = []
        try:
            began = time.monotonic()
            await consumer.start(feed)
            await self._subscribed(consumer, feed)
            print(
                f"{consumer.name}: subscribed to every symbol in {time.monotonic() - began:.1f} s",
                flush=True,
            )
            # What the consumer costs with nothing to do: part of every step's CPU.
            cpu, quiet_began = consumer.cpu_seconds(), time.monotonic()
            await asyncio.sleep(IDLE_S)
            idle = (consumer.cpu_seconds() - cpu) / (time.monotonic() - quiet_began)
            print(f"{consumer.name}: {idle:.1%} of a core while the feed is quiet", flush=True)
            self.idle[consumer.name] = idle
            warmup = await self.step(consumer, feed, 0, args.drain_seconds + 10)
            if warmup.drained_s is None:
                print(f"{consumer.name}: NOT caught up after the warm-up: {warmup.line()}")
            for number in range(1, len(self.market.steps)):
                result = await self.step(consumer, feed, number, args.drain_seconds)
                print(result.line(), flush=True)
                results.append(result)
                # Saturated: the ladder goes on up to --compare-rate, for the
                # comparison at that rate, unless a backlog is left over.
                if result.drained_s is None and not args.all_steps:
                    break
                if result.saturated and result.rate >= args.compare_rate and not args.all_steps:
                    break
            if results and results[-1].drained_s is None:
                self.recoveries[consumer.name] = await self.recover(consumer, feed)
                print(f"{consumer.name}: {self.recoveries[consumer.name]}", flush=True)
            binary = feed.subscriptions()["binary_requests"]
            if binary:
                print(
                    f"{consumer.name}: {binary} of its WebSocket requests came as binary "
                    "frames (the local server reads their JSON; whether Binance does is "
                    "not checked)",
                    flush=True,
                )
        finally:
            consumer.stop()
            feed.close()
        return results

    async def recover(self, consumer: Consumer, feed: FeedProcess) -> str:
        """Whether a consumer left behind by a step comes back once fresh events flow.

        A consumer may need new events to notice it has caught up: a quiet
        feed would keep it waiting, and the live exchange would not stay
        quiet. (Caspian also brings a symbol it held back for lag back once
        its connection has nothing left to read, without a new event.)
        """
        args = self.args
        stale = consumer.stale()
        consumer.mark()
        trickle = await asyncio.get_running_loop().run_in_executor(
            None, feed.trickle, args.recovery_rate, args.recovery_seconds, args.seed
        )
        self.times.add(trickle.record)
        waited = time.monotonic()
        while True:
            drained, equal = await consumer.caught_up(trickle.tops, trickle.last_ids)
            if drained or time.monotonic() - waited > args.drain_seconds:
                break
            await asyncio.sleep(POLL_S)
        outcome = (
            f"caught up {time.monotonic() - waited:.2f} s after it"
            if drained
            else f"NOT caught up {args.drain_seconds:g} s after it"
        )
        if equal is not None:
            outcome += f", books equal {equal}/{len(self.market.ids)}"
        now = consumer.stale()
        if stale is not None:
            outcome += f"; depthStream disconnected for {stale} symbols before, {now} after"
        return (
            f"left behind by its last step; then {trickle.events} made-up events at "
            f"{args.recovery_rate:g}/s for {args.recovery_seconds:g} s: {outcome}"
        )

    async def _subscribed(self, consumer: Consumer, feed: FeedProcess) -> None:
        """Waits until the consumer subscribed to the depth of every symbol upstream."""
        deadline = time.monotonic() + 60
        while True:
            depth = feed.subscriptions()["depth"]
            if all(depth):
                return
            if time.monotonic() > deadline:
                missing = [name for name, n in zip(self.market.ids, depth, strict=True) if not n]
                raise RuntimeError(f"{consumer.name} never subscribed to {missing}")
            if consumer.process is not None and consumer.process.process.poll() is not None:
                raise RuntimeError(f"{consumer.name} exited")
            await asyncio.sleep(0.1)

    async def step(
        self, consumer: Consumer, feed: FeedProcess, number: int, drain_s: float
    ) -> StepResult:
        loop = asyncio.get_running_loop()
        info = self.market.steps[number]
        cpus = self.consumer_place.cpus
        load_pids = [os.getpid(), feed.pid]
        consumer.mark()
        snapshots = feed.subscriptions()["snapshots"]
        cpu0, core0, load0 = consumer.cpu_seconds(), _core(cpus), _pids_cpu(load_pids)
        t0 = time.monotonic()
        feed.start_step(number)
        record = await loop.run_in_executor(None, feed.wait_step)
        cpu1, core1, load1 = consumer.cpu_seconds(), _core(cpus), _pids_cpu(load_pids)
        t1 = time.monotonic()
        self.times.add(record)
        drained = False
        equal: int | None = None
        # A consumer that is not caught up may still have processed every
        # event (a consumer may hold a symbol it left lagging until a fresh
        # event shows it is back): that is when nothing is left unread on its
        # sockets and it has gone idle. Its CPU up to then is the step's.
        probe = (t1, cpu1)
        processed: tuple[float, float] | None = None
        while True:
            drained, equal = await consumer.caught_up(info.tops, info.last_ids)
            now = time.monotonic()
            if drained or now - t1 > drain_s:
                break
            if processed is None and now - probe[0] >= IDLE_PROBE_S:
                cpu = consumer.cpu_seconds()
                idle = (cpu - probe[1]) / (now - probe[0]) < IDLE_SHARE
                if idle and await loop.run_in_executor(None, feed.backlog) == 0:
                    processed = probe
                probe = (now, cpu)
            await asyncio.sleep(POLL_S)
        t2 = time.monotonic()
        cpu2 = consumer.cpu_seconds()
        ended_us = record.ended_us
        window_s = (ended_us - record.started_us) / 1e6
        drained_us = ended_us + round((t2 - t1) * 1e6)
        in_window = consumer.consumed(record, number, ended_us, False)
        overall = consumer.consumed(record, number, drained_us, drained)
        cpu_end = cpu2
        if not drained and processed is not None:
            overall, cpu_end = info.events, processed[1]
        cpu_us_per_event = (cpu_end - cpu0) * 1e6 / max(1, overall)
        sent_ms, received_us = consumer.received()
        latencies = self.times.latencies_ms(sent_ms, received_us)
        extra = consumer.extra(number, self.times)
        snapshots = feed.subscriptions()["snapshots"] - snapshots
        seconds = t1 - t0
        estimated = False
        if extra.get("disconnected") and (drained or processed is not None):
            # Caspian sends nothing of a symbol it holds disconnected, so what
            # its client saw undercounts what it consumed: estimate from its
            # CPU time in the window and its CPU per event.
            by_cpu = round((cpu1 - cpu0) * 1e6 / cpu_us_per_event)
            if by_cpu > in_window:
                in_window, estimated = min(by_cpu, info.events), True
        result = StepResult(
            consumer=consumer.name,
            rate=info.rate,
            offered_per_s=info.events / max(window_s, info.seconds),
            consumed_per_s=in_window / max(window_s, info.seconds),
            cpu_us_per_event=cpu_us_per_event,
            cpu_share=(cpu1 - cpu0) / seconds,
            core_share=(core1 - core0) / seconds / len(cpus) if cpus else None,
            load_share=(load1 - load0) / seconds,
            drained_s=(t2 - t1) if drained else None,
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            updates=extra.get("updates"),
            top_changes=extra.get("top_changes"),
            books_equal=equal,
            symbols=len(self.market.ids),
            disconnected=extra.get("disconnected"),
            snapshots=snapshots,
            resyncs=extra.get("resyncs", {}),
            ingest_p99_ms=extra.get("ingest_p99_ms"),
            after_cpu_share=(cpu2 - cpu1) / max(t2 - t1, 1e-3),
            processed_s=processed[0] - t1 if processed is not None else None,
            consumed_estimated=estimated,
            stale=consumer.stale(),
        )
        result.saturated = (
            result.cpu_share >= SATURATED_CPU
            or result.consumed_per_s < SATURATED_CONSUMED * result.offered_per_s
            or not drained
        )
        return result


def _core(cpus: frozenset[int] | None) -> float:
    return busy_cpu_seconds(cpus) if cpus else 0.0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pids_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


# -- report ----------------------------------------------------------------------------


def saturating_rate(results: Sequence[StepResult]) -> tuple[float, bool]:
    """The most events a second the consumer consumed, and whether it saturated at all.

    A consumer that never saturated could take more: its figure is then a
    lower bound.
    """
    if not results:
        return float("nan"), False
    best = max(result.consumed_per_s for result in results)
    return best, any(result.saturated for result in results)


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs and ours == ours and theirs == theirs else "n/a"


def caspian_origin() -> str:
    """Where the ``caspian`` that runs comes from (an editable install may point anywhere)."""
    import caspian

    package = Path(caspian.__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(package), "log", "-1", "--format=%h %cI"],
        capture_output=True,
        text=True,
    )
    return f"{package}" + (f" (git {done.stdout.strip()})" if done.returncode == 0 else "")


def one_core(results: Sequence[StepResult]) -> float:
    """What one core would consume at the cost of the highest unsaturated step.

    It does not depend on how much of its core the consumer got, so other
    jobs of a shared machine move it less than the saturating rate.
    """
    unsaturated = [result for result in results if not result.saturated]
    return 1e6 / unsaturated[-1].cpu_us_per_event if unsaturated else float("nan")


def _cpu(result: StepResult) -> str:
    core = f" ({result.core_share:.0%})" if result.core_share is not None else ""
    return f"{result.cpu_share:.0%}{core}"


def _figure(value: float | None, result: StepResult | None, shape: str) -> str:
    if value is None or result is None:
        return "n/a"
    return f"{value:{shape}}{'*' if result.saturated else ''}"


def _at(results: Sequence[StepResult], rate: float) -> StepResult | None:
    return next((result for result in results if result.rate == rate), None)


def _by_rate(ours: Sequence[StepResult], theirs: Sequence[StepResult]) -> str:
    """CPU per event, ours / theirs, at each rate both ran (``*``: either saturated)."""
    return ", ".join(
        f"{mine.rate / 1000:g}k: {_ratio(mine.cpu_us_per_event, peer.cpu_us_per_event)}"
        + ("*" if mine.saturated or peer.saturated else "")
        for mine in ours
        if (peer := _at(theirs, mine.rate)) is not None
    )


def report(
    args: argparse.Namespace,
    bench: Bench,
    ladders: dict[str, list[StepResult]],
    failures: dict[str, str],
) -> None:
    print()
    print(f"Live-ingest benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"Caspian measured: {caspian_origin()}; cryptofeed {bench.cryptofeed_version}")
    cpus, load = bench.consumer_place.cpus, bench.load_place.cpus
    pinning = (
        f"consumer pinned to CPU {sorted(cpus)}, feed server and client to {sorted(load)}"
        if cpus and load
        else "no CPU pinning"
    )
    print(
        f"{args.symbols} symbols, books of ~1,000 levels a side; steps of {args.step_seconds:g} s "
        f"after a warm-up of {args.warmup_seconds:g} s at {args.warmup_rate:,.0f}/s; {pinning}"
    )
    print()
    print(
        "| consumer | events/s offered | events/s consumed | CPU µs/event | CPU (core) | "
        "L2 updates / top-20 changes | books equal | latency p50 / p99 (ms) | "
        "disconnected | snapshots |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, results in ladders.items():
        for result in results:
            share = (
                f"{result.updates:,} / {result.top_changes:,} "
                f"({result.updates / max(1, result.top_changes):.0%})"
                if result.updates is not None and result.top_changes is not None
                else "—"
            )
            equal = (
                f"{result.books_equal}/{result.symbols}" if result.books_equal is not None else "—"
            )
            disconnected = "—" if result.disconnected is None else str(result.disconnected)
            print(
                f"| {name} | {result.offered_per_s:,.0f} | "
                f"{'~' if result.consumed_estimated else ''}{result.consumed_per_s:,.0f}"
                f"{'*' if result.saturated else ''} | "
                f"{result.cpu_us_per_event:.1f} | {_cpu(result)} | {share} | {equal} | "
                f"{result.p50_ms:.2f} / {result.p99_ms:.2f} | {disconnected} | "
                f"{result.snapshots} |"
            )
    print(
        "(* saturated: CPU ≥ 95% of the core, consumed < 95% of offered, or not caught up; "
        "~ estimated from CPU time, see the script)"
    )
    for name, why in failures.items():
        print(f"{name} FAILED: {why}")
    for name, text in bench.recoveries.items():
        print(f"{name}: {text}")
    ours, alone, theirs = (
        ladders.get("caspian", []),
        ladders.get("caspian-source", []),
        ladders.get("cryptofeed", []),
    )
    compare = args.compare_rate
    print()
    print(
        "| measure | Caspian | Caspian source alone | cryptofeed | Caspian/cryptofeed | "
        "source alone/cryptofeed |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    mine, lone, peer = _at(ours, compare), _at(alone, compare), _at(theirs, compare)
    rows = [
        (
            f"CPU µs per event at {compare:,.0f} events/s",
            *(
                _figure(step.cpu_us_per_event if step else None, step, ".1f")
                for step in (mine, lone, peer)
            ),
            *(
                _ratio(step.cpu_us_per_event, peer.cpu_us_per_event) if step and peer else "n/a"
                for step in (mine, lone)
            ),
        )
    ]
    rates = [saturating_rate(results) for results in (ours, alone, theirs)]
    peer_rate = rates[2][0]
    rows.append(
        (
            "saturating rate (most events/s consumed)",
            *(
                f"{'' if saturated else '≥ '}{rate:,.0f}" if rate == rate else "n/a"
                for rate, saturated in rates
            ),
            _ratio(rates[0][0], peer_rate),
            _ratio(rates[1][0], peer_rate),
        )
    )
    rows.append(
        (
            "CPU per event / cryptofeed's, by rate",
            "",
            "",
            "",
            _by_rate(ours, theirs),
            _by_rate(alone, theirs),
        )
    )
    cores = [one_core(results) for results in (ours, alone, theirs)]
    rows.append(
        (
            "events/s one whole core would take (1 s / CPU per event, last unsaturated step)",
            *(f"{core:,.0f}" if core == core else "n/a" for core in cores),
            _ratio(cores[0], cores[2]),
            _ratio(cores[1], cores[2]),
        )
    )
    rows.append(
        (
            "CPU with the feed quiet (share of a core)",
            *(
                f"{bench.idle[name]:.1%}" if name in bench.idle else "n/a"
                for name in ("caspian", "caspian-source", "cryptofeed")
            ),
            "",
            "",
        )
    )
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print("(* measured while saturated)")
    if alone:
        print(
            f"Caspian source alone / cryptofeed: CPU per event at {compare:,.0f} events/s "
            f"{rows[0][5]}, saturating rate {rows[1][5]}"
        )
    if ours and alone:
        print(
            "Caspian source alone / the whole service (CPU per event, by rate): "
            f"{_by_rate(alone, ours)}"
        )
    for name, results in ladders.items():
        busy = max((result.load_share for result in results), default=0.0)
        if busy >= SATURATED_CPU:
            print(
                f"WARNING: the feed server and client used {busy:.0%} of their core during a "
                f"{name} step: the load side may have limited it"
            )
    # The core's busy time is sampled at clock ticks, the process's is exact:
    # for a process that sleeps and wakes a thousand times a second the two
    # disagree by a few points either way.
    others = [
        max(0.0, result.core_share - result.cpu_share)
        for results in ladders.values()
        for result in results
        if result.core_share is not None
    ]
    if others:
        print(
            f"other processes (and softirq work) used up to {max(others):.0%} of the consumer's "
            "core during a step (tick-sampled, ±5 points): latency suffers from it far more "
            "than CPU per event"
        )
    print(
        "Latency: from the write of the event's millisecond on the feed server to, for "
        "Caspian, this script reading the Level2 message (through the service), for "
        "Caspian's source alone, its sink getting the BookEvent, for cryptofeed, its book "
        "callback."
    )


async def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    ladders: dict[str, list[StepResult]] = {}
    failures: dict[str, str] = {}
    try:
        for name in args.consumers.split(","):
            consumer: Consumer
            if name == "caspian":
                consumer = Caspian(args, bench.work, bench.market, bench.consumer_place)
            elif name == "caspian-source":
                consumer = CaspianSource(args, bench.work, bench.market, bench.consumer_place)
            elif name == "cryptofeed":
                python = cryptofeed_python(args.cryptofeed_python)
                bench.cryptofeed_version = cryptofeed_version(python)
                consumer = Cryptofeed(python, bench.work, bench.market, bench.consumer_place)
            else:
                raise SystemExit(
                    f"unknown consumer {name!r}: caspian, caspian-source or cryptofeed"
                )
            try:
                ladders[name] = await bench.ladder(consumer)
            except (RuntimeError, OSError, TimeoutError) as exc:
                failures[name] = str(exc) or type(exc).__name__
                print(f"{name} FAILED: {failures[name]}", flush=True)
                if isinstance(consumer, Caspian):
                    print(consumer.stderr_tail(), flush=True)
            if isinstance(consumer, Cryptofeed | CaspianSource):
                warnings = consumer.warnings()
                if warnings:
                    print(f"{name} logged {len(warnings)} lines, the last: {warnings[-1]}")
        report(args, bench, ladders, failures)
    finally:
        bench.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", default=RATES, help="comma-separated events/s over all symbols, one per step"
    )
    parser.add_argument("--step-seconds", type=float, default=4.0)
    parser.add_argument("--symbols", type=int, default=20, help=f"1 to {len(BASES)}")
    parser.add_argument("--warmup-rate", type=float, default=1000.0)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=10.0,
        help="the longest wait for a consumer to catch up after a step",
    )
    parser.add_argument("--compare-rate", type=float, default=10_000.0)
    parser.add_argument(
        "--recovery-rate",
        type=float,
        default=200.0,
        help="events/s of the trickle sent to a consumer its last step left behind",
    )
    parser.add_argument("--recovery-seconds", type=float, default=3.0)
    parser.add_argument(
        "--consumers",
        default="caspian,caspian-source,cryptofeed",
        help="comma-separated, run in this order: caspian (the service and a Level2 client), "
        "caspian-source (its live source alone), cryptofeed",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--ws-path",
        default="/ws",
        help="path of Caspian's Binance spot WebSocket address on the local server "
        "(ccxt-based sources tell spot by a /stream in it: /stream/ws)",
    )
    parser.add_argument(
        "--max-lag",
        type=float,
        default=None,
        help="CASPIAN_LIVE_MAX_LAG_S, and caspian-source's max_lag_s (default: Caspian's, 2 s)",
    )
    parser.add_argument(
        "--cryptofeed-python", default=None, help="a Python with cryptofeed installed"
    )
    parser.add_argument(
        "--all-steps", action="store_true", help="climb past a consumer's saturation"
    )
    parser.add_argument("--no-pin", action="store_true", help="let the OS place the processes")
    parser.add_argument("--nice", type=int, default=0, help="nice value (<0 needs root)")
    # The cryptofeed consumer's own process.
    parser.add_argument("--cryptofeed-runner", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runner-log", default="cryptofeed.log", help=argparse.SUPPRESS)
    # The caspian-source consumer's own process.
    parser.add_argument("--source-runner", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.cryptofeed_runner is not None:
        run_cryptofeed(args.cryptofeed_runner, args.symbols, args.runner_log)
        return
    if args.source_runner is not None:
        max_lag = args.max_lag if args.max_lag is not None else LIVE_MAX_LAG_S
        run_source(args.source_runner, args.symbols, args.ws_path, max_lag, args.runner_log)
        return
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
