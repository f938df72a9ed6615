"""Kraken's public REST API played back from recorded answers, over real HTTP.

The answers are ``tests/fixtures/kraken`` (see its README), each file served at
``/0/public/<file name without .json>``; a test may change ``answers`` while the
server runs, as the exchange changes its listings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

KRAKEN_RECORDING = Path(__file__).resolve().parent.parent / "fixtures" / "kraken"


@dataclass
class RecordedExchange:
    url: str
    requested: list[str]
    answers: dict[str, tuple[int, bytes]]


@contextmanager
def recorded_kraken() -> Iterator[RecordedExchange]:
    answers = {
        f"/0/public/{path.stem}": (200, path.read_bytes())
        for path in KRAKEN_RECORDING.glob("*.json")
    }
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            status, body = answers.get(
                self.path.partition("?")[0], (404, b'{"error":["EGeneral:Unknown method"]}')
            )
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                # A client that gave up on the exchange (a timeout, a failed load) left.
                pass

        # Other exchanges' clients pointed here may POST; they get Kraken's 404 too.
        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield RecordedExchange(f"http://127.0.0.1:{server.server_address[1]}", requested, answers)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
