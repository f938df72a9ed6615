"""Access tokens: HS256 JWTs with ``sub``, ``iss``, ``iat``, ``exp`` and ``jti``.

Besides the registered claims a token says what logged in (``knd``: ``key`` or
``user``) and for whom (``usr``), so that the stream can check on every
connection that the key behind it has not been revoked since.
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
        issued_s = now_us() / 1_000_000
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
        }
        token = jwt.encode(payload, self._secret, algorithm=_ALGORITHM)
        return IssuedToken(token, TokenClaims(kind, subject, user, expires_s * 1_000_000, token_id))

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
        return TokenClaims(
            kind, str(payload["sub"]), user, int(payload["exp"]) * 1_000_000, str(payload["jti"])
        )


def load_or_create_secret(data_dir: Path) -> str:
    """The signing key kept in the data directory, made on first use with mode 600."""
    path = data_dir / _SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
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
