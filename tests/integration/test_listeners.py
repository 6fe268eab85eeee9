"""The public and admin listeners (consumer/http_server.py): which routes each
serves, the per-connection deadlines against clients that send a byte at a time
(raw sockets on loopback), and the throttled /readyz."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvloop
from aiohttp import web
from structlog.testing import capture_logs

from consumer.http_server import PUBLIC_DEADLINES, Deadlines, Listener
from consumer.sandbox.env import SandboxCredentials
from consumer.service import Service
from consumer.settings import Settings
from tests.helpers import metric, wait_for

TOKEN = "ops-2b7e151628aed2a6"



@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    service = Service(settings.replace(admin_token=f"ops:{TOKEN}"), serve_http=True)
    await service.start()
    yield service
    await service.stop()


def urls(service: Service) -> tuple[str, str]:
    assert service.public_listener is not None and service.admin_listener is not None
    return (f"http://127.0.0.1:{service.public_listener.port}",
            f"http://127.0.0.1:{service.admin_listener.port}")


async def status_of(session: aiohttp.ClientSession, method: str, url: str) -> int:
    async with session.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        await r.read()
        return r.status


async def test_webhooks_on_the_public_listener_admin_and_metrics_on_the_admin_one(
    service: Service,
) -> None:
    public, admin = urls(service)
    assert public != admin
    async with aiohttp.ClientSession() as session:
        # Health on both (probes may use either); /readyz is ready on both.
        for base in (public, admin):
            assert await status_of(session, "GET", f"{base}/healthz") == 200
            assert await status_of(session, "GET", f"{base}/readyz") == 200
        # The admin API (with a valid token), the console and metrics: admin listener only.
        assert await status_of(session, "GET", f"{admin}/admin/status") == 200
        assert await status_of(session, "GET", f"{admin}/metrics") == 200
        for path in ("/admin/status", "/admin/parked", "/metrics", "/console/", "/console"):
            assert await status_of(session, "GET", f"{public}{path}") == 404, path
        assert await status_of(session, "POST", f"{public}/admin/parked/replay") == 404
        # Webhooks: public listener only (unsigned, so refused there, but routed).
        assert await status_of(session, "GET", f"{public}/webhooks/whatsapp") == 403
        for method, path in (("POST", "/webhooks/twilio"), ("POST", "/webhooks/whatsapp"),
                             ("GET", "/webhooks/whatsapp"), ("POST", "/webhooks/messenger"),
                             ("GET", "/webhooks/messenger")):
            assert await status_of(session, method, f"{admin}{path}") == 404, path


async def test_the_listeners_bind_where_settings_say(service: Service) -> None:
    assert service.public_listener is not None and service.admin_listener is not None
    for listener in (service.public_listener, service.admin_listener):
        assert listener.server is not None
        hosts = {sock.getsockname()[0] for sock in listener.server.sockets}
        assert hosts == {"127.0.0.1"}, listener.name


# -- deadlines -----------------------------------------------------------------------------


async def trickle(url: str, data: bytes, every_s: float, *,
                  timeout_s: float) -> tuple[float, bytes]:
    """Send ``data`` a byte every ``every_s`` seconds until the server closes the
    connection; the seconds that took and what the server sent meanwhile."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()

    async def send() -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every_s)

    sender = asyncio.create_task(send())
    received = b""
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(4096):
                received += chunk
    except ConnectionResetError:
        pass
    finally:
        sender.cancel()
        writer.close()
    return time.monotonic() - started, received


SLOW_HEAD = (b"POST /webhooks/twilio HTTP/1.1\r\nHost: herald\r\n"
             + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"x" * 20) for i in range(100)))


async def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_deadline(
    service: Service,
) -> None:
    """Both listeners, with the service's own deadlines (10 s for the head)."""
    public, admin = urls(service)
    head_s = PUBLIC_DEADLINES.head_s
    before = metric("herald_http_deadline_exceeded_total", listener="public", phase="head")
    results = await asyncio.gather(*(trickle(base, SLOW_HEAD, 0.5, timeout_s=head_s + 10)
                                     for base in (public, admin)))
    for (elapsed, received), name in zip(results, ("public", "admin"), strict=True):
        print(f"\n{name}: a head sent a byte every 0.5 s was cut off after {elapsed:.1f} s")
        assert head_s - 0.5 <= elapsed <= head_s + 2, (name, elapsed)
        assert received == b"", name  # closed, not answered
    assert metric("herald_http_deadline_exceeded_total", listener="public",
                  phase="head") == before + 1


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHORT = Deadlines(head_s=1.0, request_s=1.5, idle_s=3.0, linger_s=0.5)


