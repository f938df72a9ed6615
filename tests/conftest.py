"""Shared fixtures: the real service started as a user starts it, and real servers it uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.postgres import postgres_server

__all__ = ["data_dir", "postgres_server", "service"]

if TYPE_CHECKING:
    from tests.support.service import RunningService


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
