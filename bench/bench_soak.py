"""Soak benchmark: well-behaved stream clients alone, then with hostile ones mixed in.

Run as ``python bench/bench_soak.py`` (about 8 minutes; ``--seconds`` sets the
length of each of the two runs, 180 s by default). ``caspian serve`` runs as
users start it (a subprocess on a fresh data directory, the built-in
simulator, default limits) and serves, for the whole benchmark, a few
well-behaved clients: each subscribes to Level2 (conflation None) and Level1
of every symbol, applies every message, and measures the latency of each
update (``caspianTimestamp`` to the kernel's receive time, and to the read)
and the longest gap between two updates of a subscription.

Two runs of the same length share that server: a quiet one, and one with
abuse mixed in, from other loopback addresses (127.0.0.2 and up, so that the
per-address limits meet the attackers, not the owner): subscribe/unsubscribe
churn, reconnect churn, slow clients that stop reading, floods of
TokenRefresh and of bad messages, connections reset during their token
check, idle and slowloris TCP connections, oversized request heads, REST
requests reset halfway through their body, and bursts of parallel wrong
secrets for the owner's key, who meanwhile logs in every few seconds from
its own address. The runs are split into ``--rounds`` windows of
``--seconds / --rounds`` (3 by default), taken alternately: quiet 1, abuse 1,
quiet 2, abuse 2, and so on, so that the machine's other tenants weigh on
both runs alike (on a shared VM they move the quiet p99 tenfold from one run
to the next). Each abuse window starts the attacks afresh; after it stops
and a short settle, its end figures are taken. ``--rounds 1`` is one quiet
run, then one abuse run. With the slow attack a window is at least
``MIN_WINDOW_S`` (40 s): its clients read nothing for ``SLOW_STALL_S`` (35 s)
before they look whether the server cut them, so a shorter window would
cancel them before any outcome is known.

Per run: the server's RSS at the start and end and its least-squares slope,
open descriptors (and those on ``caspian.db``), threads and asyncio tasks
(``caspian_asyncio_tasks`` from ``/metrics``) at the start and end, the
well-behaved clients' p99 latency and longest gap, whether their Level2 books
equal a fresh subscriber's at the end of each window, their unexpected
closes, and what the server refused or closed, from ``/metrics``. A run's
figures pool its windows: latencies and delays together, counts, CPU, log
and ``/metrics`` growth summed, longest gaps and peaks over all of them;
start figures are its first window's, end figures its last window's. The
leak check thus compares the end of the last quiet window with the end of
the last abuse window and its settle: from two rounds on both come after
abuse, so what abuse makes once and keeps (pools, lazily loaded code) is in
both, and what one more abuse window left behind shows. The RSS slopes
are over one continuous series: for the quiet run its first window, the
baseline before any abuse, shown for reference; for the abuse run, from the
start of its first window to the end of its last, the quiet windows between
included. The flat-memory target is judged on the latter: memory must not
grow across the soak as a whole, and one window's 20 s floors are too few
for a slope to mean much. That series starts and ends under abuse: one that
began with the quiet baseline and ended under abuse would slope upwards by
the abuse's transient buffers alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from loadgen import (
    Placement,
    Server,
    _sent_at_us,
    authenticate,
    busy_cpu_seconds,
    caspian_command,
    caspian_env,
    machine,
    percentile,
    placements,
    raise_nofile,
)

SYMBOLS = "FX-BTC/USD=GEMINI,FX-ETH/USD=GEMINI,FX-BTC/USDT=BINANCE,FX-ETH/USDT=BINANCE"
#: Symbols the abusers use besides the well-behaved ones (slow clients, churn).
ABUSE_EXCHANGES = ["BINANCE", "GEMINI", "GDAX", "KRAKEN"]
LEVELS = 20
#: The attacks, as ``--attacks`` names them.
ATTACKS = [
    "churn",
    "reconnect",
    "slow",
    "refresh",
    "bad",
    "reset",
    "idle",
    "slowloris",
    "head",
    "aborted",
    "logins",
]
#: How long a slow client reads nothing before it looks whether it was cut.
SLOW_STALL_S = 35.0
#: How long a slow client then waits for more before it calls itself still open.
SLOW_READ_S = 5.0
#: The shortest abuse window with the slow attack: a slow client's outcome is
#: known only after its stall and look, and a window's end cancels it.
MIN_WINDOW_S = SLOW_STALL_S + SLOW_READ_S
#: Targets of the issue.
TARGET_P99_RATIO = 2.0
#: "Flat" memory: the least-squares slope of the RSS floor over a run (the
#: least RSS of each FLOOR_WINDOW_S around a sample) under this.
TARGET_SLOPE_MB_PER_MIN = 1.0
FLOOR_WINDOW_S = 20.0
#: Linux's SO_TIMESTAMPNS (also its control-message type); Python does not name it.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
_LINGER_RESET = struct.pack("ii", 1, 0)


# -- the server ------------------------------------------------------------------


def start_server(data_dir: Path, placement: Placement) -> Server:
    """``caspian serve`` with its default settings but a free port and the data directory.

    The log level stays the default (info): the throttled error logs are part
    of what is measured (their size is reported).
    """
    env = caspian_env(data_dir, 20.0)
    for name in ("CASPIAN_SIMULATOR_RATE", "CASPIAN_LOG_LEVEL"):
        del env[name]
    run = Path(tempfile.mkdtemp(prefix="serve-", dir=data_dir.parent))
    with open(run / "stdout", "wb") as stdout, open(run / "stderr", "wb") as stderr:
        process = subprocess.Popen(
            [*caspian_command(), "serve"],
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            preexec_fn=placement.apply,
        )
    found: dict[str, str] = {}
    deadline = time.monotonic() + 90
    while len(found) < 2 and time.monotonic() < deadline and process.poll() is None:
        for line in (run / "stdout").read_text().splitlines():
            for prefix in ("Caspian REST API:", "Caspian stream:"):
                if line.startswith(prefix):
                    found[prefix] = line[len(prefix) :].strip()
        time.sleep(0.1)
    if len(found) < 2:
        process.kill()
        process.wait()
        raise RuntimeError("caspian serve did not start:\n" + (run / "stderr").read_text()[-2000:])
    return Server("caspian", process, found["Caspian stream:"], found["Caspian REST API:"])


def create_key(data_dir: Path, user: str) -> dict[str, str]:
    done = subprocess.run(
        [*caspian_command(), "keys", "create", "--user", user, "--json"],
        env=caspian_env(data_dir, 1.0),
        capture_output=True,
        check=True,
    )
    key: dict[str, str] = json.loads(done.stdout)
    return key


def products_of(rest_url: str, token: str, exchanges: list[str]) -> list[str]:
    request = urllib.request.Request(
        f"{rest_url}/reference/products",
        data=json.dumps({"exchanges": exchanges}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": token},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        products = json.load(response)
    return sorted(product["caspianCode"] for product in products if product["type"] == "FX")


@dataclass
class Sample:
    at: float  # monotonic seconds
    rss_mb: float
    fds: int
    db_fds: int
    threads: int


def sample(pid: int) -> Sample:
    threads, rss_kb = 0, 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = db_fds = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        with contextlib.suppress(OSError):
            if "caspian.db" in os.readlink(f"/proc/{pid}/fd/{name}"):
                db_fds += 1
    return Sample(time.monotonic(), rss_kb / 1024, fds, db_fds, threads)


def read_metrics(rest_url: str) -> dict[str, float]:
    """``/metrics`` as ``name{label=value,...}`` to value."""
    base = rest_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(metric.labels.items()))
            values[f"{metric.name}{{{labels}}}"] = metric.value
    return values


def slope_mb_per_min(samples: list[Sample], floor_s: float = 0.0) -> float:
    """Least-squares slope of RSS over time; with ``floor_s``, of its floor: each
    sample replaced by the least RSS of the ``floor_s`` seconds around it.

    The floor is what a leak raises; the transient peaks of a burst (64 MiB per
    argon2 check while a login is verified) come and go above it.
    """
    if len(samples) < 3:
        return float("nan")
    minutes = [(item.at - samples[0].at) / 60 for item in samples]
    values = [
        min(other.rss_mb for other in samples if abs(other.at - item.at) <= floor_s / 2)
        for item in samples
    ]
    return statistics.linear_regression(minutes, values).slope


class Sampler:
    """Samples the server every second on a thread, while the runs go on."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError):
                self.samples.append(sample(self.pid))

    def between(self, began: float, ended: float) -> list[Sample]:
        return [item for item in self.samples if began <= item.at <= ended]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class OwnerLogins:
    """The owner logs in with its key from its own address every few seconds."""

    def __init__(self, rest_url: str, key: dict[str, str], every_s: float = 5.0) -> None:
        self.outcomes: Counter[str] = Counter()
        self._url = f"{rest_url}/auth/authenticate"
        self._body = json.dumps({"type": "Key", "payload": key}).encode()
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            request = urllib.request.Request(
                self._url, data=self._body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    self.outcomes[str(response.status)] += 1
            except urllib.error.HTTPError as exc:
                self.outcomes[str(exc.code)] += 1
            except OSError as exc:
                self.outcomes[type(exc).__name__] += 1

    def take(self) -> Counter[str]:
        taken, self.outcomes = self.outcomes, Counter()
        return taken

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- well-behaved clients -------------------------------------------------------


@dataclass
class WatchStats:
    """What the well-behaved clients of one worker saw in a window."""

    arrival_us: list[int] = field(default_factory=list)
    read_us: list[int] = field(default_factory=list)
    max_gap_us: dict[str, int] = field(default_factory=dict)
    updates: Counter[str] = field(default_factory=Counter)
    #: Closes and losses the client did not ask for, by close code or "lost".
    unexpected: Counter[str] = field(default_factory=Counter)
    #: Answers other than SubscribeResponse 200, and messages of other types.
    other: Counter[str] = field(default_factory=Counter)

    @classmethod
    def pooled(cls, parts: list[WatchStats]) -> WatchStats:
        """What the clients saw in all of ``parts``, as if in one window."""
        max_gap_us: dict[str, int] = {}
        for part in parts:
            for kind, gap in part.max_gap_us.items():
                max_gap_us[kind] = max(max_gap_us.get(kind, 0), gap)
        return cls(
            arrival_us=[value for part in parts for value in part.arrival_us],
            read_us=[value for part in parts for value in part.read_us],
            max_gap_us=max_gap_us,
            updates=Counter(summed(part.updates for part in parts)),
            unexpected=Counter(summed(part.unexpected for part in parts)),
            other=Counter(summed(part.other for part in parts)),
        )


Book = dict[tuple[str, float], float]


class Watcher:
    """A well-behaved stream client on a raw socket, read with ``recvmsg``.

    It applies every Level2 message to its books and stamps what it reads
    with the kernel's receive time (``SO_TIMESTAMPNS``), so that its latency
    is the server's and the network's, not the client process's turn on a
    busy core.
    """

    def __init__(self, stats: WatchStats, url: str, subscriptions: list[dict[str, Any]]) -> None:
        self.stats = stats
        uri = parse_uri(url)
        self._ws = ClientProtocol(uri, max_size=None)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.connect((uri.host, uri.port))
        self._sock.setblocking(False)
        self._subscriptions = {str(uuid.uuid4()): sub for sub in subscriptions}
        self.symbols = {
            rid: (sub["symbol"], sub["type"]) for rid, sub in self._subscriptions.items()
        }
        self.pending = len(subscriptions)
        self.books: dict[str, Book] = {rid: {} for rid in self._subscriptions}
        self._last_us: dict[str, int] = {}
        #: While the books are checked: Level2 book fingerprints by caspianTimestamp.
        self.prints: dict[str, dict[str, int]] | None = None
        self.closing = False
        self.closed = False
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
        self._ws.send_request(self._ws.connect())
        self._write()

    def window(self) -> None:
        self._last_us.clear()

    def _write(self) -> None:
        for data in self._ws.data_to_send():
            if data and not self.closed:
                # Small writes (Subscribes, pongs, a close) on a drained socket.
                self._sock.setblocking(True)
                self._sock.sendall(data)
                self._sock.setblocking(False)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(1 << 18, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        read_us = time.time_ns() // 1000
        if not data:
            if not self.closing:
                self.stats.unexpected["lost"] += 1
            self.close_now()
            return
        arrival_us = read_us
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                arrival_us = seconds * 1_000_000 + nanoseconds // 1000
        self._ws.receive_data(data)
        for event in self._ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self.stats.unexpected[f"HTTP {event.status_code}"] += 1
                    continue
                for rid, sub in self._subscriptions.items():
                    message = {"requestId": rid, "type": "Subscribe", "payload": sub}
                    self._ws.send_text(orjson.dumps(message))
            elif isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self._message(bytes(event.data), arrival_us, read_us)
                elif event.opcode is Opcode.CLOSE and not self.closing:
                    close = self._ws.close_rcvd
                    self.stats.unexpected[str(close.code if close else 1005)] += 1
        self._write()

    def _message(self, data: bytes, arrival_us: int, read_us: int) -> None:
        message = orjson.loads(data)
        kind = message.get("type")
        stats = self.stats
        rid = message.get("requestId", "")
        if kind == "SubscribeResponse":
            code = message.get("payload", {}).get("code")
            if code == 200:
                self.pending -= 1
            else:
                stats.other[f"SubscribeResponse {code}"] += 1
            return
        if kind not in ("Level1", "Level2") or rid not in self.books:
            stats.other[str(kind)] += 1
            return
        if kind == "Level2":
            book = self.books[rid]
            for level in message["payload"]:
                where = (level["side"], level["price"])
                if level["size"]:
                    book[where] = level["size"]
                else:
                    book.pop(where, None)
            if self.prints is not None:
                self.prints[rid][message["caspianTimestamp"]] = hash(tuple(sorted(book.items())))
            if not message["payload"]:
                return
        sent = _sent_at_us(message)
        if sent is not None:
            stats.arrival_us.append(arrival_us - sent)
            stats.read_us.append(read_us - sent)
        stats.updates[kind] += 1
        last = self._last_us.get(rid)
        if last is not None:
            stats.max_gap_us[kind] = max(stats.max_gap_us.get(kind, 0), arrival_us - last)
        self._last_us[rid] = arrival_us

    def close(self) -> None:
        """A clean close: a close frame, then the socket once the server answers."""
        self.closing = True
        with contextlib.suppress(Exception):
            self._ws.send_close(1000)
            self._write()

    def close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


async def check_books(watchers: list[Watcher], url: str, seconds: float = 3.0) -> dict[str, int]:
    """Each Level2 book against a fresh subscriber's, at the same ``caspianTimestamp``s.

    A fresh subscriber starts from the server's whole top N; from then on it
    and every old client get the same messages. Books are compared after each
    message both applied: a client that missed or misapplied an update
    differs from then on.
    """
    by_symbol: dict[tuple[str, str], list[tuple[Watcher, str]]] = {}
    for watcher in watchers:
        watcher.prints = {rid: {} for rid in watcher.books}
        for rid, (symbol, kind) in watcher.symbols.items():
            if kind == "Level2":
                by_symbol.setdefault((symbol, kind), []).append((watcher, rid))
    fresh_stats = WatchStats()
    fresh = {
        symbol: Watcher(
            fresh_stats,
            url,
            [{"symbol": symbol, "type": "Level2", "numberOfLevels": LEVELS, "conflation": "None"}],
        )
        for symbol, _ in by_symbol
    }
    for reference in fresh.values():
        reference.prints = {rid: {} for rid in reference.books}
    await asyncio.sleep(seconds)
    equal = differ = unchecked = 0
    for (symbol, _), holders in by_symbol.items():
        reference = fresh[symbol]
        assert reference.prints is not None
        theirs = next(iter(reference.prints.values()))
        for watcher, rid in holders:
            assert watcher.prints is not None
            ours = watcher.prints[rid]
            common = ours.keys() & theirs.keys()
            if not common:
                unchecked += 1
            elif all(ours[stamp] == theirs[stamp] for stamp in common):
                equal += 1
            else:
                differ += 1
    for watcher in watchers:
        watcher.prints = None
    for reference in fresh.values():
        reference.close()
    await asyncio.sleep(0.5)
    for reference in fresh.values():
        reference.close_now()
    return {"equal": equal, "differ": differ, "unchecked": unchecked}


async def _watch_worker(pipe: Connection, url: str, clients: int, subs: list[Any]) -> None:
    loop = asyncio.get_running_loop()
    stats = WatchStats()
    watchers = [Watcher(stats, url, subs) for _ in range(clients)]
    done: asyncio.Future[None] = loop.create_future()
    busy: set[asyncio.Task[None]] = set()

    async def answer_check() -> None:
        pipe.send(await check_books(watchers, url))

    def command() -> None:
        nonlocal stats
        name = pipe.recv()
        if name == "ready":
            pipe.send(sum(watcher.pending for watcher in watchers))
        elif name == "start":
            stats = WatchStats()
            for watcher in watchers:
                watcher.stats = stats
                watcher.window()
        elif name == "stop":
            pipe.send(stats)
        elif name == "check":
            task = loop.create_task(answer_check())
            busy.add(task)
            task.add_done_callback(busy.discard)
        elif name == "exit":
            for watcher in watchers:
                watcher.close()
            loop.call_later(1.0, done.set_result, None)

    loop.add_reader(pipe.fileno(), command)
    await done
    for watcher in watchers:
        watcher.close_now()


def _watch_main(
    pipe: Connection, placement: Placement, url: str, clients: int, subs: list[Any]
) -> None:
    placement.apply()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_watch_worker(pipe, url, clients, subs))


# -- hostile clients --------------------------------------------------------------


@dataclass(frozen=True)
class AbusePlan:
    host: str
    port: int
    stream_url: str  # with the attacker's token
    bad_token_url: str  # a forged token
    attacker_token: str
    owner_key_id: str
    symbols: list[str]
    seconds: float
    scale: float = 1.0
    #: The attacks to run (names of ``ATTACKS``).
    attacks: tuple[str, ...] = ()


class Tally:
    """Outcomes of every attack, as ``attack: outcome -> count``, and close delays."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self.delays: dict[str, list[float]] = {}

    def add(self, attack: str, outcome: str, times: int = 1) -> None:
        self.counts.setdefault(attack, Counter())[outcome] += times

    def delay(self, attack: str, seconds: float) -> None:
        self.delays.setdefault(attack, []).append(seconds)


_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, ValueError)


class WsClient:
    """A stream client on asyncio streams, framed by websockets' sans-I/O protocol."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: ClientProtocol
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, source: str, rcvbuf: int = 0) -> WsClient:
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(reader, writer, ClientProtocol(uri, max_size=None))
        client.ws.send_request(client.ws.connect())
        await client.flush()
        while True:
            for event in await client.receive():
                if isinstance(event, Response):
                    if event.status_code != 101:
                        client.reset()
                        raise ValueError(f"HTTP {event.status_code}")
                    return client

    def write(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.writer.write(data)

    async def flush(self) -> None:
        self.write()
        await self.writer.drain()

    async def receive(self) -> list[Response | Frame]:
        data = await self.reader.read(1 << 16)
        if not data:
            raise EOFError("closed")
        self.ws.receive_data(data)
        events = self.ws.events_received()
        # Pongs and close replies, without waiting for a sender's backpressure.
        self.write()
        return [event for event in events if isinstance(event, Response | Frame)]

    async def send(self, message: dict[str, Any] | bytes) -> None:
        if isinstance(message, bytes):
            self.ws.send_text(message)
        else:
            self.ws.send_text(orjson.dumps(message))
        await self.flush()

    def reset(self) -> None:
        """Closes with a TCP reset, as a client that vanishes does."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.writer.transport.abort()


def close_code(client: WsClient) -> str:
    close = client.ws.close_rcvd
    return f"close {close.code}" if close is not None else "closed"


async def open_tcp(
    plan: AbusePlan, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(plan.host, plan.port, local_addr=(source, 0))


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


async def status_of(reader: asyncio.StreamReader, within_s: float = 30.0) -> str:
    """The HTTP status the server answered with, or how it ended without one."""
    line = await asyncio.wait_for(reader.readline(), within_s)
    if not line:
        return "closed, no answer"
    parts = line.split()
    return parts[1].decode() if len(parts) > 1 and line.startswith(b"HTTP/") else "not HTTP"


async def paced(rate: float, limit: int, attempt: Callable[[], Awaitable[None]]) -> None:
    """``attempt`` started ``rate`` times a second, at most ``limit`` at once."""
    gate = asyncio.Semaphore(limit)
    running: set[asyncio.Task[None]] = set()

    async def guarded() -> None:
        try:
            await attempt()
        finally:
            gate.release()

    try:
        while True:
            await gate.acquire()
            task = asyncio.create_task(guarded())
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(1 / rate)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def held(count: int, attempt: Callable[[], Awaitable[None]]) -> None:
    """``count`` loops, each running ``attempt`` again as soon as it ends."""

    async def loop() -> None:
        while True:
            await attempt()
            await asyncio.sleep(0.05)

    await asyncio.gather(*(loop() for _ in range(count)))


class Abuse:
    """Every attack, each from its own loopback address, for the length of the run."""

    def __init__(self, plan: AbusePlan) -> None:
        self.plan = plan
        self.tally = Tally()
        self._ids = itertools.count()
        #: Which variant an attack sends next (bad message kind, clean close or reset).
        self._turns: Counter[str] = Counter()

    def rid(self) -> str:
        return f"a{next(self._ids)}"

    def turn(self, attack: str, variants: int) -> int:
        self._turns[attack] += 1
        return self._turns[attack] % variants

    def attacks(self) -> list[Awaitable[None]]:
        scale = self.plan.scale
        every = {
            "churn": lambda: held(2, self.churn),
            "reconnect": lambda: paced(20 * scale, 8, self.reconnect),
            "slow": lambda: held(2, self.slow_client),
            "refresh": lambda: held(1, self.refresh_flood),
            "bad": lambda: held(1, self.bad_flood),
            "reset": lambda: paced(10 * scale, 16, self.reset_in_check),
            "idle": lambda: held(round(100 * scale), self.idle),
            "slowloris": lambda: held(round(50 * scale), self.slowloris),
            "head": lambda: paced(5 * scale, 8, self.big_head),
            "aborted": lambda: paced(10 * scale, 16, self.aborted_rest),
            "logins": lambda: paced(0.1 * scale, 1, self.wrong_logins),
        }
        return [every[name]() for name in self.plan.attacks]

    async def guard(self, attack: str, body: Awaitable[None]) -> None:
        try:
            await body
        except _ERRORS as exc:
            self.tally.add(attack, type(exc).__name__)

    async def churn(self) -> None:
        """Subscribes to ten symbols and unsubscribes from them, over and over."""
        await self.guard("churn", self._churn())

    async def _churn(self) -> None:
        client = await WsClient.connect(self.plan.stream_url, "127.0.0.2")
        try:
            symbols = self.plan.symbols[:10]
            while True:
                ids = [self.rid() for _ in symbols]
                for rid, symbol in zip(ids, symbols, strict=True):
                    payload = {"symbol": symbol, "type": "Level2", "conflation": "None"}
                    await client.send({"requestId": rid, "type": "Subscribe", "payload": payload})
                for rid in ids:
                    payload = {"subscribeRequestId": rid}
                    await client.send(
                        {"requestId": self.rid(), "type": "Unsubscribe", "payload": payload}
                    )
                answers = 0
                while answers < 2 * len(ids):
                    for event in await client.receive():
                        if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                            message = orjson.loads(event.data)
                            kind = message.get("type", "")
                            if kind.endswith("Response"):
                                answers += 1
                                self.tally.add("churn", f"{kind} {message['payload']['code']}")
                        elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                            self.tally.add("churn", close_code(client))
                            return
        finally:
            client.reset()

    async def reconnect(self) -> None:
        """Connects, subscribes, waits for the first update, leaves (cleanly or not)."""
        await self.guard("reconnect", self._reconnect())

    async def _reconnect(self) -> None:
        client = await WsClient.connect(self.plan.stream_url, "127.0.0.3")
        clean = self.turn("reconnect", 2) == 0
        try:
            payload = {"symbol": self.plan.symbols[0], "type": "Level1"}
            await client.send({"requestId": "r", "type": "Subscribe", "payload": payload})
            while True:
                for event in await asyncio.wait_for(client.receive(), 10):
                    if isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                        self.tally.add(
                            "reconnect", "closed cleanly" if clean else close_code(client)
                        )
                        return
                    if isinstance(event, Frame) and b'"Level1"' in event.data:
                        if not clean:
                            self.tally.add("reconnect", "updated, then reset")
                            return
                        if client.ws.state is State.OPEN:
                            client.ws.send_close(1000)
                            await client.flush()
        finally:
            if clean and client.ws.close_rcvd is not None:
                client.writer.close()
            else:
                client.reset()

    async def slow_client(self) -> None:
        """Subscribes to every abuse symbol and reads nothing, until the server cuts it."""
        await self.guard("slow", self._slow_client())

    async def _slow_client(self) -> None:
        client = await WsClient.connect(self.plan.stream_url, "127.0.0.4", rcvbuf=4096)
        try:
            for symbol in self.plan.symbols[:40]:
                for kind in ("Level1", "Level2"):
                    payload = {"symbol": symbol, "type": kind, "conflation": "None"}
                    message = {"requestId": self.rid(), "type": "Subscribe", "payload": payload}
                    await client.send(message)
            # Reading nothing: what the server sends waits in its backlog until
            # it gives up. Whether it did shows only once the kernel's buffers
            # are read, so the client then reads everything, fast.
            await asyncio.sleep(SLOW_STALL_S)
            while True:
                try:
                    events = await asyncio.wait_for(client.receive(), SLOW_READ_S)
                except TimeoutError:
                    self.tally.add("slow", f"still open after {SLOW_STALL_S:g} s")
                    return
                except (EOFError, ConnectionError):
                    self.tally.add("slow", "cut, no close frame")
                    return
                if any(
                    isinstance(event, Frame) and event.opcode is Opcode.CLOSE for event in events
                ):
                    self.tally.add("slow", close_code(client))
                    return
        finally:
            client.reset()

    async def refresh_flood(self) -> None:
        """TokenRefresh after TokenRefresh, as fast as the server reads them."""
        await self.guard("refresh", self._flood("refresh", self._refresh_message))

    def _refresh_message(self) -> dict[str, Any] | bytes:
        token = self.plan.attacker_token
        return {"requestId": self.rid(), "type": "TokenRefresh", "payload": {"accessToken": token}}

    async def bad_flood(self) -> None:
        """Messages every one of which is an error of some kind."""
        await self.guard("bad", self._flood("bad", self._bad_message))

    def _bad_message(self) -> dict[str, Any] | bytes:
        kind = self.turn("bad", 5)
        if kind == 0:
            return b"not json {"
        if kind == 1:
            return {"type": "Subscribe", "payload": {}}
        if kind == 2:
            return {"requestId": self.rid(), "type": "Nonsense"}
        if kind == 3:
            payload = {"symbol": self.plan.symbols[0], "type": {"a": [1]}}
            return {"requestId": self.rid(), "type": "Subscribe", "payload": payload}
        return {
            "requestId": self.rid(),
            "type": "Unsubscribe",
            "payload": {"subscribeRequestId": 7},
        }

    async def _flood(self, attack: str, make: Callable[[], dict[str, Any] | bytes]) -> None:
        source = "127.0.0.5" if attack == "refresh" else "127.0.0.6"
        client = await WsClient.connect(self.plan.stream_url, source)

        async def read() -> None:
            while True:
                for event in await client.receive():
                    if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                        message = orjson.loads(event.data)
                        code = message.get("payload", {}).get("code")
                        self.tally.add(attack, f"{message.get('type')} {code}")
                    elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                        self.tally.add(attack, close_code(client))
                        raise EOFError("closed")

        reading = asyncio.create_task(read())
        try:
            while not reading.done():
                # drain() holds us while the server reads no further (TCP backpressure).
                await client.send(make())
                self.tally.add(attack, "sent")
            await reading
        finally:
            reading.cancel()
            client.reset()

    async def reset_in_check(self) -> None:
        """A stream upgrade with a token, reset at once: the server is checking the token."""
        await self.guard("reset", self._reset_in_check())

    async def _reset_in_check(self) -> None:
        url = self.plan.stream_url if self.turn("reset", 2) else self.plan.bad_token_url
        client = await WsClient.connect(url, "127.0.0.7")
        client.reset()
        self.tally.add("reset", "reset")

    async def idle(self) -> None:
        """A TCP connection that sends nothing."""
        await self.guard("idle", self._hold_head("idle", "127.0.0.8", b""))

    async def slowloris(self) -> None:
        """A request head sent a header a second, never finished."""
        await self.guard("slowloris", self._hold_head("slowloris", "127.0.0.9", b"X-a: b\r\n"))

    async def _hold_head(self, attack: str, source: str, drip: bytes) -> None:
        reader, writer = await open_tcp(self.plan, source)
        began = time.monotonic()
        try:
            if drip:
                writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")
            answer: asyncio.Task[str] = asyncio.create_task(status_of(reader, 120))
            while not answer.done():
                if drip and not writer.is_closing():
                    writer.write(drip)
                await asyncio.wait([answer], timeout=1.0)
            self.tally.add(attack, answer.result())
            self.tally.delay(attack, time.monotonic() - began)
        finally:
            reset(writer)

    async def big_head(self) -> None:
        """A request head over the size limit, or with too many headers."""
        await self.guard("head", self._big_head())

    async def _big_head(self) -> None:
        reader, writer = await open_tcp(self.plan, "127.0.0.10")
        try:
            if self.turn("head", 2):
                headers = b"X-big: " + b"a" * 20_000 + b"\r\n"
            else:
                headers = b"".join(b"X-%d: b\r\n" % index for index in range(150))
            writer.write(b"GET /v1/reference/exchanges HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            await writer.drain()
            self.tally.add("head", await status_of(reader, 10))
        finally:
            reset(writer)

    async def aborted_rest(self) -> None:
        """A login whose body stops halfway, then a reset."""
        await self.guard("aborted", self._aborted_rest())

    async def _aborted_rest(self) -> None:
        _, writer = await open_tcp(self.plan, "127.0.0.11")
        try:
            writer.write(
                b"POST /v1/auth/authenticate HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
                + b'{"type": "Key", "payload": {"accessKeyID": "'
                + b"x" * 30_000
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            self.tally.add("aborted", "reset")
        finally:
            reset(writer)

    async def wrong_logins(self) -> None:
        """Fifty wrong secrets for the owner's key at once, from one address."""
        body = orjson.dumps(
            {
                "type": "Key",
                "payload": {"accessKeyID": self.plan.owner_key_id, "secretAccessKey": "wrong"},
            }
        )
        request = (
            b"POST /v1/auth/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body

        async def one() -> None:
            reader, writer = await open_tcp(self.plan, "127.0.0.12")
            try:
                writer.write(request)
                self.tally.add("logins", await status_of(reader))
            finally:
                writer.close()

        await asyncio.gather(*(self.guard("logins", one()) for _ in range(50)))

    async def run(self) -> Tally:
        tasks = [asyncio.ensure_future(attack) for attack in self.attacks()]
        await asyncio.sleep(self.plan.seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return self.tally


def _abuse_main(pipe: Connection, placement: Placement, plan: AbusePlan) -> None:
    raise_nofile()
    placement.apply()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe.recv()
    tally = asyncio.run(Abuse(plan).run())
    pipe.send((tally.counts, tally.delays))


# -- the runs -----------------------------------------------------------------------


@dataclass
class Run:
    name: str
    start: Sample
    end: Sample
    samples: list[Sample]
    #: The samples the RSS slopes are taken over: a window's own; see ``pool``.
    series: list[Sample]
    tasks_start: float
    tasks_end: float
    stats: WatchStats
    books: dict[str, int]
    metrics: dict[str, float]  # counters' growth over the run
    owner_logins: Counter[str]
    cpu_s: float
    #: CPU time of the whole machine, every process.
    busy_s: float
    log_bytes: int
    seconds: float
    #: Monotonic seconds: when the (first) window began, the (last) one ended (not its settle).
    began: float
    ended: float
    abuse: dict[str, Counter[str]] = field(default_factory=dict)
    delays: dict[str, list[float]] = field(default_factory=dict)

    @property
    def slope(self) -> float:
        return slope_mb_per_min(self.series)

    @property
    def floor_slope(self) -> float:
        return slope_mb_per_min(self.series, FLOOR_WINDOW_S)

    def p99_ms(self, kind: str = "arrival") -> float:
        values = self.stats.arrival_us if kind == "arrival" else self.stats.read_us
        return percentile(values, 0.99) / 1000

    def p50_ms(self) -> float:
        return percentile(self.stats.arrival_us, 0.50) / 1000

    def max_gap_ms(self) -> float:
        return max(self.stats.max_gap_us.values(), default=0) / 1000


class Pipe:
    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("fork")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        child.close()

    def ask(self, command: str, timeout: float = 60) -> Any:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"a worker did not answer {command!r}")
        return self.conn.recv()

    def join(self) -> None:
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


Number = TypeVar("Number", int, float)


def summed(parts: Iterable[Mapping[str, Number]]) -> dict[str, Number]:
    """The counts of ``parts`` added up by name; unlike ``Counter``'s ``+``, zeros stay."""
    total: dict[str, Number] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    return total


def growth(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    return {
        name: after[name] - before.get(name, 0.0)
        for name in after
        if name.startswith(prefix) and after[name] - before.get(name, 0.0)
    }


def measure(
    name: str,
    server: Server,
    sampler: Sampler,
    watchers: Pipe,
    logins: OwnerLogins,
    seconds: float,
    stderr: Path,
    abuse: Pipe | None = None,
    settle: float = 0.0,
) -> Run:
    assert server.rest_url is not None
    before = read_metrics(server.rest_url)
    start = sample(server.pid)
    cpu = server.cpu_seconds()
    busy = busy_cpu_seconds()
    log_start = stderr.stat().st_size
    logins.take()
    watchers.conn.send("start")
    began = time.monotonic()
    abuse_counts: dict[str, Counter[str]] = {}
    delays: dict[str, list[float]] = {}
    if abuse is not None:
        abuse.conn.send("go")
        if not abuse.conn.poll(seconds + 120):
            raise RuntimeError("the abuse worker did not finish")
        abuse_counts, delays = abuse.conn.recv()
        abuse.join()
    else:
        time.sleep(seconds)
    stats: WatchStats = watchers.ask("stop")
    ended = time.monotonic()
    cpu = server.cpu_seconds() - cpu
    busy = busy_cpu_seconds() - busy
    time.sleep(settle)
    books: dict[str, int] = watchers.ask("check")
    after = read_metrics(server.rest_url)
    end = sample(server.pid)
    samples = sampler.between(began, ended)
    run = Run(
        name=name,
        start=start,
        end=end,
        samples=samples,
        series=samples,
        tasks_start=before.get("caspian_asyncio_tasks{}", float("nan")),
        tasks_end=after.get("caspian_asyncio_tasks{}", float("nan")),
        stats=stats,
        books=books,
        metrics={
            **growth(before, after, "caspian_connections_refused_total"),
            **growth(before, after, "caspian_stream_closes_total"),
            **growth(before, after, "caspian_stream_messages_paced_total"),
        },
        owner_logins=logins.take(),
        cpu_s=cpu,
        busy_s=busy,
        log_bytes=stderr.stat().st_size - log_start,
        seconds=ended - began,
        began=began,
        ended=ended,
        abuse=abuse_counts,
        delays=delays,
    )
    print(
        f"{name}: {run.seconds:.0f} s, p99 {run.p99_ms():.2f} ms, gap {run.max_gap_ms():.0f} ms, "
        f"RSS {start.rss_mb:.1f} -> {end.rss_mb:.1f} MB, fds {start.fds} -> {end.fds}, "
        f"tasks {run.tasks_start:.0f} -> {run.tasks_end:.0f}, books {books}",
        flush=True,
    )
    return run


def pool(name: str, windows: list[Run], series: list[Sample]) -> Run:
    """One run out of its windows: what they saw taken together, the first one's
    start figures, the last one's end figures, and RSS slopes over ``series``."""
    first, last = windows[0], windows[-1]
    abuse: dict[str, Counter[str]] = {}
    delays: dict[str, list[float]] = {}
    for window in windows:
        for attack, outcomes in window.abuse.items():
            abuse.setdefault(attack, Counter()).update(outcomes)
        for attack, values in window.delays.items():
            delays.setdefault(attack, []).extend(values)
    return Run(
        name=name,
        start=first.start,
        end=last.end,
        samples=[item for window in windows for item in window.samples],
        series=series,
        tasks_start=first.tasks_start,
        tasks_end=last.tasks_end,
        stats=WatchStats.pooled([window.stats for window in windows]),
        books=summed(window.books for window in windows),
        metrics=summed(window.metrics for window in windows),
        owner_logins=Counter(summed(window.owner_logins for window in windows)),
        cpu_s=sum(window.cpu_s for window in windows),
        busy_s=sum(window.busy_s for window in windows),
        log_bytes=sum(window.log_bytes for window in windows),
        seconds=sum(window.seconds for window in windows),
        began=first.began,
        ended=last.ended,
        abuse=abuse,
        delays=delays,
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    args: argparse.Namespace,
    quiet: Run,
    abusive: Run,
    rounds: list[tuple[Run, Run]],
    clients: int,
) -> None:
    print()
    print(f"Soak benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(
        f"{clients} well-behaved clients, each Level2 ({LEVELS} levels, conflation None) and "
        f"Level1 of {args.symbols}; runs of {args.seconds:g} s, each in {len(rounds)} "
        f"window(s) of {args.seconds / len(rounds):g} s, taken alternately quiet and abuse; "
        f"settle {args.settle:g} s after each abuse window"
    )
    print(
        "A column pools its run's windows; its start figures are its first window's, its end "
        "figures its last window's (abuse: after the settle)."
    )
    print()
    print("| measure | quiet | abuse | abuse/quiet |")
    print("|---|---:|---:|---:|")

    def row(label: str, mine: float, theirs: float, shape: str, ratio: bool = False) -> None:
        share = f"{theirs / mine:.2f}" if ratio and mine else ""
        print(f"| {label} | {mine:{shape}} | {theirs:{shape}} | {share} |")

    def pair(label: str, one: str, two: str) -> None:
        print(f"| {label} | {one} | {two} | |")

    pair(
        "server RSS start → end (MB)",
        f"{quiet.start.rss_mb:.1f} → {quiet.end.rss_mb:.1f}",
        f"{abusive.start.rss_mb:.1f} → {abusive.end.rss_mb:.1f}",
    )
    series = "quiet: its first window; abuse: its first window's start to its last's end"
    row(f"RSS slope (MB/min; {series})", quiet.slope, abusive.slope, "+.2f")
    row(
        f"RSS floor slope ({FLOOR_WINDOW_S:g} s minima, MB/min; {series})",
        quiet.floor_slope,
        abusive.floor_slope,
        "+.2f",
    )
    pair(
        "RSS peak (MB)",
        f"{max(s.rss_mb for s in quiet.samples):.1f}",
        f"{max(s.rss_mb for s in abusive.samples):.1f}",
    )
    pair(
        "open fds start → end",
        f"{quiet.start.fds} → {quiet.end.fds}",
        f"{abusive.start.fds} → {abusive.end.fds}",
    )
    pair(
        "fds on caspian.db start → end",
        f"{quiet.start.db_fds} → {quiet.end.db_fds}",
        f"{abusive.start.db_fds} → {abusive.end.db_fds}",
    )
    pair(
        "peak open fds",
        f"{max(s.fds for s in quiet.samples)}",
        f"{max(s.fds for s in abusive.samples)}",
    )
    pair(
        "threads start → end",
        f"{quiet.start.threads} → {quiet.end.threads}",
        f"{abusive.start.threads} → {abusive.end.threads}",
    )
    pair(
        "asyncio tasks start → end",
        f"{quiet.tasks_start:.0f} → {quiet.tasks_end:.0f}",
        f"{abusive.tasks_start:.0f} → {abusive.tasks_end:.0f}",
    )
    row(
        "server CPU (share of a core)",
        quiet.cpu_s / quiet.seconds,
        abusive.cpu_s / abusive.seconds,
        ".0%",
        ratio=True,
    )
    row(
        "machine busy (cores, every process)",
        quiet.busy_s / quiet.seconds,
        abusive.busy_s / abusive.seconds,
        ".2f",
    )
    row("server log (KB)", quiet.log_bytes / 1024, abusive.log_bytes / 1024, ",.1f")
    row(
        "updates received",
        sum(quiet.stats.updates.values()),
        sum(abusive.stats.updates.values()),
        ",.0f",
        ratio=True,
    )
    row("latency p50, to arrival (ms)", quiet.p50_ms(), abusive.p50_ms(), ".2f", ratio=True)
    row("latency p99, to arrival (ms)", quiet.p99_ms(), abusive.p99_ms(), ".2f", ratio=True)
    row(
        "latency p99, to read (ms)", quiet.p99_ms("read"), abusive.p99_ms("read"), ".2f", ratio=True
    )
    row(
        "latency max, to arrival (ms)",
        max(quiet.stats.arrival_us, default=0) / 1000,
        max(abusive.stats.arrival_us, default=0) / 1000,
        ".1f",
        ratio=True,
    )
    for kind in ("Level2", "Level1"):
        row(
            f"longest gap between {kind} updates (ms)",
            quiet.stats.max_gap_us.get(kind, 0) / 1000,
            abusive.stats.max_gap_us.get(kind, 0) / 1000,
            ".0f",
            ratio=True,
        )
    pair("Level2 books equal a fresh subscriber's", _books(quiet.books), _books(abusive.books))
    pair(
        "unexpected closes of well-behaved clients",
        _counts(quiet.stats.unexpected),
        _counts(abusive.stats.unexpected),
    )
    pair(
        "other answers to well-behaved clients",
        _counts(quiet.stats.other),
        _counts(abusive.stats.other),
    )
    pair(
        "owner's logins meanwhile (status)",
        _counts(quiet.owner_logins),
        _counts(abusive.owner_logins),
    )
    pair(
        "server's refusals and closes (/metrics)", _counts(quiet.metrics), _counts(abusive.metrics)
    )
    print()
    print("What the attacks met (outcome × count; close delays in s):")
    for attack, outcomes in abusive.abuse.items():
        delays = abusive.delays.get(attack)
        spread = (
            f"; closed after {min(delays):.1f}–{max(delays):.1f} s (median "
            f"{statistics.median(delays):.1f})"
            if delays
            else ""
        )
        print(f"- {attack}: {_counts(outcomes)}{spread}")
    print()
    ratio = abusive.p99_ms() / quiet.p99_ms()
    leaks = [
        (what, first, last)
        for what, first, last in (
            ("fds", quiet.end.fds, abusive.end.fds),
            ("caspian.db fds", quiet.end.db_fds, abusive.end.db_fds),
            ("threads", quiet.end.threads, abusive.end.threads),
            ("tasks", quiet.tasks_end, abusive.tasks_end),
        )
        if last > first
    ]
    lost = sum(
        run.stats.unexpected.total() + run.books["differ"] + run.books["unchecked"]
        for run in (quiet, abusive)
    )
    print("Per round, latency p99 to arrival (the targets take the windows pooled):")
    for number, (quiet_window, abuse_window) in enumerate(rounds, 1):
        mine, theirs = quiet_window.p99_ms(), abuse_window.p99_ms()
        print(f"- round {number}: quiet {mine:.2f} ms, abuse {theirs:.2f} ms, {theirs / mine:.2f}x")
    print()
    print("Targets:")
    print(
        f"- flat memory (RSS floor slope from the first abuse window to the last under "
        f"{TARGET_SLOPE_MB_PER_MIN:g} MB/min): "
        f"{verdict(abusive.floor_slope < TARGET_SLOPE_MB_PER_MIN)} ({abusive.floor_slope:+.2f}; "
        f"the first quiet window alone {quiet.floor_slope:+.2f})"
    )
    print(
        "- no leaked handle or task (fds, caspian.db fds, threads, tasks after the last abuse "
        f"window and its settle no more than after the last quiet window): {verdict(not leaks)}"
        + (f" ({', '.join(f'{w} {a:.0f} → {b:.0f}' for w, a, b in leaks)})" if leaks else "")
    )
    print(
        "- no update lost for well-behaved clients (books equal, no unexpected close): "
        f"{verdict(lost == 0)}"
    )
    print(
        f"- p99 within {TARGET_P99_RATIO:g}x of the quiet run: "
        f"{verdict(ratio <= TARGET_P99_RATIO)} ({ratio:.2f}x)"
    )


def _books(books: dict[str, int]) -> str:
    total = sum(books.values())
    extra = [f"{books[key]} {key}" for key in ("differ", "unchecked") if books[key]]
    return f"{books['equal']}/{total}" + (f" ({', '.join(extra)})" if extra else "")


def _counts(counts: dict[str, float] | Counter[str]) -> str:
    if not counts:
        return "none"
    short = {
        name.replace("caspian_connections_refused_total", "refused")
        .replace("caspian_stream_closes_total", "closed")
        .replace("caspian_stream_messages_paced_total", "paced"): value
        for name, value in counts.items()
    }
    return ", ".join(f"{name} {value:,.0f}" for name, value in sorted(short.items()))


def run(args: argparse.Namespace) -> None:
    server_place, client_place = placements(not args.no_pin, args.nice)
    client_place.apply()
    work = Path(tempfile.mkdtemp(prefix="caspian-bench-soak-"))
    data_dir = work / "data"
    data_dir.mkdir(mode=0o700)
    owner = create_key(data_dir, "owner")
    attacker = create_key(data_dir, "attacker")
    server = start_server(data_dir, server_place)
    stderr = next(work.glob("serve-*")) / "stderr"
    sampler = Sampler(server.pid)
    logins: OwnerLogins | None = None
    watchers: Pipe | None = None
    try:
        assert server.rest_url is not None
        owner_token = authenticate(server.rest_url, owner)
        attacker_token = authenticate(server.rest_url, attacker)
        symbols = args.symbols.split(",")
        abuse_symbols = [
            symbol
            for symbol in products_of(server.rest_url, owner_token, ABUSE_EXCHANGES)
            if symbol not in symbols
        ]
        subs = [
            {"symbol": symbol, "type": kind, "numberOfLevels": LEVELS, "conflation": "None"}
            for symbol in symbols
            for kind in ("Level2", "Level1")
        ]
        url = f"{server.stream_url}?accessToken={owner_token}"
        watchers = Pipe(_watch_main, client_place, url, args.clients, subs)
        deadline = time.monotonic() + 30
        while watchers.ask("ready") and time.monotonic() < deadline:
            time.sleep(0.5)
        host, port = server.stream_url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
        plan = AbusePlan(
            host=host,
            port=int(port),
            stream_url=f"{server.stream_url}?accessToken={attacker_token}",
            bad_token_url=f"{server.stream_url}?accessToken={attacker_token[:-4]}AAAA",
            attacker_token=attacker_token,
            owner_key_id=owner["accessKeyID"],
            symbols=abuse_symbols,
            seconds=args.seconds / args.rounds,
            scale=args.scale,
            attacks=tuple(args.attacks.split(",")),
        )
        abuse_place = Placement(client_place.cpus, max(client_place.nice, 10))
        if args.abuse_warmup:
            # Every path the abuse takes is used once before the baseline: lazily
            # loaded code, the store's connection pool and the thread pool then
            # count as the baseline, not as a leak.
            early_plan = dataclasses.replace(plan, seconds=args.abuse_warmup)
            early = Pipe(_abuse_main, abuse_place, early_plan)
            early.conn.send("go")
            early.conn.poll(args.abuse_warmup + 120)
            early.join()
            time.sleep(args.settle)
        time.sleep(args.warmup)
        logins = OwnerLogins(server.rest_url, owner)
        rounds: list[tuple[Run, Run]] = []
        for number in range(1, args.rounds + 1):
            quiet = measure(
                f"quiet {number}", server, sampler, watchers, logins, plan.seconds, stderr
            )
            abuse = Pipe(_abuse_main, abuse_place, plan)
            abusive = measure(
                f"abuse {number}",
                server,
                sampler,
                watchers,
                logins,
                plan.seconds,
                stderr,
                abuse,
                args.settle,
            )
            rounds.append((quiet, abusive))
        quiets, abuses = [one for one, _ in rounds], [two for _, two in rounds]
        report(
            args,
            pool("quiet", quiets, quiets[0].series),
            pool("abuse", abuses, sampler.between(abuses[0].began, abuses[-1].ended)),
            rounds,
            args.clients,
        )
    finally:
        if logins is not None:
            logins.stop()
        if watchers is not None:
            with contextlib.suppress(OSError):
                watchers.conn.send("exit")
            watchers.join()
        sampler.stop()
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=180.0,
        help="length of each run, quiet and abuse, split into --rounds windows",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="windows per run, taken alternately: quiet 1, abuse 1, quiet 2, ... (1: one quiet "
        f"run, then one abuse run); with the slow attack each window (--seconds / --rounds) is at "
        f"least {MIN_WINDOW_S:g} s, as its clients stall {SLOW_STALL_S:g} s before they look "
        "whether they were cut",
    )
    parser.add_argument("--clients", type=int, default=8, help="well-behaved clients")
    parser.add_argument("--symbols", default=SYMBOLS, help="the well-behaved clients' symbols")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="wait after each abuse window before its end figures",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the abuse rates")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help=f"which attacks, of {','.join(ATTACKS)}"
    )
    parser.add_argument(
        "--abuse-warmup",
        type=float,
        default=20.0,
        help="seconds of abuse before the first quiet window, to warm its figures (0: none)",
    )
    parser.add_argument("--no-pin", action="store_true", help="let the OS place the processes")
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    window = args.seconds / args.rounds
    if "slow" in args.attacks.split(",") and window < MIN_WINDOW_S:
        parser.error(
            f"windows of {window:g} s (--seconds {args.seconds:g} / --rounds {args.rounds}) are "
            f"too short for the slow attack: its clients stall {SLOW_STALL_S:g} s, then read up "
            f"to {SLOW_READ_S:g} s before their outcome is known, so a window needs at least "
            f"{MIN_WINDOW_S:g} s; use a larger --seconds, fewer --rounds, or --attacks without slow"
        )
    return args


if __name__ == "__main__":
    raise_nofile()
    run(parse_args())
