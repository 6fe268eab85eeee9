"""Campaign windows: the daily limit's day and quiet hours, in the campaign's
timezone. Pure functions of an instant (the pipeline's clock), unit-tested.

First attempts come before retries: a first attempt may use the day's whole
limit; a retry only what is left after the day's first attempts that Herald
already knows of (sent today, or waiting for today's window). Whatever does not
fit is deferred through the delay levels to the next day's window, without
using an attempt.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_day(now: datetime, tz: ZoneInfo) -> date:
    return now.astimezone(tz).date()


def day_bounds(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants where ``day`` starts and ends in ``tz``."""
    start = datetime.combine(day, time(0), tz)
    end = datetime.combine(day + timedelta(days=1), time(0), tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def next_day_start(now: datetime, tz: ZoneInfo) -> datetime:
    return day_bounds(local_day(now, tz), tz)[1]


def quiet_until(now: datetime, tz: ZoneInfo, start: time | None, end: time | None
                ) -> datetime | None:
    """When the quiet window around ``now`` ends, or None outside quiet hours.

    ``start`` > ``end`` is a window across midnight (22:00–07:00).
    """
    if start is None or end is None or start == end:
        return None
    local = now.astimezone(tz)
    t = local.time().replace(tzinfo=None)
    today = local.date()
    if start < end:
        if start <= t < end:
            return datetime.combine(today, end, tz).astimezone(UTC)
        return None
    if t >= start:
        return datetime.combine(today + timedelta(days=1), end, tz).astimezone(UTC)
    if t < end:
        return datetime.combine(today, end, tz).astimezone(UTC)
    return None
