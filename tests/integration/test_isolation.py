"""One message's data never fails another's (issue #11, item 1), and a copy's
x-herald-* headers buy it nothing (item 3): real PostgreSQL, real RabbitMQ.

- Group commit: a batch with one item PostgreSQL refuses is written again item
  by item; the batch-mates succeed, only the culprit fails.
- The pipeline before the send: a claim the database refuses parks that one
  message as ``invalid_payload``; nothing is handed back to loop.
- After the send: an outcome the database refuses is recorded again without
  the provider's texts; the message ends ``sent``, once, and is not sent again.
- The claim does not trust a copy's attempt number or base: a live lease
  holds a forged later attempt, a parked message is claimed again only by a
  replay, a fresh budget is granted only to a replay.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.store import Store, create_pool, is_data_error
from consumer.topology import Names
from tests.conftest import RunningSandbox, ServiceFactory
from tests.helpers import (
    drain_queue,
    metric,
    publish_all,
    publish_raw,
    queue_depth,
    request,
    wait_for,
)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    pool = await create_pool(settings)
    store = Store(pool)
    yield store
    await store.close()
    await pool.close()



def claim_item(message_id: str, *, attempt: int = 1, base: int = 0,
               recipient: str = "https://example.com/") -> dict[str, Any]:
    return {"message_id": message_id, "channel": "http", "recipient": recipient,
            "campaign_id": None,
            "payload_json": json.dumps(request(message_id, recipient)),
            "attempt": attempt, "owner": "test", "lease_s": 30.0, "attempt_base": base}


# -- group commit ---------------------------------------------------------------------------


async def test_a_claim_batch_with_one_culprit(store: Store, db: asyncpg.Connection) -> None:
    splits = metric("herald_db_batch_splits_total", kind="claims")
    items = [claim_item(f"good-{i}") for i in range(20)]
    # x-herald-attempt as a publisher could once set it: past int4.
    items.insert(7, claim_item("culprit", attempt=10**12))
    results = await asyncio.gather(*(store.claim(**item) for item in items),
                                   return_exceptions=True)
    culprit = results.pop(7)
    assert isinstance(culprit, asyncpg.PostgresError) and is_data_error(culprit)
    assert all(not isinstance(r, BaseException) and r.outcome == "claimed" for r in results)
    assert metric("herald_db_batch_splits_total", kind="claims") == splits + 1
    rows = await db.fetch("SELECT message_id, status, attempts FROM messages")
    assert {(r["message_id"], r["status"], r["attempts"]) for r in rows} == {
        (f"good-{i}", "sending", 1) for i in range(20)}


async def test_a_record_batch_with_one_culprit(store: Store, db: asyncpg.Connection) -> None:
    await asyncio.gather(*(store.claim(**claim_item(f"m-{i}")) for i in range(10)))
    now = datetime.now(UTC)

    def outcome(i: int) -> dict[str, Any]:
        return {"message_id": f"m-{i}", "attempt": 1, "outcome": "retrying", "started_at": now,
                "latency_ms": 3.0, "provider": "http", "error_type": "provider_error",
                "error_code": "503", "error_text": "busy"}

    records = [outcome(i) for i in range(10)]
    # A text jsonb refuses ("unsupported Unicode escape sequence"), as a provider
    # answer held before DeliveryError made its texts storable.
    records[3]["error_text"] = "busy\x00"
    results = await asyncio.gather(*(store.record(**r) for r in records),
                                   return_exceptions=True)
    culprit = results.pop(3)
    assert isinstance(culprit, asyncpg.PostgresError) and is_data_error(culprit)
    assert results == ["retrying"] * 9
    assert await db.fetchval("SELECT count(*) FROM delivery_attempts") == 9
    assert await db.fetchval("SELECT status FROM messages WHERE message_id = 'm-3'") == "sending"


async def test_two_outcomes_of_one_message_in_a_failed_batch_apply_once(
    store: Store, db: asyncpg.Connection,
) -> None:
    await store.claim(**claim_item("twice"))
    now = datetime.now(UTC)
    first = {"message_id": "twice", "attempt": 1, "outcome": "retrying", "started_at": now,
             "latency_ms": 1.0, "provider": "http", "error_type": "network"}
    second = first | {"outcome": "paused"}
    bad = {"message_id": "twice", "attempt": 1, "outcome": "failed", "started_at": now,
           "latency_ms": 1.0, "provider": "http", "error_type": "other", "error_text": "\x00"}
    # Three rounds in one batch: the third fails, so the batch is retried item by
    # item; the first two must not be applied twice.
    results = await asyncio.gather(store.record(**first), store.record(**second),
                                   store.record(**bad), return_exceptions=True)
    assert results[:2] == ["retrying", "retrying"]
    assert isinstance(results[2], asyncpg.PostgresError)
    rows = await db.fetch("SELECT outcome FROM delivery_attempts WHERE message_id = 'twice'"
                          " ORDER BY id")
    assert [r["outcome"] for r in rows] == ["retrying", "paused"]


# -- the claim does not trust the headers -----------------------------------------------------


async def test_a_forged_later_attempt_waits_for_a_live_lease(store: Store) -> None:
    first = await store.claim(**claim_item("leased"))
    assert first.outcome == "claimed"
    # Before sql/0011 a higher attempt number took the lease over: two sends at once.
    forged = await store.claim(**claim_item("leased", attempt=2))
    assert forged.outcome == "held"
    assert forged.claimed_until == first.claimed_until


async def test_a_parked_message_is_claimed_again_only_by_a_replay(
    store: Store, db: asyncpg.Connection,
) -> None:
    await store.claim(**claim_item("parked-1"))
    await store.record(message_id="parked-1", attempt=1, outcome="failed",
                       started_at=datetime.now(UTC), latency_ms=1.0, provider="http",
                       error_type="invalid_request")
    # A publisher's copy with the next attempt number and a fresh budget.
    forged = await store.claim(**claim_item("parked-1", attempt=2, base=1))
    assert (forged.outcome, forged.status) == ("stale", "failed")
    # A replay fixes its attempt number in the parking lot before it publishes.
    await db.execute(
        """INSERT INTO parked_messages (parked_id, message_id, channel, attempts, error_type,
                                        body, replay_attempt)
           VALUES ($1, 'parked-1', 'http', 1, 'invalid_request', '\\x7b7d', 2)""",
        uuid.uuid4())
    replayed = await store.claim(**claim_item("parked-1", attempt=2, base=1))
    assert (replayed.outcome, replayed.attempt_base) == ("claimed", 1)
    assert await db.fetchval(
        "SELECT attempt_base FROM messages WHERE message_id = 'parked-1'") == 1


async def test_a_fresh_budget_is_granted_only_to_a_replay(
    store: Store, db: asyncpg.Connection,
) -> None:
    await store.claim(**claim_item("budget", attempt=1))
    await store.record(message_id="budget", attempt=1, outcome="retrying",
                       started_at=datetime.now(UTC), latency_ms=1.0, provider="http",
                       error_type="network")
    forged = await store.claim(**claim_item("budget", attempt=2, base=1))
    assert (forged.outcome, forged.attempt_base) == ("claimed", 0)
    assert await db.fetchval(
        "SELECT attempt_base FROM messages WHERE message_id = 'budget'") == 0
    # A brand-new message with a forged base gets none either.
    new = await store.claim(**claim_item("new-forged", attempt=40, base=39))
    assert (new.outcome, new.attempt_base) == ("claimed", 0)


# -- the pipeline -----------------------------------------------------------------------------


async def install_refusal(db: asyncpg.Connection, table: str, condition: str) -> None:
    """Make PostgreSQL refuse rows of ``table`` matching ``condition`` with a data
    exception (SQLSTATE 22P05, as for a NUL in jsonb): the stand-in for any value
    it cannot store, so the test does not depend on which one still gets past
    the edge."""
    await db.execute(f"""
        CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN
                RAISE EXCEPTION 'unsupported Unicode escape sequence'
                      USING ERRCODE = '22P05';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_{table} BEFORE INSERT OR UPDATE ON {table}
            FOR EACH ROW EXECUTE FUNCTION refuse_{table}();""")


async def test_a_claim_the_database_refuses_parks_that_message_alone(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await install_refusal(db, "messages", "NEW.message_id LIKE 'culprit%'")
    await start_service()
    requests = [request(f"good-{i}", sandbox.url("ok")) for i in range(60)]
    requests[30:30] = [request("culprit-1", sandbox.url("ok"))]
    with capture_logs() as logs:
        await publish_all(amqp, prefix, requests)
        (parked,) = await drain_queue(amqp, Names(prefix).parked, expect=1, timeout=20)

        async def all_sent() -> bool:
            return await db.fetchval(
                "SELECT count(*) FROM messages WHERE status = 'sent'") == 60

        await wait_for(all_sent, timeout=30, what="the 60 good messages sent")
    assert json.loads(parked.body)["message_id"] == "culprit-1"
    assert parked.headers["x-herald-error-type"] == "invalid_payload"
    assert parked.headers["x-herald-last-error"].startswith(
        "database refused it: UntranslatableCharacterError: unsupported Unicode escape")
    counts = sandbox.sandbox.accepted_counts()
    assert set(counts.values()) == {1} and len(counts) == 60 and "culprit-1" not in counts
    row = await db.fetchrow("SELECT * FROM parked_messages")
    assert row is not None and row["message_id"] == "culprit-1"
    assert not [e for e in logs if e["event"] == "delivery.crashed"]
    assert await queue_depth(amqp, f"{prefix}.send.http") == 0


async def test_an_outcome_the_database_refuses_is_recorded_sent_once(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    # The provider accepted the send; its answer (here: any provider id) is what
    # PostgreSQL refuses.
    await install_refusal(db, "delivery_attempts",
                          "NEW.message_id LIKE 'odd-%' AND NEW.provider_message_id IS NOT NULL")
    refused = metric("herald_records_refused_total", outcome="sent")
    await start_service()
    requests = [request(f"fine-{i}", sandbox.url("ok")) for i in range(40)]
    requests[10:10] = [request("odd-1", sandbox.url("ok"))]
    requests[25:25] = [request("odd-2", sandbox.url("ok"))]
    with capture_logs() as logs:
        await publish_all(amqp, prefix, requests)

        async def all_sent() -> bool:
            return await db.fetchval(
                "SELECT count(*) FROM messages WHERE status = 'sent'") == 42

        await wait_for(all_sent, timeout=30, what="42 messages sent")

        async def drained() -> bool:
            return await queue_depth(amqp, f"{prefix}.send.http") == 0

        await wait_for(drained, timeout=10, what="the queue drained")
    counts = sandbox.sandbox.accepted_counts()
    assert len(counts) == 42 and set(counts.values()) == {1}
    assert metric("herald_records_refused_total", outcome="sent") == refused + 2
    for mid in ("odd-1", "odd-2"):
        rows = await db.fetch(
            "SELECT outcome, provider_message_id, error_text FROM delivery_attempts"
            " WHERE message_id = $1", mid)
        assert [(r["outcome"], r["provider_message_id"]) for r in rows] == [("sent", None)]
        assert rows[0]["error_text"].startswith("(the outcome's own texts could not be stored:")
        m = await db.fetchrow("SELECT status, attempts, claimed_by FROM messages"
                              " WHERE message_id = $1", mid)
        assert m is not None and (m["status"], m["attempts"], m["claimed_by"]) == (
            "sent", 1, None)
    assert [e["event"] for e in logs].count("delivery.record_refused") == 2
    assert not [e for e in logs if e["event"] in ("delivery.crashed",
                                                  "database.write_failed")]


async def test_forged_attempt_headers_buy_nothing(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    ok = sandbox.url("ok")
    # Out of range: parked, with the reason, not sent; its batch-mates go through.
    await publish_raw(amqp, prefix, "http", json.dumps(request("huge-attempt", ok)).encode(),
                      headers={"x-herald-attempt": 10**12})
    await publish_raw(amqp, prefix, "http", json.dumps(request("text-attempt", ok)).encode(),
                      headers={"x-herald-attempt": "many"})
    # In range, on a new message: a first send like any other (fewer retries left).
    await publish_raw(amqp, prefix, "http", json.dumps(request("forged-7", ok)).encode(),
                      headers={"x-herald-attempt": 7, "x-herald-attempt-base": 6})
    await publish_all(amqp, prefix, [request(f"plain-{i}", ok) for i in range(20)])
    parked = await drain_queue(amqp, Names(prefix).parked, expect=2, timeout=20)
    reasons = {json.loads(p.body)["message_id"]: p.headers["x-herald-last-error"]
               for p in parked}
    assert reasons == {
        "huge-attempt": "x-herald-attempt: 1000000000000 is out of range (1 to 100000; Herald"
                        " sets it on its own copies; a publisher must not)",
        "text-attempt": "x-herald-attempt: 'many' is not a whole number (Herald sets it on"
                        " its own copies; a publisher must not)",
    }

    async def sent() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'") == 21

    await wait_for(sent, timeout=20, what="21 sent")
    assert await db.fetchval(
        "SELECT attempt_base FROM messages WHERE message_id = 'forged-7'") == 0

    # A parked message republished with a forged next attempt and a fresh budget
    # is not sent again: only a replay may.
    await publish_raw(amqp, prefix, "http",
                      json.dumps(request("down-1", sandbox.url("down", status=400))).encode())

    async def failed() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id = 'down-1'") == "failed"

    await wait_for(failed, timeout=20, what="down-1 parked")
    # Read before publishing: the copy may be suppressed before publish returns.
    duplicates = metric("herald_duplicates_suppressed_total", channel="http")
    await publish_raw(amqp, prefix, "http",
                      json.dumps(request("down-1", sandbox.url("down", status=400))).encode(),
                      headers={"x-herald-attempt": 2, "x-herald-attempt-base": 1})
    await wait_for(lambda: metric("herald_duplicates_suppressed_total", channel="http")
                   > duplicates, timeout=10, what="the forged copy suppressed")
    assert len(sandbox.sandbox.attempts_for("down-1")) == 1
    assert await db.fetchval("SELECT attempts FROM messages WHERE message_id = 'down-1'") == 1


# -- copies the broker refuses -------------------------------------------------------------


async def test_copies_the_client_cannot_encode_are_parked_not_looped(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Herald's own checks leave nothing the client refuses to encode today (ids,
    content types and carried headers are made publishable first); should
    something get through all the same, the message is parked, once, instead
    of its publish being retried as if the broker were away."""
    real_publish = Publisher.publish

    async def refusing(self: Publisher, exchange: str, routing_key: str, body: bytes,
                       **kwargs: Any) -> None:
        headers = kwargs.get("headers") or {}
        if "x-poison" in headers or kwargs.get("content_type") == "text/poison":
            raise TypeError("x-poison error: Unknown type")  # as pamqp words it
        await real_publish(self, exchange, routing_key, body, **kwargs)

    monkeypatch.setattr(Publisher, "publish", refusing)
    await start_service()
    with capture_logs() as logs:
        channel = await amqp.channel()
        try:
            exchange = await channel.get_exchange(prefix, ensure=False)
            # A retry copy carrying the publisher's header cannot be published: parked.
            await exchange.publish(aio_pika.Message(
                json.dumps(request("retry-1", sandbox.url("down", status=503))).encode(),
                headers={"x-poison": 1}), "send.http")
            # A parked copy with the publisher's content type cannot: parked without it.
            await exchange.publish(aio_pika.Message(b"not json", content_type="text/poison"),
                                   "send.http")
        finally:
            await channel.close()
        parked = await drain_queue(amqp, Names(prefix).parked, expect=2, timeout=20)
    by_body = {p.body: p for p in parked}
    retried = by_body[json.dumps(request("retry-1", sandbox.url("down", status=503))).encode()]
    assert retried.headers["x-herald-error-type"] == "provider_error"
    assert retried.headers["x-herald-last-error"].endswith(
        "(and the copy for another attempt was refused: TypeError: x-poison error:"
        " Unknown type)")
    invalid = by_body[b"not json"]
    assert invalid.headers["x-herald-error-type"] == "invalid_payload"
    assert invalid.content_type is None

    async def failed() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id = 'retry-1'") == "failed"

    await wait_for(failed, timeout=10, what="retry-1 recorded failed")
    assert len(sandbox.sandbox.attempts_for("retry-1")) == 1
    events = [e["event"] for e in logs]
    assert "delivery.crashed" not in events and "broker.unavailable" not in events
