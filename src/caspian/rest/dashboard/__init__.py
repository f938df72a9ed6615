"""The web dashboard: static files served at ``/dashboard/``, nothing to build.

The page is plain ES modules and CSS from this package (``static/``), so it works
on a host without Internet access. It speaks only the public API, REST under
``/v1`` and the stream at ``/v1/stream``, as any outside client would.

Its responses, and only those, carry a Content-Security-Policy: the page takes a
key's secret or a password, so it may run only its own scripts, talk only to its
own origin, and not be framed by another site. The API's responses are left as
they are.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

FILES = Path(__file__).parent / "static"

# 'self' in connect-src also allows ws:/wss: to the page's own host and port
# (CSP Level 3), which is where the stream is.
POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated at every load (ETag), so a new version's modules are never mixed
    # with an old one's from the cache.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """The dashboard's files, with the page's security headers."""

    def __init__(self) -> None:
        super().__init__(directory=FILES, html=True)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount(app: Starlette, path: str) -> None:
    """Serves the dashboard under ``path`` (``/dashboard/``) in ``app``."""
    base = path.rstrip("/")
    app.mount(base, DashboardFiles(), name="dashboard")

    async def slash(_: Request) -> Response:
        # Relative, so that the redirect keeps the scheme and host the client used,
        # a TLS-terminating proxy's included, which an absolute one would not.
        return RedirectResponse(f"{base.rsplit('/', 1)[-1]}/", 308)

    app.add_route(base, slash, include_in_schema=False)
