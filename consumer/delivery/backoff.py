"""Retry policy: when to try again. Pure functions, no I/O.

The pipeline asks :func:`retry_delay` for the delay before attempt ``n + 1``
after attempt ``n`` failed. Jitter is only ever *added* so that a provider's
``Retry-After`` or the configured minimum is never undercut, and the result
is rounded *up* to whole seconds because the delay levels work in seconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from schemas import RetryMode

# 2**18 - 1 seconds (about 72.8 h) is the longest delay one trip through the
# delay levels can express; longer delays go round again.
MAX_LEVEL_DELAY_S = 2**18 - 1


@dataclass(frozen=True)
class RetryPolicy:
    """Effective retry settings of one message (message > campaign > settings)."""

    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    mode: RetryMode = "auto"
    jitter: float = 0.1


def exponential_delay(attempt: int, base_delay_s: float, max_delay_s: float) -> float:
    """min(max_delay, base * 2**(attempt-1)) for the attempt that just failed (1-based)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    # Cap the exponent so huge attempt numbers cannot overflow a float.
    exponent = min(attempt - 1, 64)
    return min(max_delay_s, base_delay_s * (2.0**exponent))


def retry_delay(
    attempt: int,
    policy: RetryPolicy,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> int:
    """Whole seconds to wait before the next attempt, after ``attempt`` failed.

    Never less than ``retry_after`` and never less than one second.
    """
    delay = exponential_delay(attempt, policy.base_delay_s, policy.max_delay_s)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    if policy.jitter > 0:
        delay += (rng or random).uniform(0.0, policy.jitter * delay)
    return max(1, math.ceil(delay))


def should_retry(attempt: int, policy: RetryPolicy, retryable: bool) -> bool:
    """True when the failure of ``attempt`` should be retried rather than parked."""
    return retryable and policy.mode == "auto" and attempt < policy.max_attempts


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse an HTTP ``Retry-After`` header: delta-seconds or an HTTP date.

    Returns seconds from ``now`` (never negative), or None when absent or
    unparseable (an unreadable hint is ignored rather than trusted).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds):
            return None
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())
