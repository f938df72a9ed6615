"""The store against real databases: a SQLite file, and a PostgreSQL server the tests start."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import caspian.store
from caspian.auth import hashing
from caspian.catalog.product import ProductSpec
from caspian.store import (
    KEY,
    USER,
    AlreadyExists,
    GatewayInfo,
    NotFound,
    Principal,
    SessionInfo,
    Store,
    StoreUnavailable,
)
from caspian.store import store as store_module
from caspian.store.models import Base
from tests.support.postgres import PostgresServer

TABLES = {
    "users",
    "entitlements",
    "api_keys",
    "exchanges",
    "products",
    "gateways",
    "stream_sessions",
    "ended_tokens",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database (a file in a directory yet to be created, for SQLite)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'caspian.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"test_{uuid.uuid4().hex}")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = Store(store_url)
    await store.upgrade()
    yield store
    await store.close()


async def raw_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Read the database behind the store's back."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text(sql))
            return [tuple(row) for row in result]
    finally:
        await engine.dispose()


async def raw_execute(url: str, sql: str) -> None:
    """Change the database behind the store's back."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


def product(code: str, exchange: str, **changes: Any) -> ProductSpec:
    base, quote = code.split("-", 1)[1].split("=")[0].split("/")
    fields: dict[str, Any] = {
        "exchange": exchange,
        "type": "FX",
        "caspian_code": code,
        "pseudo_code": f"{base}{quote}={exchange}",
        "tora_code": f"{base}{quote}",
        "tora_market": exchange,
        "native_code": f"{base}{quote}".lower(),
        "native_code_v2": f"{base}-{quote}",
        "ccy_from": base,
        "ccy_to": quote,
        "description": f"{base} - {quote} - FX pair",
        "lot_size": "0.000001",
        "tick_size": "0.01",
        "tick_rule": ",,0.01",
    }
    fields.update(changes)
    return ProductSpec(**fields)


# Schema


