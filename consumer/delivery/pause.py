"""Pausing a channel when its provider fails for everyone, not for one message.

An expired token (Twilio 20003, Meta 190, …) or an outage says nothing about
the message that met it, so such a message is not charged an attempt and the
channel stops taking new work: its messages wait in their queue. After a
cool-down the channel lets exactly one message through as a probe. A probe
that meets the same trouble doubles the cool-down (up to a ceiling); the first
success resumes the channel at full speed.

:class:`PauseState` is the pure policy (unit-tested); the worker applies it by
cancelling and re-starting its consumer with a prefetch of one while probing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    PROBING = "probing"


@dataclass
class PauseState:
    """The pause policy of one channel; times are monotonic seconds."""

    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 300.0
    mode: Mode = Mode.RUNNING
    reason: str | None = None
    cooldown_s: float = 0.0
    resume_at: float = 0.0
    pauses: int = 0

    def trip(self, reason: str, now: float) -> bool:
        """A provider-wide failure was seen. Returns True when this starts a pause
        (the caller must stop consuming); False when already paused."""
        if self.mode is Mode.PAUSED:
            return False
        if self.mode is Mode.PROBING:
            # The probe met the same trouble: wait longer this time.
            self.cooldown_s = min(self.max_cooldown_s, max(self.base_cooldown_s,
                                                           self.cooldown_s * 2))
        else:
            self.cooldown_s = self.base_cooldown_s
        self.mode = Mode.PAUSED
        self.reason = reason
        self.resume_at = now + self.cooldown_s
        self.pauses += 1
        return True

    def due_for_probe(self, now: float) -> bool:
        return self.mode is Mode.PAUSED and now >= self.resume_at

    def start_probe(self) -> None:
        self.mode = Mode.PROBING

    def succeeded(self) -> bool:
        """A send went through. Returns True when this ends a pause (resume fully)."""
        if self.mode is Mode.RUNNING:
            return False
        self.mode = Mode.RUNNING
        self.reason = None
        self.cooldown_s = 0.0
        return True

    def remaining(self, now: float) -> float:
        """Seconds until the next probe (0 when running or probing)."""
        if self.mode is not Mode.PAUSED:
            return 0.0
        return max(0.0, self.resume_at - now)
