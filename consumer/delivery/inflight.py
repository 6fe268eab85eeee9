"""How many messages a lane holds in flight: found by the consumer itself. Pure.

Little's law: deliveries per second = messages in flight / time per message.
When the providers answer in 200 ms, 256 in flight can never give more than
1,280 deliveries a second, however idle the machine; when they answer at once,
the same 256 already keep the CPU busy and more would only add queueing. So no
fixed prefetch suits both, and :class:`InFlight` searches for the right one
while the lane runs:

- every period it looks at the deliveries completed and at how full the
  lane was (the mean number in flight over the period, against the prefetch).
  A period lasts ``latencies`` times the time a message spends in flight (by
  Little's law, that mean load over the throughput), within ``min_period_s``
  and ``max_period_s``: long enough for a step to show in the throughput,
  short enough that a burst of a few thousand messages still benefits;
- a lane that was *saturated* (at least ``saturated`` of its prefetch in use)
  grows its prefetch by ``growth`` while each step raises the throughput by at
  least ``gain``; a step that did not pay is taken back, and the lane holds
  that prefetch for ``hold_s`` before trying again (the load may have changed);
- the prefetch never goes below the configured one (``HERALD_PREFETCH``) nor
  above ``ceiling`` (``HERALD_PREFETCH_MAX``: what memory allows; the worst
  case is that many of the largest request bodies Herald accepts).

A lane whose channel has a configured rate keeps the configured prefetch: the
rate, not the latency, bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InFlight:
    floor: int
    ceiling: int
    period_s: float = 0.5  # the current period (the first is this long)
    min_period_s: float = 0.25
    max_period_s: float = 2.0
    latencies: float = 5.0
    growth: float = 1.5
    gain: float = 1.10
    saturated: float = 0.8
    hold_s: float = 30.0

    def __post_init__(self) -> None:
        self.ceiling = max(self.ceiling, self.floor)
        self.current = self.floor
        self._previous: int | None = None  # the prefetch before the step being judged
        self._previous_rate = 0.0
        self._hold_until = 0.0
        self._period_start: float | None = None
        self._completed = 0
        self._load_area = 0.0  # integral of messages in flight over time
        self._last_change = 0.0
        self._in_flight = 0

    def sample(self, now: float, in_flight: int) -> None:
        """The number in flight changed (or is being reported) at ``now``."""
        if self._period_start is None:
            self._period_start = now
            self._last_change = now
        self._load_area += self._in_flight * (now - self._last_change)
        self._last_change = now
        self._in_flight = in_flight

    def completed(self, count: int = 1) -> None:
        self._completed += count

    def restart(self, now: float) -> None:
        """Forget the period under way and any step being judged (the lane was
        paused, so neither says anything about the load); keep the prefetch."""
        self._period_start = now
        self._last_change = now
        self._completed = 0
        self._load_area = 0.0
        self._previous = None

    def tick(self, now: float) -> int | None:
        """At the end of a period: the new prefetch, or None to keep it."""
        if self._period_start is None:
            self._period_start = now
            self._last_change = now
            return None
        elapsed = now - self._period_start
        if elapsed < self.period_s:
            return None
        self.sample(now, self._in_flight)
        rate = self._completed / elapsed
        mean_load = self._load_area / elapsed
        if rate > 0:
            self.period_s = min(self.max_period_s,
                                max(self.min_period_s, self.latencies * mean_load / rate))
        self._period_start, self._completed, self._load_area = now, 0, 0.0
        if self._previous is not None:
            # Judge the last step: did the throughput follow?
            step, self._previous = self._previous, None
            if rate < self._previous_rate * self.gain:
                self._hold_until = now + self.hold_s
                return self._set(step)
        if now < self._hold_until or mean_load < self.saturated * self.current:
            return None
        if self.current >= self.ceiling:
            return None
        self._previous, self._previous_rate = self.current, rate
        return self._set(min(self.ceiling, int(self.current * self.growth) + 1))

    def _set(self, value: int) -> int | None:
        value = max(self.floor, min(self.ceiling, value))
        if value == self.current:
            return None
        self.current = value
        return value
