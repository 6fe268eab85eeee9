"""The channels and failure domains of this process, as one object the
pipeline and the events consumer talk to.

:class:`ChannelRegistry` implements the pipeline's
:class:`~consumer.delivery.pipeline.ChannelHooks`:

- every message belongs to a *failure domain* (its provider adapter names
  it: a destination ``scheme://host:port`` for ``http``, the account, phone
  number or page for the others); each domain has an
  :class:`~consumer.delivery.outage.OutageDetector` and a
  :class:`~consumer.delivery.rate.RateLimiter` of its own, so one host's
  outage or 429s touch only that host's messages;
- :meth:`admit` says whether a message may be sent now or must be deferred
  (its domain is open, or half-open and probing with another message);
- :meth:`succeeded` and :meth:`failed` feed the detector and the adaptive
  rate; :meth:`failed` returns how long to pause the message (not charged)
  when its domain is open;
- a channel with a single domain (``sms``, ``whatsapp``, ``messenger``) is
  also paused as a whole while that domain is open: its consumers stop
  taking work, then take one message at a time while it probes (see
  :class:`~consumer.delivery.channels.ChannelControl`).

:meth:`snapshot` answers the admin API from this state (never from metrics).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from consumer import metrics
from consumer.delivery.channels import ChannelControl
from consumer.delivery.outage import OutageDetector, State, Thresholds, Trip
from consumer.delivery.rate import RateLimiter
from consumer.errors import DeliveryError, ErrorType
from consumer.providers.base import Provider
from schemas import SendRequest

log = structlog.get_logger("herald.registry")

# Domains kept in memory; past this, the longest idle closed ones are forgotten.
MAX_DOMAINS = 10_000
# Channels whose provider adapter names one domain for every message.
MULTI_DOMAIN_CHANNELS = frozenset({"http"})


@dataclass
class Domain:
    """One failure domain's outage detector and rate limiter."""

    channel: str
    name: str
    detector: OutageDetector
    limiter: RateLimiter
    last_used: float = field(default_factory=time.monotonic)
    shown: str | None = None  # the reason label of its herald_domain_open series


@dataclass(frozen=True)
class ChannelState:
    """What the admin API shows of one channel."""

    consuming: bool
    in_flight: int
    mode: str  # running | paused | probing | inactive
    paused: str | None  # why, while paused or probing
    inactive: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"consuming": self.consuming, "in_flight": self.in_flight, "mode": self.mode,
                "paused": self.paused,
                **({"inactive": self.inactive} if self.inactive else {})}


