"""What ``/`` and ``/v1`` answer: where the API, its documentation and the stream are.

The URLs are absolute, as the client reached the service: its ``Host`` header
(Starlette falls back to the listening address when it is missing or no host
and port), and the connection's scheme, or the one a trusted proxy names in
``X-Forwarded-Proto`` (a TLS-terminating proxy in front of a plain-HTTP
service). The REST endpoints listed are the routes the OpenAPI document
describes, so the index cannot leave one out.
"""

from __future__ import annotations

import html
from importlib.metadata import version
from typing import Any

import mimeparse  # type: ignore[import-untyped]
from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import URL

from caspian.auth.proxies import TrustedProxies
from caspian.gateway.connection import STREAM_PATH
from caspian.rest.errors import json_response

#: The index's name for each path beside the API, in the order it lists them.
LINKS = {
    "dashboard": "/dashboard/",
    "docs": "/docs",
    "openapi": "/openapi.json",
    "metrics": "/metrics",
    "health": "/healthz",
    "readiness": "/readyz",
}

_LINK_TITLES = {
    "dashboard": "Web dashboard: live books in the browser",
    "docs": "Browsable API documentation",
    "openapi": "OpenAPI document",
    "metrics": "Prometheus metrics",
    "health": "Liveness",
    "readiness": "Readiness",
}

# Lowest preference first: on a tie, as for "*/*", JSON wins.
_OFFERED = ["text/html", "application/json"]


def public_scheme(request: Request, proxies: TrustedProxies) -> str:
    """``http`` or ``https``: the connection's, or what a trusted proxy says it was."""
    scheme = request.url.scheme
    peer = request.client.host if request.client else None
    if peer is not None and peer in proxies:
        # The right-most entry is what the proxy that connected to us writes or
        # passes on; a value other than http or https is not believed.
        entries = ",".join(request.headers.getlist("x-forwarded-proto")).split(",")
        forwarded = entries[-1].strip().lower()
        if forwarded in ("http", "https"):
            scheme = forwarded
    return scheme


def index(request: Request, proxies: TrustedProxies) -> dict[str, Any]:
    """The index as JSON: the API's endpoints, the stream and the operator's paths."""
    scheme = public_scheme(request, proxies)
    base = URL(f"{scheme}://{request.url.netloc}")
    stream = base.replace(scheme="wss" if scheme == "https" else "ws", path=STREAM_PATH)
    endpoints = [
        {
            "method": method,
            "url": str(base.replace(path=route.path_format)),
            "summary": route.summary,
        }
        for route in request.app.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in sorted(route.methods or ())
    ]
    return {
        "name": request.app.title,
        "version": version("caspian"),
        "endpoints": endpoints,
        "stream": str(stream),
        **{name: str(base.replace(path=path)) for name, path in LINKS.items()},
    }


def index_response(request: Request, proxies: TrustedProxies) -> Response:
    """The index as JSON, or as a small HTML page for a client that prefers HTML."""
    content = index(request, proxies)
    headers = {"Vary": "Accept"}
    try:
        wanted = mimeparse.best_match(_OFFERED, request.headers.get("accept", "*/*"))
    except ValueError:
        # A malformed Accept header gets the default rather than an error.
        wanted = "application/json"
    if wanted == "text/html":
        return HTMLResponse(_page(content), headers=headers)
    return json_response(content, headers=headers)


def _page(content: dict[str, Any]) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(item['method'])}</td><td><code>{e(item['url'])}</code></td>"
        f"<td>{e(item['summary'] or '')}</td></tr>"
        for item in content["endpoints"]
    )
    links = "\n".join(
        f'<li><a href="{e(content[name])}">{e(_LINK_TITLES[name])}</a>: '
        f"<code>{e(content[name])}</code></li>"
        for name in LINKS
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(content["name"])}</title>
</head>
<body>
<h1>{e(content["name"])}</h1>
<p>Caspian {e(content["version"])}.
Log in with <code>POST /v1/auth/authenticate</code> to get an access token.</p>
<h2>REST</h2>
<table>
{rows}
</table>
<h2>Stream</h2>
<p>WebSocket: <code>{e(content["stream"])}</code></p>
<h2>More</h2>
<ul>
{links}
</ul>
</body>
</html>
"""
