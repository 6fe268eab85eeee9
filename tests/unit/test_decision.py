"""The one decision for a failed attempt and the copy sent again (consumer.delivery.decision)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from consumer.delivery.backoff import RetryPolicy
from consumer.delivery.decision import (
    Park,
    Pause,
    Retry,
    copy_headers,
    decide,
    defer_seconds,
    whole_seconds,
)
from consumer.errors import DeliveryError, ErrorType

POLICY = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=60, jitter=0.0)


def _error(error_type: ErrorType = ErrorType.PROVIDER_ERROR, **kw: object) -> DeliveryError:
    return DeliveryError(error_type, "boom", **kw)  # type: ignore[arg-type]


def test_the_budget_counts_from_the_attempt_base() -> None:
    # Attempt 4 after a replay with a fresh budget (base 3) is the budget's first.
    assert decide(_error(), attempt=4, base=3, policy=POLICY) == Retry(10, 5)
    assert decide(_error(), attempt=5, base=3, policy=POLICY) == Retry(20, 6)
    assert decide(_error(), attempt=6, base=3, policy=POLICY) == Park()
    # Without the base the same attempt has no budget left.
    assert decide(_error(), attempt=4, base=0, policy=POLICY) == Park()


def test_retry_after_is_a_floor_rounded_up_on_every_path() -> None:
    assert decide(_error(ErrorType.RATE_LIMIT, retry_after=12.2), attempt=1, base=0,
                  policy=POLICY) == Retry(13, 2)
    assert decide(_error(ErrorType.ACCESS_TOKEN, provider_wide=True, retry_after=12.2),
                  attempt=1, base=0, policy=POLICY, pause_s=3.0) == Pause(13, 1)
    assert decide(_error(), attempt=1, base=0, policy=POLICY, pause_s=4.01) == Pause(5, 1)
    assert whole_seconds(0.0) == 1 and whole_seconds(2.000001) == 3


def test_an_open_domain_pauses_whatever_the_error_and_charges_nothing() -> None:
    assert decide(_error(), attempt=3, base=0, policy=POLICY, pause_s=30.0) == Pause(30, 3)


def test_permanent_errors_and_manual_mode_park() -> None:
    assert decide(_error(ErrorType.INVALID_RECIPIENT), attempt=1, base=0,
                  policy=POLICY) == Park()
    manual = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=60, mode="manual")
    assert decide(_error(), attempt=1, base=0, policy=manual) == Park()


def test_jitter_only_adds() -> None:
    jittery = RetryPolicy(max_attempts=9, base_delay_s=10, max_delay_s=600, jitter=0.5)
    rng = random.Random(7)
    for attempt in range(1, 8):
        decision = decide(_error(), attempt=attempt, base=0, policy=jittery, rng=rng)
        assert isinstance(decision, Retry)
        floor = min(600, 10 * 2 ** (attempt - 1))
        assert floor <= decision.delay_s <= floor * 1.5 + 1


def test_defer_seconds_rounds_up() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert defer_seconds(now + timedelta(seconds=59.1), now) == 60
    assert defer_seconds(now - timedelta(seconds=5), now) == 1


def test_copy_headers_keep_the_publishers_own_and_renew_the_rest() -> None:
    incoming = {"x-tenant": "acme", "x-herald-attempt": 2, "x-herald-attempt-base": 1,
                "x-herald-error-code": "503", "x-death": [{"count": 1}],
                "x-delivery-count": 3, "x-herald-first-seen": 1.0}
    headers = copy_headers(attempt=3, base=1, first_seen=1.0, carried=incoming,
                           error=_error(code="429"))
    assert headers == {"x-tenant": "acme", "x-herald-attempt": 3, "x-herald-attempt-base": 1,
                       "x-herald-first-seen": 1.0, "x-herald-error-type": "provider_error",
                       "x-herald-error-code": "429", "x-herald-last-error": "boom"}
    assert copy_headers(attempt=1, base=0, first_seen=None) == {"x-herald-attempt": 1}
