"""What the stream connections share: the hub, token checks, limits and timers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from caspian.auth.access import AccessCheck, Denied, Grant, Reason, denial
from caspian.codes import CloseCode, TokenRefreshCode
from caspian.gateway.hub import Hub
from caspian.gateway.registry import Lost, Registry
from caspian.gateway.session import Resolver, SessionLimits, TokenCheck
from caspian.heap import Trimmer
from caspian.store import GatewaySync, SessionInfo, StoreError
from caspian.tasks import spawn

log = logging.getLogger(__name__)


class StreamConnection(Protocol):
    """A stream connection as the gateway sees it (``connection.py`` has the real one)."""

    @property
    def principal(self) -> tuple[str, str] | None:
        """The key or user behind its token; None before authentication and once closing."""

    @property
    def registration(self) -> SessionInfo | None:
        """Its entry in the cluster's session registry; None until authenticated."""

    def entitle(self, exchanges: frozenset[str] | None) -> None: ...

    def heartbeat(self) -> None: ...

    def flush(self) -> None: ...

    def close(self, code: CloseCode, reason: str | None = None) -> None: ...


#: Syncs this gateway's sessions with the cluster's registry: ``(opened, closed)`` -> the
#: store's answer (``Store.sync_gateway``). Raises when the store is down.
SessionSync = Callable[[list[SessionInfo], list[str]], Awaitable[GatewaySync]]


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat_s: float
    #: How often live sessions' keys and users are checked again (revocations), and the
    #: session registry synced.
    recheck_s: float
    max_queue: int
    max_queue_bytes: int
    max_message_bytes: int
    limits: SessionLimits


class Gateway:
    def __init__(
        self,
        hub: Hub,
        access: AccessCheck,
        resolve: Resolver,
        settings: StreamSettings,
        in_maintenance: Callable[[], float],
        sync_sessions: SessionSync,
    ) -> None:
        self.hub = hub
        self.access = access
        self._sync_sessions = sync_sessions
        self._registry = Registry()
        self.resolve = resolve
        self.settings = settings
        #: Seconds left of the maintenance window now; 0 outside it.
        self.in_maintenance = in_maintenance
        self.connections: set[StreamConnection] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._to_flush: list[StreamConnection] = []
        self._flush_handle: asyncio.Handle | None = None
        #: Told of each slow client's dropped backlog, so that its memory goes back soon.
        self.trimmer = Trimmer()

    def flush_later(self, connection: StreamConnection) -> None:
        """Flush ``connection`` at the end of this loop turn.

        One callback for every connection with output, not one each: with a
        thousand clients the per-connection callbacks cost more than the
        serialization they follow.
        """
        self._to_flush.append(connection)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_handle = None
        pending, self._to_flush = self._to_flush, []
        for connection in pending:
            try:
                connection.flush()
            except Exception:
                log.exception("writing to a connection failed")

    async def check_token(self, token: str) -> TokenCheck:
        """Verify a token; the session turns a refusal into its close code or answer.

        Store failures propagate: the caller decides what an internal fault means.
        """
        access = await self.access.check(token)
        if isinstance(access, Denied):
            log.debug("refused a stream token: %s", access.reason.value)
            if access.reason is Reason.EXPIRED:
                return TokenCheck(TokenRefreshCode.EXPIRED)
            return TokenCheck(TokenRefreshCode.INVALID)
        return TokenCheck(
            TokenRefreshCode.OK, access.user, access.expires_us, access.exchanges, access.grant
        )

    def start(self) -> None:
        self._tasks = [
            spawn(self._beat(), "caspian-heartbeat"),
            spawn(self._recheck(), "caspian-recheck"),
        ]

    async def _recheck(self) -> None:
        """Every ``recheck_s``: re-check keys and users, then sync the session registry."""
        while True:
            await asyncio.sleep(self.settings.recheck_s)
            try:
                await self._recheck_principals()
                # After the re-check, so that streams it closed leave the registry now.
                purged = (await self._sync_registry()).purged
                if purged:
                    log.warning(
                        "this gateway had been purged from the session registry as stale: "
                        "registering its %d sessions again",
                        len(purged),
                    )
                    await self._sync_registry()
            except Exception as exc:
                # The store is away: keep every session, look again next round.
                log.warning("could not re-check stream sessions: %s", exc)

    async def _recheck_principals(self) -> None:
        """Close the sessions whose token no longer works (3001); keep entitlements current.

        A revoked key, a disabled user and a token older than its user's password change
        are refused at connection and at TokenRefresh, but a session opened before would
        otherwise live until its token expires. One store query per distinct key or user,
        however many connections.
        """
        by_principal: dict[tuple[str, str], list[StreamConnection]] = {}
        for connection in list(self.connections):
            principal = connection.principal
            if principal is not None:
                by_principal.setdefault(principal, []).append(connection)
        for (kind, subject), connections in by_principal.items():
            found = await self.access.principal(kind, subject)
            for connection in connections:
                principal = connection.principal
                if principal is None:
                    # It closed while the store answered.
                    continue
                issued_us = principal.issued_us if isinstance(principal, Grant) else None
                refused = denial(found, issued_us)
                if refused is not None:
                    log.info("closing a stream of %s %s: %s", kind, subject, refused.reason.value)
                    connection.close(CloseCode.TOKEN_INVALID)
                elif found is not None:
                    connection.entitle(found.exchanges)

    async def _sync_registry(self) -> Lost:
        """Report opened and closed sessions; close those ended on the server (3003)."""
        open_now: dict[str, tuple[SessionInfo, StreamConnection]] = {}
        for connection in list(self.connections):
            info = connection.registration
            if info is not None:
                open_now[info.id] = (info, connection)
        sent = self._registry.changes({key: info for key, (info, _) in open_now.items()})
        lost = self._registry.synced(sent, await self._sync_sessions(sent.opened, sent.closed))
        for key in lost.ended:
            info, connection = open_now[key]
            await self._end_token(connection)
            # It may have closed by itself while the store answered.
            if connection.registration is not None:
                log.info(
                    "closing stream session %s of %s (key %s) from %s: ended on the server",
                    key,
                    info.user,
                    info.key_id or "none",
                    info.peer,
                )
                connection.close(CloseCode.SESSION_NOT_FOUND)
        return lost

    async def _end_token(self, connection: StreamConnection) -> None:
        """Refuse the token of a session ended on the server, before closing it: the
        client cannot connect again with it, and must log in anew."""
        grant = connection.principal
        if not isinstance(grant, Grant):
            return
        try:
            await self.access.end(grant)
        except StoreError as exc:
            # The session still ends; only a reconnect with that token is not stopped.
            log.warning("could not record the token of an ended session as ended: %s", exc)

    async def _beat(self) -> None:
        """One timer for every connection: cheaper than a task per connection."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for connection in list(self.connections):
                try:
                    connection.heartbeat()
                except Exception:
                    log.exception("heartbeat of a connection failed")

    def close_all(self, code: CloseCode, reason: str | None = None) -> None:
        for connection in list(self.connections):
            connection.close(code, reason)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self.close_all(CloseCode.GOING_AWAY)
        self.trimmer.close()
