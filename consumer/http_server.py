"""Herald's HTTP listeners: the public one and the admin one.

- The **public** listener (``HERALD_HTTP_HOST``:``HERALD_HTTP_PORT``) is what
  an Ingress publishes for the providers: ``/webhooks/*`` (added by
  :mod:`consumer.status.webhooks`), ``/healthz`` and ``/readyz``.
- The **admin** listener (``HERALD_ADMIN_HOST``:``HERALD_ADMIN_PORT``, loopback
  by default) is for people and Prometheus: ``/metrics``, ``/healthz``,
  ``/readyz``, and the admin API and console (added by :mod:`consumer.admin.api`).

Every connection of either listener lives under :class:`Deadlines`: aiohttp
closes idle keep-alive connections, but before 3.14 it has no deadline for a
request that arrives a byte at a time, and it never has a separate one, so a
thin protocol wrapper (:class:`_Guard`) keeps one timer per connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from consumer import metrics

log = structlog.get_logger("herald.http")

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The largest body any route reads through aiohttp (webhooks read their own, capped).
CLIENT_MAX_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Deadlines:
    """How long a connection may take over each part of its life, in seconds.

    ``head_s``: the request line and headers, counted from the connection's
    start or from the first byte after an idle keep-alive pause (a request
    trickled in a byte at a time is cut off here). ``request_s``: the body
    and the answer, from the end of the headers (None: no limit; long admin
    operations such as a paced replay need none). ``idle_s``: keep-alive
    between requests. ``linger_s``: reading what is left of a body that was
    refused unread, before closing.
    """

    head_s: float = 10.0
    request_s: float | None = 15.0
    # Longer than the idle timeouts of the usual reverse proxies (nginx-ingress
    # keeps upstream connections 60 s), so that the proxy, not Herald, closes
    # an idle connection: never one the proxy has just reused for a request.
    idle_s: float = 75.0
    linger_s: float = 2.0


# Twilio waits 15 s for an answer; a webhook needs a small body and the
# broker's confirms (PUBLISH_TIMEOUT_S, 5 s).
PUBLIC_DEADLINES = Deadlines()
ADMIN_DEADLINES = Deadlines(request_s=None)


class ThrottledCheck:
    """A readiness check run at most once per ``ttl_s``; concurrent callers share one run.

    A flood of ``/readyz`` then costs one database ping a second, not one
    connection from the pool per request, so it cannot crowd out the
    pipeline's own queries.
    """

    def __init__(self, check: ReadinessCheck, ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.check = check
        self.ttl_s = ttl_s
        self.clock = clock
        self._value: dict[str, bool] | None = None
        self._at = 0.0
        self._running: asyncio.Future[dict[str, bool]] | None = None

    async def __call__(self) -> dict[str, bool]:
        if self._value is not None and self.clock() - self._at < self.ttl_s:
            return dict(self._value)
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        # Shielded: one caller going away must not cancel the others' answer.
        return dict(await asyncio.shield(self._running))

    async def _refresh(self) -> dict[str, bool]:
        try:
            value = await self.check()
            self._value, self._at = value, self.clock()
            return value
        finally:
            self._running = None


def create_app(readiness: ReadinessCheck, *, with_metrics: bool) -> web.Application:
    """An application with ``/healthz``, ``/readyz`` and, when asked, ``/metrics``."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)

    async def metrics_page(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # The event loop answers: the process is alive.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await readiness()
        ready = all(checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status=200 if ready else 503,
        )

    if with_metrics:
        app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, one deadline timer around it.

    States: ``head`` (a request is arriving: ``head_s``), ``busy`` (a handler
    runs: the listener's middleware enforces ``request_s``), ``idle``
    (between requests: ``idle_s``). The middleware marks busy and idle; bytes
    arriving while idle start a head.
    """

    def __init__(self, inner: web.RequestHandler, listener: Listener) -> None:
        self.inner = inner
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.state = "head"
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's is no subclass of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.listener.guards[self.inner] = self
        self._arm(self.listener.deadlines.head_s)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state == "idle":
            self.state = "head"
            self._arm(self.listener.deadlines.head_s)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        # aiohttp's answer is None: the transport closes once the peer stops sending.
        self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.listener.guards.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def busy(self) -> None:
        self.state = "busy"
        self._disarm()

    def idle(self) -> None:
        self.state = "idle"
        self._arm(self.listener.deadlines.idle_s)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.state == "head":
            metrics.HTTP_DEADLINES.labels(self.listener.name, "head").inc()
            # Debug only: scanners and attackers could fill the log; the metric counts.
            log.debug("http.head_deadline", listener=self.listener.name,
                      deadline_s=self.listener.deadlines.head_s)
        if self.transport is not None:
            self.transport.close()


class Listener:
    """An aiohttp application served on ``host:port``, every connection under ``deadlines``."""

    def __init__(self, name: str, app: web.Application, host: str, port: int,
                 deadlines: Deadlines) -> None:
        self.name = name
        self.app = app
        self.host = host
        self.requested_port = port
        self.deadlines = deadlines
        self.guards: dict[web.RequestHandler, _Guard] = {}
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        # Outermost, so that its deadline covers every other middleware too.
        app.middlewares.insert(0, self._middleware)

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when asked for 0)."""
        if self.server is None or not self.server.sockets:
            return self.requested_port
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None,
                                    keepalive_timeout=self.deadlines.idle_s,
                                    lingering_time=self.deadlines.linger_s)
        await self.runner.setup()
        handlers = self.runner.server
        assert handlers is not None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Guard(handlers(), self), self.host, self.requested_port,
            reuse_address=True)

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish, close the connections."""
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.server is not None:
            await self.server.wait_closed()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = self.guards.get(request.protocol)
        if guard is not None:
            guard.busy()
        try:
            return await self._within_deadline(request, handler)
        finally:
            if guard is not None:
                guard.idle()

    async def _within_deadline(self, request: web.Request,
                               handler: Handler) -> web.StreamResponse:
        seconds = self.deadlines.request_s
        if seconds is None:
            return await handler(request)
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await handler(request)
        except TimeoutError:
            if not deadline.expired():
                raise
        metrics.HTTP_DEADLINES.labels(self.name, "request").inc()
        log.warning("http.request_deadline", listener=self.name, path=request.path[:100],
                    deadline_s=seconds, remote=request.remote)
        response = web.json_response(
            {"error": f"request not complete within {seconds:g} s"}, status=408)
        response.force_close()
        return response
