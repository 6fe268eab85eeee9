"""The console over plain HTTP (no browser): every page renders, sessions end
when they should, the cookie's attributes, security headers, cross-origin
POSTs, and background jobs that are cancelled, or interrupted by a process
that died."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.publisher import Publisher
from consumer.service import Service
from consumer.settings import Settings
from consumer.topology import Names
from tests.conftest import RunningSandbox
from tests.console.conftest import OPS_TOKEN, TOKENS, VIEW_TOKEN, RunningHerald
from tests.console.test_browser import park
from tests.helpers import publish_all, request, wait_for
from tests.integration.operator_tools import wait_parked

_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
# Any answer slower than this is a failure to report, not a hang to wait out.
TIMEOUT = aiohttp.ClientTimeout(total=30)


class Client:
    """A signed-in console user over aiohttp (cookies kept, redirects not followed)."""

    def __init__(self, herald: RunningHerald, session: aiohttp.ClientSession) -> None:
        self.base = herald.base
        self.session = session
        self.csrf = ""

    async def sign_in(self, token: str) -> None:
        status, page, _ = await self.get("/console/login")
        assert status == 200, page
        login = _CSRF_RE.search(page)
        assert login is not None
        status, _, _ = await self.post("/console/login", {
            "csrf": login.group(1), "token": token, "next": "/console/"}, csrf=False)
        assert status == 303, status
        status, page, _ = await self.get("/console/")
        assert status == 200, page
        found = _CSRF_RE.search(page)
        assert found is not None
        self.csrf = found.group(1)

    async def get(self, path: str, **params: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, params=params,
                                    allow_redirects=False) as response:
            return response.status, await response.text(), response

    async def post(self, path: str, fields: dict[str, Any], *, csrf: bool = True,
                   headers: dict[str, str] | None = None
                   ) -> tuple[int, str, aiohttp.ClientResponse]:
        data = aiohttp.FormData()
        for key, value in ({"csrf": self.csrf} if csrf else {}).items() | fields.items():
            for one in value if isinstance(value, list) else [value]:
                data.add_field(key, str(one))
        async with self.session.post(self.base + path, data=data, allow_redirects=False,
                                     headers=headers or {}) as response:
            return response.status, await response.text(), response


@pytest.fixture
async def client(herald: RunningHerald) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=TIMEOUT) as session:
        yield Client(herald, session)


async def test_every_page_renders_for_an_operator_and_a_viewer(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, sandbox: RunningSandbox, client: Client,
) -> None:
    await db.execute("INSERT INTO campaigns (campaign_id, daily_limit) VALUES ('spring', 100)")
    await publish_all(amqp, prefix, [
        request(f"c-{i}", sandbox.url("ok" if i % 3 else "bad", status=200 if i % 3 else 400),
                campaign_id="spring") for i in range(9)])
    await wait_parked(db, amqp, prefix, 3)
    ids = await park(amqp, db, prefix, sandbox.url("ok"), [("network", "503", 2)], tag="n")
    await client.sign_in(OPS_TOKEN)
    pages = ["/console/", "/console/parked", "/console/parked?error_type=network",
             "/console/parked?error_type=network&error_code=503&order=newest&since=2h",
             "/console/parked?campaign=spring&recipient=x&until=2030-01-01T00:00",
             f"/console/parked/{ids[0]}", "/console/messages/c-0", "/console/jobs",
             "/console/campaigns", "/console/campaigns/spring", "/console/escalations"]
    for path in pages:
        status, page, response = await client.get(path)
        assert status == 200, (path, page[-2000:])
        assert "ops · operator" in page
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Frame-Options"] == "DENY"
    status, page, _ = await client.get("/console/parked")
    assert "invalid_request" in page and "network" in page
    status, page, _ = await client.get("/console/campaigns")
    assert "spring" in page
    status, page, _ = await client.get("/console/parked", since="yesterday")
    assert status == 400 and "since" in page
    status, page, _ = await client.get("/console/parked", channel="pigeon")
    assert status == 400
    status, page, _ = await client.get("/console/parked/00000000-0000-0000-0000-000000000000")
    assert status == 404
    status, page, _ = await client.get("/console/find", q="c-0")
    assert status == 303
    status, _, _ = await client.get("/console/static/console.css")
    assert status == 200
    status, _, _ = await client.get("/console/static/..%2Fapp.py")
    assert status == 404
    # Previews render too.
    status, page, _ = await client.post("/console/parked/preview",
                                        {"scope": "matching", "error_type": "network"})
    assert status == 200 and 'id="p-selected">2<' in page, page[-3000:]
    status, page, _ = await client.post(f"/console/parked/{ids[0]}/edit", {"body": "{\"a\": 1}"})
    assert status == 200 and 'class="add"' in page, page[-3000:]
    status, page, _ = await client.post(f"/console/parked/{ids[0]}/edit", {"body": "{\"a\": "})
    assert status in (200, 400)
    status, page, _ = await client.post("/console/parked/reject", {"id": str(ids[0]),
                                                                    "reason": "r"})
    assert status == 200, page[-2000:]
    status, page, _ = await client.post("/console/parked/purge", {"older_than": "0s"})
    assert status == 200 and 'id="purge-total">5<' in page, page[-2000:]
    status, page, _ = await client.post("/console/campaigns/spring/targets", {
        "min_delivered_share": "90", "min_retry_success_share": "", "max_average_attempts": "2"})
    assert status == 303
    status, page, _ = await client.get("/console/campaigns/spring")
    assert "missed" in page  # 6 of 9 succeeded: below 90 %

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=TIMEOUT) as other:
        viewer = Client(herald, other)
        await viewer.sign_in(VIEW_TOKEN)
        for path in pages:
            status, page, _ = await viewer.get(path)
            assert status == 200, (path, page[-2000:])
            assert "night · viewer" in page
            assert 'name="id"' not in page


async def test_sessions_end_on_expiry_when_idle_on_sign_out_and_when_the_token_changes(
    herald: RunningHerald, db: asyncpg.Connection, client: Client,
) -> None:
    async def signed_in() -> bool:
        status, _, response = await client.get("/console/parked")
        if status == 303:
            assert response.headers["Location"].startswith("/console/login?next=")
        return status == 200

    await client.sign_in(OPS_TOKEN)
    assert await signed_in()
    # The cookie holds a secret the table only knows the hash of.
    cookie = next(c for c in client.session.cookie_jar if c.key == "herald_console")
    assert await db.fetchval("SELECT count(*) FROM console_sessions") == 1
    assert cookie.value.encode() not in bytes(
        await db.fetchval("SELECT session_hash FROM console_sessions"))
    await db.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
    assert not await signed_in()

    await client.sign_in(OPS_TOKEN)
    await db.execute("UPDATE console_sessions SET seen_at = now() - interval '2 hours'")
    assert not await signed_in()

    await client.sign_in(OPS_TOKEN)
    # A session opened by a token that is no longer configured as it was ends.
    await db.execute("UPDATE console_sessions SET token_fingerprint = '\\x00'")
    assert not await signed_in()

    await client.sign_in(OPS_TOKEN)
    status, _, _ = await client.post("/console/logout", {})
    assert status == 303
    assert not await signed_in()
    # Sign-ins are audited (by label); sign-in failures are not sessions.
    status, page, _ = await client.get("/console/login")
    login = _CSRF_RE.search(page)
    assert login is not None
    status, page, _ = await client.post("/console/login", {
        "csrf": login.group(1), "token": OPS_TOKEN + "x"}, csrf=False)
    assert status == 401 and "not valid" in page
    actors = [r["actor"] for r in await db.fetch(
        "SELECT actor FROM audit_log WHERE action = 'console.sign_in'")]
    assert actors == ["ops"] * 4


async def test_cookie_is_secure_behind_https_and_cross_origin_posts_are_refused(
    settings: Settings, db: asyncpg.Connection, herald: RunningHerald, client: Client,
) -> None:
    await client.sign_in(OPS_TOKEN)
    status, page, _ = await client.post("/console/jobs", {"kind": "purge", "confirm": "yes",
                                                          "older_than": "1d"},
                                        headers={"Origin": "http://elsewhere.invalid"})
    assert status == 403 and "not sent by the console" in page
    assert await db.fetchval("SELECT count(*) FROM lot_jobs") == 0

    service = Service(settings.replace(admin_token=TOKENS, http_port=0,
                                       public_url="https://herald.example.invalid"),
                      serve_http=True, roles=("gateway",))
    await service.start()
    try:
        assert service.admin_listener is not None
        base = f"http://127.0.0.1:{service.admin_listener.port}"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{base}/console/login") as response:
                page = await response.text()
                login_cookie = response.cookies["__Secure-herald_login"]
            found = _CSRF_RE.search(page)
            assert found is not None
            async with session.post(f"{base}/console/login", allow_redirects=False, data={
                    "csrf": found.group(1), "token": VIEW_TOKEN},
                    cookies={"__Secure-herald_login": login_cookie.value}) as response:
                assert response.status == 303
                set_cookie = [v for v in response.headers.getall("Set-Cookie")
                              if v.startswith("__Secure-herald_console=")]
    finally:
        await service.stop()
    (header,) = set_cookie
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=Strict" in header and "Path=/console/" in header


async def test_a_background_replay_is_visible_to_others_cancellable_and_runs_again(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, sandbox: RunningSandbox, client: Client,
) -> None:
    await park(amqp, db, prefix, sandbox.url("ok"), [("network", "503", 10)])
    await client.sign_in(OPS_TOKEN)
    status, _, response = await client.post("/console/jobs", {
        "kind": "replay", "error_type": "network", "rate": "2", "reset_attempts": "1"})
    assert status == 303
    job_path = response.headers["Location"]

    async def progress() -> dict[str, Any]:
        async with client.session.get(herald.base + job_path + ".json") as r:
            assert r.status == 200
            return dict(await r.json())

    async def started() -> bool:
        return (await progress())["done"] >= 2

    await wait_for(started, timeout=20, what="the replay to get going")
    # Another person sees it, live; a viewer may not cancel it.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=TIMEOUT) as other:
        viewer = Client(herald, other)
        await viewer.sign_in(VIEW_TOKEN)
        status, page, _ = await viewer.get("/console/jobs")
        assert status == 200 and "running" in page and job_path in page
        status, page, _ = await viewer.get(job_path)
        assert 'id="cancel"' not in page
        status, _, _ = await viewer.post(job_path + "/cancel", {})
        assert status == 403
    status, _, _ = await client.post(job_path + "/cancel", {})
    assert status == 303

    async def cancelled() -> bool:
        return (await progress())["state"] == "cancelled"

    await wait_for(cancelled, timeout=20, what="the replay to stop")
    stopped = await progress()
    replayed = stopped["report"]["replayed"]
    assert 2 <= replayed < 10, stopped
    # Stopped between publishes: the rest is still parked, nothing half-done.
    assert await db.fetchval(
        "SELECT count(*) FROM parked_messages WHERE state = 'parked'") == 10 - replayed
    audit_rows = await db.fetch(
        "SELECT action, outcome, affected FROM audit_log WHERE action <> 'console.sign_in'"
        " ORDER BY id")
    assert [tuple(r) for r in audit_rows] == [("parked.replay", "cancelled", replayed),
                                              ("job.cancel", "ok", 1)]

    status, _, response = await client.post(job_path + "/rerun", {})
    assert status == 303
    job_path = response.headers["Location"]

    async def done() -> bool:
        return (await progress())["state"] == "done"

    await wait_for(done, timeout=30, what="the second run to finish")
    assert (await progress())["report"]["replayed"] == 10 - replayed
    assert await db.fetchval("SELECT count(*) FROM parked_messages WHERE state = 'parked'") == 0


async def test_a_job_whose_process_died_is_marked_interrupted_at_the_next_start(
    settings: Settings, db: asyncpg.Connection,
) -> None:
    audit_id = await db.fetchval(
        """INSERT INTO audit_log (source, actor, action, params, outcome)
           VALUES ('console', 'ops', 'parked.replay', '{}', 'started') RETURNING id""")
    job_id = await db.fetchval(
        """INSERT INTO lot_jobs (kind, state, params, created_by, started_at, audit_id)
           VALUES ('replay', 'running', '{"selection": {"all": true}}', 'ops', now(), $1)
           RETURNING id""", audit_id)
    service = Service(settings.replace(admin_token=TOKENS, http_port=0), serve_http=True,
                      roles=("gateway",))
    await service.start()
    try:
        # Marked at start-up, before the service answers.
        row = await db.fetchrow("SELECT state, error FROM lot_jobs WHERE id = $1", job_id)
        assert row["state"] == "interrupted" and "run it again" in row["error"]
        assert await db.fetchval("SELECT outcome FROM audit_log WHERE id = $1",
                                 audit_id) == "interrupted: its process stopped"
    finally:
        await service.stop()


async def test_a_parked_provider_event_is_listed_shown_and_previewed(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, client: Client,
) -> None:
    publisher = Publisher(amqp, Names(prefix))
    try:
        await publisher.publish(f"{prefix}.events", "twilio.delivered", b"not an event",
                                message_id="f1b8c5de-24a9-4b57-8d6e-0c1f6a8e9b11")
    finally:
        await publisher.close()

    async def parked() -> bool:
        return bool(await db.fetchval(
            "SELECT count(*) FROM parked_messages WHERE channel = 'events'"))

    await wait_for(parked, timeout=15, what="the event parked")
    parked_id = await db.fetchval("SELECT parked_id FROM parked_messages")
    await client.sign_in(OPS_TOKEN)
    status, page, _ = await client.get("/console/parked", channel="events")
    assert status == 200, page[-2000:]
    assert str(parked_id)[:8] in page and "event_schema" in page
    status, page, _ = await client.get(f"/console/parked/{parked_id}")
    assert status == 200, page[-2000:]
    assert "not an event" in page and "f1b8c5de-24a9-4b57-8d6e-0c1f6a8e9b11" in page
    status, page, _ = await client.post("/console/parked/preview",
                                        {"scope": "matching", "channel": "events"})
    assert status == 200 and 'id="p-selected">1<' in page, page[-3000:]
    status, page, _ = await client.post(f"/console/parked/{parked_id}/edit",
                                        {"body": "\"x\""})
    assert status == 400 and "cannot be edited" in page, page[-2000:]
