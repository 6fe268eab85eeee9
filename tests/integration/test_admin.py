"""The admin API under /admin/: bearer tokens, every route, the audit log."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.parking.passes import lot_lock
from consumer.service import Service
from consumer.settings import Settings
from consumer.topology import Names
from tests.conftest import RunningSandbox
from tests.helpers import publish_all, queue_depth, request, wait_for
from tests.integration.operator_tools import park_directly, wait_parked

OPS_TOKEN = "ops-7c1f0b2e9d4a4e55"
BARE_TOKEN = "bare-0d6f3a81c2b94f17"
VIEWER_TOKEN = "view-5e2b9c0d7a1f4c83"
TOKENS = f"ops:{OPS_TOKEN}, {BARE_TOKEN}, night:viewer:{VIEWER_TOKEN}"
BARE_LABEL = "sha256:" + hashlib.sha256(BARE_TOKEN.encode()).hexdigest()[:8]


class Admin:
    def __init__(self, service: Service, session: aiohttp.ClientSession) -> None:
        assert service.admin_listener is not None
        self.base = f"http://127.0.0.1:{service.admin_listener.port}/admin"
        self.session = session

    async def call(self, method: str, path: str, token: str | None = OPS_TOKEN,
                   body: Any = None, **params: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, self.base + path, headers=headers,
                                        json=body, params=params) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[Admin]:
    service = Service(settings.replace(admin_token=TOKENS, http_port=0), serve_http=True)
    await service.start()
    async with aiohttp.ClientSession() as session:
        yield Admin(service, session)
    await service.stop()


async def _audit(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT source, actor, action, params, affected, outcome"
                          " FROM audit_log ORDER BY id")


async def test_no_token_or_a_wrong_one_is_refused_and_does_nothing(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, admin: Admin,
) -> None:
    (parked_id,) = await park_directly(
        amqp, db, prefix, [(request("a-1", "http://127.0.0.1:9/x"), "permission")])
    for token in (None, "", "wrong", OPS_TOKEN + "x", f"ops:{OPS_TOKEN}"):
        for method, path, body in (("GET", "/status", None), ("GET", "/parked", None),
                                   ("GET", f"/parked/{parked_id}", None),
                                   ("POST", "/parked/replay", {"ids": [str(parked_id)]}),
                                   ("POST", "/parked/reject",
                                    {"ids": [str(parked_id)], "reason": "x"}),
                                   ("GET", "/stats", None)):
            status, answer = await admin.call(method, path, token=token, body=body)
            assert status == 401, (token, path, status, answer)
            assert answer == {"error": "unauthorized"}
    # Basic auth is not a bearer token either.
    basic = base64.b64encode(f"ops:{OPS_TOKEN}".encode()).decode()
    async with admin.session.get(admin.base + "/status",
                                 headers={"Authorization": f"Basic {basic}"}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await db.fetchval("SELECT state FROM parked_messages") == "parked"
    assert await db.fetchval("SELECT status FROM messages") == "failed"
    assert await queue_depth(amqp, Names(prefix).parked) == 1
    assert await _audit(db) == []


async def test_the_right_token_lists_shows_replays_and_is_audited(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, admin: Admin,
    sandbox: RunningSandbox,
) -> None:
    await publish_all(amqp, prefix, [
        request(f"a-{i}", sandbox.url("x", fail=1, fail_status=400 if i % 2 else 403))
        for i in range(6)])
    await wait_parked(db, amqp, prefix, 6)

    status, permission = await admin.call("GET", "/parked", error_type="permission")
    assert status == 200
    assert permission["total"] == 3 and permission["by_error_type"] == {"permission": 3}
    status, listing = await admin.call("GET", "/parked", limit="2")
    assert listing["total"] == 6 and len(listing["items"]) == 2
    assert listing["items"][0]["recipient"] == "http://127.0.0.1/…"
    first = listing["items"][0]["id"]
    status, shown = await admin.call("GET", f"/parked/{first}")
    assert status == 200 and shown["parked"]["id"] == first
    # The attempt and its parking are recorded in the same moment (either may sort first).
    assert sorted(h["kind"] for h in shown["history"][:2]) == ["attempt", "parked"]

    status, report = await admin.call("POST", "/parked/replay",
                                      body={"error_types": ["invalid_request"]})
    assert status == 200, report
    assert report["replayed"] == 3
    status, report = await admin.call("POST", "/parked/replay", token=BARE_TOKEN,
                                      body={"ids": [first[:8]], "dry_run": True})
    assert status == 200 and report["dry_run"] is True

    async def sent() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'") == 3

    await wait_for(sent, timeout=15, what="three replayed messages sent")
    assert sandbox.sandbox.accepted_counts() == Counter({"a-1": 1, "a-3": 1, "a-5": 1})
    rows = await _audit(db)
    assert len(rows) == 1  # a dry run changes nothing and is not a mutating call
    (row,) = rows
    assert (row["source"], row["actor"], row["action"], row["affected"], row["outcome"]) == (
        "api", "ops", "parked.replay", 3, "ok")
    assert json.loads(row["params"])["selection"] == {"error_types": ["invalid_request"]}
    replay_actor = await db.fetchval(
        "SELECT DISTINCT actor FROM message_actions WHERE action = 'replayed'")
    assert replay_actor == "ops"

    status, report = await admin.call("POST", "/parked/reject", token=BARE_TOKEN,
                                      body={"ids": [permission["items"][0]["id"]],
                                            "reason": "number recycled"})
    assert status == 200 and report["marked"] == 1 and report["removed"] == 1
    row = (await _audit(db))[-1]
    assert (row["actor"], row["action"], row["affected"]) == (BARE_LABEL, "parked.reject", 1)
    assert json.loads(row["params"])["reason"] == "number recycled"
    assert await queue_depth(amqp, Names(prefix).parked) == 2


async def test_status_stats_and_campaign(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, admin: Admin,
    sandbox: RunningSandbox,
) -> None:
    await db.execute("INSERT INTO campaigns (campaign_id, max_attempts) VALUES ('c1', 2)")
    await publish_all(amqp, prefix, [
        request("s-1", sandbox.url("ok"), campaign_id="c1"),
        request("s-2", sandbox.url("bad", status=400), campaign_id="c1")])
    await wait_parked(db, amqp, prefix, 1)

    async def one_sent() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id='s-1'") == "sent"

    await wait_for(one_sent, timeout=10, what="s-1 sent")
    status, doc = await admin.call("GET", "/status")
    assert status == 200
    assert doc["channels"]["http"]["consuming"] is True
    assert doc["channels"]["http"]["paused"] is None
    assert doc["in_flight"] == 0 and doc["paused"] == {}
    names = Names(prefix)
    assert doc["queues"][names.send_queue("http")]["consumers"] >= 1
    assert doc["queues"][names.parked]["messages"] == 1
    assert doc["parked"] == {"queue": 1, "index": 1, "by_error_type": {"invalid_request": 1}}
    assert set(doc["roles"]) == {"senders", "events", "gateway"}

    status, figures = await admin.call("GET", "/stats", campaign="c1")
    assert status == 200
    assert figures["totals"]["sent"] == 1 and figures["totals"]["failed"] == 1
    assert figures["retry_config"]["max_attempts"] == 2
    assert figures["failures_by_error_type"]["invalid_request"]["messages_failed"] == 1
    status, found = await admin.call("GET", "/campaigns/c1")
    assert status == 200 and found["campaign"]["max_attempts"] == 2
    assert found["stats"]["succeeded"] == 1
    status, found = await admin.call("GET", "/campaigns/nope")
    assert status == 404


async def test_bad_requests_and_a_busy_lot(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, admin: Admin,
    settings: Settings,
) -> None:
    (parked_id,) = await park_directly(
        amqp, db, prefix, [(request("b-1", "http://127.0.0.1:9/x"), "permission")])
    async with admin.session.post(admin.base + "/parked/replay", data=b"{nope",
                                  headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as r:
        assert r.status == 400
    status, answer = await admin.call("POST", "/parked/replay", body={})
    assert status == 400 and "say what to replay" in answer["error"]
    status, _ = await admin.call("GET", "/parked/00000000-0000-0000-0000-000000000000")
    assert status == 404
    status, _ = await admin.call("GET", "/parked", since="yesterday")
    assert status == 400
    status, _ = await admin.call("POST", "/parked/reject", body={"ids": [str(parked_id)]})
    assert status == 400  # a reason is required
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with lot_lock(pool, prefix):
            status, answer = await admin.call("POST", "/parked/replay", body={"all": True})
    finally:
        await pool.close()
    assert status == 409 and "another" in answer["error"]
    outcomes = [(r["action"], r["outcome"].split(":")[0]) for r in await _audit(db)]
    # Calls that reached the operation are audited, refused ones too.
    assert outcomes == [("parked.replay", "error"), ("parked.reject", "error"),
                        ("parked.replay", "error")]
    assert await queue_depth(amqp, Names(prefix).parked) == 1


async def test_without_a_token_the_api_is_off(settings: Settings) -> None:
    service = Service(settings.replace(http_port=0), serve_http=True)
    await service.start()
    try:
        assert service.admin_listener is not None
        port = service.admin_listener.port
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/admin/status",
                headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as response:
            assert response.status == 404
    finally:
        await service.stop()


async def test_a_viewer_token_reads_but_cannot_act_or_reveal(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, admin: Admin,
) -> None:
    (parked_id,) = await park_directly(
        amqp, db, prefix, [(request("v-1", "http://127.0.0.1:9/secret-path"), "permission")])
    status, listing = await admin.call("GET", "/parked", token=VIEWER_TOKEN)
    assert status == 200 and listing["total"] == 1
    assert listing["items"][0]["recipient"] == "http://127.0.0.1/…"
    status, shown = await admin.call("GET", f"/parked/{parked_id}", token=VIEWER_TOKEN)
    assert status == 200 and "secret-path" not in json.dumps(shown)
    status, _ = await admin.call("GET", "/status", token=VIEWER_TOKEN)
    assert status == 200
    for method, path, body, params in (
            ("POST", "/parked/replay", {"ids": [str(parked_id)]}, {}),
            ("POST", "/parked/replay", {"ids": [str(parked_id)], "dry_run": True}, {}),
            ("POST", "/parked/replay", {"all": True, "background": True}, {}),
            ("POST", "/parked/reject", {"ids": [str(parked_id)], "reason": "x"}, {}),
            ("POST", "/jobs/1/cancel", None, {}),
            ("GET", f"/parked/{parked_id}", None, {"reveal": "true"})):
        status, answer = await admin.call(method, path, token=VIEWER_TOKEN, body=body, **params)
        assert status == 403, (method, path, status, answer)
        assert "viewer" in answer["error"]
    assert await db.fetchval("SELECT state FROM parked_messages") == "parked"
    assert await db.fetchval("SELECT status FROM messages") == "failed"
    assert await db.fetchval("SELECT count(*) FROM lot_jobs") == 0
    assert await queue_depth(amqp, Names(prefix).parked) == 1
    refused = await _audit(db)
    assert len(refused) == 6
    assert {(r["actor"], r["outcome"]) for r in refused} == {("night", "refused: role viewer")}

    # An operator may reveal, and the reveal is audited.
    status, shown = await admin.call("GET", f"/parked/{parked_id}", reveal="true")
    assert status == 200 and shown["parked"]["recipient"] == "http://127.0.0.1:9/secret-path"
    row = (await _audit(db))[-1]
    assert (row["actor"], row["action"], row["affected"], row["outcome"]) == (
        "ops", "parked.reveal", 1, "ok")


async def test_audit_rows_are_written_before_the_action_runs(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, admin: Admin,
    settings: Settings,
) -> None:
    (parked_id,) = await park_directly(
        amqp, db, prefix, [(request("w-1", "http://127.0.0.1:9/x"), "permission")])
    # Hold the lot so that the replay waits inside the action: its audit row must
    # already say who started it.
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with lot_lock(pool, prefix):
            status, job = await admin.call("POST", "/parked/replay",
                                           body={"ids": [str(parked_id)], "background": True})
            assert status == 202, job
            (row,) = await _audit(db)
            assert (row["actor"], row["action"], row["outcome"]) == (
                "ops", "parked.replay", "started")

            async def waiting() -> bool:
                _, now = await admin.call("GET", f"/jobs/{job['id']}")
                return bool(now["state"] == "queued" and "waiting" in (now["error"] or ""))

            await wait_for(waiting, timeout=15, what="the job to wait for the busy lot")
    finally:
        await pool.close()

    async def done() -> bool:
        _, now = await admin.call("GET", f"/jobs/{job['id']}")
        return bool(now["state"] == "done")

    await wait_for(done, timeout=30, what="the background replay to finish")
    _, finished = await admin.call("GET", f"/jobs/{job['id']}")
    assert finished["done"] == finished["total"] == 1
    assert finished["report"]["replayed"] == 1
    (row,) = await _audit(db)
    assert (row["outcome"], row["affected"]) == ("ok", 1)
    assert await db.fetchval("SELECT state FROM parked_messages") == "replayed"
    status, listing = await admin.call("GET", "/jobs")
    assert status == 200 and [j["id"] for j in listing["jobs"]] == [job["id"]]
