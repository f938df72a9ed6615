"""The real service, started the way ``caspian serve`` starts it, on a free port.

It runs in a thread with its own event loop, so tests talk to it over real
sockets exactly as any client would, while still being able to reach into its
store for setup.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from caspian.server import Listening, serve
from caspian.settings import Settings

T = TypeVar("T")


@dataclass
class RunningService:
    settings: Settings
    listening: Listening
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.listening.rest_url.removesuffix("/v1")

    @property
    def stream_url(self) -> str:
        return self.listening.stream_url

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the service's own loop (e.g. a store call) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def key(self, user: str = "alice") -> tuple[str, str]:
        info, secret = self.call(self.listening.service.store.create_key(user))
        return info.key_id, secret

    def token(self, user: str = "alice") -> str:
        key_id, secret = self.key(user)
        response = httpx.post(
            f"{self.base_url}/v1/auth/authenticate",
            json={"type": "Key", "payload": {"accessKeyID": key_id, "secretAccessKey": secret}},
            timeout=30,
        )
        response.raise_for_status()
        return str(response.json()["accessToken"])

    def stop(self) -> None:
        self.listening.server.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive():
            raise RuntimeError("the service did not stop within 30 s")


def start_service(data_dir: Path, **overrides: Any) -> RunningService:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "port": 0,
        "maintenance": "off",
        "log_level": "warning",
        "unwatch_grace_s": 0,
    }
    values.update(overrides)
    settings = Settings(**values)
    ready = threading.Event()
    holder: dict[str, Any] = {}
    errors: list[BaseException] = []

    def on_ready(listening: Listening) -> None:
        holder["listening"] = listening
        holder["loop"] = asyncio.get_running_loop()
        ready.set()

    def run() -> None:
        try:
            asyncio.run(serve(settings, on_ready))
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="caspian-service", daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the service did not start within 60 s")
    if errors:
        raise RuntimeError("the service failed to start") from errors[0]
    return RunningService(settings, holder["listening"], holder["loop"], thread, errors)
