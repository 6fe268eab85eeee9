"""Outage detection per failure domain. Pure: time is passed in.

A *failure domain* is what fails together: for the ``http`` channel one
destination (``scheme://host:port``), for Twilio the account, for WhatsApp the
phone number id, for Messenger the page. When a domain's provider is down,
its messages are deferred through the delay levels without being charged an
attempt, and every other domain keeps flowing.

**What feeds it.** Only *first* attempts (counting from the last fresh
budget): the messages that come back from the delay levels are exactly the
ones that failed before, so retries arrive in correlated waves and say
nothing new about the provider. Only failures that can mean an outage count
(``network``, ``provider_error``, and not one a provider marks as about the
recipient, such as Twilio's 30003 "handset unreachable"); rate-limit answers
and every other error are neither failures nor successes here. A
provider-wide error (an expired token, a suspended account) opens the domain
at once.

**When it opens** (:class:`Thresholds`), either path:

- *rate* (normal traffic): of the last ``window_size`` first attempts, all
  made within ``window_s`` seconds, at least ``failure_ratio`` failed;
- *consecutive* (low traffic, while fewer than ``window_size`` first
  attempts were made within ``window_s``): ``consecutive`` first-attempt
  failures in a row.

Both also need the failures to span ``min_distinct`` recipients (for
``http`` the recipient is the URL and the domain is its host, so the caller
passes the message id instead). A window counted in attempts rather than
seconds bounds what an outage costs before it is caught (at most
``failure_ratio × window_size`` charged attempts, whatever the traffic).
The arithmetic behind the defaults, for independent first attempts that
fail with probability p = 0.3 (a campaign where 30 % of the recipients
fail):

- rate path, ≥ 48 failures among 60: P(Bin(60, 0.3) ≥ 48) ≈ 1.7e-15. The
  window slides, so count one chance per first attempt: at 20 first
  attempts/s, 3e-9 a day; at 1,000/s, 1.5e-7 a day (a false trip once in
  18,000 years of a sustained 30 % failure rate).
- consecutive path, 17 in a row: a run starts at a given attempt with
  probability 0.7 × 0.3^17 ≈ 9.0e-10. It applies only below 2 first
  attempts/s (60 in 30 s), so at most 172,800 starts a day: ≤ 1.6e-4 a day
  at 2/s (once in 17 years of a sustained 30 % failure rate), 7.8e-5 at 1/s
  (once in 35 years).
- a real outage (every first attempt fails): 48 failures in a row fill the
  rate path, 2.4 s at 20 first attempts/s; at 1 first attempt/s the 17th
  failure in a row comes 16 s after the first.

**Half-open.** After a cool-down (``base_cooldown_s`` doubled on each
re-open up to ``max_cooldown_s``, plus up to ``jitter`` of it, and back to
the base once the domain has been calm for ``calm_s``), the domain admits
first attempts one at a time as probes (never a retry, which is deferred
until the domain closes). The first probe that succeeds closes it; a probe
that fails with an outage-like error, or ``probe_failures`` of them, re-open
it. A probe whose outcome never comes (the message turned out to be a
duplicate, the process lost it) frees its slot after ``probe_timeout_s``.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import StrEnum

from schemas import SendRequest


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Thresholds:
    """When a domain opens and how long it stays open (see the module docstring)."""

    window_size: int = 60
    window_s: float = 30.0
    failure_ratio: float = 0.8
    consecutive: int = 17
    min_distinct: int = 3
    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 300.0
    jitter: float = 0.2
    calm_s: float = 600.0
    probe_failures: int = 3
    probe_timeout_s: float = 15.0


@dataclass
class Trip:
    """The domain opened: why, and for how long."""

    reason: str
    cooldown_s: float


@dataclass
class OutageDetector:
    """The state of one failure domain."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    rng: random.Random = field(default_factory=random.Random)
    state: State = State.CLOSED
    reason: str | None = None
    opened_at: float = 0.0
    probe_at: float = 0.0  # when an open domain admits its first probe
    closed_at: float = float("-inf")
    cooldown_s: float = 0.0
    trips: int = 0
    # (time, failed, distinct key) of the last window_size first attempts, newest last
    _recent: deque[tuple[float, bool, str]] = field(default_factory=deque)
    _failed: int = 0
    _failed_keys: Counter[str] = field(default_factory=Counter)
    _run: int = 0
    _run_keys: set[str] = field(default_factory=set)
    _probe_until: float | None = None  # a probe is in flight until then
    _probe_failed: int = 0

    # -- before a send ------------------------------------------------------------------

    def admit(self, now: float, *, first: bool) -> float | None:
        """None when a message may be sent now, else seconds to defer it.

        Closed: everything goes. Open: nothing, until the probe time. Half-open:
        one first attempt at a time (the probe); retries wait for the close.
        """
        if self.state is State.OPEN:
            if now < self.probe_at:
                return self.probe_at - now
            self.state = State.HALF_OPEN
            self._probe_until = None
            self._probe_failed = 0
        if self.state is State.CLOSED:
            return None
        # Half-open.
        if self._probe_until is not None and now >= self._probe_until:
            self._probe_until = None  # the probe never reported: free its slot
        if not first or self._probe_until is not None:
            return max(1.0, min(self.thresholds.probe_timeout_s, self.thresholds.base_cooldown_s))
        self._probe_until = now + self.thresholds.probe_timeout_s
        return None

    # -- after a send -----------------------------------------------------------------------

    def success(self, now: float, *, first: bool, key: str) -> bool:
        """A send went through. True when this closes the domain (half-open: a probe,
        or a copy admitted before it opened, got through). While open, a success of a
        copy sent before the domain opened changes nothing: the probe will tell."""
        if self.state is State.OPEN:
            return False
        if self.state is State.HALF_OPEN:
            self._close(now)
            return True
        if first:
            self._observe(now, failed=False, key=key)
        return False

    def failure(self, now: float, *, first: bool, key: str) -> Trip | None:
        """An outage-like failure (``network``/``provider_error`` not about the recipient).

        Returns a :class:`Trip` when the domain opens now.
        """
        if self.state is State.OPEN:
            return None
        if self.state is State.HALF_OPEN:
            if self._probe_until is None:
                return None  # a copy admitted before the domain opened
            self._probe_until = None
            self._probe_failed += 1
            if self._probe_failed >= self.thresholds.probe_failures:
                return self._open(now, "probe_failed")
            return None
        if not first:
            return None
        self._observe(now, failed=True, key=key)
        return self._judge(now)

    def provider_wide(self, now: float, reason: str) -> Trip | None:
        """The provider failed for everyone (an expired token): open at once."""
        if self.state is State.OPEN:
            return None
        return self._open(now, reason)

    def remaining(self, now: float) -> float:
        """Seconds until an open domain probes (0 when closed or half-open)."""
        return max(0.0, self.probe_at - now) if self.state is State.OPEN else 0.0

    # -- inside ---------------------------------------------------------------------------------

    def _observe(self, now: float, *, failed: bool, key: str) -> None:
        t = self.thresholds
        self._recent.append((now, failed, key))
        if failed:
            self._failed += 1
            self._failed_keys[key] += 1
            self._run += 1
            if len(self._run_keys) < t.min_distinct:
                self._run_keys.add(key)
        else:
            self._run = 0
            self._run_keys.clear()
        while len(self._recent) > t.window_size:
            _, old_failed, old_key = self._recent.popleft()
            if old_failed:
                self._failed -= 1
                self._failed_keys[old_key] -= 1
                if not self._failed_keys[old_key]:
                    del self._failed_keys[old_key]

    def _judge(self, now: float) -> Trip | None:
        t = self.thresholds
        if len(self._recent) >= t.window_size and now - self._recent[0][0] <= t.window_s:
            if (self._failed >= t.failure_ratio * t.window_size
                    and len(self._failed_keys) >= t.min_distinct):
                return self._open(now, "failure_rate")
            return None
        if self._run >= t.consecutive and len(self._run_keys) >= t.min_distinct:
            return self._open(now, "consecutive_failures")
        return None

    def _open(self, now: float, reason: str) -> Trip:
        t = self.thresholds
        # Re-opened by its probes, or soon after it closed: wait longer this time.
        if self.trips and (self.state is not State.CLOSED or now - self.closed_at < t.calm_s):
            self.cooldown_s = min(t.max_cooldown_s, max(t.base_cooldown_s, self.cooldown_s * 2))
        else:
            self.cooldown_s = t.base_cooldown_s
        wait = self.cooldown_s * (1.0 + self.rng.uniform(0.0, t.jitter))
        self.state = State.OPEN
        self.reason = reason
        self.opened_at = now
        self.probe_at = now + wait
        self.trips += 1
        self._recent.clear()
        self._failed = 0
        self._failed_keys.clear()
        self._run = 0
        self._run_keys.clear()
        self._probe_until = None
        return Trip(reason, wait)

    def _close(self, now: float) -> None:
        self.state = State.CLOSED
        self.reason = None
        self.closed_at = now
        self._probe_until = None
        self._probe_failed = 0


def outage_key(request: SendRequest) -> str:
    """What must differ between failures for them to look like an outage: the
    recipient, except for ``http``, whose recipient (the URL) belongs to one
    domain (its host) and often is the only one: there, the message."""
    return request.message_id if request.channel == "http" else request.to
