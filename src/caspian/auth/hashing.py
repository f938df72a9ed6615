"""argon2id hashes of secrets and passwords, and the workers that compute them.

Each check takes 64 MiB and a core for tens of milliseconds, so checks run
``AT_ONCE`` at a time, in threads at first (a CLI command's one hash needs
no more). A server moves them to worker processes of their own, at a lower
CPU priority (``start_processes``): in threads, a burst of wrong logins took
the event loop's core and its GIL, and every stream client's p99 latency with
them; a process at nice 10 shares neither, and the kernel runs the loop
first whenever both are ready. The 64 MiB of each check is then outside
the server's RSS too. The workers are spawned, not forked, so, as with any
program using multiprocessing, one that embeds the server must guard its
entry point with ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import secrets
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from functools import cache
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

log = logging.getLogger(__name__)

T = TypeVar("T")
_HASHER = PasswordHasher()
#: Checks and hashes run at once; beyond these, logins wait their turn.
AT_ONCE = 2
#: The worker processes' niceness, above the server's.
WORKER_NICE = 10
_DECOY_BYTES = 32
#: Linux's prctl option asking for a signal when the parent dies.
_PR_SET_PDEATHSIG = 1


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


@cache
def _decoy_hash() -> str:
    return _HASHER.hash(secrets.token_urlsafe(_DECOY_BYTES))


def verify(stored_hash: str | None, secret: str) -> bool:
    """Check a secret against its hash.

    Without a hash (unknown user or key), a decoy is verified instead so that the answer
    takes as long as a wrong secret: timing does not tell which names exist.
    """
    try:
        matched = _HASHER.verify(stored_hash or _decoy_hash(), secret)
    except (VerificationError, InvalidHashError):
        return False
    return matched and stored_hash is not None


def _worker_started(server: int) -> None:
    # Ctrl-C reaches the whole process group: the server stops in its own way,
    # and a worker must not print a traceback or break the pool meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(WORKER_NICE)
    # A server killed outright (kill -9) takes its workers with it; one that
    # died before the signal was asked for is seen in the parent's pid.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:
        os._exit(0)


class Hashers:
    """Where argon2 work runs: ``AT_ONCE`` threads, or processes once started."""

    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(AT_ONCE)
        self._executor: Executor = ThreadPoolExecutor(AT_ONCE, "caspian-argon2")

    async def start_processes(self) -> None:
        """Starts the worker processes now and uses them from here on."""
        threads = self._executor
        self._executor = self._new_pool()
        threads.shutdown(wait=False)
        # Submitted together, each call finds no idle worker, so every worker starts.
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, os.getpid) for _ in range(AT_ONCE))
        )

    def _new_pool(self) -> ProcessPoolExecutor:
        # Not forked: the server has threads, and a fork copies their locks mid-use.
        return ProcessPoolExecutor(
            AT_ONCE,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_started,
            initargs=(os.getpid(),),
        )

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        async with self._slots:
            loop = asyncio.get_running_loop()
            executor = self._executor
            try:
                return await loop.run_in_executor(executor, function, *args)
            except BrokenProcessPool:
                pass
            # A worker died (killed, out of memory): its pool is unusable from
            # then on, so a new one takes its place and the call is made again.
            if executor is self._executor:
                log.warning("an argon2 worker process died: starting new ones")
                self._executor = self._new_pool()
                executor.shutdown(wait=False)
            return await loop.run_in_executor(self._executor, function, *args)

    async def close(self) -> None:
        """Ends the workers and waits for them, so that none is left for init to reap."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
