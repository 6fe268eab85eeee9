"""Flow control: sending at the pace a provider allows.

- :class:`RateLimiter` — a token bucket per channel (``HERALD_{CHANNEL}_RATE``
  messages per second, bucket of one second's worth). Both lanes of a channel
  draw from it; when both wait, transactional messages get four tokens for
  every one a campaign gets, so neither starves. It is *adaptive*: a
  ``rate_limit`` answer cuts the rate by 30 % (at most once a second), and
  every second without one adds back 5 % of the configured rate
  (multiplicative decrease, additive increase).
- :class:`Breaker` — an outage detector: a run of transient failures
  (``provider_error``/``network``) across several recipients opens it, and the
  channel pauses exactly like for an expired token (see :mod:`consumer.delivery.pause`).

The limit is per process: with N replicas, set each one's rate to the
provider's limit divided by N.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from consumer.errors import ErrorType

# Of five tokens handed out while both lanes wait, four go to the main lane.
MAIN_SHARE = 4
DECREASE_FACTOR = 0.7
INCREASE_STEP = 0.05
MIN_RATE = 0.5


@dataclass
class TokenBucket:
    """Tokens accrue at ``rate`` per second up to ``capacity``. Pure; time passed in."""

    rate: float
    capacity: float
    tokens: float = 0.0
    updated: float = 0.0

    @classmethod
    def empty(cls, rate: float, now: float) -> TokenBucket:
        """A bucket that starts empty: a (re)started process does not open with a burst."""
        return cls(rate, max(1.0, rate), 0.0, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take a token if there is one: returns 0, or the seconds until one accrues."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def set_rate(self, rate: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = min(self.tokens, self.capacity)


@dataclass
class AdaptiveRate:
    """The rate a channel runs at now: AIMD around the configured ceiling. Pure."""

    configured: float | None
    current: float | None = None
    last_decrease: float = float("-inf")
    last_increase: float = 0.0
    sent_window: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.current = self.configured

    def observed(self, now: float) -> float:
        """Sends per second over the last second."""
        while self.sent_window and self.sent_window[0] < now - 1.0:
            self.sent_window.popleft()
        return float(len(self.sent_window))

    def on_sent(self, now: float) -> bool:
        """A send went through. Returns True when the rate changed."""
        self.sent_window.append(now)
        if self.current is None or now - self.last_increase < 1.0:
            return False
        if now - self.last_decrease < 1.0:
            return False
        self.last_increase = now
        ceiling = self.configured
        step = max(0.5, (ceiling or self.current) * INCREASE_STEP)
        new: float | None = self.current + step
        if ceiling is not None:
            new = min(self.current + step, ceiling)
        elif self.current + step >= 2 * max(self.observed(now), 1.0):
            new = None  # an unlimited channel is unlimited again once well clear
        changed = new != self.current
        self.current = new
        return changed

    def on_rate_limited(self, now: float) -> bool:
        """The provider said slow down. Returns True when the rate changed."""
        if now - self.last_decrease < 1.0:
            return False  # one cut per second: in-flight 429s are the same signal
        base = self.current if self.current is not None else max(self.observed(now), 1.0)
        self.current = max(MIN_RATE, base * DECREASE_FACTOR)
        self.last_decrease = now
        self.last_increase = now
        return True


class RateLimiter:
    """Hands out send permits at the channel's current rate, main lane first."""

    def __init__(self, rate: float | None, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.adaptive = AdaptiveRate(rate)
        now = clock()
        self.bucket = TokenBucket.empty(rate, now) if rate else None
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {"main": deque(), "bulk": deque()}
        self._main_streak = 0
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def rate(self) -> float | None:
        return self.adaptive.current

    async def acquire(self, lane: str = "main") -> None:
        if self.bucket is None:
            return
        if not self._pending() and self.bucket.take(self.clock()) == 0.0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters["main" if lane == "main" else "bulk"].append(future)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        await future

    def _pending(self) -> bool:
        return any(w for w in self._waiters.values())

    def _next_waiter(self) -> asyncio.Future[None] | None:
        for queue in self._waiters.values():
            while queue and queue[0].done():  # cancelled while waiting
                queue.popleft()
        main, bulk = self._waiters["main"], self._waiters["bulk"]
        if main and (not bulk or self._main_streak < MAIN_SHARE):
            self._main_streak += 1
            return main.popleft()
        if bulk:
            self._main_streak = 0
            return bulk.popleft()
        return None

    async def _dispatch(self) -> None:
        while self._pending() and self.bucket is not None:
            wait = self.bucket.take(self.clock())
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            waiter = self._next_waiter()
            if waiter is None:
                self.bucket.tokens += 1.0  # nobody left to take it
                return
            waiter.set_result(None)

    def on_sent(self) -> None:
        now = self.clock()
        if self.adaptive.on_sent(now):
            self._apply(now)

    def on_rate_limited(self) -> None:
        now = self.clock()
        if self.adaptive.on_rate_limited(now):
            self._apply(now)

    def _apply(self, now: float) -> None:
        rate = self.adaptive.current
        if rate is None:
            self.bucket = None
            for queue in self._waiters.values():
                while queue:
                    waiter = queue.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
        elif self.bucket is None:
            self.bucket = TokenBucket(rate, max(1.0, rate), 0.0, now)
        else:
            self.bucket.set_rate(rate, now)

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()


TRANSIENT = frozenset({ErrorType.PROVIDER_ERROR, ErrorType.NETWORK})


@dataclass
class Breaker:
    """Opens after ``threshold`` transient failures in a row spanning at least
    ``min_recipients`` different recipients: one recipient (or one webhook URL)
    failing again and again is that recipient's trouble, not an outage. Any
    success closes the run. Pure."""

    threshold: int = 10
    min_recipients: int = 3
    run: int = 0
    recipients: set[str] = field(default_factory=set)

    def failure(self, recipient: str) -> bool:
        """Record a transient failure; True when it makes the run an outage."""
        self.run += 1
        if len(self.recipients) < self.min_recipients:
            self.recipients.add(recipient)
        return self.run >= self.threshold and len(self.recipients) >= self.min_recipients

    def success(self) -> None:
        self.run = 0
        self.recipients.clear()
