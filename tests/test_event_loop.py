"""CASPIAN_EVENT_LOOP: the loop serve, ingest and gateway run on."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from caspian.cli import run_loop
from caspian.settings import Settings


def _loop_type(choice: str) -> type[asyncio.AbstractEventLoop]:
    seen: list[type[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    run_loop(choice, main())
    return seen[0]


@pytest.mark.parametrize(("choice", "expected"), [("auto", uvloop.Loop), ("uvloop", uvloop.Loop)])
def test_uvloop_is_the_default_where_installed(choice: str, expected: type) -> None:
    assert Settings().event_loop == "auto"
    assert _loop_type(choice) is expected


def test_asyncio_can_be_chosen() -> None:
    assert not issubclass(_loop_type("asyncio"), uvloop.Loop)


def test_a_choice_is_read_case_blind() -> None:
    assert Settings(event_loop=" UVLoop ").event_loop == "uvloop"
