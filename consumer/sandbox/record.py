"""What the fake providers share: their state and the record of what they answered.

:class:`ProviderState` is what the fake Twilio and Meta APIs
(:mod:`consumer.sandbox.twilio`, :mod:`consumer.sandbox.meta`) read and
write; :class:`consumer.sandbox.providers.ProviderSandbox` adds the controls
that tests and ``/_sandbox/*`` use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from consumer.sandbox.callbacks import CallbackConfig, CallbackSender
from consumer.sandbox.env import SandboxCredentials
from consumer.sandbox.scripts import ProviderModes, ScriptBook


@dataclass
class Received:
    """One request the sandbox answered."""

    provider: str
    message_id: str | None
    attempt: int | None
    path: str
    status: int
    at: float
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    provider_message_id: str | None = None
    recipient: str | None = None  # the number or PSID (provider channels)
    raw: str | None = None  # the request body as received (provider channels)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


class ProviderState:
    """Credentials, scripts, modes and callbacks of the fake providers, and the shared
    record (``received``) of every request the sandbox answered."""

    def __init__(
        self,
        received: list[Received],
        credentials: SandboxCredentials | None = None,
        callbacks: CallbackConfig | None = None,
    ) -> None:
        self.received = received
        self.credentials = credentials or SandboxCredentials()
        self.scripts = ScriptBook()
        self.modes = ProviderModes()
        self.callbacks = CallbackSender(callbacks or CallbackConfig())

    def record(
        self,
        provider: str,
        request: web.Request,
        *,
        raw: bytes,
        status: int,
        body: Any,
        recipient: str | None,
        provider_message_id: str | None,
    ) -> None:
        """Add one answered request to the sandbox's ``received``.

        Herald's message id never reaches these providers, so ``message_id``
        stays None; tests map ``provider_message_id`` or ``recipient`` to it.
        """
        self.received.append(Received(
            provider=provider,
            message_id=None,
            attempt=None,
            path=request.path_qs,
            status=status,
            at=time.time(),
            body=body,
            headers=dict(request.headers),
            provider_message_id=provider_message_id,
            recipient=recipient,
            raw=raw.decode("utf-8", "replace"),
        ))
