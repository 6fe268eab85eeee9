"""Escalation of parked messages to people, end to end through the sandbox: a parking
storm becomes one digest per rule and window, with the right counts, on the sandbox's
recorded endpoint; a digest that cannot be delivered is parked and never escalates
itself; two replicas send each digest once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.errors import ConfigError
from consumer.parking.escalation import Count, Digest, Escalator, digest_lines, digest_request
from consumer.publisher import Publisher
from consumer.records import escalations
from consumer.topology import Names
from schemas import ESCALATION_CAMPAIGN, SendRequest
from tests.conftest import RunningSandbox, SandboxServices
from tests.helpers import publish_all, request, wait_for
from tests.integration.test_admin import VIEWER_TOKEN, Admin, admin
from tests.integration.test_retry_rules import herald_cli
from tests.integration.test_webhooks import HeraldFactory, metric, start_herald

__all__ = ["admin", "start_herald"]  # the fixtures, used here too


async def add_rules(db_url: str, *specs: escalations.EscalationSpec) -> list[dict[str, Any]]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        return [await escalations.add(pool, spec, "test") for spec in specs]
    finally:
        await pool.close()


def digests_at(sandbox: RunningSandbox, name: str) -> list[Any]:
    """The digests the sandbox's endpoint ``name`` accepted, by their request."""
    return [r for r in sandbox.sandbox.received
            if r.provider == "http" and r.path.startswith(f"/http/{name}")]


async def test_a_parking_storm_becomes_one_digest_per_window_with_the_right_counts(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Escalator, "tick_s", 0.2)
    monkeypatch.setattr(Escalator, "rules_cache_s", 0.0)
    everything, _, broken = await add_rules(
        db_url,
        escalations.EscalationSpec("oncall", "http", sandbox.url("oncall"), window_s=2),
        escalations.EscalationSpec("requests", "http", sandbox.url("requests"), window_s=3,
                                   error_type="invalid_request"),
        # Its digests are refused (404: invalid_request) and parked, never escalated.
        escalations.EscalationSpec("broken", "http", sandbox.url("broken", status=404),
                                   window_s=2))
    # Two replicas share the notices; each digest is still sent once.
    await sandbox_services()
    await sandbox_services()
    storm = (
        [request(f"bad-to-{i}", "ftp://nowhere/x", campaign_id="spring") for i in range(1400)]
        + [request(f"refused-{i}", sandbox.url("strict", status=400), campaign_id="spring")
           for i in range(300)]
        + [request(f"plain-{i}", sandbox.url("strict", status=422)) for i in range(300)])
    await publish_all(amqp, prefix, storm)

    async def all_parked() -> bool:
        return await db.fetchval("SELECT count(*) FROM parked_messages") >= 2000

    await wait_for(all_parked, timeout=180, interval=0.5, what="2,000 messages parked")

    def told(name: str) -> int:
        return sum(r.body["parked"] for r in digests_at(sandbox, name)
                   if isinstance(r.body, dict) and r.status == 200)

    await wait_for(lambda: told("oncall") == 2000, timeout=60, interval=0.5,
                   what="digests telling of 2,000 parked messages")
    await wait_for(lambda: told("requests") == 600, timeout=60, interval=0.5,
                   what="the invalid_request rule's digests")
    # Every broken digest was refused and parked as one of the reserved campaign.
    broken_sent = await db.fetchval(
        "SELECT count(*) FROM escalation_digests WHERE rule_id = $1 AND state = 'sent'",
        broken["id"])

    async def broken_parked() -> bool:
        return await db.fetchval(
            "SELECT count(*) FROM parked_messages WHERE campaign_id = $1",
            ESCALATION_CAMPAIGN) == broken_sent

    await wait_for(broken_parked, timeout=30, what="the broken rule's digests parked")
    assert broken_sent >= 1
    # Two windows later nothing more was sent: the parked digests escalated nothing.
    windows_after = await db.fetchval("SELECT count(*) FROM escalation_digests")
    await asyncio.sleep(5)  # the absence of digests: nothing to wait for
    assert await db.fetchval("SELECT count(*) FROM escalation_digests") == windows_after
    assert told("oncall") == 2000 and told("requests") == 600

    oncall = [r for r in digests_at(sandbox, "oncall") if r.status == 200]
    # One digest per window: distinct windows, distinct ids, each accepted once.
    windows = [r.body["window_start"] for r in oncall]
    assert len(windows) == len(set(windows)) == await db.fetchval(
        "SELECT count(*) FROM escalation_digests WHERE rule_id = $1", everything["id"])
    assert len(oncall) < 60  # a few windows, never one message per parked message
    assert Counter(r.message_id for r in oncall).most_common(1)[0][1] == 1
    counts: Counter[tuple[str | None, str]] = Counter()
    for r in oncall:
        for c in r.body["counts"]:
            counts[(c["campaign_id"], c["error_type"])] += c["parked"]
    assert counts == {("spring", "invalid_recipient"): 1400,
                      ("spring", "invalid_request"): 300, (None, "invalid_request"): 300}
    requests_counts: Counter[str] = Counter()
    for r in digests_at(sandbox, "requests"):
        for c in r.body["counts"]:
            requests_counts[c["error_type"]] += c["parked"]
    assert requests_counts == {"invalid_request": 600}
    # The digest reads as a person needs it, and is an ordinary send request.
    biggest = max(oncall, key=lambda r: r.body["parked"])
    text = biggest.body["text"]
    assert text.startswith(f"Herald: {biggest.body['parked']:,} messages parked")
    assert "campaign spring: " in text and "replay with: herald parked replay --campaign " \
        "spring --since " in text
    row = await db.fetchrow("SELECT status, campaign_id, payload FROM messages"
                            " WHERE message_id = $1", biggest.message_id)
    assert row is not None and (row["status"], row["campaign_id"]) == (
        "sent", ESCALATION_CAMPAIGN)
    assert SendRequest.model_validate_json(row["payload"]).priority == "high"

    code, out, err = await herald_cli(db_url, "escalation", "list")
    assert code == 0, err
    assert "oncall: parked messages -> http http://127.0.0.1:" in out
    assert "/http/oncall" not in out  # the target's path (a webhook's key) is not shown


