"""``caspian ingest`` and ``caspian gateway``: the two sides of a cluster, as commands."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.support.cli import fails, ok
from tests.support.client import StreamClient
from tests.support.nats import NatsServer
from tests.support.running import Started

SYMBOL = "FX-BTC/USD=GEMINI"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_ingest_needs_a_nats_bus_and_a_source(data_dir: Path) -> None:
    line = fails(data_dir, "ingest", "--port", "0")
    assert line == "error: caspian ingest publishes to a NATS bus: set CASPIAN_BUS=nats://…"
    line = fails(
        data_dir, "ingest", "--port", "0", "--bus", "nats://127.0.0.1:1", "--source", "none"
    )
    assert line == "error: caspian ingest needs a source: CASPIAN_SOURCE must not be none"


def test_gateway_needs_a_nats_bus_and_takes_no_source(data_dir: Path) -> None:
    line = fails(data_dir, "gateway", "--port", "0")
    assert "needs a nats:// bus" in line
    # A source named in the environment is not the gateway's: it is fed by the bus.
    line = fails(data_dir, "gateway", "--port", "0", CASPIAN_SOURCE="simulator")
    assert "needs a nats:// bus" in line
    result = ok(data_dir, "gateway", "--help")
    assert "--bus" in result
    assert "--source" not in result
    assert "--replay-speed" not in result


def test_ingest_feeds_a_gateway_and_serves_only_health_and_metrics(
    data_dir: Path, nats_server: NatsServer
) -> None:
    created = json.loads(ok(data_dir, "keys", "create", "--user", "olga", "--json"))
    env = {"CASPIAN_BUS": nats_server.url, "CASPIAN_LOG_LEVEL": "warning"}
    ingest = Started(
        data_dir,
        "ingest",
        "--port",
        "0",
        labels=("Caspian ingest",),
        env=env | {"CASPIAN_RECHECK_S": "0.2"},
    )
    gateway: Started | None = None
    try:
        base = ingest.url("Caspian ingest")
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        # Ready once NATS is connected: the source is its own.
        deadline = time.monotonic() + 20
        while (ready := httpx.get(f"{base}/readyz", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert ready.json()["ready"] is True
        metrics = httpx.get(f"{base}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "caspian_stream_connections" in metrics.text
        refused = httpx.get(f"{base}/v1/reference/exchanges", timeout=10)
        assert refused.status_code == 404
        assert refused.json()["code"] == 404
        assert "ingest" in refused.json()["message"]
        login = httpx.post(
            f"{base}/v1/auth/authenticate",
            json={"type": "Key", "payload": created},
            timeout=10,
        )
        assert login.status_code == 404
        # It serves no client, so it takes no place in the cluster's session registry.
        time.sleep(1.0)
        with closing(sqlite3.connect(data_dir / "caspian.db")) as database:
            assert database.execute("SELECT count(*) FROM gateways").fetchone() == (0,)

        gateway = Started(
            data_dir,
            "gateway",
            "--port",
            "0",
            labels=("Caspian REST API", "Caspian stream"),
            env=env,
        )
        rest = gateway.url("Caspian REST API")
        login = httpx.post(
            f"{rest}/auth/authenticate", json={"type": "Key", "payload": created}, timeout=10
        )
        assert login.status_code == 200
        token = login.json()["accessToken"]

        async def stream() -> None:
            # The ingest has no stream: the upgrade is answered 404.
            with pytest.raises(InvalidStatus) as refused_stream:
                await StreamClient.open(f"{base.replace('http', 'ws')}/v1/stream", token)
            assert refused_stream.value.response.status_code == 404

            client = await StreamClient.open(gateway_stream, token)
            try:
                await client.whole_book(SYMBOL)
            finally:
                await client.close()

        gateway_stream = gateway.url("Caspian stream")
        asyncio.run(stream())
    finally:
        stopped = [gateway.stop() if gateway is not None else (0, 0.0), ingest.stop()]
    for (code, took), who in zip(stopped, (gateway, ingest), strict=True):
        assert code == 0, who.stderr if who is not None else ""
        assert took < 15
        assert who is None or "Traceback" not in who.stderr, who.stderr
