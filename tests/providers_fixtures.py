"""Helpers for the provider adapter tests: PROVIDERS.md's code tables as
expected outcomes, a running sandbox, and a webhook inbox for status callbacks.

The tables are copied from PROVIDERS.md by hand, independently of the
adapters' own tables, so a test fails when the two disagree.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

from consumer.sandbox import Sandbox


class Row(NamedTuple):
    code: int
    subcode: int | None
    error_type: str
    retryable: bool
    provider_wide: bool = False

    def id(self) -> str:
        return f"{self.code}" + (f"/{self.subcode}" if self.subcode is not None else "")


# PROVIDERS.md, Twilio "Error codes".
TWILIO_ROWS = [
    Row(20429, None, "rate_limit", True),
    Row(14107, None, "rate_limit", True),
    Row(30001, None, "rate_limit", True),
    Row(30002, None, "access_token", False, True),
    Row(30003, None, "provider_error", True),
    Row(30004, None, "invalid_recipient", False),
    Row(30005, None, "invalid_recipient", False),
    Row(30006, None, "invalid_recipient", False),
    Row(30007, None, "invalid_request", False),
    Row(30008, None, "provider_error", True),
    Row(21211, None, "invalid_recipient", False),
    Row(21610, None, "invalid_recipient", False),
    Row(21614, None, "invalid_recipient", False),
    Row(21602, None, "invalid_request", False),
    Row(20003, None, "access_token", False, True),
]

# PROVIDERS.md, WhatsApp table.
WHATSAPP_ROWS = [
    Row(190, None, "access_token", False, True),
    Row(4, None, "rate_limit", True),
    Row(80007, None, "rate_limit", True),
    Row(130429, None, "rate_limit", True),
    Row(131056, None, "rate_limit", True),
    Row(131048, None, "rate_limit", True),
    Row(131047, None, "invalid_request", False),
    Row(131026, None, "invalid_recipient", False),
    Row(131000, None, "provider_error", True),
    Row(133010, None, "permission", False, True),
    Row(100, None, "invalid_request", False),
    Row(131051, None, "invalid_request", False),
    Row(368, None, "permission", False, True),
]

# PROVIDERS.md, Messenger table (200 without 1545041: provider-wide, our choice).
MESSENGER_ROWS = [
    Row(190, None, "access_token", False, True),
    Row(4, None, "rate_limit", True),
    Row(613, None, "rate_limit", True),
    Row(2, None, "provider_error", True),
    Row(1200, None, "provider_error", True),
    Row(551, None, "invalid_recipient", False),
    Row(100, 2018001, "invalid_recipient", False),
    Row(100, None, "invalid_request", False),
    Row(10, None, "permission", False),
    Row(200, 1545041, "invalid_recipient", False),
    Row(200, None, "permission", False, True),
]


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free loopback port; the runner and the base URL."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class RunningProviders:
    """A sandbox serving on loopback, as the provider adapter tests use it."""

    sandbox: Sandbox
    base_url: str
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@dataclass
class Hook:
    """One request the webhook inbox received."""

    path: str
    path_qs: str
    headers: dict[str, str]
    raw: bytes


@dataclass
class Inbox:
    """A stand-in for Herald's webhook receiver: records every POST.

    ``refuse[path] = n`` answers the next ``n`` POSTs to ``path`` with 500.
    """

    base_url: str = ""
    hooks: list[Hook] = field(default_factory=list)
    refuse: dict[str, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return self.base_url + path

    def at(self, path: str) -> list[Hook]:
        return [h for h in self.hooks if h.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if self.refuse.get(request.path, 0) > 0:
            self.refuse[request.path] -= 1
            return web.Response(status=500, text="not now")
        self.hooks.append(Hook(request.path, request.path_qs, dict(request.headers), raw))
        self.changed.set()
        return web.Response(text="ok")

    async def wait(self, condition: Callable[[], bool], *, within: float = 5.0,
                   what: str = "webhooks") -> None:
        """Wait until ``condition()`` holds, woken by each arrival; fail after ``within`` s."""
        try:
            async with asyncio.timeout(within):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out after {within:g} s waiting for {what}; got "
                f"{[(h.path, len(h.raw)) for h in self.hooks]}"
            ) from None


def inbox_app(inbox: Inbox) -> web.Application:
    app = web.Application()
    app.router.add_post("/{tail:.*}", inbox.handle)
    return app


def form_fields(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode(), keep_blank_values=True))


def json_body(raw: bytes) -> Any:
    return json.loads(raw)
