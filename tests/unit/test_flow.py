"""Pure parts of flow control: token bucket, adaptive rate, breaker, lanes, windows."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from consumer.delivery.pipeline import lane_of
from consumer.delivery.quota import day_bounds, local_day, next_day_start, quiet_until, zone
from consumer.delivery.rate import AdaptiveRate, TokenBucket
from consumer.store import Campaign
from schemas import SendRequest


def test_bucket_starts_empty_and_accrues_at_the_rate() -> None:
    bucket = TokenBucket.empty(rate=50, now=0.0)
    assert bucket.take(0.0) == pytest.approx(1 / 50)
    assert bucket.take(0.02) == 0.0
    # A long idle period fills it to one second's worth, not more.
    bucket.refill(100.0)
    assert bucket.tokens == 50
    assert all(bucket.take(100.0) == 0.0 for _ in range(50))
    assert bucket.take(100.0) > 0


def test_adaptive_rate_cuts_once_a_second_and_climbs_back_to_the_ceiling() -> None:
    rate = AdaptiveRate(configured=100)
    assert rate.on_rate_limited(10.0) and rate.current == pytest.approx(70)
    assert not rate.on_rate_limited(10.5)  # the same burst of 429s
    assert rate.on_rate_limited(11.0) and rate.current == pytest.approx(49)
    now = 11.0
    for _ in range(20):
        now += 1.0
        rate.on_sent(now)
    assert rate.current == 100  # never above the configured rate


def test_with_no_configured_rate_a_429_changes_no_rate() -> None:
    """Only the message's own retry (after Retry-After) answers a 429 then."""
    rate = AdaptiveRate(configured=None)
    for i in range(80):
        rate.on_sent(5.0 + i / 100)
    assert not rate.on_rate_limited(5.9)
    assert rate.current is None


def _request(**extra: object) -> SendRequest:
    return SendRequest.model_validate(
        {"message_id": "m", "channel": "sms", "to": "+15551234567", "body": "x", **extra})


def test_lanes() -> None:
    campaign = Campaign("c", None, None, None, None)
    urgent = Campaign("c", None, None, None, None, priority="high")
    assert lane_of(_request(), None) == "main"
    assert lane_of(_request(campaign_id="c"), campaign) == "bulk"
    assert lane_of(_request(campaign_id="c", priority="high"), campaign) == "main"
    assert lane_of(_request(campaign_id="c"), urgent) == "main"
    assert lane_of(_request(campaign_id="c", priority="normal"), urgent) == "bulk"


def test_days_follow_the_campaigns_timezone() -> None:
    tz = zone("America/New_York")
    now = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # 22:00 the day before in New York
    assert local_day(now, tz) == date(2026, 11, 23)
    assert next_day_start(now, tz) == datetime(2026, 11, 24, 5, 0, tzinfo=UTC)
    start, end = day_bounds(date(2026, 11, 23), tz)
    assert (end - start).total_seconds() == 86400
    assert zone("Not/AZone").key == "UTC"


@pytest.mark.parametrize("clock,expected", [
    (time(21, 59), None),
    (time(22, 0), datetime(2026, 11, 24, 7, 0, tzinfo=UTC)),
    (time(23, 30), datetime(2026, 11, 24, 7, 0, tzinfo=UTC)),
    (time(6, 59), datetime(2026, 11, 23, 7, 0, tzinfo=UTC)),
    (time(7, 0), None),
])
def test_quiet_hours_across_midnight(clock: time, expected: datetime | None) -> None:
    day = date(2026, 11, 23)
    now = datetime.combine(day, clock, UTC)
    assert quiet_until(now, zone("UTC"), time(22, 0), time(7, 0)) == expected


def test_quiet_hours_within_a_day_and_unset() -> None:
    now = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
    assert quiet_until(now, zone("UTC"), time(12), time(14)) == datetime(
        2026, 11, 23, 14, 0, tzinfo=UTC)
    assert quiet_until(now, zone("UTC"), None, time(14)) is None


def test_campaign_flow_fields_are_checked() -> None:
    from consumer.errors import ConfigError
    from consumer.records.campaigns import CampaignDefaults, quiet_hours

    assert quiet_hours("22:00-07:00") == (time(22, 0), time(7, 0))
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        quiet_hours("22-7-1")
    CampaignDefaults("c", daily_limit=250, timezone="Europe/Paris", priority="high",
                     quiet_start=time(22), quiet_end=time(7)).check()
    for bad, flag in ((CampaignDefaults("c", timezone="Mars/Olympus"), "--timezone"),
                      (CampaignDefaults("c", daily_limit=0), "--daily-limit"),
                      (CampaignDefaults("c", priority="urgent"), "--priority"),
                      (CampaignDefaults("c", quiet_start=time(22)), "--quiet-hours")):
        with pytest.raises(ConfigError, match=flag):
            bad.check()
