"""The one access check behind every request: REST's bearer token and the stream's token.

:meth:`AccessCheck.check` turns a token into the access it grants, or a precise denial:
invalid (a bad signature or claims), expired, revoked (the key was revoked or the user
deleted, or the token was issued before its user's password change or disabling), the user
disabled, or the token ended with its stream session (``caspian sessions end``). Only token
errors become denials; a store that cannot answer raises ``StoreError``, for the caller to
report as the fault it is.

Streams hold their access for hours, so the gateway also asks again, every
``CASPIAN_RECHECK_S``, through :meth:`AccessCheck.principal` and :func:`denial`: the same
rules, with one store query per key or user however many connections use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Protocol

from caspian.auth.tokens import TokenClaims, TokenExpired, TokenInvalid, TokenService
from caspian.store import Principal
from caspian.timefmt import us_to_dt


class Reason(Enum):
    INVALID = "invalid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    DISABLED = "disabled"
    ENDED = "ended"


#: What a client is told (REST 401 message); the stream says it with its close code.
DENIAL_MESSAGES: dict[Reason, str] = {
    Reason.INVALID: "Supplied token is not valid",
    Reason.EXPIRED: "Token has expired",
    Reason.REVOKED: "Supplied token is not valid: it was revoked",
    Reason.DISABLED: "Supplied token is not valid: the user is disabled",
    Reason.ENDED: "Supplied token is not valid: its session was ended on the server",
}


@dataclass(frozen=True, slots=True)
class Denied:
    reason: Reason

    @property
    def message(self) -> str:
        return DENIAL_MESSAGES[self.reason]


class Grant(tuple[str, str]):
    """What logged in, ``(kind, subject)`` (a key id or a user name), and with which token.

    It is the pair the stream's session keeps as its principal (equal to, and hashed as,
    the plain pair, so the gateway groups connections by key or user); the token's id,
    issue time and expiry ride along for the gateway's re-checks and for ``sessions end``.
    """

    token_id: str
    issued_us: int
    expires_us: int

    def __new__(cls, claims: TokenClaims) -> Grant:
        grant = super().__new__(cls, (claims.kind, claims.subject))
        grant.token_id = claims.token_id
        grant.issued_us = claims.issued_us
        grant.expires_us = claims.expires_us
        return grant

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def subject(self) -> str:
        return self[1]


@dataclass(frozen=True, slots=True)
class Access:
    user: str
    grant: Grant
    #: The exchanges the user may stream; None: every one.
    exchanges: frozenset[str] | None
    expires_us: int


class AccessStore(Protocol):
    """What the check needs of the store (``caspian.store.Store``)."""

    async def principal(self, kind: str, subject: str) -> Principal | None: ...

    async def token_standing(
        self, token_id: str, kind: str, subject: str
    ) -> tuple[bool, Principal | None]: ...

    async def end_token(self, token_id: str, expires_time: datetime) -> None: ...


def denial(found: Principal | None, issued_us: int | None) -> Denied | None:
    """Why a token of ``found``, issued at ``issued_us``, no longer works; None if it does.

    ``issued_us`` None: a token whose issue time is unknown, judged on its principal alone.
    """
    if found is None:
        return Denied(Reason.REVOKED)
    if found.disabled:
        return Denied(Reason.DISABLED)
    not_before = found.tokens_not_before
    if issued_us is not None and not_before is not None and us_to_dt(issued_us) < not_before:
        return Denied(Reason.REVOKED)
    return None


class AccessCheck:
    def __init__(self, tokens: TokenService, store: AccessStore) -> None:
        self._tokens = tokens
        self._store = store

    async def check(self, token: str) -> Access | Denied:
        try:
            claims = self._tokens.verify(token)
        except TokenExpired:
            return Denied(Reason.EXPIRED)
        except TokenInvalid:
            return Denied(Reason.INVALID)
        ended, found = await self._store.token_standing(
            claims.token_id, claims.kind, claims.subject
        )
        if ended:
            return Denied(Reason.ENDED)
        refused = denial(found, claims.issued_us)
        if refused is not None:
            return refused
        assert found is not None
        return Access(found.user, Grant(claims), found.exchanges, claims.expires_us)

    async def principal(self, kind: str, subject: str) -> Principal | None:
        """The key's or user's standing now, for :func:`denial` (the gateway's re-checks)."""
        return await self._store.principal(kind, subject)

    async def end(self, grant: Grant) -> None:
        """Refuse the grant's token from now on, until it expires."""
        await self._store.end_token(grant.token_id, us_to_dt(grant.expires_us))
