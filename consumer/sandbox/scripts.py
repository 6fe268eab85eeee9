"""What the fake providers do: per-recipient scripts and provider-wide modes.

A :class:`Script` belongs to one recipient of one provider (the phone number
or PSID Herald sends to) and says how sends to it go: succeed, fail ``fail``
times with a provider code then succeed, fail always, answer slowly, answer
429 with ``Retry-After``, or accept and then report a failure in a status
callback. A provider *mode* overrides every recipient for a time window: an
``outage`` (5xx) or a ``token_expired`` (Twilio 20003, Meta 190).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

PROVIDERS = ("twilio", "whatsapp", "messenger")
MODES = ("normal", "outage", "token_expired")


def check_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    return provider


def recipient_key(recipient: str) -> str:
    """Recipients match with or without ``+``: WhatsApp's ``to`` has none, Twilio's has one."""
    return recipient.strip().removeprefix("+")


@dataclass(frozen=True)
class Script:
    """How the sandbox answers sends to one recipient.

    ``fail`` sends fail (counted from when the script was set) and later ones
    succeed; ``always`` makes every send fail. A failure answers the
    provider's error ``code`` (and Meta ``subcode``) with HTTP ``status``
    (default: the status that provider uses for the code) and a
    ``Retry-After`` header when ``retry_after`` is set. ``latency_ms`` delays
    every answer. ``callback_error`` accepts the send and then reports it
    failed through the status callback with that code (Twilio
    ``undelivered``, or ``callback_status="failed"``; WhatsApp ``failed``).
    """

    fail: int = 0
    always: bool = False
    code: int | None = None
    subcode: int | None = None
    status: int | None = None
    retry_after: str | None = None
    latency_ms: float = 0.0
    callback_error: int | None = None
    callback_status: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Script:
        """A script from its JSON form (the keys are the field names); ValueError when wrong."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown script field(s): {', '.join(unknown)}")
        kinds: dict[str, Callable[[Any], Any]] = {
            "fail": _whole, "always": _flag, "code": _whole, "subcode": _whole,
            "status": _whole, "retry_after": _text, "latency_ms": _number,
            "callback_error": _whole, "callback_status": _text,
        }
        values: dict[str, Any] = {}
        for name, value in data.items():
            if value is None:
                continue
            try:
                values[name] = kinds[name](value)
            except (TypeError, ValueError):
                raise ValueError(f"script field {name!r} has a bad value: {value!r}") from None
        script = cls(**values)
        if script.status is not None and not 400 <= script.status <= 599:
            raise ValueError("script status must be an HTTP error status (400-599)")
        if script.callback_status not in (None, "undelivered", "failed"):
            raise ValueError("callback_status must be 'undelivered' or 'failed'")
        return script

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, 0, 0.0, False)}


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError
    number = int(value)
    if number < 0:
        raise ValueError
    return number


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError
    number = float(value)
    if not 0 <= number <= 3_600_000:
        raise ValueError
    return number


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise TypeError
    return str(value)


@dataclass
class _Entry:
    script: Script
    failures_served: int = 0


class ScriptBook:
    """Scripts by (provider, recipient); a recipient without one always succeeds."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}

    def set(self, provider: str, recipient: str, script: Script | None) -> None:
        """Set (and restart the failure count of) a recipient's script; None removes it."""
        key = (check_provider(provider), recipient_key(recipient))
        if script is None:
            self._entries.pop(key, None)
        else:
            self._entries[key] = _Entry(script)

    def get(self, provider: str, recipient: str | None) -> Script:
        entry = self._entries.get((provider, recipient_key(recipient or "")))
        return entry.script if entry else Script()

    def failure(self, provider: str, recipient: str | None) -> Script | None:
        """The script when this send must fail (and counts it), else None."""
        entry = self._entries.get((provider, recipient_key(recipient or "")))
        if entry is None:
            return None
        if entry.script.always:
            return entry.script
        if entry.failures_served < entry.script.fail:
            entry.failures_served += 1
            return entry.script
        return None

    def clear(self) -> None:
        self._entries.clear()

    def listing(self) -> list[dict[str, Any]]:
        return [
            {"provider": p, "recipient": r, "script": e.script.to_json(),
             "failures_served": e.failures_served}
            for (p, r), e in self._entries.items()
        ]


@dataclass(frozen=True)
class _Window:
    mode: str
    until: float | None  # time.monotonic(); None = until changed


class ProviderModes:
    """Provider-wide modes, each for a time window (or until set back to ``normal``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def set(self, provider: str, mode: str, seconds: float | None = None) -> None:
        check_provider(provider)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if seconds is not None and seconds <= 0:
            raise ValueError("seconds must be positive (or absent for 'until changed')")
        if mode == "normal":
            self._windows.pop(provider, None)
            return
        until = None if seconds is None else self._clock() + seconds
        self._windows[provider] = _Window(mode, until)

    def current(self, provider: str) -> str:
        window = self._windows.get(provider)
        if window is None:
            return "normal"
        if window.until is not None and self._clock() >= window.until:
            del self._windows[provider]
            return "normal"
        return window.mode

    def clear(self) -> None:
        self._windows.clear()

    def listing(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        shown: dict[str, dict[str, Any]] = {}
        for provider in PROVIDERS:
            mode = self.current(provider)
            window = self._windows.get(provider)
            remaining = (None if window is None or window.until is None
                         else round(window.until - now, 3))
            shown[provider] = {"mode": mode, "seconds_left": remaining}
        return shown
