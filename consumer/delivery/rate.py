"""Flow control: sending at the pace a provider allows.

- :class:`RateLimiter` — a token bucket per channel (``HERALD_{CHANNEL}_RATE``
  messages per second, bucket of one second's worth). Both lanes of a channel
  draw from it; when both wait, transactional messages get four tokens for
  every one a campaign gets, so neither starves. It is *adaptive*: a
  ``rate_limit`` answer cuts the rate by 30 % (at most once a second), and
  every second without one adds back 5 % of the configured rate
  (multiplicative decrease, additive increase).

Each failure domain (see :mod:`consumer.delivery.registry`) has a limiter of
its own, so one host's 429s slow only that host. With no configured rate
there is nothing to adapt: a ``rate_limit`` answer's ``Retry-After`` is
honoured by the message's own retry delay, and the domain keeps its pace.

The limit is per process and per domain: with N replicas, set each one's
rate to the provider's limit divided by N.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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
    """The rate a domain runs at now: AIMD under the configured ceiling. Pure.

    With no configured rate there is nothing to adapt (``current`` stays None).
    """

    configured: float | None
    current: float | None = None
    last_decrease: float = float("-inf")
    last_increase: float = 0.0

    def __post_init__(self) -> None:
        self.current = self.configured

    def on_sent(self, now: float) -> bool:
        """A send went through. Returns True when the rate changed."""
        if self.configured is None or self.current is None:
            return False
        if now - self.last_increase < 1.0 or now - self.last_decrease < 1.0:
            return False
        self.last_increase = now
        new = min(self.current + max(0.5, self.configured * INCREASE_STEP), self.configured)
        changed = new != self.current
        self.current = new
        return changed

    def on_rate_limited(self, now: float) -> bool:
        """The provider said slow down. Returns True when the rate changed."""
        if self.configured is None or self.current is None:
            return False  # nothing configured, nothing to adapt: Retry-After decides
        if now - self.last_decrease < 1.0:
            return False  # one cut per second: in-flight 429s are the same signal
        self.current = max(MIN_RATE, self.current * DECREASE_FACTOR)
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

    @property
    def waiting(self) -> bool:
        """Sends are waiting for a permit."""
        return self._pending()

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
