"""Revoking users, passwords, entitlements and sessions, against the started service.

The operator's actions go through the ``caspian`` command, as an operator runs them on the
store of a running server; clients see the outcome over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cli import ok
from tests.support.client import Message, StreamClient
from tests.support.service import RunningService, start_service

RECHECK_S = 0.3
#: A re-check round, with room for a loaded machine.
WITHIN_S = RECHECK_S + 3
GEMINI = "FX-BTC/USD=GEMINI"
BITMEX = "PERP-BTC/USD=BITMEX"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("revocation") / "data"


@pytest.fixture(scope="module")
def running(data_dir: Path) -> Iterator[RunningService]:
    service = start_service(data_dir, recheck_s=RECHECK_S, simulator_rate=50.0)
    yield service
    service.stop()


def caspian(data_dir: Path, *args: str, stdin: str | None = None) -> str:
    return ok(data_dir, *args, stdin=stdin).strip()


def login(running: RunningService, type_: str, payload: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{running.base_url}/v1/auth/authenticate",
        json={"type": type_, "payload": payload},
        timeout=30,
    )


def credential(running: RunningService, user: str, password: str) -> httpx.Response:
    return login(running, "Credential", {"user": user, "pass": password})


def key_login(running: RunningService, key: dict[str, str]) -> httpx.Response:
    return login(running, "Key", key)


def token_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["accessToken"])


def exchanges(running: RunningService, token: str) -> httpx.Response:
    """A REST call that needs the token."""
    return httpx.get(
        f"{running.base_url}/v1/reference/exchanges",
        headers={"Authorization": token},
        timeout=30,
    )


def new_user(data_dir: Path, name: str, password: str) -> dict[str, str]:
    """A Credential login and a key of the same user; the key's login payload."""
    caspian(data_dir, "users", "create", name, "--password-stdin", stdin=f"{password}\n")
    key: dict[str, str] = json.loads(caspian(data_dir, "keys", "create", "--user", name, "--json"))
    return key


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(function, *args, **kwargs)


async def still_served(client: StreamClient) -> None:
    request_id = await client.subscribe("FX-ETH/USD=GEMINI")
    await client.wait_for(lambda m: m["type"] == "Level1" and m["requestId"] == request_id)
    done = await client.send("Unsubscribe", {"subscribeRequestId": request_id})
    assert (await client.response(done))["payload"]["code"] == 300


async def refused_at_connect(running: RunningService, token: str) -> int | None:
    client = await StreamClient.open(running.stream_url, token)
    return await client.closed_with(within=WITHIN_S)


async def test_a_disabled_user_is_locked_out_everywhere_until_enabled(
    running: RunningService, data_dir: Path
) -> None:
    key = await in_thread(new_user, data_dir, "dora", "pw")
    by_password = token_of(await in_thread(credential, running, "dora", "pw"))
    by_key = token_of(await in_thread(key_login, running, key))
    streams = [await StreamClient.open(running.stream_url, t) for t in (by_password, by_key)]
    for stream in streams:
        await stream.subscribe(GEMINI, conflation="None")
    other = await StreamClient.open(running.stream_url, await in_thread(running.token, "olga"))
    await other.subscribe(GEMINI, conflation="None")

    assert await in_thread(caspian, data_dir, "users", "disable", "dora") == "disabled dora"
    # REST refuses the user's tokens at once.
    for token in (by_password, by_key):
        response = await in_thread(exchanges, running, token)
        assert response.status_code == 401
        assert response.json() == {
            "code": 401,
            "message": "Supplied token is not valid: the user is disabled",
        }
    # Logins answer as for wrong credentials, and count as failed ones.
    assert (await in_thread(credential, running, "dora", "pw")).status_code == 401
    assert (await in_thread(key_login, running, key)).status_code == 401
    # Open streams close within a re-check round; new ones are refused.
    for stream in streams:
        assert await asyncio.wait_for(stream.closed_with(), WITHIN_S) == 3001
    assert await refused_at_connect(running, by_password) == 3001
    await still_served(other)

    assert await in_thread(caspian, data_dir, "users", "enable", "dora") == "enabled dora"
    # The tokens of before the disabling stay dead: enabling brings none of them back.
    response = await in_thread(exchanges, running, by_key)
    assert response.json()["message"] == "Supplied token is not valid: it was revoked"
    assert await refused_at_connect(running, by_password) == 3001
    fresh = token_of(await in_thread(credential, running, "dora", "pw"))
    assert (await in_thread(exchanges, running, fresh)).status_code == 200
    client = await StreamClient.open(
        running.stream_url, token_of(await in_thread(key_login, running, key))
    )
    await still_served(client)
    await client.close()
    await other.close()


