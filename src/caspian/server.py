"""Runs the service: REST and the stream on one address, through uvicorn.

In the ``ingest`` role (``caspian ingest``) the same service runs its source and
publishes to the NATS bus, and its address answers only the operator's paths
(``INGEST_PATHS``): no REST API, no stream.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from caspian.auth.proxies import TrustedProxies
from caspian.gateway.connection import STREAM_PATH, StreamConnection
from caspian.guard import (
    ConnectionLimits,
    GuardedHttp,
    connection_limit,
    raise_open_file_limit,
)
from caspian.metrics import CLIENT_CONNECTIONS, CLIENT_CONNECTIONS_LIMIT
from caspian.service import Service
from caspian.settings import Settings

log = logging.getLogger(__name__)

#: What an ingest instance's address answers; any other path is 404.
INGEST_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def operator_paths_only(app: ASGIApp) -> ASGIApp:
    """``app`` answering only ``INGEST_PATHS``: 404, in the REST error form, for the rest."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in INGEST_PATHS:
            response = JSONResponse(
                {
                    "code": 404,
                    "message": "Not found: this is an ingest instance; it serves "
                    + ", ".join(sorted(INGEST_PATHS)),
                },
                status_code=404,
            )
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded


@dataclass(frozen=True, slots=True)
class Listening:
    rest_url: str
    stream_url: str
    server: uvicorn.Server
    service: Service


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket for uvicorn, whose connections send at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The protocol is named, not left 0 as socket.create_server leaves it: asyncio
    # turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say they are
    # TCP, and accepted sockets inherit the listener's. With Nagle on, a write
    # waits for the client to acknowledge the one before, which a client that
    # delays its acknowledgements holds back for tens of milliseconds.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ValueError("CASPIAN_REUSE_PORT: this platform has no SO_REUSEPORT")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    except ValueError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve(
    settings: Settings,
    on_ready: Callable[[Listening], None] | None = None,
    ingest: bool = False,
) -> None:
    """Start everything, call ``on_ready`` once clients can connect, run until stopped.

    ``ingest``: as ``caspian ingest``, answering only ``INGEST_PATHS``.
    """
    if ingest:
        if not settings.bus.startswith(("nats://", "tls://")):
            raise ValueError("caspian ingest publishes to a NATS bus: set CASPIAN_BUS=nats://…")
        if settings.source == "none":
            raise ValueError("caspian ingest needs a source: CASPIAN_SOURCE must not be none")
    service = Service(settings, serves_clients=not ingest)
    sock = listen_socket(settings.host, settings.port, settings.reuse_port)
    try:
        await service.start()
        await service.store.prepare()
        limits = client_limits(settings, service.proxies)
        config = uvicorn.Config(
            operator_paths_only(service.rest) if ingest else service.rest,
            http=GuardedHttp.bound(
                limits,
                settings.handshake_timeout_s,
                settings.max_header_bytes,
                settings.max_headers,
            ),
            # Without a WebSocket protocol, an upgrade to the stream is a plain request: 404.
            ws="none" if ingest else StreamConnection.bound(service.gateway, limits),
            lifespan="off",
            log_level=settings.log_level,
            access_log=False,
            server_header=False,
            # uvicorn would otherwise take X-Forwarded-For from any local peer as the
            # client; the service decides whom to believe (CASPIAN_TRUSTED_PROXIES).
            proxy_headers=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        )
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        rest, stream = addresses(host, port, settings.tls_cert is not None)
        if on_ready is not None:
            on_ready(Listening(rest, stream, server, service))
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await service.stop()


def addresses(host: str, port: int, secure: bool) -> tuple[str, str]:
    """The REST API's and the stream's URLs on ``host:port``."""
    shown = f"[{host}]" if ":" in host else host
    base = f"{'https' if secure else 'http'}://{shown}:{port}"
    return f"{base}/v1", f"{'wss' if secure else 'ws'}://{shown}:{port}{STREAM_PATH}"


def client_limits(settings: Settings, proxies: TrustedProxies) -> ConnectionLimits:
    """The connection limits, the total one kept below the open-file limit."""
    open_files = raise_open_file_limit()
    total = connection_limit(settings.max_connections, open_files)
    if total > open_files:
        log.warning(
            "CASPIAN_MAX_CONNECTIONS=%d is above the open-file limit (%d): connections past "
            "that will fail to be accepted",
            total,
            open_files,
        )
    log.info("open-file limit %d: up to %d client connections", open_files, total)
    CLIENT_CONNECTIONS_LIMIT.set(total)
    limits = ConnectionLimits(
        total,
        settings.max_connections_per_address,
        settings.max_streams_per_principal,
        proxies.__contains__,
        (settings.max_messages_per_s_per_principal, settings.max_message_burst_per_principal),
    )
    CLIENT_CONNECTIONS.set_function(lambda: limits.open)
    return limits
