"""Status callbacks from the fake providers to Herald's webhooks.

After a send is accepted the sandbox POSTs the provider's status callbacks
(built and signed by the provider modules) the way real providers misbehave:
after a delay, out of order and sometimes twice, as :class:`CallbackConfig`
says. Every accepted send gets one task that sends its callbacks in turn; the
tasks are kept in a set, reaped when done and cancelled on shutdown (nothing
is fire-and-forget). A callback Herald does not take (non-2xx or no
connection) is logged and tried again a few times.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("herald.sandbox.callbacks")

STATUSES = ("sending", "sent", "delivered", "read")


@dataclass
class CallbackConfig:
    """How status callbacks are sent; change it between tests or with ``POST /_sandbox/callbacks``.

    ``statuses`` are the successful statuses to report, each provider taking
    those it has (Twilio SMS: sending, sent, delivered; WhatsApp: sent,
    delivered, read; Messenger: delivered, read). Before each callback the
    sender waits a random time in ``delay_ms``; ``shuffle`` sends a message's
    callbacks in random order; each callback is sent a second time with
    ``duplicate_probability``. Twilio's callbacks go to the ``StatusCallback``
    of the send; Meta's to ``whatsapp_url`` and ``messenger_url`` (None: none
    sent). ``messenger_mids=False`` leaves ``mids`` out of delivery events so
    that only the watermark says what was delivered. ``seed`` makes the
    randomness repeatable.
    """

    statuses: tuple[str, ...] = ("sent", "delivered", "read")
    delay_ms: tuple[float, float] = (0.0, 0.0)
    shuffle: bool = False
    duplicate_probability: float = 0.0
    enabled: bool = True
    whatsapp_url: str | None = None
    messenger_url: str | None = None
    messenger_mids: bool = True
    attempts: int = 3
    retry_delay_ms: float = 200.0
    timeout_s: float = 5.0
    seed: int | None = None

    @classmethod
    def for_herald(cls, public_url: str, **changes: Any) -> CallbackConfig:
        """Meta's webhooks to Herald's receivers under ``public_url`` (HERALD_PUBLIC_URL)."""
        base = public_url.rstrip("/")
        config = cls(whatsapp_url=f"{base}/webhooks/whatsapp",
                     messenger_url=f"{base}/webhooks/messenger")
        config.update(changes)
        return config

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial JSON update (``meta_callback_url`` sets both Meta URLs).

        Raises ValueError, leaving the config unchanged, when a value is wrong.
        """
        staged = dict(changes)
        if "meta_callback_url" in staged:
            url = staged.pop("meta_callback_url")
            staged.setdefault("whatsapp_url", url)
            staged.setdefault("messenger_url", url)
        new = asdict(self)
        for name, value in staged.items():
            if name not in new:
                raise ValueError(f"unknown callback setting {name!r}")
            new[name] = value
        checked = _checked(new)
        for name, value in checked.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["statuses"] = list(self.statuses)
        shown["delay_ms"] = list(self.delay_ms)
        return shown


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    statuses = values["statuses"]
    if isinstance(statuses, str) or not all(s in STATUSES for s in statuses):
        raise ValueError(f"statuses must be a list of {', '.join(STATUSES)}")
    delay = values["delay_ms"]
    if isinstance(delay, int | float) and not isinstance(delay, bool):
        delay = (delay, delay)
    lo, hi = (float(d) for d in delay)
    if not 0 <= lo <= hi <= 600_000:
        raise ValueError("delay_ms must be [low, high] milliseconds with 0 <= low <= high")
    probability = float(values["duplicate_probability"])
    if not 0 <= probability <= 1:
        raise ValueError("duplicate_probability must be between 0 and 1")
    attempts = int(values["attempts"])
    if not 1 <= attempts <= 20:
        raise ValueError("attempts must be between 1 and 20")
    for name in ("whatsapp_url", "messenger_url"):
        url = values[name]
        if url is not None and not (isinstance(url, str) and url.startswith(("http://",
                                                                           "https://"))):
            raise ValueError(f"{name} must be an http(s) URL or null")
    for name in ("shuffle", "enabled", "messenger_mids"):
        if not isinstance(values[name], bool):
            raise ValueError(f"{name} must be true or false")
    seed = values["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("seed must be a whole number or null")
    return values | {
        "statuses": tuple(statuses),
        "delay_ms": (lo, hi),
        "duplicate_probability": probability,
        "attempts": attempts,
        "retry_delay_ms": max(0.0, float(values["retry_delay_ms"])),
        "timeout_s": max(0.1, float(values["timeout_s"])),
    }


@dataclass(frozen=True)
class Callback:
    """One status callback to send. ``render`` builds the body and headers at
    sending time, because some fields (Messenger watermarks) are times."""

    provider: str
    url: str
    status: str
    provider_message_id: str
    render: Callable[[], tuple[bytes, dict[str, str]]]


@dataclass
class CallbackRecord:
    """What became of one callback: kept in :attr:`CallbackSender.sent` for tests."""

    provider: str
    url: str
    status: str
    provider_message_id: str
    delivered: bool
    attempts: int
    http_status: int | None
    at: float = field(default_factory=time.time)
    error: str | None = None


class CallbackSender:
    """Sends planned callbacks from tracked tasks; :meth:`close` cancels what is left."""

    def __init__(self, config: CallbackConfig) -> None:
        self.config = config
        self.sent: list[CallbackRecord] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.rng = random.Random(config.seed)

    def reseed(self) -> None:
        self.rng = random.Random(self.config.seed)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def plan(self, callbacks: list[Callback]) -> list[Callback]:
        """The order callbacks go out in: shuffled and with duplicates as configured."""
        planned = list(callbacks)
        if self.config.shuffle:
            self.rng.shuffle(planned)
        for callback in list(planned):
            if self.rng.random() < self.config.duplicate_probability:
                planned.insert(self.rng.randint(planned.index(callback) + 1, len(planned)),
                               callback)
        return planned

    def schedule(self, callbacks: list[Callback]) -> None:
        """Send ``callbacks`` in the background (from a request handler, so in the loop)."""
        if not callbacks or not self.config.enabled:
            return
        task = asyncio.get_running_loop().create_task(self._run(self.plan(callbacks)))
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("sandbox.callback_task_failed", error=repr(error))

    async def _run(self, callbacks: list[Callback]) -> None:
        for callback in callbacks:
            lo, hi = self.config.delay_ms
            if hi > 0:
                await asyncio.sleep(self.rng.uniform(lo, hi) / 1000.0)
            self.sent.append(await self._deliver(callback))

    async def _deliver(self, callback: Callback) -> CallbackRecord:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        attempts = self.config.attempts
        error: str | None = None
        status: int | None = None
        for attempt in range(1, attempts + 1):
            body, headers = callback.render()
            try:
                async with self._session.post(
                    callback.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                ) as response:
                    status = response.status
                    await response.read()
                if 200 <= status < 300:
                    return CallbackRecord(callback.provider, callback.url, callback.status,
                                          callback.provider_message_id, True, attempt, status)
                error = f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status = None
                error = f"{type(exc).__name__}: {exc}"
            log.warning("sandbox.callback_failed", provider=callback.provider,
                        status=callback.status, url=callback.url, attempt=attempt,
                        of=attempts, error=error)
            if attempt < attempts:
                await asyncio.sleep(self.config.retry_delay_ms / 1000.0 * 2 ** (attempt - 1))
        log.error("sandbox.callback_given_up", provider=callback.provider,
                  status=callback.status, url=callback.url, attempts=attempts)
        return CallbackRecord(callback.provider, callback.url, callback.status,
                              callback.provider_message_id, False, attempts, status, error=error)

    async def drain(self) -> None:
        """Wait until every scheduled callback was sent or given up.

        Callers bound the wait: ``async with asyncio.timeout(5): await sender.drain()``.
        """
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Cancel callbacks not yet sent and close the HTTP session."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
