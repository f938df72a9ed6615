"""The first URLs a user opens: the index at / and /v1, and /docs without the Internet.

Everything goes over real HTTP to the started service, as a browser or a
client program would send it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from websockets.sync.client import connect

from tests.support.service import RunningService, start_service

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
OPERATIONS = {
    ("POST", "/v1/auth/authenticate"),
    ("GET", "/v1/reference/exchanges"),
    ("POST", "/v1/reference/products"),
    ("GET", "/v1/reference/products/{caspianCode}"),
}


def get(service: RunningService, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{service.base_url}{path}", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """A service that believes its local peer is its reverse proxy."""
    running = start_service(tmp_path_factory.mktemp("proxied"), trusted_proxies=["127.0.0.1"])
    yield running
    running.stop()


@pytest.mark.parametrize("path", ["/", "/v1"])
def test_index_is_json_by_default(service: RunningService, path: str) -> None:
    response = get(service, path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "accept" in response.headers["vary"].lower()
    index = response.json()
    base = service.base_url
    assert index["name"] == "Caspian API v1"
    assert index["version"]
    assert {
        (endpoint["method"], endpoint["url"].removeprefix(base)) for endpoint in index["endpoints"]
    } == OPERATIONS
    assert all(endpoint["summary"] for endpoint in index["endpoints"])
    assert index["stream"] == service.stream_url
    assert index["docs"] == f"{base}/docs"
    assert index["openapi"] == f"{base}/openapi.json"
    assert index["metrics"] == f"{base}/metrics"
    assert index["health"] == f"{base}/healthz"
    assert index["readiness"] == f"{base}/readyz"


@pytest.mark.parametrize(
    "accept", ["*/*", "application/json", "application/json, text/html;q=0.5", "image/png", "a/b/c"]
)
def test_index_stays_json_unless_html_is_preferred(service: RunningService, accept: str) -> None:
    response = get(service, "/v1", accept=accept)
    assert response.status_code == 200
    assert response.json()["stream"] == service.stream_url


def test_every_address_in_the_index_answers(service: RunningService) -> None:
    index = get(service, "/").json()
    for endpoint in index["endpoints"]:
        url = endpoint["url"].replace("{caspianCode}", "FX-ETH/USD=GEMINI")
        # Without a token or a body: refused, but by the endpoint itself.
        answered = httpx.request(endpoint["method"], url, timeout=30)
        assert answered.status_code in (400, 401), (endpoint, answered.text)
    for name in ("docs", "openapi", "metrics", "health", "readiness"):
        assert httpx.get(index[name], timeout=30).status_code == 200, name
    with connect(f"{index['stream']}?accessToken={service.token()}") as stream:
        stream.ping().wait(10)


@pytest.mark.parametrize("path", ["/", "/v1"])
def test_index_is_a_page_for_a_browser(service: RunningService, path: str) -> None:
    response = get(service, path, accept=BROWSER_ACCEPT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "accept" in response.headers["vary"].lower()
    page = response.text
    base = service.base_url
    for link in ("/docs", "/openapi.json", "/metrics", "/healthz", "/readyz"):
        assert f'href="{base}{link}"' in page
    assert service.stream_url in page
    assert f"{base}/v1/auth/authenticate" in page
    assert f"{base}/v1/reference/products/{{caspianCode}}" in page


def test_index_names_the_host_the_client_used(service: RunningService) -> None:
    index = get(service, "/v1", host="md.example.com:8443").json()
    assert index["stream"] == "ws://md.example.com:8443/v1/stream"
    assert index["docs"] == "http://md.example.com:8443/docs"
    v6 = get(service, "/v1", host="[2001:db8::1]").json()
    assert v6["stream"] == "ws://[2001:db8::1]/v1/stream"


@pytest.mark.parametrize("host", ["bad host", "md.example.com/x", "<b>", "md.example.com:port"])
def test_a_host_header_that_is_no_host_gives_the_service_address(
    service: RunningService, host: str
) -> None:
    index = get(service, "/", host=host).json()
    assert index["stream"] == service.stream_url
    assert index["docs"] == f"{service.base_url}/docs"
    page = get(service, "/", host=host, accept=BROWSER_ACCEPT).text
    assert host not in page


def test_forwarded_proto_is_ignored_from_an_untrusted_peer(service: RunningService) -> None:
    index = get(service, "/v1", **{"x-forwarded-proto": "https"}).json()
    assert index["stream"] == service.stream_url
    assert index["docs"].startswith("http://")


def test_a_trusted_proxy_names_the_scheme(behind_proxy: RunningService) -> None:
    headers = {"host": "md.example.com", "x-forwarded-proto": "https"}
    index = get(behind_proxy, "/v1", **headers).json()
    assert index["stream"] == "wss://md.example.com/v1/stream"
    assert index["docs"] == "https://md.example.com/docs"
    assert all(e["url"].startswith("https://md.example.com/v1/") for e in index["endpoints"])
    # The proxy that connected is the one whose word counts: the right-most entry.
    chained = get(
        behind_proxy, "/v1", host="md.example.com", **{"x-forwarded-proto": "https, http"}
    )
    assert chained.json()["stream"] == "ws://md.example.com/v1/stream"
    # Anything but http or https is not a scheme to give clients.
    odd = get(behind_proxy, "/v1", host="md.example.com", **{"x-forwarded-proto": "gopher"})
    assert odd.json()["stream"] == "ws://md.example.com/v1/stream"


class _References(HTMLParser):
    """The URLs an HTML page makes the browser load: scripts, styles, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (name == "src" or (tag == "link" and name == "href")):
                self.urls.append(value)


def _fetch_same_host(service: RunningService, page_url: str, reference: str) -> httpx.Response:
    url = urljoin(page_url, reference)
    assert urlsplit(url).netloc == urlsplit(service.base_url).netloc, url
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, url
    assert response.content, url
    return response


def test_docs_load_everything_from_the_service(service: RunningService) -> None:
    docs_url = f"{service.base_url}/docs"
    response = httpx.get(docs_url, timeout=30)
    assert response.status_code == 200
    page = response.text
    # No absolute or protocol-relative address anywhere: nothing is loaded off this host.
    assert "://" not in page
    assert not re.search(r"""(src|href)=["']//""", page)
    references = _References()
    references.feed(page)
    assert any(url.endswith(".js") for url in references.urls)
    assert any(url.endswith(".css") for url in references.urls)
    stylesheets: list[Any] = []
    for reference in references.urls:
        fetched = _fetch_same_host(service, docs_url, reference)
        if reference.endswith(".css"):
            stylesheets.append((urljoin(docs_url, reference), fetched.text))
    for css_url, css in stylesheets:
        for reference in re.findall(r"url\(\s*['\"]?([^'\")]+)", css):
            if not reference.startswith("data:"):
                _fetch_same_host(service, css_url, reference)
    # The page's script asks for the document here, and for no outside validator.
    document = re.search(r"url: '([^']+)'", page)
    assert document is not None
    assert _fetch_same_host(service, docs_url, document.group(1)).json()["openapi"]
    assert re.search(r'"validatorUrl": null', page)


def test_docs_answer_during_maintenance(tmp_path: Path) -> None:
    now = time.gmtime()
    day = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"][now.tm_wday]
    start = now.tm_hour * 60 + now.tm_min
    end = (start + 2) % 1440
    window = f"{day} {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    running = start_service(tmp_path, maintenance=window)
    try:
        assert get(running, "/v1/reference/exchanges").status_code == 503
        docs = get(running, "/docs")
        assert docs.status_code == 200
        assert get(running, "/").status_code == 200
    finally:
        running.stop()
