"""The gateway's bookkeeping of the session registry, without a store."""

from __future__ import annotations

import re
from datetime import datetime

from caspian.gateway.registry import Changes, Lost, Registry, format_peer, new_session
from caspian.store import KEY, USER, GatewaySync, SessionInfo


def info(name: str) -> SessionInfo:
    return SessionInfo(
        id=name, user="alice", key_id=None, peer="127.0.0.1:1", opened_time=datetime(2026, 1, 1)
    )


def opened(*names: str) -> dict[str, SessionInfo]:
    return {name: info(name) for name in names}


def sync(
    registry: Registry, now_open: dict[str, SessionInfo], held: set[str], rejoined: bool = False
) -> tuple[Changes, Lost]:
    """One round against a store that answers ``held``."""
    sent = registry.changes(now_open)
    return sent, registry.synced(sent, GatewaySync(rejoined, frozenset(held)))


NOTHING = Lost(ended=frozenset(), purged=frozenset())


def test_only_changes_since_the_last_sync_are_sent() -> None:
    registry = Registry()
    sent, lost = sync(registry, opened("a", "b"), {"a", "b"}, rejoined=True)
    assert ([s.id for s in sent.opened], sent.closed) == (["a", "b"], [])
    # The first sync of a gateway finds no row of its own: nothing was lost.
    assert lost == NOTHING

    sent, lost = sync(registry, opened("b", "c"), {"b", "c"})
    assert ([s.id for s in sent.opened], sent.closed) == (["c"], ["a"])
    assert lost == NOTHING

    sent = registry.changes(opened("b", "c"))
    assert (sent.opened, sent.closed) == ([], [])


def test_a_session_opened_and_closed_between_syncs_is_never_sent() -> None:
    registry = Registry()
    sync(registry, opened("a"), {"a"}, rejoined=True)
    # "b" opened and closed since: the gateway's open set never shows it here.
    sent = registry.changes(opened("a"))
    assert (sent.opened, sent.closed) == ([], [])


def test_a_failed_sync_is_sent_again_whole_and_no_bigger_than_the_sessions() -> None:
    registry = Registry()
    sync(registry, opened("a", "b"), {"a", "b"}, rejoined=True)
    # Rounds whose sync failed leave nothing behind: what is sent next follows from the
    # sessions open then, however many opened and closed during the outage.
    for round_ in range(100):
        registry.changes(opened("a", f"churn{round_}"))
    sent = registry.changes(opened("a", "c"))
    assert ([s.id for s in sent.opened], sent.closed) == (["c"], ["b"])


def test_a_session_the_store_lost_was_ended_on_the_server() -> None:
    registry = Registry()
    sync(registry, opened("a", "b", "c"), {"a", "b", "c"}, rejoined=True)
    # "a" was ended with the CLI; "c" closed by itself; "d" is new.
    sent, lost = sync(registry, opened("a", "b", "d"), {"b", "d"})
    assert sent.closed == ["c"]
    assert lost == Lost(ended=frozenset({"a"}), purged=frozenset())
    # Ended once: the next round neither closes nor sends it again.
    sent, lost = sync(registry, opened("b", "d"), {"b", "d"})
    assert (sent.opened, sent.closed, lost) == ([], [], NOTHING)


def test_a_session_not_yet_registered_cannot_be_ended() -> None:
    registry = Registry()
    # The store answered without "b", though it was sent: not a session ended on the server.
    _, lost = sync(registry, opened("a", "b"), {"a"}, rejoined=True)
    assert lost == NOTHING
    sent = registry.changes(opened("a", "b"))
    assert [s.id for s in sent.opened] == ["b"]


def test_a_session_closed_while_the_store_answered_is_closed_next_round() -> None:
    registry = Registry()
    sent = registry.changes(opened("a"))
    # "a" closed before the answer that holds it came back.
    registry.synced(sent, GatewaySync(True, frozenset({"a"})))
    sent = registry.changes({})
    assert (sent.opened, sent.closed) == ([], ["a"])


def test_a_purged_gateway_registers_its_sessions_again_and_closes_none() -> None:
    registry = Registry()
    sync(registry, opened("a", "b"), {"a", "b"}, rejoined=True)
    # Another instance purged this gateway as stale: only what this sync sent is held.
    sent, lost = sync(registry, opened("a", "b", "c"), {"c"}, rejoined=True)
    assert [s.id for s in sent.opened] == ["c"]
    assert lost == Lost(ended=frozenset(), purged=frozenset({"a", "b"}))
    sent, lost = sync(registry, opened("a", "b", "c"), {"a", "b", "c"})
    assert ([s.id for s in sent.opened], sent.closed, lost) == (["a", "b"], [], NOTHING)


def test_new_session_records_who_and_from_where() -> None:
    by_key = new_session("alice", (KEY, "V1QHTQPJ01921C3MDFHY"), ("10.1.2.3", 50123))
    assert (by_key.user, by_key.key_id, by_key.peer) == (
        "alice",
        "V1QHTQPJ01921C3MDFHY",
        "10.1.2.3:50123",
    )
    assert re.fullmatch(r"[0-9a-f]{16}", by_key.id)
    by_password = new_session("bob", (USER, "bob"), ("::1", 50124, 0, 0))
    assert (by_password.key_id, by_password.peer) == (None, "[::1]:50124")
    assert new_session("bob", (USER, "bob"), ("::1", 1)).id != by_password.id


def test_format_peer_of_an_address_that_is_not_ip_and_port() -> None:
    assert format_peer("/run/caspian.sock") == "/run/caspian.sock"
