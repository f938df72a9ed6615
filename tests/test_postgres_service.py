"""The service on a real PostgreSQL server: serving from it, and riding out its outage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.postgres import PostgresServer, running_server
from tests.support.service import RunningService, start_service

DATABASE_ERROR = {"code": 5001, "message": "Could not access the database"}


def authenticate(running: RunningService, type_: str, payload: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{running.base_url}/v1/auth/authenticate",
        json={"type": type_, "payload": payload},
        timeout=30,
    )


def key_login(running: RunningService, key_id: str, secret: str) -> httpx.Response:
    return authenticate(running, "Key", {"accessKeyID": key_id, "secretAccessKey": secret})


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.fixture
def outage_server() -> Iterator[PostgresServer]:
    # A server of its own: stopping the shared one would break other tests using it.
    with running_server() as server:
        yield server


def test_service_serves_from_postgres(
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    url = postgres_server.create_database(f"service_{uuid.uuid4().hex}")
    data_dir = tmp_path / "data"
    running = start_service(data_dir, database_url=url)
    try:
        # The operator's command reaches the same database through the same setting.
        env = {name: value for name, value in os.environ.items() if not name.startswith("CASPIAN_")}
        created = subprocess.run(
            [sys.executable, "-m", "caspian", "users", "create", "paula", "--password-stdin"],
            input="paula-pass\n",
            capture_output=True,
            text=True,
            env=env | {"CASPIAN_DATABASE_URL": url, "CASPIAN_DATA_DIR": str(data_dir)},
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        login = authenticate(running, "Credential", {"user": "paula", "pass": "paula-pass"})
        assert login.status_code == 200
        credential_token = login.json()["accessToken"]

        key_id, secret = running.key("quinn")
        token = key_login(running, key_id, secret).json()["accessToken"]
        for header in (token, credential_token):
            exchanges = httpx.get(
                f"{running.base_url}/v1/reference/exchanges",
                headers={"Authorization": header},
                timeout=30,
            )
            assert exchanges.status_code == 200
            assert len(exchanges.json()) == 22
        headers = {"Authorization": token}
        products = httpx.post(
            f"{running.base_url}/v1/reference/products",
            json={"exchanges": ["GEMINI", "DERIBIT"]},
            headers=headers,
            timeout=30,
        )
        assert products.status_code == 200
        assert {product["exchange"] for product in products.json()} == {"GEMINI", "DERIBIT"}
        one = httpx.get(
            f"{running.base_url}/v1/reference/products/FX-ETH/USD=GEMINI",
            headers=headers,
            timeout=30,
        )
        assert one.status_code == 200
        assert one.json()["nativeCode"] == "ethusd"
        # Everything came from PostgreSQL: no SQLite file was made beside the signing key.
        assert not (data_dir / "caspian.db").exists()
        assert (data_dir / "jwt-secret").exists()
    finally:
        running.stop()


def test_postgres_outage_answers_5001_and_recovers(
    outage_server: PostgresServer, tmp_path: Path
) -> None:
    running = start_service(tmp_path / "data", database_url=outage_server.url)
    try:
        key_id, secret = running.key("rita")
        running.call(running.listening.service.store.create_user("sam", "sam-pass"))
        token = key_login(running, key_id, secret).json()["accessToken"]
        headers = {"Authorization": token}
        exchanges_url = f"{running.base_url}/v1/reference/exchanges"
        product_url = f"{running.base_url}/v1/reference/products/FX-ETH/USD=GEMINI"
        # Fill the pool with connections the outage will kill.
        for _ in range(3):
            assert httpx.get(exchanges_url, headers=headers, timeout=30).status_code == 200

        outage_server.stop()
        requests = {
            "exchanges": lambda: httpx.get(exchanges_url, headers=headers, timeout=30),
            "key login": lambda: key_login(running, key_id, secret),
            "credential login": lambda: authenticate(
                running, "Credential", {"user": "sam", "pass": "sam-pass"}
            ),
            "product": lambda: httpx.get(product_url, headers=headers, timeout=30),
            "products": lambda: httpx.post(
                f"{running.base_url}/v1/reference/products",
                json={"exchanges": ["GEMINI"]},
                headers=headers,
                timeout=30,
            ),
        }
        for name, request in requests.items():
            response, took = timed(request)
            assert response.status_code == 500, (name, response.status_code, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert response.json() == DATABASE_ERROR, name
            assert took < 10, (name, took)
        # Asked again, still a quick and clean answer rather than a hang.
        response, took = timed(requests["exchanges"])
        assert response.json() == DATABASE_ERROR and took < 10

        outage_server.start()
        deadline = time.monotonic() + 15
        while True:
            response = httpx.get(exchanges_url, headers=headers, timeout=30)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert response.status_code == 200, response.text
        assert len(response.json()) == 22
        # The same service, the same store: old tokens and logins work again.
        assert key_login(running, key_id, secret).status_code == 200
        sam = authenticate(running, "Credential", {"user": "sam", "pass": "sam-pass"})
        assert sam.status_code == 200
        assert httpx.get(product_url, headers=headers, timeout=30).status_code == 200
        assert not running.errors
    finally:
        running.stop()
