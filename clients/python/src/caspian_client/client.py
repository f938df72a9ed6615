"""The REST side: logging in, keeping a token, and reference data."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from caspian_client.errors import (
    AuthenticationError,
    HTTPError,
    RequestTimeout,
    ServiceUnavailable,
    Unreachable,
)
from caspian_client.models import Exchange, Product, Token, timestamp

if TYPE_CHECKING:
    from caspian_client.stream import Stream


def _base_urls(url: str) -> tuple[str, str]:
    """The REST base (``…/v1``) and the stream URL for a service address, given with or
    without ``/v1`` (``http://host:8080``, ``https://host/v1``, or the ``ws://`` stream)."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ValueError(f"not a Caspian service URL: {url!r}")
    path = parts.path.removesuffix("/stream").removesuffix("/v1")
    secure = parts.scheme in ("https", "wss")
    rest = urlunsplit(("https" if secure else "http", parts.netloc, f"{path}/v1", "", ""))
    stream = urlunsplit(("wss" if secure else "ws", parts.netloc, f"{path}/v1/stream", "", ""))
    return rest, stream


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error(response: httpx.Response, on_login: bool = False) -> HTTPError:
    code: int | None = None
    message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        raw_code = body.get("code")
        code = raw_code if isinstance(raw_code, int) else None
        message = str(body.get("message") or body.get("detail") or "")
    status = response.status_code
    if status in (429, 503):
        return ServiceUnavailable(status, code, message, _retry_after(response))
    if status == 401 or (on_login and status == 400):
        return AuthenticationError(status, code, message)
    return HTTPError(status, code, message)


class Client:
    """A Caspian service: ``Client(url, key_id=..., secret=...)`` or
    ``Client(url, user=..., password=...)``. Anything not given comes from the
    environment: ``CASPIAN_URL``, ``CASPIAN_KEY_ID``/``CASPIAN_KEY_SECRET`` or
    ``CASPIAN_USER``/``CASPIAN_PASSWORD``.

    Use it as ``async with Client(...) as client:`` (or call ``aclose``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        key_id: str | None = None,
        secret: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
    ) -> None:
        url = url or os.environ.get("CASPIAN_URL")
        if not url:
            raise ValueError("no service URL: pass one or set CASPIAN_URL")
        self.rest_url, self.stream_url = _base_urls(url)
        if key_id is None and secret is None and user is None and password is None:
            key_id = os.environ.get("CASPIAN_KEY_ID")
            secret = os.environ.get("CASPIAN_KEY_SECRET")
            if key_id is None and secret is None:
                user = os.environ.get("CASPIAN_USER")
                password = os.environ.get("CASPIAN_PASSWORD")
        login: dict[str, Any]
        if key_id is not None and secret is not None:
            login = {"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}}
        elif user is not None and password is not None:
            login = {"type": "Credential", "payload": {"user": user, "pass": password}}
        else:
            raise ValueError(
                "no login: pass key_id and secret, or user and password "
                "(or set CASPIAN_KEY_ID and CASPIAN_KEY_SECRET)"
            )
        self._login = login
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout, verify=verify)
        self.verify = verify
        self._token: Token | None = None
        self._token_received = 0.0
        self._token_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- tokens -------------------------------------------------------------

    async def authenticate(self) -> Token:
        """Logs in afresh; the new token is also kept for the next requests."""
        response = await self._send("POST", "/auth/authenticate", self._login)
        if response.status_code != 200:
            raise _error(response, on_login=True)
        body = response.json()
        expiration = timestamp(body.get("expiration"))
        lifetime: float | None = None
        if expiration is not None:
            # The shorter of the lifetimes by the local clock and by the server's
            # (its Date header): a skewed clock on either side then makes the token
            # look shorter-lived, never longer.
            lifetime = (expiration - datetime.now(UTC)).total_seconds()
            date = response.headers.get("Date")
            if date:
                with contextlib.suppress(TypeError, ValueError):
                    lifetime = min(
                        lifetime, (expiration - parsedate_to_datetime(date)).total_seconds()
                    )
            lifetime = max(0.0, lifetime)
        token = Token(str(body["accessToken"]), expiration, lifetime)
        self._token, self._token_received = token, time.monotonic()
        return token

    def forget_token(self) -> None:
        """Drops the kept token: the next request logs in again."""
        self._token = None

    def refresh_due_in(self) -> float | None:
        """Seconds until the kept token should be replaced (None: no token, or its
        lifetime unknown): when a quarter of its lifetime is left, or half of it but
        at most a minute, whichever comes first, so that even a short-lived token is
        replaced with time to spare for the login and the TokenRefresh."""
        if self._token is None or self._token.lifetime_s is None:
            return None
        lifetime = self._token.lifetime_s
        spare = max(lifetime * 0.25, min(lifetime * 0.5, 60.0))
        return lifetime - spare - (time.monotonic() - self._token_received)

    async def token(self, fresh: bool = False) -> str:
        """A valid access token: the kept one, or a new one when it is due (or ``fresh``)."""
        async with self._token_lock:
            due = self.refresh_due_in()
            if fresh or self._token is None or (due is not None and due <= 0):
                await self.authenticate()
            assert self._token is not None
            return self._token.access_token

    async def _send(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        try:
            return await self._http.request(
                method, f"{self.rest_url}{path}", json=body, headers=headers
            )
        except httpx.TimeoutException:
            raise RequestTimeout(f"{method} {path}", self.timeout) from None
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.rest_url}: {exc or type(exc).__name__}") from exc

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(2):
            token = await self.token(fresh=attempt > 0)
            response = await self._send(method, path, body, {"Authorization": token})
            # A token that stopped being valid (expired, signing key rotated) gets one
            # more try with a new login.
            if response.status_code == 401 and attempt == 0:
                continue
            if response.status_code != 200:
                raise _error(response)
            return response.json()
        raise AssertionError("unreachable")

    # -- reference data -----------------------------------------------------

    async def exchanges(self) -> list[Exchange]:
        return [Exchange.parse(raw) for raw in await self._request("GET", "/reference/exchanges")]

    async def products(self, exchanges: Sequence[str]) -> list[Product]:
        if isinstance(exchanges, str):
            raise TypeError("products() takes a list of exchange codes, e.g. ['GEMINI']")
        raw = await self._request("POST", "/reference/products", {"exchanges": list(exchanges)})
        return [Product.parse(entry) for entry in raw]

    async def product(self, caspian_code: str) -> Product:
        path = f"/reference/products/{quote(caspian_code, safe='')}"
        return Product.parse(await self._request("GET", path))

    # -- streaming ----------------------------------------------------------

    def stream(self, **options: Any) -> Stream:
        """A stream that keeps itself connected; use ``async with client.stream() as s``.
        Options: see ``Stream``."""
        from caspian_client.stream import Stream

        return Stream(self, **options)
