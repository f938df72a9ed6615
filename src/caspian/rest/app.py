"""The REST half of the Caspian API: authentication and reference data.

Bodies are parsed by hand rather than by FastAPI's validation because the
original documents a distinct code for each way an authentication request can
be wrong (4000 to 4003); the OpenAPI document still describes every body.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import orjson
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caspian.auth.access import AccessCheck, Denied
from caspian.auth.proxies import TrustedProxies
from caspian.auth.ratelimit import Kind, LoginLimiter
from caspian.auth.tokens import TokenService
from caspian.catalog.exchanges import EXCHANGES
from caspian.codes import (
    AUTH_ERROR_MESSAGES,
    DATABASE_ERROR_MESSAGE,
    AuthErrorCode,
    RestErrorCode,
)
from caspian.metrics import REST_BUSY
from caspian.pacing import LogThrottle
from caspian.store import Store, StoreUnavailable
from caspian.timefmt import format_us

if TYPE_CHECKING:
    from caspian.service import Readiness

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)


class RestBackend(Protocol):
    store: Store
    tokens: TokenService
    limiter: LoginLimiter
    proxies: TrustedProxies

    def maintenance_remaining(self) -> float: ...

    async def readiness(self) -> Readiness: ...


class ApiError(Exception):
    def __init__(
        self, status: int, code: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, headers=headers, media_type="application/json"
    )


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"code": code, "message": message}, status, headers)


def _auth_error(code: AuthErrorCode, detail: str | None = None) -> ApiError:
    message = AUTH_ERROR_MESSAGES[code]
    return ApiError(400, int(code), f"{message}: {detail}" if detail else message)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Bad Request: the body is not valid JSON or misses required attributes",
        401: "Unauthorized: no valid access token (or, for authentication, wrong credentials)",
        404: "Not found",
        413: "The request body is too large",
        429: "Too many failed logins; retry after the Retry-After header's seconds",
        500: "Internal Server Error (5001: could not access the database)",
        503: "The service is down for its maintenance window",
    }
    return {
        status: {
            "description": descriptions[status],
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
        for status in statuses
    }


_PRODUCT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["caspianCode", "exchange"],
    "properties": {
        name: {"type": "string"}
        for name in (
            "toraCode",
            "toraMarket",
            "caspianCode",
            "lotSize",
            "pseudoCode",
            "createdTime",
            "updatedTime",
            "ccyFrom",
            "ccyTo",
            "nativeCode",
            "tickRule",
            "description",
            "exchange",
            "multiplier",
            "lastTradingDate",
            "expireDate",
            "type",
            "strike",
            "underlyingCaspianCode",
            "nativeCode_v2",
        )
    },
}


def _login(type_: str, fields: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "payload"],
        "properties": {
            "type": {"type": "string", "const": type_},
            "payload": {
                "type": "object",
                "required": list(fields),
                "properties": {name: {"type": "string", "minLength": 1} for name in fields},
            },
        },
    }


_AUTH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    _login("Key", ("accessKeyID", "secretAccessKey")),
                    _login("Credential", ("user", "pass")),
                ]
            }
        }
    },
}

_PRODUCTS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["exchanges"],
                "properties": {
                    "exchanges": {
                        "type": "array",
                        "items": {"type": "string", "enum": [code for _, code in EXCHANGES]},
                        "minItems": 1,
                    }
                },
            }
        }
    },
}

_TOKEN_SECURITY: list[dict[str, list[str]]] = [{"accessToken": []}]


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
        response = _error(413, int(RestErrorCode.TOO_LARGE), text, {"Connection": "close"})
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
            response = _error(
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


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON


_NOT_JSON = object()


def client_address(request: Request, proxies: TrustedProxies) -> str:
    """The client's address: the TCP peer, or whom a trusted proxy says it forwards."""
    peer = request.client.host if request.client else "unknown"
    # Several X-Forwarded-For fields are one list, in order (RFC 9110, 5.3).
    forwarded = request.headers.getlist("x-forwarded-for")
    return proxies.client(peer, ",".join(forwarded) if forwarded else None)


