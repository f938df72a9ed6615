"""Runs the service: REST and the stream on one address, through uvicorn."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

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


async def serve(settings: Settings, on_ready: Callable[[Listening], None] | None = None) -> None:
    """Start everything, call ``on_ready`` once clients can connect, run until stopped."""
    service = Service(settings)
    sock = listen_socket(settings.host, settings.port, settings.reuse_port)
    try:
        await service.start()
        limits = client_limits(settings, service.proxies)
        config = uvicorn.Config(
            service.rest,
            http=GuardedHttp.bound(
                limits,
                settings.handshake_timeout_s,
                settings.max_header_bytes,
                settings.max_headers,
            ),
            ws=StreamConnection.bound(service.gateway, limits),
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
        shown = f"[{host}]" if ":" in host else host
        secure = settings.tls_cert is not None
        base = f"{'https' if secure else 'http'}://{shown}:{port}"
        stream = f"{'wss' if secure else 'ws'}://{shown}:{port}{STREAM_PATH}"
        if on_ready is not None:
            on_ready(Listening(f"{base}/v1", stream, server, service))
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await service.stop()


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
    )
    CLIENT_CONNECTIONS.set_function(lambda: limits.open)
    return limits
