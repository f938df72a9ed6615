"""The rate and log limits connections are held to, with a hand-moved clock."""

from __future__ import annotations

import logging

import pytest

from caspian.guard import ConnectionLimits
from caspian.pacing import LogThrottle, TokenBucket


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=4.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.25)
    assert not bucket.take(0.2)
    assert bucket.take(0.25)
    # A long pause refills no more than the burst.
    assert sum(bucket.take(100.0) for _ in range(10)) == 3


def test_log_throttle_logs_the_first_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("caspian.test"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="caspian.test"):
        for _ in range(500):
            throttle.warning("flood", "the same failure")
        throttle.warning("other", "another failure")
        now[0] = 11.0
        throttle.warning("flood", "the same failure")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "the same failure",
        "another failure",
        "the same failure (and 499 more like it since the last such message)",
    ]


def test_log_throttle_keeps_the_traceback_of_the_first(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("caspian.test"), clock=lambda: 0.0)
    with caplog.at_level(logging.ERROR, logger="caspian.test"):
        for _ in range(3):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                throttle.exception("boom", "it failed")
    (record,) = caplog.records
    assert record.exc_info is not None


def test_streams_of_one_principal_share_one_budget_while_any_is_open() -> None:
    limits = ConnectionLimits(10, 10, 3, messages_per_principal=(5.0, 2))
    alice = ("key", "A")
    assert limits.admit_stream("c1", alice) and limits.admit_stream("c2", alice)
    budget = limits.budget(alice, 0.0)
    assert limits.budget(alice, 0.0) is budget
    assert limits.budget(("key", "B"), 0.0) is not budget
    assert budget.take(0.0) and budget.take(0.0) and not budget.take(0.0)
    limits.release("c1")
    assert limits.budget(alice, 0.0) is budget
    # Its last stream gone, the key's spent budget is forgotten with it.
    limits.release("c2")
    assert limits.budget(alice, 0.0) is not budget
