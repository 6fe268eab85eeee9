"""The channels this process consumes, as one object the pipeline and the
events consumer talk to.

:class:`ChannelRegistry` implements the pipeline's
:class:`~consumer.delivery.pipeline.ChannelHooks` (pause on a provider-wide
failure, rate limiting, the outage breaker) by forwarding each call to the
:class:`~consumer.delivery.channels.ChannelControl` of the channel named, and
answers :meth:`ChannelRegistry.snapshot` for the admin API from the controls'
own state (never from metrics). A channel this process does not consume is
simply absent: its hooks do nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from consumer.delivery.channels import ChannelControl
from consumer.errors import DeliveryError


@dataclass(frozen=True)
class ChannelState:
    """What the admin API shows of one channel."""

    consuming: bool
    in_flight: int
    mode: str  # running | paused | probing | inactive
    paused: str | None  # why, while paused or probing
    rate: float | None
    inactive: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"consuming": self.consuming, "in_flight": self.in_flight, "mode": self.mode,
                "paused": self.paused, "rate": self.rate,
                **({"inactive": self.inactive} if self.inactive else {})}


class ChannelRegistry:
    """The channel controls by channel name; the pipeline's hooks."""

    def __init__(self, *, pause_base_s: float) -> None:
        self.controls: dict[str, ChannelControl] = {}
        self.inactive: dict[str, str] = {}
        self.pause_base_s = pause_base_s

    def add(self, control: ChannelControl) -> None:
        self.controls[control.channel_name] = control

    def __getitem__(self, channel: str) -> ChannelControl:
        return self.controls[channel]

    # -- ChannelHooks -----------------------------------------------------------------

    def provider_wide(self, channel: str, error: DeliveryError) -> float:
        """Pause the channel; seconds until it probes again (at least one)."""
        control = self.controls.get(channel)
        if control is None:
            return self.pause_base_s
        control.trip(f"{error.error_type.value}:{error.code or '?'}")
        return max(control.pause.remaining(time.monotonic()), 1.0)

    def sent(self, channel: str) -> None:
        control = self.controls.get(channel)
        if control is not None:
            control.sent_ok()

    async def acquire(self, channel: str, lane: str) -> None:
        control = self.controls.get(channel)
        if control is not None:
            await control.limiter.acquire(lane)

    def rate_limited(self, channel: str) -> None:
        control = self.controls.get(channel)
        if control is not None:
            control.rate_limited()

    def transient_failure(self, channel: str, recipient: str) -> bool:
        control = self.controls.get(channel)
        return control is not None and control.transient_failure(recipient)

    # -- state ------------------------------------------------------------------------

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
            mode = c.pause.mode.value
            states[name] = ChannelState(
                consuming=c.active, in_flight=len(c.tasks), mode=mode,
                paused=c.pause.reason if mode != "running" else None, rate=c.limiter.rate)
        for name, why in self.inactive.items():
            states.setdefault(name, ChannelState(False, 0, "inactive", None, None, why))
        return states

    # -- lifecycle --------------------------------------------------------------------

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
