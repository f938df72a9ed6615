"""Load generator and harness shared by the stream benchmarks.

The clients must cost less per message than the server they measure, so a
client here is an ``asyncio.Protocol`` with a hand-written frame reader:
server frames are unmasked, the reader walks their headers and counts text
frames, and parses the JSON of only one frame in ``sample_every`` (for
latency). Connections are spread over worker processes driven through pipes
by the benchmark script, which reads the server's CPU time and memory from
``/proc`` around the same windows.

A few connections can be probes: they read their socket with ``recvmsg`` and
the kernel's receive timestamp (``SO_TIMESTAMPNS``), which tells when a
message reached the client machine's network stack, however late the client
process got round to reading it. Their latency is kept apart ("arrival");
that of the others is taken when the client process reads ("read").

Both servers send every message as one frame, so text frames are messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import orjson

from caspian.timefmt import parse_us

BENCH_DIR = Path(__file__).resolve().parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_OPEN_CONCURRENCY = 100
#: Linux's ``SO_TIMESTAMPNS`` (also its control-message type); Python does not name it.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
_RECV_BYTES = 1 << 18


# -- process set-up ------------------------------------------------------------


def raise_nofile() -> int:
    """Raise the open-files limit to the hard limit; thousands of sockets need it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True)
class Placement:
    """Where a process runs: its CPUs (None: any) and its nice value (0: unchanged)."""

    cpus: frozenset[int] | None = None
    nice: int = 0

    def apply(self, pid: int = 0) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(pid, self.cpus)
        if self.nice:
            os.setpriority(os.PRIO_PROCESS, pid, self.nice)


def placements(pin: bool, nice: int) -> tuple[Placement, Placement]:
    """Server and client placements: the first core for the server, the rest for the clients.

    Pinning keeps the load generator from stealing the server's core, which
    would make the server's throughput depend on the scheduler; a negative
    nice value makes other jobs of a shared machine disturb both less.
    """
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return Placement(None, nice), Placement(None, nice)
    return Placement(frozenset(cores[:1]), nice), Placement(frozenset(cores[1:]), nice)


def busy_cpu_seconds(cpus: Iterable[int] | None = None) -> float:
    """CPU time the given cores (default: all) spent busy, whoever used it.

    Compared with the server's and the clients' own CPU time over a window,
    it shows how much other jobs of a shared machine took meanwhile. On the
    server's own core it also counts the loopback network work the kernel
    does in softirq context, which is charged to no process.
    """
    names = {"cpu"} if cpus is None else {f"cpu{cpu}" for cpu in cpus}
    busy = 0
    with open("/proc/stat") as stat:
        for line in stat:
            fields = line.split()
            if fields and fields[0] in names:
                values = [int(value) for value in fields[1:9]]
                busy += sum(values) - values[3] - values[4]  # not idle, not iowait
    return busy / _CLK_TCK


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"nproc {os.cpu_count()}, {model}, Python {platform.python_version()}"


# -- servers under test --------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, every thread included."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces; the fields after it do not.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Server:
    """A server subprocess, its stream URL and its ``/proc`` figures."""

    name: str
    process: subprocess.Popen[bytes]
    stream_url: str
    rest_url: str | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the server process, every thread included."""
        return process_cpu_seconds(self.pid)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS from ``status`` and Rss/Pss from ``smaps_rollup``, in KiB."""
        figures: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    figures["VmRSS"] = int(line.split()[1])
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/smaps_rollup") as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    figures[key] = int(rest.split()[0])
        return figures

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_line(process: subprocess.Popen[bytes], out: Path, prefix: str, name: str) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = out.read_text() if out.exists() else ""
        for line in text.splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    errors = (out.parent / "stderr").read_text(errors="replace").strip().splitlines()
    raise RuntimeError(f"{name} did not start:\n" + "\n".join(errors[-20:]))


