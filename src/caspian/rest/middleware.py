"""What every REST request passes before its route: size, load and maintenance checks.

``create_app`` stacks them so that the in-flight cap runs first, then the body
limit, then the maintenance window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caspian.codes import RestErrorCode
from caspian.metrics import REST_BUSY
from caspian.pacing import LogThrottle
from caspian.rest.errors import error_response

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413.

    The body is read here, at most ``limit`` bytes of it, and handed on whole:
    bodies this API takes are small, and reading first means an oversized one
    is refused before any handler starts, whether or not it declared a length.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    await self._refuse(scope, receive, send)
                    return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        text = f"The request body is larger than {self.limit} bytes"
        response = error_response(413, int(RestErrorCode.TOO_LARGE), text, {"Connection": "close"})
        await response(scope, receive, send)


class InFlightLimit:
    """Answers 503 at once when ``limit`` requests are already being served.

    A client that sends requests and hangs up does not stop their handlers:
    thousands of them held memory and the store's connections for tens of
    seconds while real clients waited. The cap bounds both.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            REST_BUSY.inc()
            _throttled.warning("busy", f"refusing REST requests: {self.limit} in flight")
            response = error_response(
                503,
                int(RestErrorCode.UNAVAILABLE),
                "The server is busy: try again shortly",
                {"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class Maintenance:
    """Answers 503 under ``/v1/`` while the maintenance window is open.

    ``remaining`` gives the seconds the window stays open (0 when it is
    closed); they become the ``Retry-After``. The operator's paths and the
    documentation answer throughout.
    """

    def __init__(self, app: ASGIApp, remaining: Callable[[], float]) -> None:
        self.app = app
        self.remaining = remaining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            remaining = self.remaining()
            if remaining > 0:
                response = error_response(
                    503,
                    int(RestErrorCode.UNAVAILABLE),
                    "The service is down for maintenance",
                    {"Retry-After": str(max(1, int(remaining + 0.999)))},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
