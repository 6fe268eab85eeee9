"""The events consumer: provider events applied to messages (forward only, read
implies delivered, repeats change nothing, early events kept until the send
is recorded, Messenger watermarks, failures reported after acceptance), then
end to end through the sandbox's signed, delayed, shuffled and duplicated
status callbacks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.publisher import Publisher
from consumer.sandbox.callbacks import Callback, CallbackRecord, CallbackSender
from consumer.status.events import EventsConsumer
from consumer.topology import Names
from schemas import ProviderEvent
from tests.conftest import REPO, RunningSandbox
from tests.helpers import drain_queue, publish_all, queue_depth, wait_for
from tests.integration.test_webhooks import HeraldFactory, start_herald

__all__ = ["start_herald"]  # the fixture, used here too

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
RANK = {"queued": 0, "sending": 0, "retrying": 0, "sent": 1, "delivered": 2, "read": 3}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(provider: str, pmid: str | None, status: str, when: datetime, **extra: Any
       ) -> ProviderEvent:
    return ProviderEvent.model_validate({"provider": provider, "provider_message_id": pmid,
                                         "status": status, "occurred_at": when, **extra})


async def publish_events(amqp: AbstractRobustConnection, prefix: str, *events: ProviderEvent,
                         message_id: str | None = None) -> None:
    publisher = Publisher(amqp, Names(prefix))
    try:
        await asyncio.gather(*(
            publisher.publish(f"{prefix}.events", f"{e.provider}.{e.status}",
                              e.model_dump_json(exclude_none=True).encode(),
                              message_id=message_id or str(uuid.uuid4()))
            for e in events))
    finally:
        await publisher.close()


def sms_payload(mid: str, to: str = "+15551234567", max_attempts: int = 3) -> dict[str, Any]:
    return {"message_id": mid, "channel": "sms", "to": to, "body": f"hello {mid}",
            "retry": {"max_attempts": max_attempts}}


async def insert_message(
    db: asyncpg.Connection, mid: str, *, provider: str = "twilio", pmid: str | None = None,
    channel: str = "sms", recipient: str = "+15551234567", status: str = "sent",
    attempts: int = 1, payload: dict[str, Any] | None = None,
    sending_at: datetime | None = None,
) -> None:
    """A message as the pipeline leaves it (sent, or being sent when ``status='sending'``)."""
    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, payload, attempts,
                                 provider, provider_message_id, queued_at, sending_at, sent_at)
           VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, now(),
                   COALESCE($9, now()), CASE WHEN $2 = 'sent' THEN now() END)""",
        mid, status, channel, recipient, json.dumps(payload or sms_payload(mid, recipient)),
        attempts, provider if status == "sent" else None, pmid, sending_at,
    )


async def record_sent(db: asyncpg.Connection, mid: str, provider: str, pmid: str,
                      attempt: int = 1) -> None:
    """What the pipeline records when the provider accepted a send."""
    await db.fetch("SELECT * FROM herald_record_batch($1::text::jsonb)", json.dumps([{
        "idx": 0, "message_id": mid, "attempt": attempt, "outcome": "sent",
        "started_at": datetime.now(UTC).isoformat(), "latency_ms": 5.0, "provider": provider,
        "provider_message_id": pmid}]))