async def test_a_digest_reaches_an_sms_number_through_the_sandboxs_twilio(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SMS target: the digest is one text message sent by Herald's own sms channel
    (the sandbox's Twilio), counting the campaign's parked messages by error type."""
    monkeypatch.setattr(Escalator, "tick_s", 0.2)
    monkeypatch.setattr(Escalator, "rules_cache_s", 0.0)
    lead = "+15550001111"
    digests_before = metric("herald_escalation_digests_total", target_channel="sms")
    await add_rules(db_url, escalations.EscalationSpec(
        "sms-lead", "sms", lead, window_s=2, campaign_id="autumn"))
    await start_herald(sandbox_port=int(sandbox.base_url.rsplit(":", 1)[1]),
                       HERALD_RETRY_RULES="builtin")
    box = sandbox.sandbox.providers
    box.script("twilio", "+15550002222", always=True, code=21211)  # invalid To
    await publish_all(amqp, prefix, [
        *[{"message_id": f"bad-{i}", "channel": "sms", "to": "+15550002222", "body": "hi",
           "campaign_id": "autumn"} for i in range(7)],
        *[request(f"refused-{i}", sandbox.url("strict", status=400), campaign_id="autumn")
          for i in range(3)],
        # Another campaign: the rule does not select it.
        request("other-0", sandbox.url("strict", status=400), campaign_id="winter")])

    def texts() -> list[str]:
        return [r.body["Body"] for r in box.accepted("twilio") if r.recipient == lead]

    await wait_for(lambda: sum(_parked_in(t) for t in texts()) == 10, timeout=60,
                   interval=0.3, what="digests telling the lead of 10 parked messages")
    body = max(texts(), key=_parked_in)
    assert body.startswith("Herald: ") and "(escalation sms-lead)" in body
    assert "campaign autumn: " in body and "winter" not in body
    assert "herald parked replay --campaign autumn --since " in body
    told = Counter[str]()
    for text in texts():
        for part in text.split("campaign autumn: ", 1)[1].split(";", 1)[0].split(", "):
            n, _, kind = part.replace(" parked", "").partition(" as ")
            told[kind] += int(n.replace(",", ""))
    assert told == {"invalid_recipient": 7, "invalid_request": 3}
    # Herald's own sms channel sent it, as a message of the reserved campaign.
    rows = await db.fetch("SELECT status, channel, campaign_id FROM messages"
                          " WHERE message_id LIKE 'herald-escalation-%'")
    assert rows and {(r["channel"], r["campaign_id"]) for r in rows} == {
        ("sms", ESCALATION_CAMPAIGN)}
    assert {r["status"] for r in rows} <= {"sent", "delivered"}  # the sandbox reports it
    assert metric("herald_escalation_digests_total", target_channel="sms") \
        - digests_before == len(rows)


def _parked_in(text: str) -> int:
    """The total a digest's first line gives ("Herald: 1,234 messages parked ...")."""
    return int(text.split(" ", 2)[1].replace(",", ""))


async def test_a_digest_published_twice_is_delivered_once(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process that died after publishing a digest, before recording it sent: the
    digest is published again after ``resend_after_s``, with the same message id, and
    the idempotent claim delivers it once."""
    monkeypatch.setattr(Escalator, "tick_s", 0.2)
    monkeypatch.setattr(Escalator, "resend_after_s", 0.5)
    monkeypatch.setattr(Escalator, "rules_cache_s", 0.0)
    (rule,) = await add_rules(db_url, escalations.EscalationSpec(
        "oncall", "http", sandbox.url("oncall"), window_s=1))
    sent: list[str] = []
    real = Escalator.send_due

    async def forgetful(self: Escalator) -> int:
        # The first digest is published but its record is "lost": as after a crash.
        digests = await self._close_due()
        for digest in digests:
            await self.publisher.publish_send(
                digest.target_channel, json.dumps(digest_request(digest)).encode(),
                message_id=digest.message_id, lane="main")
            sent.append(digest.message_id)
        if sent:
            monkeypatch.setattr(Escalator, "send_due", real)
        return len(digests)

    monkeypatch.setattr(Escalator, "send_due", forgetful)
    await sandbox_services()
    await publish_all(amqp, prefix, [request(f"bad-{i}", "ftp://nowhere", campaign_id="c")
                                     for i in range(5)])

    async def recorded() -> bool:
        return bool(await db.fetchval(
            """SELECT sum(parked) = 5 AND bool_and(state = 'sent') FROM escalation_digests
                WHERE rule_id = $1""", rule["id"]))

    await wait_for(recorded, timeout=30, what="the digests recorded sent")
    assert sent  # published before, never recorded
    await wait_for(lambda: sum(r.body["parked"] for r in digests_at(sandbox, "oncall")) == 5,
                   timeout=20, what="the digests delivered")
    await asyncio.sleep(2)  # a second delivery would come within this; none may
    oncall = digests_at(sandbox, "oncall")
    assert Counter(r.message_id for r in oncall).most_common(1)[0][1] == 1
    assert sent[0] in {r.message_id for r in oncall}
    assert sum(r.body["parked"] for r in oncall) == 5
    # The forgotten digest was published twice: the second copy was a duplicate the
    # claim suppressed.
    assert await db.fetchval("SELECT count(*) FROM delivery_attempts WHERE message_id = $1",
                             sent[0]) == 1


async def test_a_notice_delivered_again_is_not_counted_twice(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
) -> None:
    await add_rules(db_url, escalations.EscalationSpec(
        "all", "sms", "+15551230000", window_s=3600))
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    assert pool is not None
    escalator = Escalator(connection=amqp, names=Names(prefix), pool=pool)
    notice = {"parked_id": str(uuid.uuid4()), "message_id": "m1", "channel": "sms",
              "error_type": "invalid_recipient", "error_code": "21211", "campaign_id": "c",
              "last_error": "bad", "attempt": 1, "parked_at": "2026-11-23T10:00:00+00:00"}
    escalation = {**notice, "parked_id": str(uuid.uuid4()), "campaign_id": ESCALATION_CAMPAIGN}
    nul = {**notice, "parked_id": str(uuid.uuid4()), "campaign_id": "nul\u0000here"}
    publisher = Publisher(amqp, Names(prefix))
    try:
        for body in (notice, notice, escalation, nul, {"not": "a notice"}):
            await publisher.publish(f"{prefix}.notifications", "parked.sms.invalid_recipient",
                                    json.dumps(body).encode())
        queue_messages = []
        channel = await amqp.channel()
        queue = await channel.get_queue(f"{prefix}.escalations", ensure=False)
        for _ in range(5):
            message = await queue.get(fail=False, timeout=5)
            assert message is not None
            queue_messages.append(message)
        # Counted once; the escalation's own notice and the junk not at all; the one
        # the database cannot store is dropped alone.
        before = metric("herald_escalation_counted_total")
        assert await escalator.count(queue_messages) == 1
        assert metric("herald_escalation_counted_total") - before == 1
        assert await db.fetchval("SELECT sum(parked) FROM escalation_digests") == 1
        assert await db.fetchval("SELECT campaign_id FROM escalation_counts") == "c"
        assert await queue.get(fail=False, timeout=1) is None  # all acked
        await channel.close()
    finally:
        await publisher.close()
        await pool.close()


def test_digest_text_groups_by_campaign_and_says_how_to_replay() -> None:
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    digest = Digest(1, "oncall", start, start + timedelta(minutes=5), "sms", "+15551230000", (
        Count("spring", "sms", "invalid_recipient", 9800),
        Count("spring", "sms", "provider_error", 200),
        Count("", "http", "invalid_request", 3),
        Count("x y", "http", "invalid_request", 1)))
    lines = digest_lines(digest)
    assert lines[0] == "Herald: 10,004 messages parked 10:00:00-10:05:00 UTC (escalation oncall)."
    assert lines[1] == ("campaign spring: 9,800 parked as invalid_recipient, 200 as "
                        "provider_error; replay with: herald parked replay --campaign spring"
                        " --since 2026-11-23T09:59:00Z --dry-run")
    assert lines[2].startswith("no campaign (http): 3 parked as invalid_request; replay with:"
                               " herald parked replay --channel http --since")
    assert "--campaign 'x y'" in lines[3]
    request = SendRequest.model_validate(digest_request(digest))
    assert (request.message_id, request.campaign_id, request.channel) == (
        f"herald-escalation-1-{int(start.timestamp())}", ESCALATION_CAMPAIGN, "sms")
    assert isinstance(request.body, str) and len(request.body) <= 1500


@pytest.mark.parametrize(("spec", "why"), [
    (escalations.EscalationSpec("x", "sms", "555"), "--to: not an E.164"),
    (escalations.EscalationSpec("x", "http", "https://u:p@chat.example/x"), "credentials"),
    (escalations.EscalationSpec("x", "pager", "x"), "--to-channel"),
    (escalations.EscalationSpec("x", "http", "https://h/x", window_s=0), "--window"),
    (escalations.EscalationSpec("x", "http", "https://h/x", error_type="bogus"),
     "--error-type"),
    (escalations.EscalationSpec("x", "http", "https://h/x",
                                campaign_id=ESCALATION_CAMPAIGN), "never escalated"),
    (escalations.EscalationSpec("", "http", "https://h/x"), "name"),
])
def test_bad_rules_are_refused_with_one_line(spec: escalations.EscalationSpec,
                                             why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        spec.check()


async def test_escalations_and_retry_rules_through_the_admin_api(
    admin: Admin, db: asyncpg.Connection,
) -> None:
    hook = "https://chat.example.com/hooks/T000/B000/secret-part"
    body = {"name": "oncall", "to_channel": "http", "to": hook, "window_s": 120,
            "error_type": "invalid_recipient"}
    status, viewer = await admin.call("POST", "/escalations", token=VIEWER_TOKEN, body=body)
    assert status == 403, viewer
    status, created = await admin.call("POST", "/escalations", body=body)
    assert status == 201, created
    assert created["target"] == "https://chat.example.com/…"  # the webhook's key is not shown
    assert (created["name"], created["window_s"], created["error_type"]) == (
        "oncall", 120, "invalid_recipient")
    assert await db.fetchval("SELECT target FROM escalation_rules") == hook
    status, again = await admin.call("POST", "/escalations", body=body)
    assert status == 400 and "exists" in again["error"]
    status, bad = await admin.call("POST", "/escalations", body=body | {
        "name": "x", "to_channel": "sms", "to": "555"})
    assert status == 400 and "E.164" in bad["error"]
    status, listed = await admin.call("GET", "/escalations", token=VIEWER_TOKEN)
    assert status == 200 and [r["name"] for r in listed["rules"]] == ["oncall"]
    assert hook not in json.dumps(listed)
    status, _ = await admin.call("DELETE", f"/escalations/{created['id']}", token=VIEWER_TOKEN)
    assert status == 403
    status, removed = await admin.call("DELETE", "/escalations/oncall")
    assert status == 200 and removed["id"] == created["id"]
    status, _ = await admin.call("DELETE", "/escalations/oncall")
    assert status == 404
    actions = [(r["action"], r["outcome"]) for r in await db.fetch(
        "SELECT action, outcome FROM audit_log WHERE action LIKE 'escalation.%' ORDER BY id")]
    assert actions == [("escalation.create", "ok"),
                       ("escalation.create", "error: name: an escalation named 'oncall' exists"),
                       ("escalation.remove", "ok"),
                       ("escalation.remove", "error: no escalation 'oncall'")]
    assert hook not in json.dumps([dict(r) for r in await db.fetch(
        "SELECT params::text FROM audit_log")])

    status, rules = await admin.call("GET", "/retry-rules", token=VIEWER_TOKEN)
    assert status == 200 and rules["builtin_enabled"] is False  # the tests' HERALD_RETRY_RULES
    assert rules["operator"] == [] and rules["builtin"] == []
