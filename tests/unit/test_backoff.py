"""Retry policy (consumer/delivery/backoff.py): pure functions, no broker or database."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from consumer.delivery.backoff import (
    RetryPolicy,
    exponential_delay,
    parse_retry_after,
    retry_delay,
    should_retry,
)

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


def policy(**changes: Any) -> RetryPolicy:
    values: dict[str, Any] = {"max_attempts": 5, "base_delay_s": 30.0,
                                 "max_delay_s": 3600.0, "mode": "auto", "jitter": 0.1}
    values.update(changes)
    return RetryPolicy(**values)


# -- exponential_delay ---------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (7, 1920.0), (8, 3600.0), (9, 3600.0)],
)
def test_exponential_delay_doubles_from_base_up_to_the_cap(attempt: int, expected: float) -> None:
    assert exponential_delay(attempt, 30.0, 3600.0) == expected


def test_exponential_delay_of_huge_attempt_numbers_is_the_cap_not_an_overflow() -> None:
    assert exponential_delay(10_000, 30.0, 3600.0) == 3600.0
    assert exponential_delay(10**9, 1.0, 262143.0) == 262143.0


def test_exponential_delay_when_base_equals_cap() -> None:
    assert [exponential_delay(n, 5.0, 5.0) for n in range(1, 6)] == [5.0] * 5


@pytest.mark.parametrize("attempt", [0, -1])
def test_exponential_delay_counts_attempts_from_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="from 1"):
        exponential_delay(attempt, 30.0, 3600.0)


# -- retry_delay -----------------------------------------------------------------


def test_retry_delay_without_jitter_is_the_exponential_delay() -> None:
    p = policy(jitter=0.0)
    assert [retry_delay(n, p) for n in range(1, 10)] == [
        30, 60, 120, 240, 480, 960, 1920, 3600, 3600
    ]


def test_retry_delay_returns_whole_seconds_rounded_up() -> None:
    p = policy(base_delay_s=1.5, max_delay_s=100.0, jitter=0.0)
    assert retry_delay(1, p) == 2
    assert retry_delay(2, p) == 3
    assert retry_delay(3, p) == 6
    assert all(isinstance(retry_delay(n, p), int) for n in range(1, 8))


def test_retry_delay_is_never_less_than_one_second() -> None:
    p = policy(base_delay_s=0.001, max_delay_s=0.5, jitter=0.0)
    assert retry_delay(1, p) == 1
    assert retry_delay(1, policy(base_delay_s=0.0, max_delay_s=0.0, jitter=0.0)) == 1
    assert retry_delay(1, p, retry_after=0.0) == 1


@pytest.mark.parametrize("jitter", [0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_jitter_only_adds_and_stays_within_its_bound(jitter: float, seed: int) -> None:
    p = policy(base_delay_s=7.0, max_delay_s=5000.0, jitter=jitter)
    rng = random.Random(seed)
    for attempt in range(1, 15):
        exact = min(5000.0, 7.0 * 2 ** (attempt - 1))
        for _ in range(50):
            d = retry_delay(attempt, p, rng=rng)
            assert exact <= d <= math.ceil((1 + jitter) * exact), (attempt, d)


def test_jitter_actually_spreads_the_delays() -> None:
    p = policy(base_delay_s=100.0, max_delay_s=100.0, jitter=0.5)
    rng = random.Random(1234)
    seen = {retry_delay(1, p, rng=rng) for _ in range(200)}
    assert len(seen) > 10
    assert min(seen) >= 100
    assert max(seen) <= 150


def test_seeded_random_makes_retry_delay_reproducible() -> None:
    p = policy(jitter=0.3)
    first = [retry_delay(n, p, rng=random.Random(42)) for n in range(1, 10)]
    again = [retry_delay(n, p, rng=random.Random(42)) for n in range(1, 10)]
    assert first == again


def test_jitter_applies_on_top_of_the_cap() -> None:
    """The cap bounds the exponential part; jitter never takes a delay *below* it."""
    p = policy(base_delay_s=30.0, max_delay_s=60.0, jitter=0.2)
    rng = random.Random(7)
    delays = [retry_delay(10, p, rng=rng) for _ in range(100)]
    assert all(60 <= d <= 72 for d in delays)


@pytest.mark.parametrize("seed", range(3))
def test_retry_after_longer_than_backoff_wins_and_is_never_undercut(seed: int) -> None:
    p = policy(jitter=0.5)
    rng = random.Random(seed)
    for _ in range(100):
        d = retry_delay(1, p, retry_after=125.0, rng=rng)
        assert 125 <= d <= math.ceil(1.5 * 125.0)


def test_retry_after_is_rounded_up_not_down() -> None:
    p = policy(jitter=0.0)
    assert retry_delay(1, p, retry_after=90.2) == 91
    assert retry_delay(1, p, retry_after=30.0001) == 31


def test_retry_after_shorter_than_backoff_does_not_shorten_it() -> None:
    p = policy(jitter=0.0)
    assert retry_delay(3, p, retry_after=5.0) == 120
    assert retry_delay(1, p, retry_after=0.0) == 30


def test_retry_after_above_the_cap_is_respected() -> None:
    """The provider's word beats our max_delay: retrying sooner is just refused."""
    p = policy(max_delay_s=60.0, jitter=0.0)
    assert retry_delay(1, p, retry_after=600.0) == 600


