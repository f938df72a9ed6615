"""Shared fixtures: the real service started as a user starts it, and real servers it uses."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.postgres import postgres_server

__all__ = ["data_dir", "nats_server", "postgres_server", "service"]

if TYPE_CHECKING:
    from tests.support.nats import NatsServer
    from tests.support.service import RunningService


@pytest.fixture(scope="session", autouse=True)
def _interruptible_children() -> None:
    """Commands the tests start can be stopped with Ctrl-C (SIGINT) and SIGQUIT, however
    the suite was started: a shell starts a background job (``pytest &``) with both
    ignored, every process the tests start inherits that, and the tests that stop one
    with SIGINT then waited for it in vain."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session", autouse=True)
def _no_real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default data directory, for any test or command that does not name one, is a
    temporary one: no test writes into the real user's data directory (on Linux
    platformdirs takes it from XDG_DATA_HOME, and commands run by tests inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        patch.delenv("CASPIAN_DATA_DIR", raising=False)
        yield


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """One service per test module, on the embedded defaults (SQLite, simulator)."""
    from tests.support.service import start_service

    running = start_service(tmp_path_factory.mktemp("caspian"), simulator_rate=50.0)
    yield running
    running.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A real NATS server (with JetStream), started for the test and stopped after it."""
    from tests.support.nats import NatsServer

    server = NatsServer()
    server.start()
    yield server
    server.stop()
