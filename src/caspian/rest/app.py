"""The REST half of the Caspian API: authentication and reference data.

Bodies are parsed by hand rather than by FastAPI's validation because the
original documents a distinct code for each way an authentication request can
be wrong (4000 to 4003); ``caspian.rest.openapi`` still describes every body.
``/docs`` loads Swagger UI from files in the ``fastapi-offline`` package, never
from a CDN, so it works on a host without Internet access.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import orjson
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from caspian.auth.access import AccessCheck, Denied
from caspian.auth.proxies import TrustedProxies
from caspian.auth.ratelimit import Kind, LoginLimiter
from caspian.auth.tokens import TokenService
from caspian.codes import (
    AUTH_ERROR_MESSAGES,
    DATABASE_ERROR_MESSAGE,
    AuthErrorCode,
    RestErrorCode,
)
from caspian.pacing import LogThrottle
from caspian.rest import dashboard, openapi
from caspian.rest.errors import ApiError, error_response, json_response
from caspian.rest.index import LINKS, index_response
from caspian.rest.middleware import BodyLimit, InFlightLimit, Maintenance
from caspian.store import Store, StoreUnavailable
from caspian.tasks import failed
from caspian.timefmt import format_us

if TYPE_CHECKING:
    from caspian.service import Readiness

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)

#: Where the documentation page's own files (Swagger UI) are served.
DOCS_ASSETS = "/docs/assets"


class RestBackend(Protocol):
    store: Store
    tokens: TokenService
    limiter: LoginLimiter
    proxies: TrustedProxies

    def maintenance_remaining(self) -> float: ...

    async def readiness(self) -> Readiness: ...


def _auth_error(code: AuthErrorCode, detail: str | None = None) -> ApiError:
    message = AUTH_ERROR_MESSAGES[code]
    return ApiError(400, int(code), f"{message}: {detail}" if detail else message)


_NOT_JSON = object()


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _login_request(body: Any) -> tuple[Kind, str, str]:
    """The kind of login, the key id or user, and the secret or password of a body."""
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
    return ("key" if auth_type == "Key" else "user"), name, secret


def _exchange_codes(body: Any) -> list[str]:
    """The exchange codes a products request names, each once, in its order."""
    if body is _NOT_JSON or not isinstance(body, dict):
        raise ApiError(400, int(AuthErrorCode.NOT_FORMATTED), "Request is not properly formatted")
    codes = body.get("exchanges")
    if codes is None or codes == []:
        raise ApiError(400, int(RestErrorCode.NOTHING_SPECIFIED), "No exchange specified")
    if not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
        raise ApiError(
            400, int(AuthErrorCode.NOT_FORMATTED), "exchanges must be a list of exchange codes"
        )
    return list(dict.fromkeys(codes))


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
    app = FastAPIOffline(
        title="Caspian API v1",
        version="1.0",
        description="Authentication and reference data of the Caspian market-data service. "
        "The real-time stream is the WebSocket at /v1/stream (see the README).",
        docs_url=LINKS["docs"],
        redoc_url=None,
        openapi_url=LINKS["openapi"],
        static_url=DOCS_ASSETS,
        # Swagger UI would otherwise send the document's URL to swagger.io's validator
        # and show its badge: a request off this host.
        swagger_ui_parameters={"validatorUrl": None},
    )
    openapi.install(app)
    _handle_errors(app)
    # The last added runs first: a request refused for load costs nothing more.
    app.add_middleware(Maintenance, remaining=backend.maintenance_remaining)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(InFlightLimit, limit=max_in_flight)

    store = backend.store
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

    @app.get("/", include_in_schema=False)
    @app.get("/v1", include_in_schema=False)
    async def index(request: Request) -> Response:
        return index_response(request, backend.proxies)

    dashboard.mount(app, LINKS["dashboard"])

    @app.post("/v1/auth/authenticate", **openapi.AUTHENTICATE)
    async def authenticate(request: Request) -> Response:
        kind, name, secret = _login_request(await _json_body(request))
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

    @app.get("/v1/reference/exchanges", **openapi.EXCHANGES_DOC)
    async def exchanges(request: Request) -> Response:
        await require_token(request)
        rows = await store.list_exchanges()
        return json_response([{"name": name, "code": code} for name, code in rows])

    @app.post("/v1/reference/products", **openapi.PRODUCTS)
    async def products(request: Request) -> Response:
        await require_token(request)
        codes = _exchange_codes(await _json_body(request))
        known = {code for _, code in await store.list_exchanges()}
        unknown = sorted(set(codes) - known)
        if unknown:
            raise ApiError(
                400,
                int(AuthErrorCode.NOT_FORMATTED),
                f"Unknown exchange: {', '.join(unknown[:10])}",
            )
        records = await store.products(codes)
        return json_response([record.api_dict() for record in records])

    @app.get("/v1/reference/products/{caspianCode:path}", **openapi.PRODUCT)
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

    @app.get(LINKS["health"], include_in_schema=False)
    async def health() -> Response:
        # Liveness: whatever the store, the bus or the source do, the process answers;
        # only a background task of its own that failed asks for a restart.
        broken = failed()
        if broken:
            return json_response({"status": "failed", "failed": broken}, 503)
        return json_response({"status": "ok"})

    @app.get(LINKS["readiness"], include_in_schema=False)
    async def ready() -> Response:
        readiness = await backend.readiness()
        return json_response(
            {"ready": readiness.ready, **readiness.parts}, 200 if readiness.ready else 503
        )

    expected_metrics = metrics_token.encode() if metrics_token else None

    @app.get(LINKS["metrics"], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if expected_metrics is not None:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            # Header values arrive decoded as Latin-1: encoding them back gives the bytes
            # sent. Compared in constant time, so the token cannot be guessed byte by byte.
            matches = hmac.compare_digest(given.strip().encode("latin-1"), expected_metrics)
            if scheme.lower() != "bearer" or not matches:
                return error_response(
                    401,
                    int(RestErrorCode.UNAUTHORIZED),
                    "The metrics token is missing or wrong",
                    {"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error answered in the documented ``{"code", "message"}`` form."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, exc: StoreUnavailable) -> Response:
        _throttled.warning("store", f"store unavailable: {exc}")
        return error_response(500, int(RestErrorCode.DATABASE), DATABASE_ERROR_MESSAGE)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(
            400, int(RestErrorCode.BAD_REQUEST), "Request is not properly formatted"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(
            exc.status_code,
            exc.status_code,
            str(exc.detail),
            dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Response:
        _throttled.exception("internal", "unhandled error in a REST request")
        return error_response(500, int(RestErrorCode.INTERNAL), "Internal Server Error")