def test_retry_delay_of_none_retry_after_is_plain_backoff() -> None:
    p = policy(jitter=0.0)
    assert retry_delay(2, p, retry_after=None) == 60


# -- should_retry ---------------------------------------------------------------


def test_max_attempts_counts_the_first_attempt() -> None:
    p = policy(max_attempts=5)
    assert [should_retry(n, p, True) for n in range(1, 7)] == [
        True, True, True, True, False, False
    ]


def test_max_attempts_one_never_retries() -> None:
    assert should_retry(1, policy(max_attempts=1), True) is False


def test_permanent_errors_are_not_retried() -> None:
    assert should_retry(1, policy(max_attempts=5), False) is False


def test_manual_mode_parks_on_the_first_failure() -> None:
    p = policy(max_attempts=100, mode="manual")
    assert should_retry(1, p, True) is False
    assert should_retry(1, p, False) is False


# -- parse_retry_after ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("2.5", 2.5), ("86400", 86400.0)],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_retry_after_http_date_is_relative_to_now() -> None:
    later = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert later.endswith("GMT")
    assert parse_retry_after(later, now=NOW) == 90.0
    assert parse_retry_after(later, now=NOW + timedelta(seconds=30)) == 60.0


def test_retry_after_http_date_with_numeric_zone() -> None:
    plus_two = timezone(timedelta(hours=2))
    header = format_datetime((NOW + timedelta(minutes=5)).astimezone(plus_two))
    assert "+0200" in header
    assert parse_retry_after(header, now=NOW) == 300.0


def test_retry_after_rfc_850_and_asctime_dates() -> None:
    # RFC 9110 says recipients must accept the obsolete forms too.
    assert parse_retry_after("Friday, 01-Mar-24 12:02:00 GMT", now=NOW) == 120.0
    assert parse_retry_after("Fri Mar  1 12:00:10 2024", now=NOW) == 10.0


def test_retry_after_date_in_the_past_is_zero_not_negative() -> None:
    past = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(past, now=NOW) == 0.0


def test_negative_retry_after_is_never_negative() -> None:
    assert parse_retry_after("-5", now=NOW) == 0.0


@pytest.mark.parametrize("header", [None, "", "   "])
def test_absent_retry_after_is_none(header: str | None) -> None:
    assert parse_retry_after(header, now=NOW) is None


@pytest.mark.parametrize(
    "header",
    ["soon", "nan", "inf", "-inf", "1e400", "12 apples", "Fri, 32 Mar 2024 12:00:00 GMT",
     "Fri, 01 Mar 2024 25:00:00 GMT", "0x10", "Mon, 01 Jan 99999 00:00:00 GMT"],
)
def test_garbage_retry_after_is_ignored(header: str) -> None:
    assert parse_retry_after(header, now=NOW) is None


def test_retry_after_without_now_uses_the_clock() -> None:
    far = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    seconds = parse_retry_after(far)
    assert seconds is not None
    assert 3500 < seconds <= 3600


def test_parsed_retry_after_feeds_retry_delay() -> None:
    p = policy(jitter=0.0)
    later = format_datetime(NOW + timedelta(seconds=301), usegmt=True)
    assert retry_delay(1, p, retry_after=parse_retry_after(later, now=NOW)) == 301