class ChannelRegistry:
    """The channel controls by channel name and the failure domains; the pipeline's hooks."""

    def __init__(
        self,
        *,
        thresholds: Thresholds,
        rates: Mapping[str, float | None] | None = None,
        providers: Mapping[str, Provider] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.controls: dict[str, ChannelControl] = {}
        self.inactive: dict[str, str] = {}
        self.providers: Mapping[str, Provider] = providers or {}
        self.thresholds = thresholds
        self.rates = dict(rates or {})
        self.clock = clock
        self.rng = rng or random.Random()
        self.domains: dict[tuple[str, str], Domain] = {}

    def add(self, control: ChannelControl) -> None:
        self.controls[control.channel_name] = control

    def __getitem__(self, channel: str) -> ChannelControl:
        return self.controls[channel]

    # -- domains --------------------------------------------------------------------------

    def domain_of(self, channel: str, request: SendRequest | None) -> str:
        """The failure domain of a message (its adapter's answer; the channel without one)."""
        provider = self.providers.get(channel)
        if provider is None or (request is None and channel in MULTI_DOMAIN_CHANNELS):
            return channel
        return provider.domain(request)

    def domain(self, channel: str, name: str) -> Domain:
        key = (channel, name)
        found = self.domains.get(key)
        if found is None:
            if len(self.domains) >= MAX_DOMAINS:
                self._forget_idle()
            found = Domain(channel, name,
                           OutageDetector(self.thresholds, rng=self.rng),
                           RateLimiter(self.rates.get(channel), clock=self.clock))
            self.domains[key] = found
        found.last_used = self.clock()
        return found

    def _forget_idle(self) -> None:
        closed = sorted((d for d in self.domains.values()
                         if d.detector.state is State.CLOSED and not d.limiter.waiting),
                        key=lambda d: d.last_used)
        for d in closed[: max(1, len(closed) // 2)]:
            del self.domains[(d.channel, d.name)]

    def trips(self, channel: str) -> int:
        """How often the channel's domains opened (for tests and the admin API)."""
        return sum(d.detector.trips for d in self.domains.values() if d.channel == channel)

    # -- ChannelHooks ---------------------------------------------------------------------

    def admit(self, channel: str, domain: str, *, first: bool) -> float | None:
        """None when the message may be sent now, else seconds to defer it by.

        Deferrals spread over the cool-down, so a domain's backlog does not come
        back all at once when it probes.
        """
        d = self.domain(channel, domain)
        wait = d.detector.admit(self.clock(), first=first)
        if wait is None:
            return None
        return wait + self.rng.uniform(0.0, max(wait, d.detector.cooldown_s))

    async def acquire(self, channel: str, domain: str, lane: str) -> None:
        """Wait for the domain's rate limiter to allow one more send."""
        await self.domain(channel, domain).limiter.acquire(lane)

    def succeeded(self, channel: str, domain: str, *, first: bool, key: str) -> None:
        d = self.domain(channel, domain)
        d.limiter.on_sent()
        self._show_rate(d)
        if d.detector.success(self.clock(), first=first, key=key):
            self._closed(d)

    def failed(self, channel: str, domain: str, error: DeliveryError, *, first: bool,
               key: str) -> float | None:
        """Record a failed send. Returns seconds to pause the message (re-sent without
        charging an attempt) when its domain is open, else None (judge the failure)."""
        d = self.domain(channel, domain)
        now = self.clock()
        trip: Trip | None = None
        if error.provider_wide:
            trip = d.detector.provider_wide(now, f"{error.error_type.value}:{error.code or '?'}")
        elif error.error_type is ErrorType.RATE_LIMIT:
            d.limiter.on_rate_limited()
            self._show_rate(d)
            return None
        elif error.outage_signal:
            trip = d.detector.failure(now, first=first, key=key)
        else:
            return None
        if trip is not None:
            self._opened(d, trip)
        state = d.detector.state
        if state is State.OPEN:
            return max(1.0, d.detector.remaining(now))
        if state is State.HALF_OPEN:
            # A probe that met the outage: not the message's fault either.
            return max(1.0, self.thresholds.base_cooldown_s)
        return None

    def provider_wide(self, channel: str, error: DeliveryError,
                      request: SendRequest | None = None) -> float:
        """A provider-wide failure reported after acceptance (the events consumer): open
        the domain; seconds until it probes."""
        pause = self.failed(channel, self.domain_of(channel, request), error, first=True,
                            key="")
        return pause if pause is not None else self.thresholds.base_cooldown_s

    def _opened(self, d: Domain, trip: Trip) -> None:
        self._unshow(d)
        d.shown = trip.reason
        metrics.DOMAIN_OPEN.labels(d.channel, d.name, trip.reason).set(1)
        metrics.DOMAIN_TRIPS.labels(d.channel, trip.reason).inc()
        log.warning("domain.opened", channel=d.channel, domain=d.name, reason=trip.reason,
                    probe_in_s=round(trip.cooldown_s, 1), trips=d.detector.trips)
        control = self.controls.get(d.channel)
        if control is not None and d.channel not in MULTI_DOMAIN_CHANNELS:
            control.pause(trip.reason, trip.cooldown_s)

    def _show_rate(self, d: Domain) -> None:
        if d.channel not in MULTI_DOMAIN_CHANNELS and d.limiter.rate is not None:
            metrics.CHANNEL_RATE.labels(d.channel).set(d.limiter.rate)

    def _unshow(self, d: Domain) -> None:
        if d.shown is not None:
            metrics.DOMAIN_OPEN.remove(d.channel, d.name, d.shown)
            d.shown = None

    def _closed(self, d: Domain) -> None:
        self._unshow(d)
        log.info("domain.closed", channel=d.channel, domain=d.name)
        control = self.controls.get(d.channel)
        if control is not None and d.channel not in MULTI_DOMAIN_CHANNELS:
            control.resume()

    # -- state ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(len(c.tasks) for c in self.controls.values())

    @property
    def active(self) -> bool:
        """Every channel consuming or deliberately paused (and at least one channel)."""
        return bool(self.controls) and all(c.active for c in self.controls.values())

    def snapshot(self) -> dict[str, ChannelState]:
        states = {}
        for name, c in self.controls.items():
            states[name] = ChannelState(
                consuming=c.active, in_flight=len(c.tasks), mode=c.mode, paused=c.reason)
        for name, why in self.inactive.items():
            states.setdefault(name, ChannelState(False, 0, "inactive", None, why))
        return states

    def open_domains(self) -> list[dict[str, Any]]:
        """The domains not closed now, and why."""
        now = self.clock()
        return [{"channel": d.channel, "domain": d.name, "state": d.detector.state.value,
                 "reason": d.detector.reason, "probe_in_s": round(d.detector.remaining(now), 1),
                 "trips": d.detector.trips, "rate": d.limiter.rate}
                for d in self.domains.values() if d.detector.state is not State.CLOSED]

    # -- lifecycle --------------------------------------------------------------------------

    async def stop_consuming(self) -> None:
        for control in self.controls.values():
            await control.stop_consuming()

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for in-flight work; returns how many were cancelled."""
        left = 0
        for control in self.controls.values():
            left += await control.drain(grace_s)
        return left

    async def close(self) -> None:
        for control in self.controls.values():
            await control.close()
        for d in self.domains.values():
            await d.limiter.close()
