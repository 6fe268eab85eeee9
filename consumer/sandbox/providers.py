"""The fake Twilio, WhatsApp and Messenger APIs of the sandbox, and their controls.

:func:`install` is what :class:`consumer.sandbox.app.Sandbox` calls: it
adds the provider routes (``consumer.sandbox.twilio``, ``consumer.sandbox.meta``)
and the control endpoints to the sandbox's app and returns the
:class:`ProviderSandbox` that tests drive from Python:

- ``POST /_sandbox/script`` ``{"provider": "twilio", "recipient": "+15550001111",
  "script": {"fail": 2, "code": 30003}}`` (``"script": null`` removes it);
  ``GET /_sandbox/scripts`` lists them;
- ``POST /_sandbox/provider`` ``{"provider": "whatsapp", "mode": "token_expired",
  "seconds": 120}`` (modes ``outage``, ``token_expired``, ``normal``);
  ``GET /_sandbox/provider`` shows them;
- ``GET /_sandbox/callbacks`` shows the callback config and what was sent;
  ``POST /_sandbox/callbacks`` changes the config (partial JSON).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from typing import Any

from aiohttp import web

from consumer.sandbox import meta, twilio
from consumer.sandbox.callbacks import CallbackConfig
from consumer.sandbox.env import SandboxCredentials
from consumer.sandbox.record import ProviderState, Received
from consumer.sandbox.scripts import Script, check_provider


class ProviderSandbox(ProviderState):
    """The fake providers' state with the controls tests use (Python and HTTP)."""

    # -- the Python API for tests ----------------------------------------------------

    def script(self, provider: str, recipient: str, script: Script | None = None,
               **fields: Any) -> Script:
        """Script the sends to ``recipient``: a :class:`Script` or its fields as keywords.

        ``box.providers.script("twilio", "+15550001111", fail=2, code=30003)``.
        Setting a script restarts its failure count.
        """
        chosen = script if script is not None else Script.from_json(fields)
        self.scripts.set(provider, recipient, chosen)
        return chosen

    def unscript(self, provider: str, recipient: str) -> None:
        self.scripts.set(provider, recipient, None)

    def set_mode(self, provider: str, mode: str, seconds: float | None = None) -> None:
        """``outage``, ``token_expired`` or ``normal`` for ``seconds`` (None: until changed)."""
        self.modes.set(provider, mode, seconds)

    def configure_callbacks(self, **changes: Any) -> CallbackConfig:
        """Change the callback config, e.g. ``statuses=("delivered",), shuffle=True``."""
        self.callbacks.config.update(changes)
        if "seed" in changes:
            self.callbacks.reseed()
        return self.callbacks.config

    def accepted(self, provider: str | None = None) -> list[Received]:
        """Accepted sends of the fake providers (all three, or one)."""
        return [r for r in self.received
                if r.accepted and r.provider in ("twilio", "whatsapp", "messenger")
                and (provider is None or r.provider == provider)]

    def accepted_by_recipient(self, provider: str | None = None) -> Counter[str]:
        """Accepted sends per recipient; Herald's message id never reaches these providers."""
        return Counter(r.recipient for r in self.accepted(provider) if r.recipient)

    def reset(self) -> None:
        """Forget scripts, modes and sent callbacks (the callback config stays)."""
        self.scripts.clear()
        self.modes.clear()
        self.callbacks.sent.clear()

    # -- control endpoints -------------------------------------------------------------

    async def _set_script(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        try:
            provider = check_provider(str(data.get("provider")))
            recipient = data.get("recipient")
            if not isinstance(recipient, str) or not recipient:
                raise ValueError("recipient must be the number or PSID sends go to")
            raw = data.get("script", {})
            if raw is not None and not isinstance(raw, dict):
                raise ValueError("script must be an object or null")
            script = None if raw is None else Script.from_json(raw)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.scripts.set(provider, recipient, script)
        return web.json_response({"provider": provider, "recipient": recipient,
                                  "script": None if script is None else script.to_json()})

    async def _list_scripts(self, _: web.Request) -> web.Response:
        return web.json_response(self.scripts.listing())

    async def _set_mode(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        try:
            seconds = data.get("seconds")
            if seconds is not None and (isinstance(seconds, bool)
                                        or not isinstance(seconds, int | float)):
                raise ValueError("seconds must be a number or null")
            self.modes.set(str(data.get("provider")), str(data.get("mode", "")),
                           None if seconds is None else float(seconds))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.modes.listing())

    async def _list_modes(self, _: web.Request) -> web.Response:
        return web.json_response(self.modes.listing())

    async def _set_callbacks(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        try:
            self.configure_callbacks(**data)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.callbacks.config.to_json())

    async def _list_callbacks(self, _: web.Request) -> web.Response:
        return web.json_response({
            "config": self.callbacks.config.to_json(),
            "pending": self.callbacks.pending,
            "sent": [asdict(r) for r in self.callbacks.sent],
        })

    async def _on_cleanup(self, _: web.Application) -> None:
        await self.callbacks.close()


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.read() or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "body must be JSON"}',
                                 content_type="application/json") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}',
                                 content_type="application/json")
    return data


def install(
    app: web.Application,
    received: list[Received],
    credentials: SandboxCredentials | None = None,
    callbacks: CallbackConfig | None = None,
) -> ProviderSandbox:
    """Add the fake providers and their controls to ``app``; they record into ``received``."""
    fakes = ProviderSandbox(received, credentials, callbacks)
    router = app.router
    router.add_post("/_sandbox/script", fakes._set_script)
    router.add_get("/_sandbox/scripts", fakes._list_scripts)
    router.add_post("/_sandbox/provider", fakes._set_mode)
    router.add_get("/_sandbox/provider", fakes._list_modes)
    router.add_post("/_sandbox/callbacks", fakes._set_callbacks)
    router.add_get("/_sandbox/callbacks", fakes._list_callbacks)
    twilio.add_routes(app, fakes)
    meta.add_routes(app, fakes)
    app.on_cleanup.append(fakes._on_cleanup)
    return fakes
