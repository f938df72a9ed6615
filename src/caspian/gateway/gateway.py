"""What the stream connections share: the hub, token checks, limits and timers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from caspian.auth.tokens import TokenClaims, TokenExpired, TokenService
from caspian.codes import CloseCode, TokenRefreshCode
from caspian.gateway.hub import Hub
from caspian.gateway.session import Resolver, SessionLimits, TokenCheck

if TYPE_CHECKING:
    from caspian.gateway.connection import StreamConnection

log = logging.getLogger(__name__)

#: Looks up who a token speaks for: ``(kind, subject)`` -> ``(user, exchanges)``,
#: None when the key was revoked or the user is gone. Raises when the store is down.
PrincipalLookup = Callable[[str, str], Awaitable[tuple[str, frozenset[str] | None] | None]]


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat_s: float
    #: How often live sessions' keys and users are checked again (revocations).
    recheck_s: float
    max_queue: int
    max_message_bytes: int
    limits: SessionLimits


class Gateway:
    def __init__(
        self,
        hub: Hub,
        tokens: TokenService,
        principal: PrincipalLookup,
        resolve: Resolver,
        settings: StreamSettings,
        in_maintenance: Callable[[], float],
    ) -> None:
        self.hub = hub
        self.tokens = tokens
        self._principal = principal
        self.resolve = resolve
        self.settings = settings
        #: Seconds left of the maintenance window now; 0 outside it.
        self.in_maintenance = in_maintenance
        self.connections: set[StreamConnection] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._to_flush: list[StreamConnection] = []
        self._flush_handle: asyncio.Handle | None = None

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

    async def check_token(self, token: str) -> tuple[TokenCheck, CloseCode | None]:
        """Verify a token; the close code says how a connection should end if it fails.

        Store failures propagate: the caller decides what an internal fault means.
        """
        try:
            claims: TokenClaims = self.tokens.verify(token)
        except TokenExpired:
            return TokenCheck(TokenRefreshCode.EXPIRED), CloseCode.TOKEN_EXPIRED
        except Exception:
            return TokenCheck(TokenRefreshCode.INVALID), CloseCode.TOKEN_INVALID
        found = await self._principal(claims.kind, claims.subject)
        if found is None:
            return TokenCheck(TokenRefreshCode.INVALID), CloseCode.TOKEN_INVALID
        user, exchanges = found
        check = TokenCheck(
            TokenRefreshCode.OK,
            user,
            claims.expires_us,
            exchanges,
            (claims.kind, claims.subject),
        )
        return check, None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._beat(), name="caspian-heartbeat"),
            asyncio.create_task(self._recheck(), name="caspian-recheck"),
        ]

    async def _recheck(self) -> None:
        """Close the sessions of revoked keys (3001); keep entitlements current.

        A revoked key is refused at connection and at TokenRefresh, but a
        session opened before would otherwise live until its token expires.
        One store query per distinct key or user, however many connections.
        """
        while True:
            await asyncio.sleep(self.settings.recheck_s)
            by_principal: dict[tuple[str, str], list[StreamConnection]] = {}
            for connection in list(self.connections):
                principal = connection.principal
                if principal is not None:
                    by_principal.setdefault(principal, []).append(connection)
            for (kind, subject), connections in by_principal.items():
                try:
                    found = await self._principal(kind, subject)
                except Exception as exc:
                    # The store is away: keep the sessions, look again next round.
                    log.warning("could not re-check stream sessions: %s", exc)
                    break
                for connection in connections:
                    if found is None:
                        log.info("closing a stream of revoked %s %s", kind, subject)
                        connection.close(CloseCode.TOKEN_INVALID)
                    else:
                        connection.entitle(found[1])

    async def _beat(self) -> None:
        """One timer for every connection: cheaper than a task per connection."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for connection in list(self.connections):
                try:
                    connection.heartbeat()
                except Exception:
                    log.exception("heartbeat of a connection failed")

    def close_all(self, code: CloseCode) -> None:
        for connection in list(self.connections):
            connection.close(code)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self.close_all(CloseCode.GOING_AWAY)
