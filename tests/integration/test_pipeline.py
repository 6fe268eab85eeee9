"""The delivery pipeline end to end: real RabbitMQ, real PostgreSQL, the sandbox."""

from __future__ import annotations

import json
import time
from collections import Counter

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from consumer.publisher import Publisher
from consumer.topology import Names
from tests.conftest import RunningSandbox, ServiceFactory
from tests.helpers import drain_queue, metric, publish_all, queue_depth, request, wait_for


async def _statuses(db: asyncpg.Connection) -> Counter[str]:
    return Counter({r["status"]: r["n"] for r in await db.fetch(
        "SELECT status, count(*) AS n FROM messages GROUP BY status")})


async def test_thousand_messages_with_transient_and_permanent_failures(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    transient = {f"m-{i}" for i in range(0, 1000, 10)}           # 10 %
    permanent = {f"m-{i}" for i in range(5, 1000, 20)}           # 5 %
    assert not transient & permanent
    requests = []
    for i in range(1000):
        mid = f"m-{i}"
        if mid in transient:
            to = sandbox.url("flaky", fail=2, fail_status=503)
        elif mid in permanent:
            to = sandbox.url("broken", status=400)
        else:
            to = sandbox.url("ok")
        requests.append(request(mid, to))

    await start_service()
    await publish_all(amqp, prefix, requests)

    async def settled() -> bool:
        s = await _statuses(db)
        return s["sent"] == 950 and s["failed"] == 50

    await wait_for(settled, timeout=90, interval=0.5, what="950 sent and 50 failed")

    attempts = {r["message_id"]: r["attempts"] for r in await db.fetch(
        "SELECT message_id, attempts FROM messages")}
    for mid in transient:
        assert attempts[mid] == 3, mid
    for mid in permanent:
        assert attempts[mid] == 1, mid

    # Every message reached the provider exactly once more than it failed:
    # transient ones 3 times (2 failures + 1 success), permanent ones once.
    per_message = Counter(r.message_id for r in sandbox.sandbox.received)
    accepted = sandbox.sandbox.accepted_counts()
    assert len(per_message) == 1000
    for mid, n in per_message.items():
        expected = 3 if mid in transient else 1
        assert n == expected, (mid, n)
        assert accepted[mid] == (0 if mid in permanent else 1), mid

    # One delivery_attempts row per attempt, numbered 1..n.
    rows = await db.fetch(
        "SELECT message_id, array_agg(attempt ORDER BY attempt) AS numbers, "
        "array_agg(outcome ORDER BY attempt) AS outcomes FROM delivery_attempts "
        "GROUP BY message_id")
    assert len(rows) == 1000
    for r in rows:
        mid = r["message_id"]
        if mid in transient:
            assert r["numbers"] == [1, 2, 3] and r["outcomes"] == ["retrying", "retrying", "sent"]
        elif mid in permanent:
            assert r["numbers"] == [1] and r["outcomes"] == ["failed"]
        else:
            assert r["numbers"] == [1] and r["outcomes"] == ["sent"]

    # The permanent failures are in the parking lot, with the reason in headers.
    names = Names(prefix)
    parked = await drain_queue(amqp, names.parked, expect=50, timeout=10)
    assert len(parked) == 50
    parked_ids = set()
    for message in parked:
        headers = message.headers
        assert headers["x-herald-error-type"] == "invalid_request"
        assert headers["x-herald-error-code"] == "400"
        assert headers["x-herald-attempt"] == 1
        assert "x-herald-parked-at" in headers and headers["x-herald-last-error"]
        parked_ids.add(json.loads(message.body)["message_id"])
    assert parked_ids == permanent
    # ...and indexed for operators, with the same parked id as the queue copy.
    rows = await db.fetch("SELECT parked_id::text, message_id, error_type, attempts, body "
                          "FROM parked_messages")
    assert {r["message_id"] for r in rows} == permanent
    assert {r["parked_id"] for r in rows} == {m.headers["x-herald-parked-id"] for m in parked}
    assert all(r["error_type"] == "invalid_request" and r["attempts"] == 1 for r in rows)
    assert await queue_depth(amqp, names.send_queue("http")) == 0


async def test_same_message_id_published_twice_is_delivered_once(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    suppressed_before = metric("herald_duplicates_suppressed_total", channel="http")
    r = request("dup-1", sandbox.url("ok"))
    await publish_all(amqp, prefix, [r, r])
    await publish_all(amqp, prefix, [r])

    await wait_for(
        lambda: metric("herald_duplicates_suppressed_total", channel="http")
        - suppressed_before >= 2,
        timeout=10, what="two copies suppressed",
    )
    assert sandbox.sandbox.accepted_counts() == {"dup-1": 1}
    assert await db.fetchval("SELECT count(*) FROM delivery_attempts") == 1



async def test_retry_after_is_respected(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    await publish_all(amqp, prefix, [
        request("ra-1", sandbox.url("limited", fail=1, fail_status=429, retry_after=3))])

    async def sent() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id='ra-1'") == "sent"

    await wait_for(sent, timeout=15, what="ra-1 sent")
    first, second = sandbox.sandbox.attempts_for("ra-1")
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 3.0
    assert second.attempt == 2
    row = await db.fetchrow("SELECT last_error_type, last_error_code FROM messages "
                            "WHERE message_id='ra-1'")
    assert row["last_error_type"] == "rate_limit" and row["last_error_code"] == "429"


async def test_delays_are_exact_and_not_blocked_by_longer_ones(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """A 5 s delay arrives 5–6 s after scheduling even behind a 60 s one."""
    names = Names(prefix)
    publisher = Publisher(amqp, names)
    await publisher.publish_delayed("sms", b'{"n": "long"}', 60)
    scheduled = time.monotonic()
    await publisher.publish_delayed("sms", b'{"n": "short"}', 5)
    got = await drain_queue(amqp, names.send_queue("sms"), expect=1, timeout=10)
    arrived = time.monotonic() - scheduled
    await publisher.close()
    assert [json.loads(m.body)["n"] for m in got] == ["short"]
    assert 5.0 <= arrived < 6.0, arrived


async def test_a_copy_deferred_again_through_the_same_delay_levels_arrives(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    """A copy that carries the broker's history of an earlier trip through delay levels
    1 and 0 is deferred through them again: RabbitMQ would take the old x-death for a
    dead-letter cycle and strand the copy in level 1's queue; Herald never carries it."""
    await start_service()
    history = [{"queue": f"{prefix}.delay.{level}", "reason": "expired", "count": 1,
                "exchange": f"{prefix}.delay.{level}", "routing-keys": ["x"]}
               for level in (0, 1)]
    publisher = Publisher(amqp, Names(prefix))
    await publisher.publish_send(
        "http", json.dumps(request("again", sandbox.url("again"))).encode(),
        message_id="again",
        headers={"x-death": history, "x-herald-due-at": int(time.time()) + 3})
    await publisher.close()

    async def sent() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id = 'again'"
                                 ) == "sent"

    await wait_for(sent, timeout=20, what="the deferred copy sent")
