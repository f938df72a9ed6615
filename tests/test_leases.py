"""The lease rules of bus/leases.py, on a clock of the test's own: a renewal that gets
no answer keeps the lease only while no other instance can have won it."""

from __future__ import annotations

from typing import Any, cast

import nats.js.errors
import pytest
from nats.js.kv import KeyValue

from caspian.bus.leases import Leases

TTL_S = 3.0


class ScriptedBucket:
    """The three calls Leases makes, each answering as the test scripts it."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.unanswered = False

    def _write(self, key: str, value: bytes) -> int:
        if self.unanswered:
            raise nats.js.errors.NoStreamResponseError
        self.revision += 1
        self.values[key] = (value, self.revision)
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        if key in self.values:
            raise nats.js.errors.KeyWrongLastSequenceError
        return self._write(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if key not in self.values or self.values[key][1] != last:
            raise nats.js.errors.KeyWrongLastSequenceError
        return self._write(key, value)

    async def get(self, key: str) -> Any:
        if key not in self.values:
            raise nats.js.errors.KeyNotFoundError
        value, revision = self.values[key]
        return KeyValue.Entry(
            bucket="b",
            key=key,
            value=value,
            revision=revision,
            delta=None,
            created=None,
            operation=None,
        )


@pytest.fixture
def now() -> list[float]:
    return [100.0]


def leases_on(bucket: ScriptedBucket, now: list[float]) -> Leases:
    return Leases(cast(KeyValue, bucket), "me", TTL_S, clock=lambda: now[0])


async def test_an_unanswered_renewal_keeps_the_lease_until_it_could_have_expired(
    now: list[float],
) -> None:
    bucket = ScriptedBucket()
    leases = leases_on(bucket, now)
    assert await leases.acquire("GEMINI")
    bucket.unanswered = True
    now[0] += 1.0
    assert await leases.renew() == set() and leases.held == {"GEMINI"}
    now[0] += 1.9
    assert await leases.renew() == set() and leases.held == {"GEMINI"}
    now[0] += 0.1
    assert await leases.renew() == {"GEMINI"} and leases.held == frozenset()


async def test_a_renewal_answered_renews_the_bound(now: list[float]) -> None:
    bucket = ScriptedBucket()
    leases = leases_on(bucket, now)
    assert await leases.acquire("GEMINI")
    now[0] += 2.0
    assert await leases.renew() == set()
    bucket.unanswered = True
    now[0] += 2.9
    assert await leases.renew() == set() and leases.held == {"GEMINI"}


async def test_a_refused_renewal_loses_the_lease_at_once(now: list[float]) -> None:
    bucket = ScriptedBucket()
    leases = leases_on(bucket, now)
    assert await leases.acquire("GEMINI")
    bucket.values["GEMINI"] = (b"another", 99)
    assert await leases.renew() == {"GEMINI"}
    assert not await leases.acquire("GEMINI")


async def test_a_key_that_still_names_this_instance_is_taken_back(now: list[float]) -> None:
    """A renewal written but unanswered leaves the key ahead of the revision held."""
    bucket = ScriptedBucket()
    leases = leases_on(bucket, now)
    assert await leases.acquire("GEMINI")
    bucket.values["GEMINI"] = (b"me", 7)
    assert await leases.renew() == {"GEMINI"}
    assert await leases.acquire("GEMINI") and leases.held == {"GEMINI"}
    bucket.unanswered = True
    now[0] += 2.9
    assert await leases.renew() == set()
