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

from consumer.service import Service
from consumer.settings import Settings
from tests.conftest import RunningSandbox
from tests.console.conftest import OPS_TOKEN, TOKENS, VIEW_TOKEN, RunningHerald
from tests.console.test_browser import park
from tests.helpers import publish_all, request, wait_for
from tests.integration.operator_tools import wait_parked

_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


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
        status, _, response = await self.post("/console/login", {
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
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
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
             "/console/campaigns", "/console/campaigns/spring"]
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

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        viewer = Client(herald, other)
        await viewer.sign_in(VIEW_TOKEN)
        for path in pages:
            status, page, _ = await viewer.get(path)
            assert status == 200, (path, page[-2000:])
            assert "night · viewer" in page
            assert 'name="id"' not in page
