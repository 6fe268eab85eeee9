"""The sandbox server and its record of what it received.

Scripts live in the recipient itself so that a test (or a demo campaign)
needs no set-up call: for the ``http`` channel the URL's query says what to
do, for example ``http://127.0.0.1:8090/http/a?fail=2&fail_status=429&retry_after=3``.

``/_sandbox/requests`` lists what was received; ``/_sandbox/counts`` gives
accepted sends per message id; ``POST /_sandbox/reset`` forgets both.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from consumer.sandbox.providers import ProviderSandbox, install
from consumer.sandbox.record import Received

if TYPE_CHECKING:
    from consumer.sandbox.callbacks import CallbackConfig
    from consumer.sandbox.env import SandboxCredentials


@dataclass(frozen=True)
class HttpScript:
    """What the fake HTTP endpoint does for one recipient URL."""

    fail: int = 0  # fail this many times per message, then succeed
    fail_status: int = 500
    then_fail: int = 0  # after those, fail this many times more with then_status
    then_status: int = 500
    retry_after: str | None = None
    status: int | None = None  # always answer this status
    hang: bool = False  # never answer (until the client gives up)
    latency_ms: float = 0.0
    rate_limit: float | None = None  # answer 429 above this many requests/s (per endpoint)

    @classmethod
    def from_query(cls, query: Any) -> HttpScript:
        def num(name: str, default: float) -> float:
            raw = query.get(name)
            return float(raw) if raw not in (None, "") else default

        status = query.get("status")
        return cls(
            fail=int(num("fail", 0)),
            fail_status=int(num("fail_status", 500)),
            then_fail=int(num("then_fail", 0)),
            then_status=int(num("then_status", 500)),
            retry_after=query.get("retry_after") or None,
            status=int(status) if status else None,
            hang=query.get("hang") in ("1", "true", "yes"),
            latency_ms=num("latency_ms", 0.0),
            rate_limit=num("rate_limit", 0.0) or None,
        )


class Sandbox:
    """An aiohttp application imitating the providers, with a record for tests."""

    def __init__(
        self,
        credentials: SandboxCredentials | None = None,
        *,
        callbacks: CallbackConfig | None = None,
    ) -> None:
        self.received: list[Received] = []
        self._failures: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._recent: defaultdict[str, deque[float]] = defaultdict(deque)
        self._http_outage: tuple[float, int] | None = None
        self.app = web.Application(client_max_size=4 * 1024 * 1024)
        self.app.router.add_post("/http/{name:.*}", self._http)
        self.app.router.add_get("/_sandbox/requests", self._list)
        self.app.router.add_get("/_sandbox/counts", self._counts)
        self.app.router.add_post("/_sandbox/reset", self._reset)
        self.providers: ProviderSandbox = install(self.app, self.received, credentials, callbacks)

    # -- what tests read --------------------------------------------------------------

    def accepted_counts(self, provider: str | None = None) -> Counter[str]:
        return Counter(
            r.message_id
            for r in self.received
            if r.accepted and r.message_id and (provider is None or r.provider == provider)
        )

    def attempts_for(self, message_id: str) -> list[Received]:
        return [r for r in self.received if r.message_id == message_id]

    def reset(self) -> None:
        self.received.clear()
        self._failures.clear()
        self.providers.reset()

    # -- the generic HTTP endpoint ----------------------------------------------------

    async def _http(self, request: web.Request) -> web.Response:
        script = HttpScript.from_query(request.query)
        message_id = request.headers.get("Idempotency-Key")
        attempt_header = request.headers.get("X-Herald-Attempt")
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if script.latency_ms:
            await asyncio.sleep(script.latency_ms / 1000.0)
        if script.hang:
            # Hold the request far longer than any sane client timeout.
            await asyncio.sleep(3600)

        key = (request.path_qs, message_id or "")
        headers: dict[str, str] = {}
        now = time.time()
        outage = self._http_outage
        if outage is not None and now < outage[0]:
            status = outage[1]
        elif script.rate_limit is not None and self._over_rate(request.path, now,
                                                                 script.rate_limit):
            status = 429
            headers["Retry-After"] = "1"
        elif script.status is not None:
            status = script.status
        elif self._failures[key] < script.fail:
            self._failures[key] += 1
            status = script.fail_status
        elif self._failures[key] < script.fail + script.then_fail:
            self._failures[key] += 1
            status = script.then_status
        else:
            status = 200
        if status >= 300 and script.retry_after is not None:
            headers["Retry-After"] = script.retry_after

        provider_message_id = f"http-{uuid.uuid4().hex[:16]}" if status < 300 else None
        self.received.append(
            Received(
                provider="http",
                message_id=message_id,
                attempt=int(attempt_header) if attempt_header and attempt_header.isdigit()
                else None,
                path=request.path_qs,
                status=status,
                at=time.time(),
                body=body,
                provider_message_id=provider_message_id,
            )
        )
        if status < 300:
            return web.json_response({"id": provider_message_id}, status=status)
        return web.json_response({"error": f"scripted {status}"}, status=status,
                                 headers=headers)

    def http_outage(self, seconds: float, status: int = 503) -> None:
        """Every ``/http/…`` request answers ``status`` for the next ``seconds``."""
        self._http_outage = (time.time() + seconds, status)

    def _over_rate(self, endpoint: str, now: float, limit: float) -> bool:
        """Count this request against the endpoint's last second; True when over."""
        recent = self._recent[endpoint]
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) >= limit:
            return True
        recent.append(now)
        return False

    # -- control API --------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        message_id = request.query.get("message_id")
        rows = [asdict(r) | {"accepted": r.accepted} for r in self.received
                if message_id is None or r.message_id == message_id]
        return web.json_response(rows)

    async def _counts(self, _: web.Request) -> web.Response:
        return web.json_response(dict(self.accepted_counts()))

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"status": "reset"})


async def serve(host: str, port: int, public_url: str | None = None) -> None:
    """Serve the sandbox; with ``public_url``, its Meta status callbacks go to that
    Herald's webhooks (Twilio's go wherever each request's StatusCallback says)."""
    from consumer.sandbox.callbacks import CallbackConfig as Callbacks

    sandbox = Sandbox(callbacks=Callbacks.for_herald(public_url) if public_url else None)
    runner = web.AppRunner(sandbox.app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"herald sandbox listening on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
