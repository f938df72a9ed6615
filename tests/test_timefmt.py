"""API time stamps: the fast formatter against datetime's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from caspian.timefmt import format_us, parse_us

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.lists(st.integers(-(10**15), 4 * 10**15), min_size=1, max_size=20))
def test_format_us_writes_what_datetime_writes(stamps: list[int]) -> None:
    # Runs of stamps, some within one second, so that the cached second is
    # both reused and replaced.
    for us in [*stamps, stamps[0] + 1, stamps[0] + 999_999, stamps[0] - 1]:
        expected = (EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%f")
        assert format_us(us) == expected
        assert parse_us(format_us(us)) == us


def test_format_us_known_answer() -> None:
    assert format_us(1528445624653000) == "2018-06-08T08:13:44.653000"