async def message(db: asyncpg.Connection, mid: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM messages WHERE message_id = $1", mid)
    assert row is not None
    return row


async def outcomes(db: asyncpg.Connection, **where: str) -> list[str | None]:
    clauses = " AND ".join(f"{k} = ${i}" for i, k in enumerate(where, 1)) or "true"
    return [r["outcome"] for r in await db.fetch(
        f"SELECT outcome FROM provider_events WHERE {clauses} ORDER BY id", *where.values())]


async def settled(db: asyncpg.Connection, expect: int) -> bool:
    """``expect`` events stored and none pending."""
    row = await db.fetchrow("SELECT count(*) AS n, count(*) FILTER (WHERE outcome IS NULL) AS p"
                            " FROM provider_events")
    assert row is not None
    return bool(row["n"] >= expect and row["p"] == 0)


# -- applying statuses --------------------------------------------------------------------


async def test_statuses_only_move_forward_and_repeats_change_nothing(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))
    for n in (1, 2, 3):
        await insert_message(db, f"m{n}", pmid=f"SM{n}")
    sent_at = (await message(db, "m1"))["sent_at"]

    # One batch, out of order and repeated.
    await publish_events(amqp, prefix,
                         ev("twilio", "SM1", "read", at(3)),
                         ev("twilio", "SM1", "delivered", at(2)),
                         ev("twilio", "SM1", "sent", at(1)),
                         ev("twilio", "SM1", "delivered", at(4)),
                         ev("twilio", "SM2", "delivered", at(2)),
                         ev("twilio", "SM3", "read", at(5)))
    await wait_for(lambda: settled(db, 6), timeout=10, what="6 events applied")
    m1, m2, m3 = [await message(db, f"m{n}") for n in (1, 2, 3)]
    assert (m1["status"], m1["delivered_at"], m1["read_at"]) == ("read", at(2), at(3))
    assert m1["sent_at"] == sent_at  # Herald's own record of acceptance stays
    assert (m2["status"], m2["delivered_at"], m2["read_at"]) == ("delivered", at(2), None)
    # Read implies delivered: until its own report comes, delivered_at is the read's time.
    assert (m3["status"], m3["delivered_at"], m3["read_at"]) == ("read", at(5), at(5))
    assert m3["delivered_implied"]

    # Later batches: a late sent, the real delivery report of m3, then repeats.
    await publish_events(amqp, prefix, ev("twilio", "SM2", "sent", at(9)),
                         ev("twilio", "SM3", "delivered", at(4)))
    await wait_for(lambda: settled(db, 8), timeout=10, what="8 events applied")
    await publish_events(amqp, prefix, ev("twilio", "SM3", "delivered", at(6)),
                         ev("twilio", "SM1", "read", at(7)),
                         ev("twilio", "SM2", "delivered", at(1)))
    await wait_for(lambda: settled(db, 11), timeout=10, what="11 events applied")
    m1, m2, m3 = [await message(db, f"m{n}") for n in (1, 2, 3)]
    assert (m1["status"], m1["delivered_at"], m1["read_at"]) == ("read", at(2), at(3))
    assert (m2["status"], m2["delivered_at"]) == ("delivered", at(2))
    assert (m3["status"], m3["delivered_at"], m3["read_at"]) == ("read", at(4), at(5))
    assert not m3["delivered_implied"]

    assert await outcomes(db, provider_message_id="SM1") == [
        "applied", "applied", "unchanged", "unchanged", "unchanged"]
    assert await outcomes(db, provider_message_id="SM3") == ["applied", "applied", "unchanged"]
    assert await outcomes(db, provider_message_id="SM2") == ["applied", "unchanged", "unchanged"]
    linked = await db.fetchval("SELECT count(*) FROM provider_events WHERE message_id IS NULL")
    assert linked == 0


async def test_a_redelivered_event_is_stored_and_applied_once(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))
    await insert_message(db, "m1", pmid="SM1")
    same = str(uuid.uuid4())
    event = ev("twilio", "SM1", "delivered", at(1))
    await publish_events(amqp, prefix, event, message_id=same)
    await publish_events(amqp, prefix, event, message_id=same)
    await publish_events(amqp, prefix, ev("twilio", "SM1", "read", at(2)))
    await wait_for(lambda: settled(db, 2), timeout=10, what="events applied")
    assert await outcomes(db) == ["applied", "applied"]


async def test_event_before_the_send_is_recorded_is_applied_once_it_is(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))
    await insert_message(db, "m1", status="sending")
    await publish_events(amqp, prefix, ev("twilio", "SM1", "sent", at(1)),
                         ev("twilio", "SM1", "delivered", at(2)))

    async def stored_pending() -> bool:
        return await outcomes(db) == [None, None]

    await wait_for(stored_pending, timeout=10, what="two pending events")
    assert (await message(db, "m1"))["status"] == "sending"

    await record_sent(db, "m1", "twilio", "SM1")

    async def delivered() -> bool:
        return (await message(db, "m1"))["status"] == "delivered"

    await wait_for(delivered, timeout=10, what="the early delivery applied")
    assert (await message(db, "m1"))["delivered_at"] == at(2)
    assert sorted(o or "" for o in await outcomes(db)) == ["applied", "unchanged"]
    # A repeat now is an ordinary repeat.
    await publish_events(amqp, prefix, ev("twilio", "SM1", "delivered", at(3)))
    await wait_for(lambda: settled(db, 3), timeout=10, what="the repeat applied")
    assert (await outcomes(db))[-1] == "unchanged"
    assert (await message(db, "m1"))["delivered_at"] == at(2)


async def test_an_event_no_send_claims_becomes_an_orphan(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EventsConsumer, "orphan_after_s", 1.0)
    monkeypatch.setattr(EventsConsumer, "sweep_interval_s", 0.2)
    await start_herald(roles=("events",))
    await publish_events(amqp, prefix, ev("whatsapp", "wamid.nobody", "delivered", at(1)))

    async def orphaned() -> bool:
        return await outcomes(db) == ["orphan"]

    await wait_for(orphaned, timeout=10, what="the event marked orphan")


