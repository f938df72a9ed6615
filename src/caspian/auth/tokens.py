"""Access tokens: HS256 JWTs with ``sub``, ``iss``, ``iat``, ``exp`` and ``jti``.

Besides the registered claims a token says what logged in (``knd``: ``key`` or
``user``) and for whom (``usr``), so that the stream can check on every
connection that the key behind it has not been revoked since; and when it was
issued to the microsecond (``ius``; ``iat`` has whole seconds), so that a
password changed even a moment before a new login leaves that login's token
valid and every earlier one invalid.
"""

from __future__ import annotations

import math
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from caspian.codes import TOKEN_ISSUER
from caspian.files import private_dir, tighten_if_present
from caspian.timefmt import now_us

_ALGORITHM = "HS256"
_SECRET_FILE = "jwt-secret"


class TokenError(Exception):
    """The token cannot be used."""


class TokenInvalid(TokenError):
    pass


class TokenExpired(TokenError):
    pass


@dataclass(frozen=True, slots=True)
class TokenClaims:
    kind: str
    subject: str
    user: str
    expires_us: int
    token_id: str
    issued_us: int


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    claims: TokenClaims


class TokenService:
    def __init__(self, secret: str, ttl_s: int) -> None:
        if len(secret) < 32:
            raise ValueError("the token signing key must be at least 32 characters")
        self._secret = secret
        self._ttl_s = ttl_s

    def issue(self, kind: str, subject: str, user: str) -> IssuedToken:
        issued_us = now_us()
        issued_s = issued_us / 1_000_000
        # PyJWT compares whole seconds, so the expiry is a whole second and
        # the advertised expiration matches what is enforced exactly.
        expires_s = math.ceil(issued_s + self._ttl_s)
        token_id = uuid.uuid4().hex
        payload = {
            "sub": subject,
            "iss": TOKEN_ISSUER,
            "iat": int(issued_s),
            "exp": expires_s,
            "jti": token_id,
            "knd": kind,
            "usr": user,
            "ius": issued_us,
        }
        token = jwt.encode(payload, self._secret, algorithm=_ALGORITHM)
        claims = TokenClaims(kind, subject, user, expires_s * 1_000_000, token_id, issued_us)
        return IssuedToken(token, claims)

    def verify(self, token: str) -> TokenClaims:
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=TOKEN_ISSUER,
                options={"require": ["sub", "iss", "iat", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpired(str(exc)) from exc
        except jwt.PyJWTError as exc:
            raise TokenInvalid(str(exc)) from exc
        kind, user = payload.get("knd"), payload.get("usr")
        if kind not in ("key", "user") or not isinstance(user, str):
            raise TokenInvalid("token does not name its principal")
        # Tokens issued before ``ius`` existed have only the whole second of ``iat``.
        issued_us = payload.get("ius", int(payload["iat"]) * 1_000_000)
        if isinstance(issued_us, bool) or not isinstance(issued_us, int):
            raise TokenInvalid("token has an invalid issue time")
        return TokenClaims(
            kind,
            str(payload["sub"]),
            user,
            int(payload["exp"]) * 1_000_000,
            str(payload["jti"]),
            issued_us,
        )


def load_or_create_secret(data_dir: Path) -> str:
    """The signing key kept in the data directory, made on first use with mode 600.

    The data directory is made private first (700), and a key file found readable by
    others is tightened.
    """
    private_dir(data_dir)
    path = data_dir / _SECRET_FILE
    try:
        tighten_if_present(path)
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(48)
    # Written in full under a name of its own, then linked into place: a process that
    # finds the key file (a second server starting at the same time) never reads it
    # half-written, and a crash mid-write leaves no empty key behind.
    draft = data_dir / f".{_SECRET_FILE}.{uuid.uuid4().hex}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret)
        os.link(draft, path)
    except FileExistsError:
        # Another process made it first: use theirs.
        return path.read_text().strip()
    finally:
        draft.unlink()
    return secret