async def test_migrations_apply_from_empty_and_match_the_models(store_url: str) -> None:
    store = Store(store_url)
    try:
        await store.upgrade()
        await store.upgrade()
        await store.create_user("alice", None)
        await store.upgrade()
        assert [user.name for user in await store.list_users()] == ["alice"]
    finally:
        await store.close()

    assert await raw_rows(store_url, "SELECT version_num FROM alembic_version") == [("0003",)]

    def differences(connection: Connection) -> list[Any]:
        assert set(inspect(connection).get_table_names()) >= TABLES
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    engine = create_async_engine(store_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


def run(connection: Connection, action: Callable[[Config, str], None], target: str) -> None:
    """Run an Alembic command on the store's migrations over ``connection``."""
    config = Config()
    config.set_main_option(
        "script_location", str(Path(caspian.store.__file__).parent / "migrations")
    )
    config.attributes["connection"] = connection
    action(config, target)


async def test_migration_downgrades_to_empty_and_upgrades_again(store_url: str) -> None:
    engine = create_async_engine(store_url)
    try:
        store = Store(store_url)
        await store.upgrade()
        await store.close()
        async with engine.begin() as connection:
            await connection.run_sync(run, command.downgrade, "base")
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
            assert set(names).isdisjoint(TABLES)
            await connection.run_sync(run, command.upgrade, "head")
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
            assert set(names) >= TABLES
    finally:
        await engine.dispose()


async def test_revocation_migration_keeps_users_keys_and_entitlements(store_url: str) -> None:
    """0003 alters the users table in place: on SQLite, copying it instead would drop the
    old one, and with foreign keys on that deletes every key and entitlement."""
    engine = create_async_engine(store_url)
    store = Store(store_url)
    try:
        await store.upgrade()
        await store.seed_exchanges([("Gemini", "GEMINI"), ("BitMEX", "BITMEX")])
        key, secret = await store.create_key("ivan")
        await store.revoke("ivan", "BITMEX")
        async with engine.begin() as connection:
            await connection.run_sync(run, command.downgrade, "0002")
        assert await raw_rows(store_url, "SELECT COUNT(*) FROM api_keys") == [(1,)]
        await store.upgrade()
        assert await store.verify_key(key.key_id, secret) == key
        [ivan] = await store.list_users()
        assert (ivan.exchanges, ivan.disabled) == (("GEMINI",), False)
    finally:
        await store.close()
        await engine.dispose()


# Users


async def test_users_are_created_listed_and_checked(store: Store, store_url: str) -> None:
    alice = await store.create_user("alice", "correct horse")
    assert (alice.name, alice.has_password, alice.all_exchanges, alice.exchanges) == (
        "alice",
        True,
        True,
        (),
    )
    await store.create_user("bob.smith@example-1_x", None)
    with pytest.raises(AlreadyExists):
        await store.create_user("alice", None)
    for bad in ("", "x" * 65, "with space", "semi;colon", "naïve"):
        with pytest.raises(ValueError):
            await store.create_user(bad, None)

    users = await store.list_users()
    assert [(user.name, user.has_password) for user in users] == [
        ("alice", True),
        ("bob.smith@example-1_x", False),
    ]
    assert users[0].created_time == alice.created_time

    verified = await store.verify_credential("alice", "correct horse")
    assert verified is not None and verified.name == "alice"
    assert await store.verify_credential("alice", "wrong horse") is None
    assert await store.verify_credential("bob.smith@example-1_x", "") is None
    assert await store.verify_credential("nobody", "correct horse") is None

    [(stored,)] = await raw_rows(store_url, "SELECT password_hash FROM users WHERE name = 'alice'")
    assert stored.startswith("$argon2id$") and "correct horse" not in stored


async def test_disabled_users_cannot_log_in_until_enabled(store: Store) -> None:
    await store.create_user("judy", "pw")
    key, secret = await store.create_key("judy")
    assert (await store.principal(USER, "judy")) == Principal("judy", None)

    judy = await store.set_disabled("judy", True)
    assert judy.disabled
    assert [user.disabled for user in await store.list_users()] == [True]
    assert await store.verify_credential("judy", "pw") is None
    assert await store.verify_key(key.key_id, secret) is None
    for found in (await store.principal(USER, "judy"), await store.principal(KEY, key.key_id)):
        assert found is not None and found.disabled and found.tokens_not_before is not None
    disabled_at = (await store.principal(USER, "judy")).tokens_not_before  # type: ignore[union-attr]
    # Disabling twice does not move the stamp; enabling keeps it: no old token comes back.
    await store.set_disabled("judy", True)
    judy = await store.set_disabled("judy", False)
    assert not judy.disabled
    found = await store.principal(USER, "judy")
    assert found is not None and not found.disabled and found.tokens_not_before == disabled_at
    assert await store.verify_credential("judy", "pw") is not None
    assert await store.verify_key(key.key_id, secret) == key
    with pytest.raises(NotFound):
        await store.set_disabled("nobody", True)


async def test_a_new_password_replaces_the_old_and_stamps_the_user(store: Store) -> None:
    await store.create_key("kim")
    assert (await store.principal(USER, "kim")).tokens_not_before is None  # type: ignore[union-attr]
    kim = await store.set_password("kim", "new pass")
    assert kim.has_password
    assert await store.verify_credential("kim", "new pass") is not None
    first = (await store.principal(USER, "kim")).tokens_not_before  # type: ignore[union-attr]
    assert first is not None
    await store.set_password("kim", "newer pass")
    assert await store.verify_credential("kim", "new pass") is None
    assert await store.verify_credential("kim", "newer pass") is not None
    second = (await store.principal(USER, "kim")).tokens_not_before  # type: ignore[union-attr]
    assert second is not None and second > first
    with pytest.raises(ValueError):
        await store.set_password("kim", "")
    with pytest.raises(NotFound):
        await store.set_password("nobody", "pw")


async def test_a_password_changed_while_it_is_checked_does_not_log_in(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_user("lee", "old")
    loop = asyncio.get_running_loop()
    real_verify = hashing.verify

    def verify_then_change(stored_hash: str | None, secret: str) -> bool:
        matched = real_verify(stored_hash, secret)
        # The change lands while the old password is being verified (in a worker thread).
        asyncio.run_coroutine_threadsafe(store.set_password("lee", "new"), loop).result(30)
        return matched

    monkeypatch.setattr(hashing, "verify", verify_then_change)
    assert await store.verify_credential("lee", "old") is None
    monkeypatch.setattr(hashing, "verify", real_verify)
    assert await store.verify_credential("lee", "new") is not None


async def test_ended_tokens_are_refused_and_forgotten_once_expired(
    store: Store, store_url: str
) -> None:
    later = datetime(2100, 1, 1)
    await store.end_token("a" * 32, later)
    await store.end_token("a" * 32, later)
    await store.create_user("ted", "pw")
    assert await store.token_standing("a" * 32, USER, "ted") == (True, None)
    assert await store.token_standing("b" * 32, USER, "ted") == (False, Principal("ted", None))
    await store.end_token("c" * 32, datetime(2000, 1, 1))
    # The next one ended sweeps out those already expired.
    await store.end_token("d" * 32, later)
    rows = await raw_rows(store_url, "SELECT token_id FROM ended_tokens ORDER BY token_id")
    assert rows == [("a" * 32,), ("d" * 32,)]


# API keys


async def test_keys_are_created_verified_listed_and_revoked(store: Store, store_url: str) -> None:
    info, secret = await store.create_key("carol")
    assert re.fullmatch(r"[A-Z0-9]{20}", info.key_id)
    assert len(secret) >= 40
    assert (info.user, info.revoked) == ("carol", False)
    [carol] = await store.list_users()
    assert (carol.name, carol.has_password) == ("carol", False)
    assert await store.verify_credential("carol", secret) is None

    [(stored,)] = await raw_rows(
        store_url, f"SELECT secret_hash FROM api_keys WHERE key_id = '{info.key_id}'"
    )
    assert stored != secret and secret not in stored and stored.startswith("$argon2id$")

    assert await store.verify_key(info.key_id, secret) == info
    assert await store.verify_key(info.key_id, secret[:-1]) is None
    assert await store.verify_key("A" * 20, secret) is None

    second, second_secret = await store.create_key("carol")
    assert second.key_id != info.key_id and second_secret != secret
    assert len(await store.list_users()) == 1
    assert {(key.key_id, key.user, key.revoked) for key in await store.list_keys()} == {
        (info.key_id, "carol", False),
        (second.key_id, "carol", False),
    }

    assert await store.revoke_key(info.key_id) is True
    assert await store.revoke_key("NOSUCHKEY00000000000") is False
    assert await store.verify_key(info.key_id, secret) is None
    assert await store.verify_key(second.key_id, second_secret) == second
    assert {(key.key_id, key.revoked) for key in await store.list_keys()} == {
        (info.key_id, True),
        (second.key_id, False),
    }


async def test_a_key_for_an_existing_user_keeps_their_password(store: Store) -> None:
    await store.create_user("dave", "pass word")
    key, _ = await store.create_key("dave")
    assert key.user == "dave"
    assert await store.verify_credential("dave", "pass word") is not None


async def test_principal_of_keys_and_users(store: Store) -> None:
    key, _ = await store.create_key("erin")
    assert await store.principal(KEY, key.key_id) == Principal(user="erin", exchanges=None)
    assert await store.principal(USER, "erin") == Principal(user="erin", exchanges=None)
    assert await store.principal(KEY, "NOSUCHKEY00000000000") is None
    assert await store.principal(USER, "nobody") is None

    await store.revoke("erin", None)
    await store.grant("erin", "GEMINI")
    assert await store.principal(KEY, key.key_id) == Principal("erin", frozenset({"GEMINI"}))

    await store.revoke_key(key.key_id)
    assert await store.principal(KEY, key.key_id) is None
    assert await store.principal(USER, "erin") == Principal("erin", frozenset({"GEMINI"}))
    with pytest.raises(ValueError):
        await store.principal("token", "erin")


async def test_grant_and_revoke_exchanges(store: Store) -> None:
    await store.seed_exchanges([("Gemini", "GEMINI"), ("BitMEX", "BITMEX"), ("Kraken", "KRAKEN")])
    await store.create_key("frank")

    # Revoking one exchange from an "all" user leaves every other known exchange.
    frank = await store.revoke("frank", "GEMINI")
    assert (frank.all_exchanges, frank.exchanges) == (False, ("BITMEX", "KRAKEN"))
    frank = await store.grant("frank", "GEMINI")
    assert (frank.all_exchanges, frank.exchanges) == (False, ("BITMEX", "GEMINI", "KRAKEN"))
    frank = await store.grant("frank", "GEMINI")
    assert frank.exchanges == ("BITMEX", "GEMINI", "KRAKEN")
    frank = await store.revoke("frank", "KRAKEN")
    assert frank.exchanges == ("BITMEX", "GEMINI")

    frank = await store.revoke("frank", None)
    assert (frank.all_exchanges, frank.exchanges) == (False, ())
    assert await store.principal(USER, "frank") == Principal("frank", frozenset())

    frank = await store.grant("frank", "BITMEX")
    assert frank.exchanges == ("BITMEX",)
    frank = await store.grant("frank", None)
    assert (frank.all_exchanges, frank.exchanges) == (True, ())
    assert await store.principal(USER, "frank") == Principal("frank", None)
    frank = await store.grant("frank", "GEMINI")
    assert (frank.all_exchanges, frank.exchanges) == (True, ())

    [listed] = await store.list_users()
    assert listed == frank
    with pytest.raises(NotFound):
        await store.grant("nobody", None)
    with pytest.raises(NotFound):
        await store.revoke("nobody", "GEMINI")


# Registry of open stream sessions

STALE_S = 60.0


def gateway(name: str, pid: int = 4242) -> GatewayInfo:
    return GatewayInfo(id=name, host=f"host-{name}", pid=pid, started_time=datetime(2026, 1, 1))


def stream(name: str, user: str = "alice", key_id: str | None = None) -> SessionInfo:
    return SessionInfo(
        id=name, user=user, key_id=key_id, peer="10.0.0.1:50000", opened_time=datetime(2026, 1, 2)
    )


async def test_sync_adds_and_removes_a_gateways_sessions(store: Store) -> None:
    a, b = gateway("gw-a"), gateway("gw-b")
    one = stream("s1", key_id="V1QHTQPJ01921C3MDFHY")
    first = await store.sync_gateway(a, [one, stream("s2", "bob")], [], STALE_S)
    assert first.rejoined is True  # its first sync: there was no row yet
    assert first.sessions == {"s1", "s2"}
    assert (await store.sync_gateway(b, [stream("s3")], [], STALE_S)).sessions == {"s3"}

    again = await store.sync_gateway(a, [stream("s4")], ["s2"], STALE_S)
    assert (again.rejoined, again.sessions) == (False, frozenset({"s1", "s4"}))
    # Nothing to report still renews the gateway and answers what it holds; a session
    # sent twice (a sync whose commit went unconfirmed) and an unknown close are harmless,
    # and one gateway cannot close another's session.
    quiet = await store.sync_gateway(a, [one], ["s2", "nope", "s3"], STALE_S)
    assert (quiet.rejoined, quiet.sessions) == (False, frozenset({"s1", "s4"}))

    listed = await store.list_sessions(STALE_S)
    assert [(row.session.id, row.gateway.id) for row in listed] == [
        ("s1", "gw-a"),
        ("s3", "gw-b"),
        ("s4", "gw-a"),
    ]
    assert listed[0].session == one
    assert listed[0].gateway == a
    assert listed[2].session.key_id is None


async def test_ending_a_session_drops_it_from_its_gateways_next_sync(store: Store) -> None:
    a = gateway("gw-a")
    await store.sync_gateway(a, [stream("s1"), stream("s2")], [], STALE_S)
    assert await store.end_session("s1") is True
    assert await store.end_session("s1") is False
    assert await store.end_session("nope") is False
    answer = await store.sync_gateway(a, [], [], STALE_S)
    assert (answer.rejoined, answer.sessions) == (False, frozenset({"s2"}))
    assert [row.session.id for row in await store.list_sessions(STALE_S)] == ["s2"]


async def test_stale_gateways_are_purged_with_their_sessions(store: Store, store_url: str) -> None:
    a, b, c = gateway("gw-a"), gateway("gw-b"), gateway("gw-c")
    await store.sync_gateway(a, [stream("a1"), stream("a2")], [], STALE_S)
    await store.sync_gateway(b, [stream("b1")], [], STALE_S)
    await store.sync_gateway(c, [stream("c1")], [], STALE_S)
    listed = await store.list_sessions(STALE_S)
    assert {row.session.id for row in listed} == {"a1", "a2", "b1", "c1"}
    # a and b stopped syncing two minutes ago: the list leaves them out at once...
    await raw_execute(
        store_url,
        "UPDATE gateways SET seen_time = seen_time - INTERVAL '2 minutes' WHERE id <> 'gw-c'"
        if store_url.startswith("postgresql")
        else "UPDATE gateways SET seen_time = datetime(seen_time, '-2 minutes') WHERE id <> 'gw-c'",
    )
    assert {row.session.id for row in await store.list_sessions(STALE_S)} == {"c1"}
    assert len(await raw_rows(store_url, "SELECT id FROM stream_sessions")) == 4

    # ...and the next sync of a live gateway purges them, their sessions by cascade.
    assert (await store.sync_gateway(c, [], [], STALE_S)).sessions == {"c1"}
    assert await raw_rows(store_url, "SELECT id FROM gateways") == [("gw-c",)]
    assert await raw_rows(store_url, "SELECT id FROM stream_sessions") == [("c1",)]

    # a was alive after all (a long store outage, say): it learns it was purged, and
    # registers again what it sends.
    back = await store.sync_gateway(a, [stream("a3")], [], STALE_S)
    assert (back.rejoined, back.sessions) == (True, frozenset({"a3"}))
    back = await store.sync_gateway(a, [stream("a1"), stream("a2")], [], STALE_S)
    assert (back.rejoined, back.sessions) == (False, frozenset({"a1", "a2", "a3"}))


async def test_a_gateway_leaving_takes_its_sessions(store: Store, store_url: str) -> None:
    a, b = gateway("gw-a"), gateway("gw-b")
    await store.sync_gateway(a, [stream("a1")], [], STALE_S)
    await store.sync_gateway(b, [stream("b1")], [], STALE_S)
    await store.remove_gateway("gw-a")
    await store.remove_gateway("gw-a")
    assert [row.session.id for row in await store.list_sessions(STALE_S)] == ["b1"]
    assert await raw_rows(store_url, "SELECT id FROM stream_sessions") == [("b1",)]


async def test_more_closed_sessions_than_a_statement_takes_parameters(store: Store) -> None:
    a = gateway("gw-a")
    await store.sync_gateway(a, [stream("s1"), stream("s2")], [], STALE_S)
    # More than PostgreSQL takes in one statement (32767 bound parameters).
    closed = [f"x{n}" for n in range(40_000)] + ["s1"]
    assert (await store.sync_gateway(a, [], closed, STALE_S)).sessions == {"s2"}


# Reference data


async def test_exchanges_are_seeded_and_listed_by_code(store: Store) -> None:
    assert await store.list_exchanges() == []
    await store.seed_exchanges([("Gemini", "GEMINI"), ("BitMEX", "BITMEX")])
    await store.seed_exchanges([("Coin Market Cap", "COINMKTCAP"), ("Gemini Trust", "GEMINI")])
    assert await store.list_exchanges() == [
        ("BitMEX", "BITMEX"),
        ("Coin Market Cap", "COINMKTCAP"),
        ("Gemini Trust", "GEMINI"),
    ]


async def test_products_are_upserted_and_queried(store: Store) -> None:
    await store.seed_exchanges([("Gemini", "GEMINI"), ("BitMEX", "BITMEX")])
    eth = product("FX-ETH/USD=GEMINI", "GEMINI")
    ltc = product("FX-LTC/ETH=GEMINI", "GEMINI")
    future = product(
        "FUT-XBT/USD-20261225=BITMEX",
        "BITMEX",
        type="FUT",
        multiplier="1",
        expire_date="2026-12-25T12:00:00.000000",
        last_trading_date="2026-12-25T12:00:00.000000",
        underlying_caspian_code="FX-XBT/USD=BITMEX",
    )
    assert await store.upsert_products([eth, ltc, future]) == (3, 0)
    assert await store.has_products("GEMINI") and not await store.has_products("KRAKEN")

    first = await store.product("FX-ETH/USD=GEMINI")
    assert first is not None
    assert first.spec == eth and first.created_time == first.updated_time
    stored_future = await store.product(future.caspian_code)
    assert stored_future is not None and stored_future.spec == future
    assert await store.product("FX-NOPE/USD=GEMINI") is None

    api = first.api_dict()
    assert api["caspianCode"] == "FX-ETH/USD=GEMINI" and api["nativeCode_v2"] == "ETH-USD"
    assert "strike" not in api
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", api["createdTime"])
    assert api["updatedTime"] == api["createdTime"]

    renamed = product("FX-ETH/USD=GEMINI", "GEMINI", description="Ether - US Dollar")
    btc = product("FX-BTC/USD=GEMINI", "GEMINI")
    assert await store.upsert_products([renamed, ltc, btc]) == (1, 2)
    again = await store.product("FX-ETH/USD=GEMINI")
    assert again is not None and again.spec == renamed
    assert again.created_time == first.created_time
    assert again.updated_time > first.updated_time
    unchanged = await store.product(future.caspian_code)
    assert unchanged is not None and unchanged.updated_time == stored_future.updated_time

    codes = [record.spec.caspian_code for record in await store.products()]
    assert codes == [
        "FUT-XBT/USD-20261225=BITMEX",
        "FX-BTC/USD=GEMINI",
        "FX-ETH/USD=GEMINI",
        "FX-LTC/ETH=GEMINI",
    ]
    gemini = await store.products(["GEMINI"])
    assert {record.spec.exchange for record in gemini} == {"GEMINI"} and len(gemini) == 3
    assert len(await store.products(["GEMINI", "BITMEX"])) == 4
    assert await store.products([]) == []
    assert await store.products(["KRAKEN"]) == []


async def test_products_of_an_unknown_exchange_are_refused(store: Store) -> None:
    await store.seed_exchanges([("Gemini", "GEMINI")])
    with pytest.raises(NotFound, match="KRAKEN"):
        await store.upsert_products(
            [product("FX-ETH/USD=GEMINI", "GEMINI"), product("FX-ETH/USD=KRAKEN", "KRAKEN")]
        )
    assert await store.products() == []


# SQLite specifics


async def test_sqlite_file_is_shared_by_concurrent_writers(tmp_path: Path) -> None:
    """Two stores on one file, as the CLI and a running server are, write at the same time."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first, second = Store(url), Store(url)
    try:
        await first.upgrade()
        await second.upgrade()
        assert await raw_rows(url, "PRAGMA journal_mode") == [("wal",)]
        # Each seed reads the known exchanges before writing: the pattern that fails at
        # once between processes unless the write lock is taken up front.
        writers = (first, second)
        await asyncio.gather(
            *(writers[n % 2].seed_exchanges([(f"Exchange {n}", f"EX{n:02}")]) for n in range(40))
        )
        assert len(await second.list_exchanges()) == 40
    finally:
        await first.close()
        await second.close()


async def test_a_servers_token_checks_see_another_processs_changes_at_once(
    tmp_path: Path,
) -> None:
    """A server's token checks on a SQLite file read on a connection of their own, in a
    thread: what the CLI writes (ending a token, disabling a user, revoking a key or an
    exchange) must count from the next check, with no snapshot of an earlier read kept."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'caspian.db'}"
    server, cli = Store(url), Store(url)
    try:
        await server.upgrade()
        await server.prepare()
        key, _ = await cli.create_key("zoe")
        assert await server.token_standing("t1", KEY, key.key_id) == (False, Principal("zoe", None))
        await cli.end_token("t1", datetime(2100, 1, 1))
        assert await server.token_standing("t1", KEY, key.key_id) == (True, None)
        await cli.revoke("zoe", None)
        await cli.grant("zoe", "GEMINI")
        assert await server.principal(USER, "zoe") == Principal("zoe", frozenset({"GEMINI"}))
        await cli.set_disabled("zoe", True)
        found = await server.principal(USER, "zoe")
        assert found is not None and found.disabled
        await cli.revoke_key(key.key_id)
        assert await server.token_standing("t2", KEY, key.key_id) == (False, None)
    finally:
        await server.close()
        await cli.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("caspian-store-reads")]


async def test_sqlite_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    (tmp_path / "garbage.db").write_bytes(b"not a database, " * 512)
    for path in (tmp_path, tmp_path / "file" / "caspian.db", tmp_path / "garbage.db"):
        store = Store(f"sqlite+aiosqlite:///{path}")
        try:
            with pytest.raises(StoreUnavailable):
                await store.upgrade()
            with pytest.raises(StoreUnavailable):
                await store.list_exchanges()
            # The token checks' reads take a path of their own (Store._read, on a thread
            # of the store's): their failures must come out the same way.
            with pytest.raises(StoreUnavailable):
                await store.token_standing("t", USER, "ann")
            with pytest.raises(StoreUnavailable):
                await store.principal(KEY, "k")
        finally:
            await store.close()
    # After a failed connect aiosqlite stops its worker thread without waiting for it; the
    # thread must be done before this test's event loop closes, or it reports to a closed one.
    for thread in threading.enumerate():
        if thread.name.endswith("(_connection_worker_thread)"):
            await asyncio.to_thread(thread.join, 5)


async def test_a_prepared_store_keeps_its_descriptors_and_threads_through_a_burst(
    tmp_path: Path,
) -> None:
    """A server's store opens its connections and starts its argon2 worker processes at
    start, and never more: the soak run saw descriptors on ``caspian.db`` and threads grow
    under load, and could not tell that growth from a leak."""
    database = tmp_path / "caspian.db"
    store = Store(f"sqlite+aiosqlite:///{database}")

    def opened() -> tuple[int, int, int, list[int]]:
        """Descriptors on the database's files, aiosqlite's connection threads, argon2's
        threads and worker processes."""
        descriptors = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                descriptors += os.readlink(f"/proc/self/fd/{fd}").startswith(str(database))
        names = [thread.name for thread in threading.enumerate()]
        return (
            descriptors,
            sum(name.endswith("(_connection_worker_thread)") for name in names),
            sum(name.startswith("caspian-argon2") for name in names),
            sorted(child.pid or 0 for child in multiprocessing.active_children()),
        )

    try:
        await store.upgrade()
        key, secret = await store.create_key("alice")
        await store.prepare()
        prepared = opened()
        assert prepared[1:3] == (store_module.POOL_SIZE, 0)
        assert len(prepared[3]) == hashing.AT_ONCE
        # Eight times as many requests at once as there are connections, and logins:
        # they wait their turn, and all are answered.
        burst = 8 * store_module.POOL_SIZE
        found = await asyncio.gather(
            *(store.token_standing(f"t{n}", KEY, "NOKEY") for n in range(burst))
        )
        logins = await asyncio.gather(
            *(store.verify_key(key.key_id, secret if n % 2 else "wrong") for n in range(4))
        )
        assert found == [(False, None)] * burst
        assert [login is not None for login in logins] == [False, True, False, True]
        assert opened() == prepared
    finally:
        await store.close()


async def test_an_in_memory_store_has_no_pool_to_fill() -> None:
    store = Store("sqlite+aiosqlite://")
    try:
        await store.upgrade()
        await store.prepare()
        assert await store.list_exchanges() == []
        await store.create_user("ann", None)
        assert await store.token_standing("t", USER, "ann") == (False, Principal("ann", None))
    finally:
        await store.close()


# PostgreSQL availability


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_postgres_that_never_ran_is_unavailable_quickly() -> None:
    store = Store(f"postgresql+asyncpg://postgres@127.0.0.1:{_free_port()}/postgres")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.upgrade()
        with pytest.raises(StoreUnavailable):
            await store.product("FX-ETH/USD=GEMINI")
        assert time.monotonic() - started < 10
    finally:
        await store.close()


async def test_store_survives_a_postgres_outage() -> None:
    # A server of its own: stopping the shared one would disturb other tests.
    server = PostgresServer()
    try:
        server.start()
        store = Store(server.url)
        try:
            await store.upgrade()
            await store.seed_exchanges([("Gemini", "GEMINI")])
            key, secret = await store.create_key("grace")
            # Several pooled connections, all of which the outage kills.
            await asyncio.gather(*(store.list_exchanges() for _ in range(4)))

            server.stop()
            calls: list[Callable[[], Awaitable[object]]] = [
                store.list_exchanges,
                lambda: store.verify_key(key.key_id, secret),
                lambda: store.create_user("heidi", None),
                lambda: store.principal(KEY, key.key_id),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - started < 10

            server.start()
            assert await store.list_exchanges() == [("Gemini", "GEMINI")]
            assert await store.verify_key(key.key_id, secret) == key
            await store.create_user("heidi", None)
            assert [user.name for user in await store.list_users()] == ["grace", "heidi"]

            # A restart nobody saw leaves only dead connections in the pool: the next calls
            # must get fresh ones rather than fail.
            await asyncio.gather(*(store.list_exchanges() for _ in range(4)))
            server.stop()
            server.start()
            results = await asyncio.gather(*(store.list_exchanges() for _ in range(4)))
            assert results == [[("Gemini", "GEMINI")]] * 4
        finally:
            await store.close()
    finally:
        server.destroy()


async def test_argon2_checks_run_at_most_two_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'caspian.db'}")
    await store.upgrade()
    try:
        info, _ = await store.create_key("alice")
        running = 0
        most = 0
        lock = threading.Lock()
        verify = hashing.verify

        def counted(stored_hash: str, secret: str) -> bool:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                time.sleep(0.05)
                return verify(stored_hash, secret)
            finally:
                with lock:
                    running -= 1

        monkeypatch.setattr(hashing, "verify", counted)
        answers = await asyncio.gather(*(store.verify_key(info.key_id, "wrong") for _ in range(8)))
        assert answers == [None] * 8
        assert most == 2
    finally:
        await store.close()