async def test_messenger_watermarks_cover_every_earlier_message_to_the_person(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))
    psid, other = "2401000000000001", "2401000000000002"
    now = datetime.now(UTC)
    mark = now - timedelta(seconds=10)
    for mid, who, began in (("a", psid, mark - timedelta(seconds=3)),
                            ("b", psid, mark - timedelta(seconds=1)),
                            ("c", psid, mark + timedelta(seconds=5)),
                            ("d", other, mark - timedelta(seconds=3))):
        await insert_message(db, mid, provider="messenger", pmid=f"m_{mid}", channel="messenger",
                             recipient=who, sending_at=began)
    # A send to the person begun before the watermark, not recorded yet.
    await insert_message(db, "e", channel="messenger", recipient=psid, status="sending",
                         sending_at=mark - timedelta(seconds=2))

    await publish_events(amqp, prefix, ev("messenger", None, "delivered", mark,
                                          recipient=psid, watermark=mark))

    async def covered() -> bool:
        rows = await db.fetch("SELECT message_id, status FROM messages ORDER BY message_id")
        return [r["status"] for r in rows] == ["delivered", "delivered", "sent", "sent",
                                               "sending"]

    await wait_for(covered, timeout=10, what="a and b delivered by the watermark")
    assert await outcomes(db) == [None]  # waits for e to be recorded
    await record_sent(db, "e", "messenger", "m_e")

    async def e_delivered() -> bool:
        return (await message(db, "e"))["status"] == "delivered"

    await wait_for(e_delivered, timeout=10, what="the pending watermark applied to e")
    assert await outcomes(db) == ["applied"]

    read_mark = mark + timedelta(seconds=1)
    await publish_events(amqp, prefix, ev("messenger", None, "read", read_mark,
                                          recipient=psid, watermark=read_mark))
    await wait_for(lambda: settled(db, 2), timeout=10, what="the read watermark applied")
    rows = {r["message_id"]: r for r in await db.fetch("SELECT * FROM messages")}
    assert {m: r["status"] for m, r in rows.items()} == {
        "a": "read", "b": "read", "c": "sent", "d": "sent", "e": "read"}
    assert rows["a"]["delivered_at"] == mark and rows["a"]["read_at"] == read_mark


# -- failures reported after acceptance ----------------------------------------------------


async def test_retryable_failure_resends_as_a_new_attempt_whose_claim_succeeds(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))  # no senders: the re-sent copy waits in its queue
    await insert_message(db, "m1", pmid="SM1", payload=sms_payload("m1", max_attempts=3))
    await publish_events(amqp, prefix, ev("twilio", "SM1", "failed", at(1), error_code="30003",
                                          error_text="Unreachable destination handset"))

    async def retrying() -> bool:
        return (await message(db, "m1"))["status"] == "retrying"

    await wait_for(retrying, timeout=10, what="m1 retrying")
    m1 = await message(db, "m1")
    assert (m1["last_error_type"], m1["last_error_code"], m1["attempts"]) == (
        "provider_error", "30003", 1)
    attempts = await db.fetch("SELECT attempt, outcome, error_code, provider_message_id "
                              "FROM delivery_attempts WHERE message_id = 'm1'")
    assert [tuple(r) for r in attempts] == [(1, "retrying", "30003", "SM1")]

    # A repeat of the report and a late "delivered" of the failed attempt change nothing.
    await publish_events(amqp, prefix, ev("twilio", "SM1", "failed", at(2), error_code="30003"),
                         ev("twilio", "SM1", "delivered", at(3)))
    await wait_for(lambda: settled(db, 3), timeout=10, what="the late events applied")
    assert await outcomes(db) == ["retry", "superseded", "superseded"]
    assert (await message(db, "m1"))["status"] == "retrying"

    # The copy comes back from the delay levels (base delay 1 s) as attempt 2, once.
    copies = await drain_queue(amqp, f"{prefix}.send.sms", expect=2, timeout=6)
    assert len(copies) == 1
    (copy,) = copies
    assert copy.headers["x-herald-attempt"] == 2
    assert copy.headers["x-herald-error-code"] == "30003"
    assert copy.message_id == "m1"
    assert json.loads(copy.body) == sms_payload("m1", max_attempts=3)
    assert await db.fetchval("SELECT count(*) FROM event_actions WHERE done_at IS NULL") == 0

    claim = await db.fetchrow("SELECT * FROM herald_claim_batch($1::text::jsonb)", json.dumps([{
        "idx": 0, "message_id": "m1", "channel": "sms", "recipient": "+15551234567",
        "campaign_id": None, "payload": sms_payload("m1"), "attempt": 2, "owner": "test",
        "lease_s": 10}]))
    assert claim is not None and claim["outcome"] == "claimed"


