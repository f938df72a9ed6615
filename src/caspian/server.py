"""Runs the service: REST and the stream on one address, through uvicorn."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from caspian.gateway.connection import STREAM_PATH, StreamConnection
from caspian.service import Service
from caspian.settings import Settings


@dataclass(frozen=True, slots=True)
class Listening:
    rest_url: str
    stream_url: str
    server: uvicorn.Server
    service: Service


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


async def serve(settings: Settings, on_ready: Callable[[Listening], None] | None = None) -> None:
    """Start everything, call ``on_ready`` once clients can connect, run until stopped."""
    service = Service(settings)
    sock = _bind(settings.host, settings.port, settings.reuse_port)
    try:
        await service.start()
        config = uvicorn.Config(
            service.rest,
            ws=StreamConnection.bound(service.gateway),
            lifespan="off",
            log_level=settings.log_level,
            access_log=False,
            server_header=False,
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