def create_app(
    backend: RestBackend,
    max_body_bytes: int,
    metrics_token: str | None,
    max_in_flight: int,
) -> FastAPI:
    app = FastAPI(
        title="Caspian API v1",
        version="1.0",
        description="Authentication and reference data of the Caspian market-data service. "
        "The real-time stream is the WebSocket at /v1/stream (see the README).",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    store = backend.store

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, exc: StoreUnavailable) -> Response:
        _throttled.warning("store", f"store unavailable: {exc}")
        return _error(500, int(RestErrorCode.DATABASE), DATABASE_ERROR_MESSAGE)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return _error(400, int(RestErrorCode.BAD_REQUEST), "Request is not properly formatted")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(
            exc.status_code,
            exc.status_code,
            str(exc.detail),
            dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Response:
        _throttled.exception("internal", "unhandled error in a REST request")
        return _error(500, int(RestErrorCode.INTERNAL), "Internal Server Error")

    @app.middleware("http")
    async def _maintenance(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path.startswith("/v1/"):
            remaining = backend.maintenance_remaining()
            if remaining > 0:
                return _error(
                    503,
                    int(RestErrorCode.UNAVAILABLE),
                    "The service is down for maintenance",
                    {"Retry-After": str(max(1, int(remaining + 0.999)))},
                )
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    # Added last, so it runs first: a refused request costs nothing more.
    app.add_middleware(InFlightLimit, limit=max_in_flight)

    access_check = AccessCheck(backend.tokens, store)

    async def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "").strip()
        if header[:7].lower() == "bearer ":
            header = header[7:].strip()
        if not header:
            raise ApiError(401, int(RestErrorCode.UNAUTHORIZED), "Access token not found")
        access = await access_check.check(header)
        if isinstance(access, Denied):
            raise ApiError(401, int(RestErrorCode.UNAUTHORIZED), access.message)

    @app.post(
        "/v1/auth/authenticate",
        summary="Obtain an access token",
        tags=["Authentication"],
        openapi_extra={"requestBody": _AUTH_BODY},
        responses={
            200: {
                "description": "Authorization successful",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["accessToken", "expiration"],
                            "properties": {
                                "accessToken": {"type": "string"},
                                "expiration": {"type": "string"},
                            },
                        }
                    }
                },
            },
            **_responses(400, 413, 429, 500, 503),
            401: {"description": "Incorrect credentials or key (no content)"},
        },
    )
    async def authenticate(request: Request) -> Response:
        body = await _json_body(request)
        if body is _NOT_JSON or not isinstance(body, dict):
            raise _auth_error(AuthErrorCode.NOT_FORMATTED)
        if "type" not in body:
            raise _auth_error(AuthErrorCode.TYPE_NOT_FOUND)
        payload = body.get("payload")
        if not isinstance(payload, dict):
            raise _auth_error(AuthErrorCode.DETAILS_NOT_FOUND)
        auth_type = body["type"]
        if auth_type == "Key":
            fields = ("accessKeyID", "secretAccessKey")
        elif auth_type == "Credential":
            fields = ("user", "pass")
        else:
            raise _auth_error(AuthErrorCode.UNSUPPORTED_TYPE, "use Key or Credential")
        name, secret = (payload.get(field) for field in fields)
        if not isinstance(name, str) or not isinstance(secret, str) or not name or not secret:
            raise _auth_error(AuthErrorCode.DETAILS_NOT_FOUND, f"{fields[0]} and {fields[1]}")
        kind: Kind = "key" if auth_type == "Key" else "user"
        attempt = backend.limiter.begin(kind, name, client_address(request, backend.proxies))
        if isinstance(attempt, int):
            raise ApiError(
                429,
                int(RestErrorCode.TOO_MANY_REQUESTS),
                "Too many failed logins; try again later",
                {"Retry-After": str(attempt)},
            )
        # The attempt holds its place in the limiter's counts across the awaited
        # check, so that parallel guesses are counted like serial ones.
        with attempt:
            if kind == "key":
                key = await store.verify_key(name, secret)
                subject, user = (key.key_id, key.user) if key else (None, None)
            else:
                found = await store.verify_credential(name, secret)
                subject, user = (found.name, found.name) if found else (None, None)
            if subject is None or user is None:
                attempt.failed()
                return Response(status_code=401)
            attempt.succeeded()
        issued = backend.tokens.issue(kind, subject, user)
        return json_response(
            {"accessToken": issued.token, "expiration": format_us(issued.claims.expires_us)}
        )

    @app.get(
        "/v1/reference/exchanges",
        summary="All available exchanges",
        tags=["Reference Data"],
        openapi_extra={"security": _TOKEN_SECURITY},
        responses={
            200: {
                "description": "The exchanges",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "code"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "code": {"type": "string"},
                                },
                            },
                        }
                    }
                },
            },
            **_responses(401, 500, 503),
        },
    )
    async def exchanges(request: Request) -> Response:
        await require_token(request)
        rows = await store.list_exchanges()
        return json_response([{"name": name, "code": code} for name, code in rows])

    @app.post(
        "/v1/reference/products",
        summary="All products of the given exchanges",
        tags=["Reference Data"],
        openapi_extra={"requestBody": _PRODUCTS_BODY, "security": _TOKEN_SECURITY},
        responses={
            200: {
                "description": "The products",
                "content": {
                    "application/json": {"schema": {"type": "array", "items": _PRODUCT_SCHEMA}}
                },
            },
            **_responses(400, 401, 413, 500, 503),
        },
    )
    async def products(request: Request) -> Response:
        await require_token(request)
        body = await _json_body(request)
        if body is _NOT_JSON or not isinstance(body, dict):
            raise ApiError(
                400, int(AuthErrorCode.NOT_FORMATTED), "Request is not properly formatted"
            )
        codes = body.get("exchanges")
        if codes is None or codes == []:
            raise ApiError(400, int(RestErrorCode.NOTHING_SPECIFIED), "No exchange specified")
        if not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
            raise ApiError(
                400,
                int(AuthErrorCode.NOT_FORMATTED),
                "exchanges must be a list of exchange codes",
            )
        known = {code for _, code in await store.list_exchanges()}
        unknown = sorted(set(codes) - known)
        if unknown:
            raise ApiError(
                400,
                int(AuthErrorCode.NOT_FORMATTED),
                f"Unknown exchange: {', '.join(unknown[:10])}",
            )
        records = await store.products(list(dict.fromkeys(codes)))
        return json_response([record.api_dict() for record in records])

    @app.get(
        "/v1/reference/products/{caspianCode:path}",
        summary="The details of one product",
        tags=["Reference Data"],
        openapi_extra={"security": _TOKEN_SECURITY},
        responses={
            200: {
                "description": "The product",
                "content": {"application/json": {"schema": _PRODUCT_SCHEMA}},
            },
            **_responses(400, 401, 404, 500, 503),
        },
    )
    async def product(
        request: Request,
        caspianCode: Annotated[
            str,
            # Described, not enforced: a blank code gets the original's 4001 answer.
            Path(
                description="A Caspian code, raw or percent-encoded",
                json_schema_extra={"pattern": r"^\S+$"},
            ),
        ],
    ) -> Response:
        await require_token(request)
        if not caspianCode.strip():
            raise ApiError(400, int(RestErrorCode.NOTHING_SPECIFIED), "No product specified")
        record = await store.product(caspianCode)
        if record is None:
            raise ApiError(404, int(RestErrorCode.NOT_FOUND), f"Product not found: {caspianCode}")
        return json_response(record.api_dict())

    @app.get("/v1/reference/products", include_in_schema=False)
    async def no_product(request: Request) -> Response:
        await require_token(request)
        raise ApiError(400, int(RestErrorCode.NOTHING_SPECIFIED), "No product specified")

    @app.get("/healthz", include_in_schema=False)
    async def health() -> Response:
        # Liveness only: whatever the store, the bus or the source do, the process answers.
        return json_response({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    async def ready() -> Response:
        readiness = await backend.readiness()
        return json_response(
            {"ready": readiness.ready, **readiness.parts}, 200 if readiness.ready else 503
        )

    expected_metrics = metrics_token.encode() if metrics_token else None

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if expected_metrics is not None:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            # Header values arrive decoded as Latin-1: encoding them back gives the bytes
            # sent. Compared in constant time, so the token cannot be guessed byte by byte.
            matches = hmac.compare_digest(given.strip().encode("latin-1"), expected_metrics)
            if scheme.lower() != "bearer" or not matches:
                return _error(
                    401,
                    int(RestErrorCode.UNAUTHORIZED),
                    "The metrics token is missing or wrong",
                    {"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "accessToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "The accessToken from /v1/auth/authenticate, "
                    "alone or after 'Bearer '",
                }
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