async def test_a_reported_failure_keeps_a_replayed_messages_fresh_budget_and_its_lane(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    """Attempt 4 of a message replayed with a fresh budget after attempt 3 (attempt base
    3), in a campaign (bulk lane): a reported failure re-sends it as attempt 5 with the
    base kept and on the bulk lane, as the pipeline would for a synchronous failure."""
    await start_herald(roles=("events",))  # no senders: the re-sent copy waits in its queue
    payload = sms_payload("m1", max_attempts=3) | {"campaign_id": "spring"}
    await insert_message(db, "m1", pmid="SM4", attempts=4, payload=payload)
    await db.execute("UPDATE messages SET attempt_base = 3, campaign_id = 'spring'"
                     " WHERE message_id = 'm1'")
    await publish_events(amqp, prefix, ev("twilio", "SM4", "failed", at(1), error_code="30003"))

    (copy,) = await drain_queue(amqp, f"{prefix}.send.sms.bulk", expect=1, timeout=10)
    assert copy.headers["x-herald-attempt"] == 5
    assert copy.headers["x-herald-attempt-base"] == 3
    assert await queue_depth(amqp, f"{prefix}.send.sms") == 0
    # Judged against the fresh budget: attempt 4 was the first of it, so it was retried.
    assert await outcomes(db) == ["retry"]


async def test_failure_reported_before_the_send_is_recorded_is_acted_on_once_it_is(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))
    await insert_message(db, "m1", status="sending", payload=sms_payload("m1"))
    await publish_events(amqp, prefix, ev("twilio", "SM1", "failed", at(1), error_code="30003"),
                         ev("twilio", "SM1", "failed", at(2), error_code="30003"))

    async def stored_pending() -> bool:
        return await outcomes(db) == [None, None]

    await wait_for(stored_pending, timeout=10, what="two pending reports")
    await record_sent(db, "m1", "twilio", "SM1")

    async def retrying() -> bool:
        return (await message(db, "m1"))["status"] == "retrying"

    await wait_for(retrying, timeout=10, what="m1 retrying")
    assert await outcomes(db) == ["retry", "unchanged"]
    copies = await drain_queue(amqp, f"{prefix}.send.sms", expect=2, timeout=6)
    assert [c.headers["x-herald-attempt"] for c in copies] == [2]


