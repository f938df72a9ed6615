"""argon2 work in a server: worker processes below the server's priority, replaced when
they die, and gone with the server however it ends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from caspian.auth import hashing
from caspian.auth.hashing import Hashers, hash_secret, verify


@pytest.fixture
async def hashers() -> AsyncIterator[Hashers]:
    started = Hashers()
    await started.start_processes()
    try:
        yield started
    finally:
        await started.close()


def children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def existing(pids: set[int]) -> list[int]:
    """Those of ``pids`` the kernel still has, zombies too."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def alive(pid: int) -> bool:
    # A zombie is gone for our purposes: only its reaper's wait is missing.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_checks_run_in_other_processes_at_a_lower_priority(hashers: Hashers) -> None:
    pid = await hashers.run(os.getpid)
    assert pid != os.getpid()
    assert await hashers.run(os.nice, 0) == os.nice(0) + hashing.WORKER_NICE
    stored = await hashers.run(hash_secret, "s3cret")
    assert await hashers.run(verify, stored, "s3cret")
    assert not await hashers.run(verify, stored, "wrong")
    assert not await hashers.run(verify, None, "s3cret")


async def test_a_worker_that_dies_is_replaced_and_the_check_still_answered(
    hashers: Hashers,
) -> None:
    pids = {await hashers.run(os.getpid) for _ in range(4)}
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stored = hash_secret("s3cret")
    # In flight when the pool is found broken, or sent after: both are answered.
    answers = await asyncio.gather(*(hashers.run(verify, stored, "s3cret") for _ in range(3)))
    assert answers == [True] * 3
    assert await hashers.run(os.getpid) not in pids


async def test_more_checks_than_workers_at_once_are_all_answered(hashers: Hashers) -> None:
    stored = hash_secret("s3cret")
    answers = await asyncio.gather(
        *(hashers.run(verify, stored, "s3cret" if n % 2 else "wrong") for n in range(6))
    )
    assert answers == [n % 2 == 1 for n in range(6)]


def test_workers_end_with_a_server_killed_outright() -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from caspian.auth.hashing import Hashers

        async def main() -> None:
            hashers = Hashers()
            await hashers.start_processes()
            await hashers.run(os.getpid)
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        pids = children(server.pid)
        # The workers, and multiprocessing's resource tracker.
        assert len(pids) == hashing.AT_ONCE + 1 and all(alive(pid) for pid in pids)
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids)
    finally:
        server.kill()
        server.wait(10)


async def test_closing_ends_and_reaps_the_workers() -> None:
    def workers() -> set[int]:
        found = set()
        for pid in children(os.getpid()):
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    found.add(pid)
        return found

    before = workers()
    started = Hashers()
    await started.start_processes()
    mine = workers() - before
    assert len(mine) == hashing.AT_ONCE
    await started.close()
    # Not even a zombie: waited for, so that none is left for init to reap.
    assert not existing(mine)