async def test_a_new_password_ends_every_token_of_the_user(
    running: RunningService, data_dir: Path
) -> None:
    key = await in_thread(new_user, data_dir, "pete", "old")
    old = token_of(await in_thread(credential, running, "pete", "old"))
    by_key = token_of(await in_thread(key_login, running, key))
    stream = await StreamClient.open(running.stream_url, old)
    await stream.subscribe(GEMINI, conflation="None")

    changed = await in_thread(
        caspian, data_dir, "users", "passwd", "pete", "--password-stdin", stdin="new\n"
    )
    assert changed == "changed the password of pete"
    for token in (old, by_key):
        assert (await in_thread(exchanges, running, token)).status_code == 401
    assert (await in_thread(credential, running, "pete", "old")).status_code == 401
    assert await asyncio.wait_for(stream.closed_with(), WITHIN_S) == 3001

    # A login right after the change works: its token is newer than the change.
    new = token_of(await in_thread(credential, running, "pete", "new"))
    assert (await in_thread(exchanges, running, new)).status_code == 200
    client = await StreamClient.open(running.stream_url, new)
    await still_served(client)
    # The key itself still works; only its token of before the change was ended.
    again = token_of(await in_thread(key_login, running, key))
    assert (await in_thread(exchanges, running, again)).status_code == 200
    await client.close()


async def read_until(
    client: StreamClient, done: Callable[[list[Message]], bool], within: float
) -> list[Message]:
    """Everything the client receives until ``done`` accepts what came so far."""
    seen: list[Message] = []
    deadline = time.monotonic() + within
    while not done(seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not done after {within} s: {seen[-5:]}")
        seen.append(await client.recv(remaining))
    return seen


def answered_205(request_id: str) -> Callable[[Message], bool]:
    def matches(message: Message) -> bool:
        return (
            message.get("requestId") == request_id
            and message["type"] == "SubscribeResponse"
            and message["payload"]["code"] == 205
        )

    return matches


async def test_a_revoked_exchange_ends_the_users_subscriptions_to_it(
    running: RunningService, data_dir: Path
) -> None:
    client = await StreamClient.open(running.stream_url, await in_thread(running.token, "rita"))
    gemini = await client.subscribe(GEMINI, conflation="None")
    bitmex = await client.subscribe(BITMEX, conflation="None")
    depth = await client.subscribe(BITMEX, "Level2", conflation="None")
    await client.wait_for(lambda m: m["type"] == "Level1" and m["requestId"] == bitmex)

    revoked = await in_thread(caspian, data_dir, "users", "revoke", "rita", "BITMEX")
    assert revoked.startswith("rita: ") and "BITMEX" not in revoked
    ended = {bitmex: answered_205(bitmex), depth: answered_205(depth)}
    seen = await read_until(
        client, lambda got: all(any(map(m, got)) for m in ended.values()), WITHIN_S
    )
    for request_id, matches in ended.items():
        [answer] = [message for message in seen if matches(message)]
        assert answer["payload"]["message"] == (
            "Not authorized: the entitlement to BITMEX was revoked"
        )
        # Nothing of the subscription follows its 205.
        assert all(m.get("requestId") != request_id for m in seen[seen.index(answer) + 1 :])
    # The other subscription goes on, and the ended ones stay ended.
    later = await read_until(
        client, lambda got: sum(m["requestId"] == gemini for m in got) >= 3, 10
    )
    assert {message["requestId"] for message in later} == {gemini}
    retry = await client.send("Subscribe", {"symbol": BITMEX, "type": "Level1"})
    assert (await client.response(retry))["payload"]["code"] == 205

    assert await in_thread(caspian, data_dir, "users", "revoke", "rita", "--all") == "rita: none"
    await read_until(client, lambda got: any(map(answered_205(gemini), got)), WITHIN_S)
    # The connection itself stays open: granting back makes Subscribes work again.
    assert await in_thread(caspian, data_dir, "users", "grant", "rita", "--all") == "rita: ALL"
    await asyncio.sleep(RECHECK_S * 3)
    await still_served(client)
    await client.close()


async def test_an_ended_sessions_token_opens_no_stream_again(
    running: RunningService, data_dir: Path
) -> None:
    key = await in_thread(new_user, data_dir, "sean", "pw")
    token = token_of(await in_thread(key_login, running, key))
    client = await StreamClient.open(running.stream_url, token)
    await client.subscribe(GEMINI, conflation="None")
    host, port = client.ws.local_address[:2]

    def session_id() -> str | None:
        rows = json.loads(caspian(data_dir, "sessions", "list", "--json"))
        mine = [row["id"] for row in rows if row["peer"] == f"{host}:{port}"]
        return str(mine[0]) if mine else None

    deadline = time.monotonic() + 15
    while (listed := await in_thread(session_id)) is None:
        assert time.monotonic() < deadline, "the session was never registered"
        await asyncio.sleep(0.1)

    assert await in_thread(caspian, data_dir, "sessions", "end", listed) == f"ended {listed}"
    assert await asyncio.wait_for(client.closed_with(), WITHIN_S) == 3003
    # The same token neither reconnects nor answers on REST: the client must log in anew.
    assert await refused_at_connect(running, token) == 3001
    response = await in_thread(exchanges, running, token)
    assert response.status_code == 401
    assert response.json()["message"] == (
        "Supplied token is not valid: its session was ended on the server"
    )
    fresh = await StreamClient.open(
        running.stream_url, token_of(await in_thread(key_login, running, key))
    )
    await still_served(fresh)
    await fresh.close()