def caspian_command() -> list[str]:
    script = Path(sys.executable).with_name("caspian")
    found = str(script) if script.exists() else shutil.which("caspian")
    if found is None:
        raise RuntimeError("the caspian command is not installed: pip install -e .")
    return [found]


def caspian_env(data_dir: Path, rate: float) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CASPIAN_DATA_DIR=str(data_dir),
        CASPIAN_PORT="0",
        CASPIAN_HOST="127.0.0.1",
        CASPIAN_SIMULATOR_RATE=str(rate),
        CASPIAN_MAINTENANCE="off",
        CASPIAN_LOG_LEVEL="warning",
    )
    return env


#: Every load-generating client is one key from 127.0.0.1: the limits that keep
#: one hostile key or address from taking the server would refuse them.
MANY_CLIENTS = {
    "CASPIAN_MAX_STREAMS_PER_PRINCIPAL": "1000000",
    "CASPIAN_MAX_CONNECTIONS_PER_ADDRESS": "1000000",
    "CASPIAN_MAX_MESSAGES_PER_S_PER_PRINCIPAL": "1000000",
    "CASPIAN_MAX_MESSAGE_BURST_PER_PRINCIPAL": "1000000",
}


def launch(
    command: list[str], run: Path, placement: Placement, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(run / "stdout", "wb") as stdout, open(run / "stderr", "wb") as stderr:
        # Placed before exec, so that every thread the server starts inherits it.
        return subprocess.Popen(
            command,
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            preexec_fn=placement.apply,
        )


def start_caspian(
    data_dir: Path,
    rate: float,
    placement: Placement,
    role: str = "serve",
    extra_env: Mapping[str, str] | None = None,
) -> Server:
    """``caspian serve`` with the simulator as source, on a free port.

    ``role`` may also be ``gateway`` (clients fed by the bus ``extra_env`` names).
    """
    run = Path(tempfile.mkdtemp(prefix=f"{role}-", dir=data_dir))
    out = run / "stdout"
    env = caspian_env(data_dir, rate) | MANY_CLIENTS | dict(extra_env or {})
    process = launch([*caspian_command(), role], run, placement, env)
    rest = wait_for_line(process, out, "Caspian REST API:", f"caspian {role}")
    stream = wait_for_line(process, out, "Caspian stream:", f"caspian {role}")
    return Server("caspian" if role == "serve" else role, process, stream, rest)


@dataclass(frozen=True)
class ProductArgs:
    """What the naive server needs to simulate a symbol exactly as ours does."""

    symbol: str
    tick: str
    lot: str


def start_naive(
    products: Sequence[ProductArgs],
    rate: float,
    seed: int,
    placement: Placement,
    work_dir: Path,
) -> Server:
    run = Path(tempfile.mkdtemp(prefix="naive-", dir=work_dir))
    out = run / "stdout"
    args = [sys.executable, str(BENCH_DIR / "naive_server.py"), "--rate", str(rate)]
    args += ["--seed", str(seed)]
    for product in products:
        args += ["--product", product.symbol, product.tick, product.lot]
    process = launch(args, run, placement)
    stream = wait_for_line(process, out, "naive stream:", "naive server")
    return Server("naive", process, stream, None)


def create_key(data_dir: Path) -> dict[str, str]:
    done = subprocess.run(
        [*caspian_command(), "keys", "create", "--user", "bench", "--json"],
        env=caspian_env(data_dir, 1.0),
        capture_output=True,
        check=True,
    )
    key: dict[str, str] = json.loads(done.stdout)
    return key


def _rest(url: str, body: Any = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", token)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def authenticate(rest_url: str, key: dict[str, str]) -> str:
    answer = _rest(f"{rest_url}/auth/authenticate", {"type": "Key", "payload": key})
    token: str = answer["accessToken"]
    return token


def product_args(rest_url: str, token: str, symbols: Iterable[str]) -> list[ProductArgs]:
    """Tick and lot of each symbol from our catalog, so both servers simulate the same market.

    The simulator's tick is the product's smallest tick: the last field of
    each ``from,to,tick`` range of ``tickRule``.
    """
    found = []
    for symbol in symbols:
        quoted = urllib.parse.quote(symbol, safe="")
        product = _rest(f"{rest_url}/reference/products/{quoted}", token=token)
        ticks = [rule.split(",")[-1] for rule in product["tickRule"].split(";")]
        found.append(ProductArgs(symbol, min(ticks, key=float), product["lotSize"]))
    return found


# -- the client ----------------------------------------------------------------


@dataclass
class _Stats:
    """One worker's counters, shared by its connections."""

    frames: int = 0
    bytes: int = 0
    next_sample: int = 0
    sample_every: int = 0  # 0: not sampling
    latencies_us: list[int] = field(default_factory=list)
    #: Probes' latencies to the kernel's receive timestamp.
    arrivals_us: list[int] = field(default_factory=list)
    sampled_types: dict[str, int] = field(default_factory=dict)
    closes: dict[int, int] = field(default_factory=dict)
    lost: int = 0
    subscribe_errors: dict[str, int] = field(default_factory=dict)


def _mask(opcode: int, payload: bytes) -> bytes:
    """A client frame: RFC 6455 requires clients to mask what they send."""
    key = os.urandom(4)
    length = len(payload)
    repeated = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    else:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    return header + key + masked


def _sent_at_us(message: dict[str, Any]) -> int | None:
    """When the update's newest content reached the server.

    A Level1 update caused by a trade still carries the BBO time of an earlier
    event, so Level1 takes the later of its BBO and trade times.
    """
    if message.get("type") == "Level2":
        stamp = message.get("caspianTimestamp")
        return parse_us(stamp) if stamp else None
    payload = message.get("payload") or {}
    stamps = [payload.get("bboCaspianTimestamp"), payload.get("tradeCaspianTimestamp")]
    parsed = [parse_us(stamp) for stamp in stamps if stamp]
    return max(parsed) if parsed else None


class _Client(asyncio.Protocol):
    #: Probes stamp what they read with the kernel's receive time.
    probe = False

    def __init__(
        self, stats: _Stats, request: bytes, subscribes: list[bytes], ready: asyncio.Future[bool]
    ) -> None:
        self._stats = stats
        self._request = request
        self._subscribes = subscribes
        self._pending = len(subscribes)
        self._ready = ready
        self._transport: asyncio.Transport | None = None
        self._open = False
        self._buffer = b""
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence no isinstance.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.closing:
            self._stats.lost += 1
        if not self._ready.done():
            self._ready.set_result(False)

    def close(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._receive(data, time.time_ns() // 1000)

    def _receive(self, data: bytes, now_us: int) -> None:
        """Walk the frames of ``data``, which the client got at ``now_us``."""
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos = 0
        if not self._open:
            end_of_headers = data.find(b"\r\n\r\n")
            if end_of_headers < 0:
                self._buffer = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                status = data[: data.find(b"\r\n")].decode(errors="replace")
                self._failed(status)
                return
            self._open = True
            assert self._transport is not None
            self._transport.write(b"".join(self._subscribes))
            pos = end_of_headers + 4
        stats = self._stats
        end = len(data)
        count = 0
        # The frame number (within this call) of the next frame to sample.
        due = stats.next_sample - stats.frames if stats.sample_every else -1
        while end - pos >= 2:
            length = data[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126:
                start = pos + 4
                if start > end:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
            else:
                start = pos + 10
                if start > end:
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
            stop = start + length
            if stop > end:
                break
            opcode = data[pos] & 0x0F
            if opcode == 1:
                count += 1
                if self._pending:
                    self._subscribed(data[start:stop])
                elif count == due:
                    # The worker's connections share one sampling sequence; a sample
                    # that falls on a probe measures arrival instead of reading.
                    stats.next_sample += stats.sample_every
                    due = stats.next_sample - stats.frames
                    into = stats.arrivals_us if self.probe else stats.latencies_us
                    self._record(data[start:stop], now_us, into)
            elif opcode == 9:
                assert self._transport is not None
                self._transport.write(_mask(0xA, data[start:stop]))
            elif opcode == 8:
                code = int.from_bytes(data[start : start + 2], "big") if length >= 2 else 1005
                stats.closes[code] = stats.closes.get(code, 0) + 1
                self.close()
                return
            pos = stop
        stats.frames += count
        stats.bytes += pos
        if pos < end:
            self._buffer = data[pos:]

    def _record(self, payload: bytes, now_us: int, into: list[int]) -> None:
        message = orjson.loads(payload)
        sent = _sent_at_us(message)
        if sent is not None:
            into.append(now_us - sent)
            kind = str(message.get("type"))
            types = self._stats.sampled_types
            types[kind] = types.get(kind, 0) + 1

    def _subscribed(self, payload: bytes) -> None:
        message = orjson.loads(payload)
        if message.get("type") != "SubscribeResponse":
            return
        self._pending -= 1
        code = message.get("payload", {}).get("code")
        if code != 200:
            self._failed(f"SubscribeResponse {code}")
        elif not self._pending and not self._ready.done():
            self._ready.set_result(True)

    def _failed(self, why: str) -> None:
        errors = self._stats.subscribe_errors
        errors[why] = errors.get(why, 0) + 1
        if not self._ready.done():
            self._ready.set_result(False)
        self.close()


class _Probe(_Client):
    """A client on a raw socket, read with ``recvmsg`` for the kernel's receive time.

    It is its own transport: the little it writes (handshake, Subscribes,
    pongs) goes straight to the socket.
    """

    probe = True

    def attach(self, sock: socket.socket) -> None:
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self.connection_made(cast(asyncio.Transport, self))

    def write(self, data: bytes) -> None:
        # Small writes on an idle socket: the send buffer takes them whole.
        self._sock.sendall(data)

    def abort(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self.connection_lost(None)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(_RECV_BYTES, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.abort()
            return
        stamp = time.time_ns() // 1000
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                stamp = seconds * 1_000_000 + nanoseconds // 1000
        self._receive(data, stamp)


async def _connect_probe(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _upgrade_request(url: str) -> tuple[str, int, bytes]:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return host, port, request.encode()


class _Worker:
    """One client process: many connections, driven by commands from a pipe."""

    def __init__(self, pipe: Connection) -> None:
        self._pipe = pipe
        self._stats = _Stats()
        self._clients: list[_Client] = []
        self._window_start = (0.0, 0.0)
        self._done: asyncio.Future[None] | None = None
        self._busy: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        loop.add_reader(self._pipe.fileno(), self._command)
        await self._done

    def _command(self) -> None:
        name, *args = self._pipe.recv()
        # uvloop's add_reader made the pipe non-blocking; an answer larger
        # than the socket buffer (many latency samples) must still go out whole.
        os.set_blocking(self._pipe.fileno(), True)
        if name == "open":
            task = asyncio.get_running_loop().create_task(self._open(*args))
            self._busy.add(task)
            task.add_done_callback(self._busy.discard)
        elif name == "start":
            self._start(*args)
        elif name == "stop":
            self._pipe.send(self._stop())
        elif name == "close":
            self._close()
            self._pipe.send("closed")
        elif name == "exit":
            self._close()
            assert self._done is not None
            self._done.set_result(None)

    async def _open(
        self, url: str, count: int, subscriptions: list[dict[str, Any]], probe_every: int
    ) -> None:
        loop = asyncio.get_running_loop()
        self._stats.subscribe_errors = {}
        gate = asyncio.Semaphore(_OPEN_CONCURRENCY)
        began = time.monotonic()

        async def one(index: int) -> bool:
            async with gate:
                host, port, request = _upgrade_request(url)
                subscribes = [
                    _mask(
                        0x1,
                        orjson.dumps(
                            {"requestId": str(uuid.uuid4()), "type": "Subscribe", "payload": sub}
                        ),
                    )
                    for sub in subscriptions
                ]
                ready: asyncio.Future[bool] = loop.create_future()
                client: _Client
                try:
                    if probe_every and index % probe_every == 0:
                        sock = await _connect_probe(host, port)
                        probe = _Probe(self._stats, request, subscribes, ready)
                        probe.attach(sock)
                        client = probe
                    else:
                        _, client = await loop.create_connection(
                            lambda: _Client(self._stats, request, subscribes, ready), host, port
                        )
                except OSError as exc:
                    errors = self._stats.subscribe_errors
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return False
                self._clients.append(client)
                try:
                    return await asyncio.wait_for(ready, 60)
                except TimeoutError:
                    return False

        results = await asyncio.gather(*(one(index) for index in range(count)))
        os.set_blocking(self._pipe.fileno(), True)
        self._pipe.send(
            {
                "opened": sum(results),
                "errors": dict(self._stats.subscribe_errors),
                "seconds": time.monotonic() - began,
            }
        )

    def _start(self, sample_every: int) -> None:
        stats = self._stats
        stats.frames = stats.bytes = stats.lost = 0
        stats.latencies_us = []
        stats.arrivals_us = []
        stats.sampled_types = {}
        stats.closes = {}
        stats.sample_every = sample_every
        stats.next_sample = sample_every
        times = os.times()
        self._window_start = (time.monotonic(), times.user + times.system)

    def _stop(self) -> dict[str, Any]:
        stats = self._stats
        times = os.times()
        began, cpu = self._window_start
        stats.sample_every = 0
        return {
            "frames": stats.frames,
            "bytes": stats.bytes,
            "latencies_us": stats.latencies_us,
            "arrivals_us": stats.arrivals_us,
            "sampled_types": stats.sampled_types,
            "closes": stats.closes,
            "lost": stats.lost,
            "seconds": time.monotonic() - began,
            "cpu_s": times.user + times.system - cpu,
        }

    def _close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients = []


def _worker_main(pipe: Connection, placement: Placement) -> None:
    raise_nofile()
    placement.apply()
    # The parent's Ctrl-C is for the parent: it shuts the workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_Worker(pipe).run())
    else:
        uvloop.run(_Worker(pipe).run())


@dataclass
class Window:
    """What all clients received during one measurement window."""

    frames: int
    bytes: int
    seconds: float
    latencies_us: list[int]
    #: Of the probes, to the kernel's receive time.
    arrivals_us: list[int]
    sampled_types: dict[str, int]
    closes: dict[int, int]
    lost: int
    client_cpu_s: float


class ClientPool:
    """Client worker processes, each holding an even share of the connections."""

    def __init__(self, processes: int, placement: Placement) -> None:
        context = multiprocessing.get_context("fork")
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(child, placement), daemon=True)
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    def _gather(self, timeout: float) -> list[Any]:
        answers = []
        for pipe in self._pipes:
            if not pipe.poll(timeout):
                raise RuntimeError("a client worker did not answer")
            answers.append(pipe.recv())
        return answers

    def open(
        self,
        url: str,
        count: int,
        subscriptions: list[dict[str, Any]],
        probe_every: int = 0,
        timeout: float = 300,
    ) -> dict[str, Any]:
        """Open ``count`` connections, each sending ``subscriptions``; wait for every answer.

        One in ``probe_every`` of each worker's connections is a probe (0: none).
        """
        shares = [count // len(self._pipes)] * len(self._pipes)
        for index in range(count % len(self._pipes)):
            shares[index] += 1
        for pipe, share in zip(self._pipes, shares, strict=True):
            pipe.send(("open", url, share, subscriptions, probe_every))
        answers = self._gather(timeout)
        errors: dict[str, int] = {}
        for answer in answers:
            for why, times in answer["errors"].items():
                errors[why] = errors.get(why, 0) + times
        return {
            "opened": sum(answer["opened"] for answer in answers),
            "errors": errors,
            "seconds": max(answer["seconds"] for answer in answers),
        }

    def start(self, sample_every: int) -> None:
        for pipe in self._pipes:
            pipe.send(("start", sample_every))

    def stop(self) -> Window:
        for pipe in self._pipes:
            pipe.send(("stop",))
        answers = self._gather(60)
        closes: dict[int, int] = {}
        types: dict[str, int] = {}
        for answer in answers:
            for code, times in answer["closes"].items():
                closes[code] = closes.get(code, 0) + times
            for kind, times in answer["sampled_types"].items():
                types[kind] = types.get(kind, 0) + times
        return Window(
            frames=sum(answer["frames"] for answer in answers),
            bytes=sum(answer["bytes"] for answer in answers),
            seconds=max(answer["seconds"] for answer in answers),
            latencies_us=[value for answer in answers for value in answer["latencies_us"]],
            arrivals_us=[value for answer in answers for value in answer["arrivals_us"]],
            sampled_types=types,
            closes=closes,
            lost=sum(answer["lost"] for answer in answers),
            client_cpu_s=sum(answer["cpu_s"] for answer in answers),
        )

    def close_connections(self) -> None:
        for pipe in self._pipes:
            pipe.send(("close",))
        self._gather(60)

    def shutdown(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a sample."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


#: The simulator seed both servers run, so they serve the same market.
SEED = 1


class BenchSetup:
    """What every benchmark here prepares: core placement, a data directory with an
    API key, client worker processes, and both servers on the same market."""

    def __init__(self, args: Any, name: str, symbols: Sequence[str]) -> None:
        self.args = args
        self.server_place, self.client_place = placements(not args.no_pin, args.nice)
        self.client_place.apply()
        self.work = Path(tempfile.mkdtemp(prefix=f"caspian-bench-{name}-"))
        self.data_dir = self.work / "data"
        self.data_dir.mkdir()
        self.pool = ClientPool(args.processes, self.client_place)
        self.key = create_key(self.data_dir)
        self.token = ""
        self.products: list[ProductArgs] = []
        self._symbols = list(symbols)

    def close(self) -> None:
        self.pool.shutdown()
        shutil.rmtree(self.work, ignore_errors=True)

    def caspian(self, rate: float) -> Server:
        server = start_caspian(self.data_dir, rate, self.server_place)
        if not self.token:
            assert server.rest_url is not None
            self.token = authenticate(server.rest_url, self.key)
            # Also checks that every symbol exists before anything is measured.
            self.products = product_args(server.rest_url, self.token, self._symbols)
        return server

    def naive(self, rate: float) -> Server:
        return start_naive(self.products, rate, SEED, self.server_place, self.work)

    def open(
        self,
        server: Server,
        count: int,
        subscriptions: list[dict[str, Any]],
        probe_every: int = 0,
    ) -> float:
        """Open ``count`` subscribed connections, one in ``probe_every`` a probe; seconds taken."""
        url = f"{server.stream_url}?accessToken={self.token}"
        opened = self.pool.open(url, count, subscriptions, probe_every)
        if opened["opened"] != count:
            raise RuntimeError(
                f"{server.name}: only {opened['opened']} of {count} connections "
                f"subscribed: {opened['errors']}"
            )
        seconds: float = opened["seconds"]
        return seconds


def bench_main(parse_args: Callable[[], Any], run: Callable[[Any], None]) -> None:
    """A benchmark's entry point: enough open files for its connections, then the run."""
    limit = raise_nofile()
    arguments = parse_args()
    if arguments.connections + 100 > limit:
        raise SystemExit(f"the open-files limit {limit} is too low for {arguments.connections}")
    run(arguments)
