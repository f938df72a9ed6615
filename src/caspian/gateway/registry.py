"""This gateway's side of the cluster's registry of open stream sessions (no I/O).

Each recheck round the gateway tells the store which of its sessions opened and closed
since the last successful sync, and the store answers with those it still holds. A
session the store held before and has lost without being told it closed was ended on the
server (``caspian sessions end``): its connection closes with 3003.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from caspian.store import KEY, GatewaySync, SessionInfo
from caspian.store.models import REGISTRY_ID_LENGTH
from caspian.timefmt import now_us, us_to_dt


def new_id() -> str:
    """A gateway or session id."""
    return secrets.token_hex(REGISTRY_ID_LENGTH // 2)


def format_peer(peername: Any) -> str:
    """A socket's ``peername`` as ``ip:port`` (``[ip]:port`` for IPv6)."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peername)


def new_session(user: str, principal: tuple[str, str] | None, peername: Any) -> SessionInfo:
    """The registry entry of a session just let in; ``principal`` as in ``TokenCheck``."""
    return SessionInfo(
        id=new_id(),
        user=user,
        key_id=principal[1] if principal is not None and principal[0] == KEY else None,
        peer=format_peer(peername),
        opened_time=us_to_dt(now_us()),
    )


@dataclass(frozen=True, slots=True)
class Changes:
    """What one sync tells the store."""

    opened: list[SessionInfo]
    closed: list[str]


@dataclass(frozen=True, slots=True)
class Lost:
    """Sessions the store held and no longer holds, though this gateway never closed them."""

    #: Ended on the server: close them (3003).
    ended: frozenset[str]
    #: Gone with this gateway's row, purged as stale by another instance (after a long
    #: store outage, say). That says nothing about the sessions: they count as not yet
    #: sent, so the next sync registers them again.
    purged: frozenset[str]


class Registry:
    """What the store holds of this gateway's sessions, as far as this gateway knows."""

    def __init__(self) -> None:
        #: Held by the store at the last successful sync.
        self._registered: frozenset[str] = frozenset()

    def changes(self, open_sessions: Mapping[str, SessionInfo]) -> Changes:
        """What to send, given the sessions open now (by id).

        Worked out afresh each time rather than queued, so that a store outage cannot grow
        it past the sessions themselves, and a session that opened and closed between two
        syncs is never sent at all.
        """
        registered = self._registered
        return Changes(
            opened=[info for key, info in open_sessions.items() if key not in registered],
            closed=sorted(registered - open_sessions.keys()),
        )

    def synced(self, sent: Changes, answer: GatewaySync) -> Lost:
        """Take in the store's answer to ``sent``: what it lost of this gateway's sessions."""
        lost = self._registered.difference(sent.closed, answer.sessions)
        self._registered = answer.sessions
        if answer.rejoined:
            return Lost(ended=frozenset(), purged=lost)
        return Lost(ended=lost, purged=frozenset())