async def test_provider_wide_failure_resends_without_charging_an_attempt(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",), HERALD_PAUSE_BASE_S="1")
    await insert_message(db, "m1", pmid="SM1", payload=sms_payload("m1"))
    await publish_events(amqp, prefix, ev("twilio", "SM1", "failed", at(1), error_code="30002",
                                          error_text="Account suspended"))
    (copy,) = await drain_queue(amqp, f"{prefix}.send.sms", expect=1, timeout=10)
    assert copy.headers["x-herald-attempt"] == 1  # the same attempt, not charged
    m1 = await message(db, "m1")
    assert (m1["status"], m1["attempts"], m1["last_error_type"]) == (
        "retrying", 0, "access_token")
    assert await outcomes(db) == ["pause"]
    claim = await db.fetchrow("SELECT * FROM herald_claim_batch($1::text::jsonb)", json.dumps([{
        "idx": 0, "message_id": "m1", "channel": "sms", "recipient": "+15551234567",
        "campaign_id": None, "payload": sms_payload("m1"), "attempt": 1, "owner": "test",
        "lease_s": 10}]))
    assert claim is not None and claim["outcome"] == "claimed"


@pytest.mark.parametrize(("code", "attempts", "error_type"), [
    ("30006", 1, "invalid_recipient"),   # permanent
    ("30003", 3, "provider_error"),      # retryable, but no attempt left
])
async def test_failure_that_is_not_retried_parks_the_message(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, code: str, attempts: int, error_type: str,
) -> None:
    await start_herald(roles=("events",))
    await insert_message(db, "m1", pmid="SM1", attempts=attempts,
                         payload=sms_payload("m1", max_attempts=3))
    await publish_events(amqp, prefix, ev("twilio", "SM1", "failed", at(1), error_code=code))

    async def failed() -> bool:
        return (await message(db, "m1"))["status"] == "failed"

    await wait_for(failed, timeout=10, what="m1 failed")
    (parked,) = await drain_queue(amqp, f"{prefix}.parked", expect=1, timeout=5)
    headers = parked.headers
    assert (headers["x-herald-error-type"], headers["x-herald-error-code"],
            headers["x-herald-attempt"], headers["x-herald-channel"],
            headers["x-herald-message-id"]) == (error_type, code, attempts, "sms", "m1")
    assert json.loads(parked.body)["message_id"] == "m1"
    row = await db.fetchrow("SELECT * FROM parked_messages WHERE message_id = 'm1'")
    assert row is not None
    assert (row["error_type"], row["error_code"], row["attempts"], row["state"]) == (
        error_type, code, attempts, "parked")
    assert str(row["parked_id"]) == headers["x-herald-parked-id"]
    assert await outcomes(db) == ["park"]
    assert await queue_depth(amqp, f"{prefix}.send.sms") == 0


@pytest.mark.parametrize(("code", "kind", "queue"), [("30003", "resend", "send.sms"),
                                                      ("21211", "park", "parked")])
async def test_a_message_id_that_cannot_be_an_amqp_message_id_does_not_stop_the_events(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, code: str, kind: str, queue: str,
) -> None:
    # 150 characters, 300 bytes in UTF-8: a message_id the edge refuses today, but
    # one a message stored before that rule may have. AMQP's message-id (a
    # shortstr) cannot hold it: the republish used to raise, was taken for a
    # broker outage, and the events role retried it for ever.
    long_id = "é" * 150
    await start_herald(roles=("events",))
    await insert_message(db, long_id, pmid="SM-long", payload=sms_payload(long_id))
    await insert_message(db, "after", pmid="SM-after")
    await publish_events(amqp, prefix, ev("twilio", "SM-long", "failed", at(1),
                                          error_code=code))

    async def acted() -> bool:
        return await db.fetchval("SELECT count(*) FROM event_actions WHERE kind = $1"
                                 " AND done_at IS NOT NULL", kind) == 1

    await wait_for(acted, timeout=15, what=f"the {kind} done")
    (copy,) = await drain_queue(amqp, f"{prefix}.{queue}", expect=1, timeout=10)
    # Not the id (the client fills in one of its own); the body carries the id.
    assert copy.message_id != long_id
    assert json.loads(copy.body)["message_id"] == long_id
    if kind == "park":
        assert copy.headers["x-herald-message-id"] == long_id
        assert await db.fetchval("SELECT message_id FROM parked_messages") == long_id
    # The events role goes on applying.
    await publish_events(amqp, prefix, ev("twilio", "SM-after", "delivered", at(2)))

    async def delivered() -> bool:
        return (await message(db, "after"))["status"] == "delivered"

    await wait_for(delivered, timeout=10, what="the next event applied")


async def test_failure_after_delivery_is_ignored(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await start_herald(roles=("events",))
    await insert_message(db, "w1", provider="whatsapp", pmid="wamid.1", channel="whatsapp")
    # In one batch: delivered first, then failed (the first terminal report wins).
    await publish_events(amqp, prefix, ev("whatsapp", "wamid.1", "delivered", at(1)))
    await publish_events(amqp, prefix, ev("whatsapp", "wamid.1", "failed", at(2),
                                          error_code="131026"))
    await wait_for(lambda: settled(db, 2), timeout=10, what="both applied")
    assert (await message(db, "w1"))["status"] == "delivered"
    assert await outcomes(db) == ["applied", "ignored"]
    assert await db.fetchval("SELECT count(*) FROM event_actions") == 0


async def test_an_action_left_undone_by_a_crash_is_done_by_the_sweep(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EventsConsumer, "action_retry_after_s", 0.5)
    monkeypatch.setattr(EventsConsumer, "sweep_interval_s", 0.2)
    # What a process that died between the commit and the publish leaves behind.
    await insert_message(db, "m1", pmid="SM1", status="sent")
    await db.execute(
        """INSERT INTO provider_events (event_id, provider, provider_message_id, status,
                                        occurred_at, message_id, outcome, applied_at)
           VALUES ($1, 'twilio', 'SM1', 'failed', now(), 'm1', 'retry', now())""",
        uuid.uuid4())
    await db.execute("UPDATE messages SET status = 'retrying' WHERE message_id = 'm1'")
    await db.execute(
        """INSERT INTO event_actions (event_row, message_id, kind, channel, attempt, delay_s,
                                      error_type, error_code, error_text, created_at)
           SELECT id, 'm1', 'resend', 'sms', 2, 1, 'provider_error', '30003', 'x',
                  now() - interval '1 minute' FROM provider_events""")
    await start_herald(roles=("events",))
    (copy,) = await drain_queue(amqp, f"{prefix}.send.sms", expect=1, timeout=10)
    assert copy.headers["x-herald-attempt"] == 2
    assert await db.fetchval("SELECT done_at IS NOT NULL FROM event_actions")


async def test_a_burst_of_events_is_absorbed(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    n = 4000
    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, payload, attempts,
                                 provider, provider_message_id, sending_at, sent_at)
           SELECT 'b' || i, 'sent', 'whatsapp', '+1555' || lpad(i::text, 7, '0'), '{}', 1,
                  'whatsapp', 'wamid.' || i, now(), now()
             FROM generate_series(1, $1) AS i""", n)
    events = [ev("whatsapp", f"wamid.{i}", status, at(i % 50 + (1 if status == "read" else 0)))
              for i in range(1, n + 1) for status in ("delivered", "read")]
    publisher = Publisher(amqp, Names(prefix))
    for start in range(0, len(events), 1000):
        await asyncio.gather(*(
            publisher.publish(f"{prefix}.events", "whatsapp.x", e.model_dump_json().encode(),
                              message_id=str(uuid.uuid4())) for e in events[start:start + 1000]))
    await publisher.close()
    started = time.monotonic()
    await start_herald(roles=("events",))

    async def all_read() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE status = 'read'") == n

    await wait_for(all_read, timeout=120, interval=0.2, what=f"{n} messages read")
    elapsed = time.monotonic() - started
    print(f"\n{2 * n} events applied in {elapsed:.2f} s ({2 * n / elapsed:.0f}/s, "
          "including service start)")
    assert await db.fetchval("SELECT count(*) FROM provider_events WHERE outcome = 'applied'"
                             ) == 2 * n


# -- end to end through the sandbox ----------------------------------------------------------


def _recipient(channel: str, n: int) -> str:
    if channel == "sms":
        return f"+1555{n:07d}"
    if channel == "whatsapp":
        return f"+1556{n:07d}"
    return f"{7_000_000 + n:016d}"


async def _through_sandbox(sandbox: RunningSandbox, start_herald: HeraldFactory,
                           **callbacks: Any) -> str:
    port = int(sandbox.base_url.rsplit(":", 1)[1])
    herald = await start_herald(sandbox_port=port)
    sandbox.sandbox.providers.configure_callbacks(
        whatsapp_url=f"{herald.url}/webhooks/whatsapp",
        messenger_url=f"{herald.url}/webhooks/messenger", **callbacks)
    return herald.url


@dataclass(frozen=True)
class Report:
    """A status callback as the sandbox rendered it."""

    provider_message_id: str
    status: str
    rendered_at: float
    occurred_at: datetime | None  # the time written in it (Twilio writes none)


def spy_on_callbacks(monkeypatch: pytest.MonkeyPatch) -> list[Report]:
    """Record every callback body the sandbox renders, with the time it gives."""
    reports: list[Report] = []
    deliver = CallbackSender._deliver

    async def spying(self: CallbackSender, callback: Callback) -> CallbackRecord:
        def render() -> tuple[bytes, dict[str, str]]:
            body, headers = callback.render()
            when: datetime | None = None
            if callback.provider == "whatsapp":
                status = json.loads(body)["entry"][0]["changes"][0]["value"]["statuses"][0]
                when = datetime.fromtimestamp(int(status["timestamp"]), UTC)
            elif callback.provider == "messenger":
                entry = json.loads(body)["entry"][0]
                ms = entry["messaging"][0].get("timestamp", entry["time"])
                when = datetime.fromtimestamp(ms / 1000, UTC)
            reports.append(Report(callback.provider_message_id, callback.status, time.time(),
                                  when))
            return body, headers

        return await deliver(self, dataclasses.replace(callback, render=render))

    monkeypatch.setattr(CallbackSender, "_deliver", spying)
    return reports


@pytest.mark.slow
async def test_thousand_messages_end_at_the_furthest_status_the_sandbox_reported(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reports = spy_on_callbacks(monkeypatch)
    await _through_sandbox(sandbox, start_herald, delay_ms=(0, 300), shuffle=True,
                           duplicate_probability=0.3, seed=20261123,
                           statuses=("sending", "sent", "delivered", "read"))
    channels = ("sms", "whatsapp", "messenger")
    requests = [{"message_id": f"e-{i}", "channel": channels[i % 3],
                 "to": _recipient(channels[i % 3], i), "body": f"hello {i}"}
                for i in range(1000)]

    # Watch every message's status while it all happens: it may never go back.
    backwards: list[str] = []
    seen: dict[str, int] = {}
    watching = True

    async def watch() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            while watching:
                for r in await conn.fetch("SELECT message_id, status FROM messages"):
                    rank = RANK.get(r["status"], -1)
                    if rank < seen.get(r["message_id"], 0):
                        backwards.append(f"{r['message_id']}: {r['status']}")
                    seen[r["message_id"]] = rank
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    try:
        await publish_all(amqp, prefix, requests)
        box = sandbox.sandbox.providers
        await wait_for(lambda: len(box.accepted()) == 1000, timeout=120, interval=0.5,
                       what="1000 sends accepted")
        await wait_for(lambda: box.callbacks.pending == 0, timeout=120, interval=0.5,
                       what="every callback sent")
        # A callback Herald did not answer in time (a busy broker) was sent again,
        # as providers do; in the end every one was taken.
        records = list(box.callbacks.sent)
        assert records and all(r.delivered for r in records), [
            r for r in records if not r.delivered][:3]
        assert len(reports) >= len(records)

        furthest: dict[str, int] = defaultdict(int)
        written: dict[tuple[str, str], set[datetime]] = defaultdict(set)
        window: dict[tuple[str, str], tuple[float, float]] = {}
        for report in reports:
            status = "sent" if report.status == "sending" else report.status
            key = (report.provider_message_id, status)
            furthest[key[0]] = max(furthest[key[0]], RANK[status])
            if report.occurred_at is not None:
                written[key].add(report.occurred_at)
            low, high = window.get(key, (report.rendered_at, report.rendered_at))
            window[key] = (min(low, report.rendered_at), high)
        for r in records:
            key = (r.provider_message_id, "sent" if r.status == "sending" else r.status)
            window[key] = (window[key][0], max(window[key][1], r.at))
        names = {rank: name for name, rank in RANK.items() if rank > 0}

        async def all_applied() -> bool:
            rows = await db.fetch("SELECT provider_message_id, status FROM messages")
            return len(rows) == 1000 and all(
                names[furthest[r["provider_message_id"]]] == r["status"] for r in rows)

        await wait_for(all_applied, timeout=60, interval=0.5,
                       what="every message at its furthest reported status")
        await wait_for(lambda: settled(db, len(records)), timeout=30, what="no pending event")
    finally:
        watching = False
        await watcher
    assert backwards == []

    # (Messenger watermarks name the person, not a message: one message per person here.)
    applied = {(r["message_id"], r["status"]): r["occurred_at"] for r in await db.fetch(
        """SELECT COALESCE(p.message_id, m.message_id) AS message_id, p.status, p.occurred_at
             FROM provider_events p
             LEFT JOIN messages m ON p.message_id IS NULL AND m.channel = 'messenger'
                                 AND m.recipient = p.recipient
            WHERE p.outcome = 'applied'""")}
    rows = await db.fetch("SELECT * FROM messages")
    by_channel = defaultdict(set)
    for r in rows:
        by_channel[r["channel"]].add(r["status"])
        assert not r["delivered_implied"]
        for status, column in (("delivered", "delivered_at"), ("read", "read_at")):
            key = (r["provider_message_id"], status)
            if key not in window:
                continue
            # Set once, by the report that first reached that status ...
            assert r[column] == applied[(r["message_id"], status)], (r["message_id"], status)
            # ... with the time the provider wrote in it (Twilio writes none: then
            # when Herald received it, between rendering and the answer).
            if written[key]:
                assert r[column] in written[key], (r["message_id"], status)
            else:
                low, high = window[key]
                assert low - 0.01 <= r[column].timestamp() <= high + 0.01, (
                    r["message_id"], status)
    assert by_channel == {"sms": {"delivered"}, "whatsapp": {"read"}, "messenger": {"read"}}
    # Every callback taken was stored, repeats included (and a few the sandbox gave up
    # waiting for but the broker had taken), none left pending or orphaned.
    stored = await db.fetchval("SELECT count(*) FROM provider_events")
    assert len(records) <= stored <= len(reports)
    assert await db.fetchval("SELECT count(*) FROM provider_events WHERE outcome IS NULL "
                             "OR outcome IN ('orphan', 'superseded', 'ignored')") == 0


async def test_callback_before_the_send_is_committed_is_applied_once_it_is(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, start_herald: HeraldFactory,
) -> None:
    await _through_sandbox(sandbox, start_herald, statuses=("sent", "delivered"))
    box = sandbox.sandbox.providers
    box.script("twilio", "+15557654321", latency_ms=1000)  # time to step in after the claim
    await publish_all(amqp, prefix, [{"message_id": "early", "channel": "sms",
                                      "to": "+15557654321", "body": "hi"}])

    async def claimed() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id = 'early'"
                                 ) == "sending"

    await wait_for(claimed, timeout=10, interval=0.02, what="the send claimed")
    # Hold back the pipeline's record of the send: it must update this row.
    blocker = await asyncpg.connect(db_url)
    transaction = blocker.transaction()
    await transaction.start()
    try:
        await blocker.execute("SELECT 1 FROM messages WHERE message_id = 'early' FOR UPDATE")
        await wait_for(lambda: len(box.callbacks.sent) == 2, timeout=20,
                       what="both callbacks answered")

        async def pending() -> bool:
            return await outcomes(db) == [None, None]

        await wait_for(pending, timeout=10, what="the callbacks stored as pending")
        assert (await message(db, "early"))["status"] == "sending"
    finally:
        await transaction.commit()
        await blocker.close()

    async def delivered() -> bool:
        return (await message(db, "early"))["status"] == "delivered"

    await wait_for(delivered, timeout=20, what="the early callbacks applied")
    assert sorted(o or "" for o in await outcomes(db)) == ["applied", "unchanged"]


async def test_undelivered_30003_is_sent_again_and_succeeds_30006_is_parked(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, start_herald: HeraldFactory,
) -> None:
    await _through_sandbox(sandbox, start_herald, statuses=("sent", "delivered"))
    box = sandbox.sandbox.providers
    flaky, landline = "+15550003003", "+15550003006"
    box.script("twilio", flaky, callback_error=30003)
    box.script("twilio", landline, callback_error=30006)
    await publish_all(amqp, prefix, [
        {"message_id": "flaky", "channel": "sms", "to": flaky, "body": "hi",
         "retry": {"max_attempts": 3}},
        {"message_id": "landline", "channel": "sms", "to": landline, "body": "hi",
         "retry": {"max_attempts": 3}},
    ])
    await wait_for(lambda: box.accepted_by_recipient()[flaky] == 1, timeout=20,
                   what="the first attempt accepted")
    box.unscript("twilio", flaky)  # the next attempt is delivered

    async def done() -> bool:
        rows = {r["message_id"]: r["status"] for r in await db.fetch(
            "SELECT message_id, status FROM messages")}
        return rows == {"flaky": "delivered", "landline": "failed"}

    await wait_for(done, timeout=30, what="flaky delivered, landline failed")
    assert box.accepted_by_recipient() == {flaky: 2, landline: 1}
    flaky_row = await message(db, "flaky")
    assert flaky_row["attempts"] == 2
    history = await db.fetch("SELECT attempt, outcome, error_code FROM delivery_attempts "
                             "WHERE message_id = 'flaky' ORDER BY id")
    assert [tuple(r) for r in history] == [(1, "sent", None), (1, "retrying", "30003"),
                                           (2, "sent", None)]
    landline_row = await message(db, "landline")
    assert (landline_row["last_error_type"], landline_row["last_error_code"]) == (
        "invalid_recipient", "30006")
    (parked,) = await drain_queue(amqp, f"{prefix}.parked", expect=1, timeout=10)
    assert parked.headers["x-herald-error-type"] == "invalid_recipient"
    assert parked.headers["x-herald-message-id"] == "landline"

    # herald status: the whole story, in time order.
    code, out, err = await herald_cli(db_url, "status", "flaky")
    assert code == 0, err
    assert "status    delivered" in out and "attempts  2" in out
    history = out.split("history\n", 1)[1].splitlines()
    stamps = [line.split()[0] for line in history]
    assert stamps == sorted(stamps)
    text = "\n".join(history)
    for expected in ("attempt 1 sent as SM", "twilio reported failed 30003 → retry",
                     "attempt 1 retrying: provider_error 30003", "attempt 2 sent as SM",
                     "twilio reported delivered → applied"):
        assert expected in text, (expected, text)
    assert "+15550003003" not in out  # masked
    code, out, _ = await herald_cli(db_url, "status", "landline", "--json")
    assert code == 0
    story = json.loads(out)
    assert story["message"]["status"] == "failed"
    kinds = [(e["kind"], e.get("outcome") or e.get("state")) for e in story["history"]]
    assert ("parked", "parked") in kinds and ("event", "park") in kinds
    code, _, err = await herald_cli(db_url, "status", "nobody")
    assert code == 1 and "no message 'nobody'" in err


async def herald_cli(db_url: str, *args: str) -> tuple[int, str, str]:
    """Run ``herald`` as a user does (without blocking the services in this loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env["HERALD_DATABASE_URL"] = db_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *args, env=env, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
