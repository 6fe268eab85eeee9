"""Bad input is parked with its bytes and a reason; the consumer keeps going."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from consumer.topology import Names
from tests.conftest import RunningSandbox, ServiceFactory
from tests.helpers import drain_queue, publish_all, publish_raw, request, wait_for


async def test_malformed_bodies_are_parked_with_their_bytes(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    huge = json.dumps(request("huge", sandbox.url("ok"), body="x" * 300_000)).encode()
    bad = {
        "not utf-8": b"\xff\xfe\x00garbage",
        "not json": b"{this is not json",
        "missing fields": json.dumps({"message_id": "nf-1", "channel": "http"}).encode(),
        "huge": huge,
        "wrong channel": json.dumps({"message_id": "wc-1", "channel": "sms", "to": "+1555",
                                     "body": "hi"}).encode(),
        "naive time": json.dumps(request("nt-1", sandbox.url("ok"),
                                         expires_at="2030-01-01T00:00:00")).encode(),
    }
    for body in bad.values():
        await publish_raw(amqp, prefix, "http", body)
    # The consumer keeps going: a good message after the bad ones is sent.
    await publish_all(amqp, prefix, [request("good-1", sandbox.url("ok"))])

    parked = await drain_queue(amqp, Names(prefix).parked, expect=len(bad), timeout=15)
    by_body = {m.body: m for m in parked}
    assert set(by_body) == set(bad.values())  # original bytes kept, byte for byte
    reasons = {name: by_body[body].headers["x-herald-last-error"] for name, body in bad.items()}
    for message in parked:
        assert message.headers["x-herald-error-type"] == "invalid_payload"
    assert "not UTF-8" in reasons["not utf-8"]
    assert "not JSON" in reasons["not json"]
    assert "to" in reasons["missing fields"] and "body" in reasons["missing fields"]
    assert "exceeds" in reasons["huge"]
    assert "does not match" in reasons["wrong channel"]
    assert "expires_at" in reasons["naive time"]

    async def good_sent() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='good-1'") == "sent"

    await wait_for(good_sent, timeout=10, what="good-1 sent after the bad ones")
    # Nothing that failed validation reached the provider or the messages table.
    assert set(sandbox.sandbox.accepted_counts()) == {"good-1"}
    assert await db.fetchval("SELECT count(*) FROM messages") == 1
    # The parking lot's index holds each bad body byte for byte, up to
    # HERALD_MAX_BODY_BYTES (the queue holds all of it), and says when it is cut.
    indexed = await db.fetch(
        "SELECT body, body_size, error_type, message_id FROM parked_messages")
    limit = 256 * 1024
    assert {bytes(r["body"]) for r in indexed} == {b[:limit] for b in bad.values()}
    assert {r["body_size"] for r in indexed} == {None, len(huge)}
    assert {r["error_type"] for r in indexed} == {"invalid_payload"}


async def test_expired_message_is_not_sent(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    await publish_all(amqp, prefix, [request("otp-1", sandbox.url("ok"), expires_at=past)])

    async def expired() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='otp-1'") == "expired"

    await wait_for(expired, timeout=10, what="otp-1 expired")
    assert sandbox.sandbox.received == []


async def test_expiry_during_retries_stops_them(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    await publish_all(amqp, prefix, [
        request("otp-2", sandbox.url("down", status=503), expires_at=soon,
                retry={"base_delay_s": 2})])

    async def expired() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='otp-2'") == "expired"

    await wait_for(expired, timeout=10, what="otp-2 expired while retrying")
    assert len(sandbox.sandbox.attempts_for("otp-2")) == 1


async def test_send_at_defers_the_first_attempt(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    due = datetime.now(UTC) + timedelta(seconds=3)
    await publish_all(amqp, prefix, [request("later-1", sandbox.url("ok"),
                                             send_at=due.isoformat())])

    async def queued() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='later-1'") == "queued"

    await wait_for(queued, timeout=5, what="later-1 queued")

    async def sent() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='later-1'") == "sent"

    await wait_for(sent, timeout=10, what="later-1 sent")
    (received,) = sandbox.sandbox.received
    assert received.at >= due.timestamp()
    assert received.at < due.timestamp() + 2.0
    assert await db.fetchval("SELECT attempts FROM messages WHERE message_id='later-1'") == 1


async def test_manual_mode_parks_on_first_failure(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    await publish_all(amqp, prefix, [request("man-1", sandbox.url("down", status=503),
                                             retry={"mode": "manual"})])
    parked = await drain_queue(amqp, Names(prefix).parked, expect=1, timeout=10)
    assert parked[0].headers["x-herald-error-type"] == "provider_error"

    async def failed() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='man-1'") == "failed"

    await wait_for(failed, timeout=5, what="man-1 failed")
    assert len(sandbox.sandbox.attempts_for("man-1")) == 1


async def test_timeout_is_retried_then_parked(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service(send_timeout_s=0.5)
    await publish_all(amqp, prefix, [request("hang-1", sandbox.url("slow", hang=1),
                                             retry={"max_attempts": 2})])

    async def failed() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='hang-1'") == "failed"

    await wait_for(failed, timeout=15, what="hang-1 parked after two timeouts")
    rows = await db.fetch("SELECT outcome, error_type, error_code FROM delivery_attempts "
                          "WHERE message_id='hang-1' ORDER BY attempt")
    assert [tuple(r) for r in rows] == [("retrying", "provider_error", "timeout"),
                                        ("failed", "provider_error", "timeout")]
