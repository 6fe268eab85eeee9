"""What to do after a failed attempt, and the copy that is sent again. Pure.

The pipeline (a synchronous failure) and the events consumer (a failure the
provider reported after accepting the send) both ask :func:`decide` and
build the re-sent copy with :func:`copy_headers`; neither keeps retry logic
of its own.

- :class:`Retry`: charge the attempt and send the message again as attempt
  ``attempt`` after ``delay_s`` (exponential backoff, never less than the
  provider's ``Retry-After``).
- :class:`Pause`: not the message's fault (an expired token, an outage of
  its failure domain): send it again after ``delay_s`` *without* charging an
  attempt (same attempt number).
- :class:`Park`: no retry (permanent error, budget spent, or manual mode).

Which budget a failure is charged to, and its delays, come from the
message's :class:`~consumer.delivery.rules.RetryPlan` (retry rules per error
code); the decisions name the rule that applied, which is recorded with the
attempt.

A fourth outcome, deferring a message *before* it is sent (``send_at``,
quiet hours, a daily limit, an open failure domain), needs no decision
about a failure: see :func:`defer_seconds`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from consumer.delivery.backoff import RetryPolicy, retry_delay
from consumer.delivery.rules import CEILING, History, RetryPlan
from consumer.errors import DeliveryError
from consumer.wire import (
    HEADER_ATTEMPT,
    HEADER_ATTEMPT_BASE,
    HEADER_ERROR_CODE,
    HEADER_ERROR_TYPE,
    HEADER_FIRST_SEEN,
    HEADER_LAST_ERROR,
    PER_ATTEMPT,
    encodable,
)

# What a deferred copy keeps of the last failure's headers (Herald writes at
# most 1,000 characters of error text; more can only come from a publisher).
LAST_ERROR_BYTES = 8 * 1024

# Two decisions are equal when they do the same thing; the rule that led to one
# and the budget's count are for the record (compare=False).


@dataclass(frozen=True)
class Retry:
    delay_s: int
    attempt: int  # the attempt number of the copy sent again
    rule: str | None = field(default=None, compare=False)
    used: int = field(default=0, compare=False)  # the budget's count with this failure

    kind = "retry"


@dataclass(frozen=True)
class Pause:
    delay_s: int
    attempt: int  # unchanged: the attempt is not charged
    rule: None = field(default=None, compare=False)  # no budget is charged

    kind = "pause"


@dataclass(frozen=True)
class Park:
    # permanent | manual | budget | ceiling
    reason: str = field(default="permanent", compare=False)
    rule: str | None = field(default=None, compare=False)
    used: int = field(default=0, compare=False)

    kind = "park"


Decision = Retry | Pause | Park


def whole_seconds(seconds: float) -> int:
    """A delay the delay levels can carry: whole seconds, rounded up, at least one."""
    return max(1, math.ceil(seconds))


def decide(
    error: DeliveryError,
    *,
    attempt: int,
    base: int,
    policy: RetryPolicy | None = None,
    plan: RetryPlan | None = None,
    history: History | None = None,
    pause_s: float | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """The decision for attempt ``attempt`` that failed with ``error``.

    ``base``: attempts made before the last replay with a fresh budget (budgets
    count from there). ``plan``: the message's retry rules and fields (or, for
    a plan without rules, ``policy``); ``history``: its earlier failed attempts
    since the base by (error_type, code), which the plan needs when
    :meth:`RetryPlan.needs_history` says so. ``pause_s``: when the message's
    failure domain is open (or the error is provider-wide), how long until it
    probes again; such a failure is a :class:`Pause`, never charged.
    """
    if error.provider_wide or pause_s is not None:
        wait = max(pause_s or 0.0, error.retry_after or 0.0)
        return Pause(whole_seconds(wait), attempt)
    if plan is None:
        if policy is None:
            raise TypeError("decide() needs a plan or a policy")
        plan = RetryPlan.of(policy)
    if not error.retryable:
        return Park("permanent")
    if plan.mode != "auto":
        return Park("manual")
    budget, used = plan.charge(error.error_type.value, error.code, attempt=attempt,
                               base=base, history=history)
    if used >= budget.policy.max_attempts:
        return Park("budget", budget.label, used)
    if attempt - base >= CEILING:
        return Park("ceiling", budget.label, used)
    return Retry(retry_delay(used, budget.policy, retry_after=error.retry_after, rng=rng),
                 attempt + 1, budget.label, used)


def defer_seconds(due_at: datetime, now: datetime) -> int:
    """Whole seconds until ``due_at`` (at least one): how long a deferred copy waits."""
    return whole_seconds((due_at - now).total_seconds())


def error_headers(error: DeliveryError) -> dict[str, Any]:
    """The ``x-herald-error-*`` headers of a failed attempt."""
    return {
        HEADER_ERROR_TYPE: error.error_type.value,
        HEADER_ERROR_CODE: error.code or "",
        HEADER_LAST_ERROR: error.message[:1000],
    }


def copy_headers(
    *,
    attempt: int,
    base: int,
    first_seen: float | None,
    error: DeliveryError | None = None,
    carried: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The headers of a copy of a message that is sent round again.

    ``carried``: the headers of the copy in hand; the publisher's own are kept
    (in a form that can be published again, see :func:`consumer.wire.encodable`),
    those about one attempt or one trip through the broker are not (they are
    set afresh here).
    """
    headers = encodable({k: v for k, v in (carried or {}).items()
                         if k not in PER_ATTEMPT
                         and k not in (HEADER_ATTEMPT_BASE, HEADER_FIRST_SEEN)})
    headers[HEADER_ATTEMPT] = attempt
    if base:
        headers[HEADER_ATTEMPT_BASE] = base
    if first_seen is not None:
        headers[HEADER_FIRST_SEEN] = first_seen
    if error is not None:
        headers |= error_headers(error)
    return headers


def deferred_headers(incoming: Mapping[str, Any], *, attempt: int, base: int,
                     first_seen: float | None) -> dict[str, Any]:
    """The headers of a copy deferred before its attempt (``send_at``, quiet hours, a
    daily limit, an open domain): the same attempt, the last failure kept.

    Never the broker's ``x-death`` of an earlier trip: a copy that goes through a
    delay level it went through before, carrying that history, is taken by the broker
    for a dead-letter cycle and is stranded in the level's queue.
    """
    headers = copy_headers(attempt=attempt, base=base, first_seen=first_seen,
                           carried=incoming)
    headers |= encodable({k: incoming[k] for k in (HEADER_ERROR_TYPE, HEADER_ERROR_CODE,
                                                    HEADER_LAST_ERROR) if k in incoming},
                         max_bytes=LAST_ERROR_BYTES)
    return headers
