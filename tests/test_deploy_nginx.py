"""The deployment guide's nginx configuration, run by Debian's nginx in front of two
gateways on loopback: a client logs in, reads REST and streams through it.

The configuration is read from ``docs/deploy.md`` itself, so the guide cannot drift
from what was tested; only its ports are changed to free ones.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.client import StreamClient
from tests.support.nats import NatsServer
from tests.support.ports import free_port
from tests.support.service import RunningService, start_service

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
SYMBOL = "FX-BTC/USD=GEMINI"


def nginx_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def guide_nginx_config() -> str:
    """The configuration the guide writes to nginx's conf.d."""
    [config] = re.findall(
        r"cat > /etc/nginx/conf\.d/caspian\.conf <<'EOF'\n(.*?\n)EOF\n",
        GUIDE.read_text(),
        flags=re.DOTALL,
    )
    assert "upstream caspian_gateways" in config
    return str(config)


def test_the_guide_names_the_ports_this_test_replaces() -> None:
    config = guide_nginx_config()
    for port in ("listen 8080;", "server 127.0.0.1:8081", "server 127.0.0.1:8082"):
        assert port in config


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[tuple[RunningService, RunningService]]:
    nats_server = NatsServer()
    nats_server.start()
    data_dir = tmp_path / "data"
    shared = {"bus": nats_server.url, "trusted_proxies": "127.0.0.1"}
    first = start_service(data_dir, **shared)
    second: RunningService | None = None
    try:
        second = start_service(data_dir, source="none", **shared)
        yield first, second
    finally:
        if second is not None:
            second.stop()
        first.stop()
        nats_server.stop()


def _port_of(running: RunningService) -> int:
    return int(running.base_url.rsplit(":", 1)[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.poll() is None, "nginx exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nginx did not listen")


def test_a_client_logs_in_and_streams_through_nginx(
    tmp_path: Path, gateways: tuple[RunningService, RunningService]
) -> None:
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip(
            "nginx not found (apt-get install nginx): the guide's nginx config is unchecked"
        )
    first, second = gateways
    port = free_port()
    config = (
        guide_nginx_config()
        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
        .replace("server 127.0.0.1:8081", f"server 127.0.0.1:{_port_of(first)}")
        .replace("server 127.0.0.1:8082", f"server 127.0.0.1:{_port_of(second)}")
    )
    root = tmp_path / "nginx"
    root.mkdir()
    (root / "caspian.conf").write_text(config)
    temp = " ".join(
        f"{kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi")
    )
    (root / "nginx.conf").write_text(
        # As root, nginx's workers would otherwise run as a user that cannot reach tmp_path.
        f"{'user root;' if os.geteuid() == 0 else ''}\n"
        f"daemon off;\nworker_processes 1;\npid {root / 'nginx.pid'};\n"
        f"error_log {root / 'error.log'} warn;\n"
        "events { worker_connections 256; }\n"
        f"http {{ access_log off; {temp} scgi_temp_path {root / 'scgi'};\n"
        f"include {root / 'caspian.conf'}; }}\n"
    )
    arguments = [nginx, "-p", str(root), "-e", str(root / "error.log"), "-c"]
    checked = subprocess.run(
        [*arguments, str(root / "nginx.conf"), "-t"], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([*arguments, str(root / "nginx.conf")])
    try:
        _wait_listening(port, process)
        base = f"http://127.0.0.1:{port}"
        key_id, secret = first.key("nina")
        login = httpx.post(
            f"{base}/v1/auth/authenticate",
            json={"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}},
            timeout=10,
        )
        assert login.status_code == 200, login.text
        token = login.json()["accessToken"]
        # Round robin: both gateways answer, and take the same token.
        for _ in range(4):
            exchanges = httpx.get(
                f"{base}/v1/reference/exchanges", headers={"Authorization": token}, timeout=10
            )
            assert exchanges.status_code == 200
            assert {"name": "Kraken", "code": "KRAKEN"} in exchanges.json()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "never ready behind nginx"
            time.sleep(0.2)

        async def stream() -> None:
            for _ in range(2):
                client = await StreamClient.open(f"ws://127.0.0.1:{port}/v1/stream", token)
                try:
                    await client.whole_book(SYMBOL)
                finally:
                    await client.close()

        asyncio.run(stream())
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
