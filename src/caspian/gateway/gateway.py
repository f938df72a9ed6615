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
        self._heartbeat: asyncio.Task[None] | None = None
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
        return TokenCheck(TokenRefreshCode.OK, user, claims.expires_us, exchanges), None

    def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat(), name="caspian-heartbeat")

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
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await self._heartbeat
        self.close_all(CloseCode.GOING_AWAY)
