"""The console's Escalations page (listing, adding and removing rules) and the
campaigns' completion (plain HTTP)."""

from __future__ import annotations

import json

import aiohttp
import asyncpg

from schemas import ESCALATION_CAMPAIGN
from tests.console.conftest import OPS_TOKEN, VIEW_TOKEN, RunningHerald
from tests.console.test_pages import TIMEOUT, Client, client

__all__ = ["client"]  # the fixture, used here too


async def test_escalations_and_completed_campaigns_are_shown(
    db: asyncpg.Connection, herald: RunningHerald, client: Client,
) -> None:
    await client.sign_in(VIEW_TOKEN)
    status, page, _ = await client.get("/console/escalations")
    assert status == 200 and "No escalation rules" in page
    await db.execute(
        """INSERT INTO escalation_rules (name, error_type, target_channel, target, window_s,
                                         created_by)
           VALUES ('oncall', 'invalid_recipient', 'http',
                   'https://chat.example.com/hooks/T0/B0/secret', 300, 'test')""")
    await db.execute(
        """INSERT INTO escalation_digests (rule_id, window_start, window_end, state, parked,
                                           sent_at)
           VALUES (1, '2026-11-23T10:00:00Z', '2026-11-23T10:05:00Z', 'sent', 9800, now())""")
    status, page, _ = await client.get("/console/escalations")
    assert status == 200
    assert 'id="escalation-1"' in page and "invalid_recipient" in page
    assert "https://chat.example.com/…" in page and "secret" not in page
    assert "2026-11-23 10:00:00 UTC" in page and "9,800" in page
    assert 'href="/console/escalations" aria-current="page"' in page

    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, campaign_id, payload)
           VALUES ('m1', 'sent', 'http', 'http://x', 'spring', '{}')""")
    await db.execute(
        """INSERT INTO campaign_completion (campaign_id, state, last_activity_at, completed_at,
                                           completions, counters)
           VALUES ('spring', 'completed', now(), now(), 1, '{}')""")
    status, page, _ = await client.get("/console/campaigns")
    assert status == 200 and '<span class="badge good"' in page and ">completed</span>" in page
    status, page, _ = await client.get("/console/campaigns/spring")
    assert status == 200 and 'id="completed"><span class="badge good">completed</span>' in page


async def test_an_operator_adds_and_removes_escalations_a_viewer_may_not(
    db: asyncpg.Connection, herald: RunningHerald, client: Client,
) -> None:
    hook = "https://chat.example.com/hooks/T0/B0/secret-part"
    await client.sign_in(OPS_TOKEN)
    status, page, _ = await client.get("/console/escalations")
    assert status == 200 and 'id="escalation-form"' in page
    status, _, response = await client.post("/console/escalations", {
        "name": "oncall", "to_channel": "http", "to": hook, "window": "90s",
        "error_type": "invalid_recipient", "campaign": "spring", "channel": ""})
    assert status == 303 and response.headers["Location"] == "/console/escalations"
    row = await db.fetchrow("SELECT * FROM escalation_rules")
    assert row is not None
    assert (row["name"], row["target_channel"], row["target"], row["window_s"],
            row["error_type"], row["campaign_id"], row["channel"], row["created_by"]) == (
        "oncall", "http", hook, 90, "invalid_recipient", "spring", None, "ops")
    status, page, _ = await client.get("/console/escalations")
    assert 'id="escalation-1"' in page and "https://chat.example.com/…" in page
    assert "secret-part" not in page and 'id="remove-escalation-1"' in page

    # Bad input: one line saying what is wrong, the form filled in again but for the
    # target (a webhook's URL is its key), and nothing stored.
    for fields, why in [
        ({"to": "555", "to_channel": "sms"}, "--to: not an E.164"),
        ({"window": "soon"}, "window: a duration"),
        ({"window": "2d"}, "--window: between 1 s and 86400 s"),
        ({"error_type": "bogus"}, "--error-type: one of"),
        ({"to_channel": "pager"}, "--to-channel: one of"),
        ({"campaign": ESCALATION_CAMPAIGN}, "never escalated"),
        ({}, "name: an escalation named &#39;oncall&#39; exists"),  # HTML-escaped
    ]:
        status, page, _ = await client.post("/console/escalations", {
            "name": "oncall", "to_channel": "http", "to": hook, "window": "5m"} | fields)
        assert status == 400, (fields, page[-1500:])
        assert 'id="escalation-error"' in page and why in page, (fields, page[-1500:])
        assert "secret-part" not in page
    assert 'value="oncall"' in page
    assert await db.fetchval("SELECT count(*) FROM escalation_rules") == 1

    # A viewer sees the rules but neither the form nor the buttons, and is refused.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=TIMEOUT) as other:
        viewer = Client(herald, other)
        await viewer.sign_in(VIEW_TOKEN)
        status, page, _ = await viewer.get("/console/escalations")
        assert status == 200 and 'id="escalation-1"' in page
        assert 'id="escalation-form"' not in page and "remove-escalation" not in page
        for path, fields in [("/console/escalations", {"name": "x", "to_channel": "http",
                                                        "to": hook}),
                             ("/console/escalations/1/remove", {})]:
            status, page, _ = await viewer.post(path, fields)
            assert status == 403 and "may only read" in page, path
    # Without the session's CSRF token nothing changes either.
    status, _, _ = await client.post("/console/escalations/1/remove", {}, csrf=False)
    assert status == 403
    assert await db.fetchval("SELECT count(*) FROM escalation_rules") == 1

    status, _, response = await client.post("/console/escalations/1/remove", {})
    assert status == 303
    assert await db.fetchval("SELECT count(*) FROM escalation_rules") == 0
    status, page, _ = await client.post("/console/escalations/1/remove", {})
    assert status == 404 and "no escalation &#39;1&#39;" in page
    actions = [(r["source"], r["actor"], r["action"], r["outcome"]) for r in await db.fetch(
        """SELECT source, actor, action, outcome FROM audit_log
            WHERE action LIKE 'escalation.%' ORDER BY id""")]
    assert actions == [
        ("console", "ops", "escalation.create", "ok"),
        ("console", "ops", "escalation.create",
         "error: name: an escalation named 'oncall' exists"),
        ("console", "ops", "escalation.remove", "ok"),
        ("console", "ops", "escalation.remove", "error: no escalation '1'")]
    assert "secret-part" not in json.dumps([r["params"] for r in await db.fetch(
        "SELECT params::text FROM audit_log")])
