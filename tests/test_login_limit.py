"""The failed-login limit against the started service, attacked as issue 9 found it:
guesses sent in parallel, and guesses meant to lock the owner out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cli import fails
from tests.support.service import RunningService, start_service

#: A second loopback address: on Linux all of 127.0.0.0/8 reaches the service on
#: 127.0.0.1, so a client bound here is another TCP peer.
OTHER_ADDRESS = "127.0.0.2"


@pytest.fixture
def running(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningService]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    service = start_service(tmp_path, auth_max_failures=5, auth_window_s=60.0, **overrides)
    yield service
    service.stop()


def key_login(key_id: str, secret: str) -> dict[str, Any]:
    return {"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}}


def login(
    service: RunningService,
    body: dict[str, Any],
    source: str | None = None,
    forwarded_for: str | None = None,
) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source) if source else None
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    with httpx.Client(transport=transport, timeout=60) as client:
        return client.post(f"{service.base_url}/v1/auth/authenticate", json=body, headers=headers)


def login_in_parallel(
    service: RunningService, body: dict[str, Any], count: int, forwarded_for: str | None = None
) -> list[httpx.Response]:
    """``count`` logins sent at once, each on a connection of its own."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            url = f"{service.base_url}/v1/auth/authenticate"
            return await asyncio.gather(
                *(client.post(url, json=body, headers=headers) for _ in range(count))
            )

    return asyncio.run(send_all())


def assert_limited(responses: list[httpx.Response], allowed: int) -> None:
    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(401) == allowed, statuses
    assert statuses.count(429) == len(responses) - allowed, statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["code"] == 429


def test_parallel_wrong_secrets_are_limited_like_serial_ones(running: RunningService) -> None:
    key_id, secret = running.key("frank")
    wrong = key_login(key_id, "wrong" * 9)
    assert_limited(login_in_parallel(running, wrong, 100), allowed=5)
    # Once they are settled the lock is the window's, and binds the right secret too
    # from this address...
    locked = login(running, key_login(key_id, secret))
    assert locked.status_code == 429
    assert 50 <= int(locked.headers["Retry-After"]) <= 60
    # ...but not from an address that did not fail: the owner keeps the key.
    assert login(running, key_login(key_id, secret), source=OTHER_ADDRESS).status_code == 200


def test_parallel_wrong_passwords_are_limited(running: RunningService) -> None:
    running.call(running.listening.service.store.create_user("grace", "right-password-1"))
    wrong = {"type": "Credential", "payload": {"user": "grace", "pass": "wrong"}}
    assert_limited(login_in_parallel(running, wrong, 40), allowed=5)
    right = {"type": "Credential", "payload": {"user": "grace", "pass": "right-password-1"}}
    assert login(running, right).status_code == 429
    assert login(running, right, source=OTHER_ADDRESS).status_code == 200


def test_forwarded_for_from_an_untrusted_peer_is_ignored(running: RunningService) -> None:
    key_id, secret = running.key("heidi")
    # Each guess claims another address; the peer is the same, and it is the one counted.
    for number in range(5):
        response = login(running, key_login(key_id, "x" * 43), forwarded_for=f"10.0.0.{number}")
        assert response.status_code == 401
    spoofed = login(running, key_login(key_id, secret), forwarded_for="10.9.9.9")
    assert spoofed.status_code == 429
    # Nor can the header put the lock on someone else's address.
    assert login(running, key_login(key_id, secret), source=OTHER_ADDRESS).status_code == 200


@pytest.mark.parametrize("running", [{"trusted_proxies": ["127.0.0.1/32"]}], indirect=True)
def test_behind_a_trusted_proxy_each_client_is_counted_apart(running: RunningService) -> None:
    key_id, secret = running.key("ivan")
    wrong = key_login(key_id, "y" * 43)
    assert_limited(login_in_parallel(running, wrong, 30, forwarded_for="203.0.113.9"), 5)
    assert login(running, key_login(key_id, secret), forwarded_for="203.0.113.9").status_code == 429
    # Whatever the attacker writes before the proxy's own entry is not believed.
    forged = login(running, key_login(key_id, secret), forwarded_for="198.51.100.7, 203.0.113.9")
    assert forged.status_code == 429
    # The owner, through the same proxy from another address, logs in.
    owner = login(running, key_login(key_id, secret), forwarded_for="198.51.100.7")
    assert owner.status_code == 200
    # A peer outside the trusted proxies names only itself.
    direct = login(running, key_login(key_id, secret), OTHER_ADDRESS, forwarded_for="203.0.113.9")
    assert direct.status_code == 200


@pytest.mark.parametrize("value", ["10.0.0.0/33", "proxy.example.com", '["10.0.0.1"'])
def test_serve_refuses_an_invalid_trusted_proxy(data_dir: Path, value: str) -> None:
    line = fails(data_dir, "serve", timeout=30, CASPIAN_PORT="0", CASPIAN_TRUSTED_PROXIES=value)
    assert "trusted_proxies" in line