def short_listener() -> Listener:
    """A listener with short deadlines around an app that reads whole bodies."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/ok", ok)
    return Listener("test", app, "127.0.0.1", 0, SHORT)


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    listener = short_listener()
    await listener.start()
    yield listener
    await listener.stop()


def url_of(listener: Listener) -> str:
    return f"http://127.0.0.1:{listener.port}"


async def test_a_body_sent_a_byte_at_a_time_is_answered_408_then_closed(
    listener: Listener,
) -> None:
    assert SHORT.request_s is not None
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    host, port = url_of(listener).removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    started = time.monotonic()

    async def send() -> None:
        while True:
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(send())
    before = metric("herald_http_deadline_exceeded_total", listener="test", phase="request")
    try:
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            answered = time.monotonic() - started
            while await reader.read(4096):
                pass
            closed = time.monotonic() - started
    except ConnectionResetError:
        closed = time.monotonic() - started
    finally:
        sender.cancel()
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert SHORT.request_s - 0.2 <= answered <= SHORT.request_s + 1
    assert closed <= SHORT.request_s + SHORT.linger_s + 1
    assert metric("herald_http_deadline_exceeded_total", listener="test",
                  phase="request") == before + 1


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(
    listener: Listener,
) -> None:
    elapsed, received = await trickle(url_of(listener), b"", 1.0, timeout_s=10)
    assert received == b""
    assert SHORT.head_s - 0.2 <= elapsed <= SHORT.head_s + 1


async def test_keep_alive_outlasts_the_head_deadline_then_idles_out(listener: Listener) -> None:
    """Between requests a connection may wait ``idle_s`` (longer than ``head_s``):
    a proxy reusing it after a pause is not cut off."""
    host, port = url_of(listener).removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        async with asyncio.timeout(15):
            for pause in (0.0, SHORT.head_s + 0.5):
                await asyncio.sleep(pause)
                writer.write(request)
                assert (await reader.readline()).startswith(b"HTTP/1.1 200"), pause
                while (await reader.readline()) != b"\r\n":
                    pass
                assert await reader.readexactly(2) == b"ok"
            answered = time.monotonic()
            assert await reader.read(4096) == b""
            idle = time.monotonic() - answered
    finally:
        writer.close()
    assert SHORT.idle_s - 0.3 <= idle <= SHORT.idle_s + 1.5


def test_the_deadlines_hold_under_uvloop() -> None:
    """`herald run` uses uvloop, whose transports the guard wraps as well."""

    async def scenario() -> None:
        listener = short_listener()
        await listener.start()
        try:
            async with aiohttp.ClientSession() as session:
                assert await status_of(session, "GET", f"{url_of(listener)}/ok") == 200
                async with session.post(f"{url_of(listener)}/echo", data=b"x" * 5000) as r:
                    assert (r.status, await r.text()) == (200, "5000")
            elapsed, received = await trickle(url_of(listener), SLOW_HEAD, 0.2, timeout_s=10)
            assert received == b""
            assert SHORT.head_s - 0.2 <= elapsed <= SHORT.head_s + 1
        finally:
            await listener.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert type(runner.get_loop()).__module__.startswith("uvloop")
        runner.run(asyncio.wait_for(scenario(), 20))


# -- /readyz -------------------------------------------------------------------------------


async def test_a_flood_of_readyz_costs_one_database_ping_a_second(service: Service) -> None:
    store = service.store
    assert store is not None
    pings = 0
    real_ping = store.ping

    async def counted() -> None:
        nonlocal pings
        pings += 1
        await real_ping()

    store.ping = counted  # type: ignore[method-assign]
    public, admin = urls(service)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        statuses = await asyncio.gather(*(status_of(session, "GET", f"{base}/readyz")
                                          for _ in range(150) for base in (public, admin)))
        took = time.monotonic() - started
        assert statuses == [200] * 300
        # One ping per started second of the flood at most (none if start-up's is fresh).
        assert pings <= int(took / service.ready.ttl_s) + 1, (pings, took)
        print(f"\n300 concurrent /readyz took {took:.2f} s and {pings} database ping(s)")
        flood_pings = pings

        async def pinged_again() -> bool:
            await status_of(session, "GET", f"{public}/readyz")
            return pings > flood_pings

        # The cached answer expires: a later /readyz checks the database again.
        await wait_for(pinged_again, timeout=5, interval=0.2, what="a fresh readiness check")


# -- start-up check of HERALD_PUBLIC_URL -------------------------------------------------


@pytest.mark.parametrize("base_url, warned", [("https://api.twilio.com", True),
                                              ("http://127.0.0.1:9", False)])
async def test_a_loopback_public_url_with_twilio_configured_is_one_warning_at_start(
    settings: Settings, base_url: str, warned: bool,
) -> None:
    """Gateway role only: no sender runs, so nothing is ever sent to ``base_url``."""
    creds = SandboxCredentials()
    twilio = settings.replace(
        twilio_account_sid=creds.twilio_account_sid, twilio_auth_token=creds.twilio_auth_token,
        twilio_from=creds.twilio_from, twilio_base_url=base_url,
        public_url="http://127.0.0.1:8080")
    service = Service(twilio, roles=("gateway",), serve_http=False)
    with capture_logs() as logs:
        await service.start()
    try:
        assert "sms" in service.providers
        warnings = [e for e in logs if e["event"] == "service.twilio_callbacks_unreachable"]
        assert len(warnings) == (1 if warned else 0)
        if warned:
            assert warnings[0]["log_level"] == "warning"
            assert "HERALD_PUBLIC_URL (http://127.0.0.1:8080) is a loopback address" in (
                warnings[0]["problem"])
    finally:
        await service.stop()
