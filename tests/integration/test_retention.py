"""herald prune: old finished messages go in batches with everything about
them; failed ones, recent ones and the parked lot stay; each leaves a
tombstone, so that no copy or republished request of it is ever sent again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import REGISTRY

from consumer.publisher import Publisher
from consumer.records.retention import prune
from consumer.topology import Names
from tests.conftest import REPO, RunningSandbox, ServiceFactory, herald_env
from tests.helpers import publish_all, request, wait_for
from tests.integration.operator_tools import herald_cli, wait_parked


async def _message(db: asyncpg.Connection, message_id: str, status: str, age_days: int) -> None:
    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, payload, attempts,
                                 updated_at)
           VALUES ($1, $2, 'sms', '+15551234567', '{}', 1, now() - make_interval(days => $3))""",
        message_id, status, age_days)
    await db.execute(
        """INSERT INTO delivery_attempts (message_id, attempt, started_at, outcome)
           VALUES ($1, 1, now(), $2)""",
        message_id, "sent" if status in ("sent", "delivered", "read") else "failed")


async def test_prune_deletes_old_finished_messages_and_keeps_the_rest(
    prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    old = {"sent": 3, "delivered": 2, "read": 1, "cancelled": 1, "expired": 1}
    for status, n in old.items():
        for i in range(n):
            await _message(db, f"old-{status}-{i}", status, 120)
    await _message(db, "old-failed", "failed", 120)
    await _message(db, "new-sent", "sent", 10)
    # A provider event with an action of the events consumer, and operator
    # history, for a message that goes; a parked copy of one that stays.
    event_row = await db.fetchval(
        """INSERT INTO provider_events (event_id, provider, provider_message_id, status,
                                        occurred_at, message_id, outcome)
           VALUES ($1, 'twilio', 'SM1', 'delivered', now(), 'old-delivered-0', 'applied')
        RETURNING id""", uuid.uuid4())
    await db.execute(
        """INSERT INTO event_actions (event_row, message_id, kind, channel, attempt, error_type)
           VALUES ($1, 'old-delivered-0', 'resend', 'sms', 2, 'provider_error')""", event_row)
    await db.execute("INSERT INTO message_actions (message_id, action, actor)"
                     " VALUES ('old-sent-0', 'replayed', 'test')")
    # Messenger watermarks belong to no one message: an old finished one goes, a
    # recent one and an old one still pending stay.
    for outcome, days in (("applied", 120), ("applied", 1), (None, 120)):
        await db.execute(
            """INSERT INTO provider_events (event_id, provider, status, occurred_at,
                                            stored_at, recipient, watermark, outcome)
               VALUES ($1, 'messenger', 'read', now(), now() - make_interval(days => $2),
                       '123456789', now(), $3)""", uuid.uuid4(), days, outcome)
    for message_id, state in (("old-failed", "parked"), ("old-sent-1", "replayed")):
        await db.execute(
            """INSERT INTO parked_messages (parked_id, message_id, channel, attempts,
                   error_type, body, state, parked_at, resolved_at)
               VALUES ($1, $2, 'sms', 1, 'permission', '\\x7b7d', $3,
                       now() - interval '121 days', now() - interval '120 days')""",
            uuid.uuid4(), message_id, state)

    env = herald_env(prefix, db_url)
    code, out, err = await herald_cli(env, "prune", "--older-than", "90d", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["messages"] == 8
    assert await db.fetchval("SELECT count(*) FROM messages") == 10

    code, out, err = await herald_cli(env, "prune", "--older-than", "90d", "--batch-size", "3",
                                      "--yes", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report == {"dry_run": False, "messages": 8, "attempts": 8, "provider_events": 2,
                      "actions": 1, "parked_rows": 1, "batches": 3, "kept_parked": 0,
                      "tombstones_forgotten": 0}
    left = dict(await db.fetch("SELECT message_id, status FROM messages"))
    assert left == {"old-failed": "failed", "new-sent": "sent"}
    # Each pruned message left a tombstone with its last status.
    tombstones = dict(await db.fetch(
        "SELECT status, count(*) FROM message_tombstones GROUP BY status"))
    assert tombstones == {status: n for status, n in old.items()}
    assert await db.fetchval("SELECT count(*) FROM delivery_attempts") == 2
    assert await db.fetchval("SELECT count(*) FROM provider_events") == 2
    assert await db.fetchval("SELECT count(*) FROM provider_events WHERE message_id IS NULL"
                             " AND (outcome IS NULL OR stored_at > now() - interval '2 days')"
                             ) == 2
    assert await db.fetchval("SELECT count(*) FROM event_actions") == 0
    assert await db.fetchval(
        "SELECT array_agg(state) FROM parked_messages") == ["parked"]
    (audit,) = await db.fetch("SELECT source, action, affected FROM audit_log")
    assert tuple(audit) == ("cli", "prune", 8)



# -- idempotency after pruning ------------------------------------------------------------


def _suppressed() -> float:
    return REGISTRY.get_sample_value("herald_duplicates_suppressed_total",
                                     {"channel": "http"}) or 0.0


async def _status_of(db: asyncpg.Connection, message_id: str) -> str | None:
    return await db.fetchval("SELECT status FROM messages WHERE message_id = $1", message_id)


async def test_a_pruned_message_is_never_sent_again(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    names = Names(prefix)
    env = herald_env(prefix, db_url)
    sent = request("kept-promise", sandbox.url("ok"))
    refused = request("opted-out", sandbox.url("broken", status=400))
    await publish_all(amqp, prefix, [sent, refused])
    await wait_parked(db, amqp, prefix, 1)

    async def sent_at_last() -> bool:
        return await _status_of(db, "kept-promise") == "sent"

    await wait_for(sent_at_last, timeout=30, what="kept-promise sent")
    # The refused one is rejected for good: cancelled.
    parked_id = await db.fetchval("SELECT parked_id FROM parked_messages")
    code, _, err = await herald_cli(env, "parked", "reject", str(parked_id),
                                    "--reason", "opted out")
    assert code == 0, err
    assert await _status_of(db, "opted-out") == "cancelled"
    calls = {mid: len(sandbox.sandbox.attempts_for(mid)) for mid in ("kept-promise",
                                                                      "opted-out")}
    assert calls == {"kept-promise": 1, "opted-out": 1}

    await db.execute("UPDATE messages SET updated_at = now() - interval '10 days'")
    code, out, err = await herald_cli(env, "prune", "--older-than", "5d", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["messages"] == 2
    assert await db.fetchval("SELECT count(*) FROM messages") == 0

    # Every kind of copy that can outlive the row: the publisher's late duplicate,
    # a retry copy still in the delay levels, a long delay's copy coming round
    # (x-herald-due-at) when it is due.
    before = _suppressed()
    publisher = Publisher(amqp, names)
    try:
        for req in (sent, refused):
            body, mid = json.dumps(req).encode(), req["message_id"]
            await publisher.publish_send("http", body, message_id=mid)
            await publisher.publish_delayed("http", body, 1, headers={"x-herald-attempt": 2},
                                            message_id=mid)
            await publisher.publish_send(
                "http", body, headers={"x-herald-attempt": 3, "x-herald-due-at": int(time.time())},
                message_id=mid)
        # A parked copy that a crash left in the queue before it was indexed.
        copy_id = uuid.uuid4()
        await publisher.publish(
            names.parked, names.parked, json.dumps(sent).encode(), message_id="kept-promise",
            headers={"x-herald-attempt": 1, "x-herald-error-type": "provider_error",
                     "x-herald-error-code": "503", "x-herald-last-error": "HTTP 503",
                     "x-herald-parked-at": datetime.now(UTC).isoformat(),
                     "x-herald-channel": "http", "x-herald-message-id": "kept-promise",
                     "x-herald-parked-id": str(copy_id)})
    finally:
        await publisher.close()
    await wait_for(lambda: _suppressed() - before >= 6, timeout=30,
                   what="six stale copies suppressed")
    code, out, err = await herald_cli(env, "parked", "sync")
    assert code == 0, err
    code, out, err = await herald_cli(env, "parked", "replay", "--all", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["replayed"], report["already_delivered"]) == (0, 1)
    resolution = await db.fetchval(
        "SELECT resolution FROM parked_messages WHERE parked_id = $1", copy_id)
    assert "pruned" in resolution
    assert {mid: len(sandbox.sandbox.attempts_for(mid)) for mid in calls} == calls
    # Nothing brought the rows back; the tombstones still answer for them.
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    code, out, err = await herald_cli(env, "status", "opted-out")
    assert code == 0, err
    assert "cancelled, pruned" in out


async def test_prune_keeps_messages_with_a_copy_still_parked(
    prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    await _message(db, "sent-and-parked", "sent", 30)
    await _message(db, "just-sent", "sent", 30)
    # Published again after it was parked, and sent: its parked copy still waits
    # for an operator, who may look for the message it belongs to.
    await db.execute(
        """INSERT INTO parked_messages (parked_id, message_id, channel, attempts, error_type,
               body, parked_at)
           VALUES ($1, 'sent-and-parked', 'sms', 1, 'provider_error', '\\x7b7d',
                   now() - interval '31 days')""", uuid.uuid4())
    env = herald_env(prefix, db_url)
    code, out, err = await herald_cli(env, "prune", "--older-than", "7d", "--dry-run", "--json")
    assert code == 0, err
    assert (json.loads(out)["messages"], json.loads(out)["kept_parked"]) == (1, 1)
    code, out, err = await herald_cli(env, "prune", "--older-than", "7d", "--yes")
    assert code == 0, err
    assert "kept 1 finished message(s) that still have a parked copy" in out
    assert await db.fetchval("SELECT array_agg(message_id) FROM messages") == [
        "sent-and-parked"]


async def test_prune_refuses_short_windows_and_asks_first(
    prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    await _message(db, "old", "delivered", 30)
    env = herald_env(prefix, db_url)
    for args, says in ((("--older-than", "72h"), "at least 4d 49m 3s"),
                       (("--older-than", "0s"), "at least"),
                       (("--older-than", "30d", "--forget-after", "7d"), "--forget-after")):
        code, _, err = await herald_cli(env, "prune", *args, "--yes")
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith("herald") and says in line, line
    # Not interactive and no --yes: nothing happens.
    code, _, err = await herald_cli(env, "prune", "--older-than", "7d")
    assert code == 2 and "--yes" in err
    # Asked on a terminal: "n" keeps everything, "y" prunes.
    code, out = await _prune_on_a_terminal(env, "n")
    assert code == 1 and "delete 1 message(s)" in out and "nothing pruned" in out
    assert await db.fetchval("SELECT count(*) FROM messages") == 1
    code, out = await _prune_on_a_terminal(env, "y")
    assert code == 0 and "pruned 1 message(s)" in out
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def _prune_on_a_terminal(env: dict[str, str], answer: str) -> tuple[int, str]:
    """``herald prune --older-than 7d`` with a terminal as stdin, answering its question."""
    controller, terminal = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumer", "prune", "--older-than", "7d",
            env={**os.environ, **env}, cwd=str(REPO), stdin=terminal,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        os.close(terminal)
        os.write(controller, answer.encode() + b"\n")
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        os.close(controller)
    return int(proc.returncode or 0), out.decode()


async def test_tombstones_are_forgotten_after_the_forget_window(
    prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    for message_id, days in (("last-year", 400), ("this-year", 100)):
        await db.execute(
            """INSERT INTO message_tombstones (message_key, finished_at, status)
               VALUES (herald_message_key($1), now() - make_interval(days => $2), 'sent')""",
            message_id, days)
    # While it is remembered, no path brings a pruned message's row back: not the
    # claim, not a deferred first attempt recorded as queued, not an expiry.
    assert (await _claim(db, "this-year"))["outcome"] == "duplicate"
    for status in ("queued", "expired"):
        await db.execute(
            """INSERT INTO messages (message_id, status, channel, recipient, payload)
               VALUES ('this-year', $1, 'sms', '+15551234567', '{}')""", status)
    assert await db.fetchval("SELECT count(*) FROM messages") == 0

    env = herald_env(prefix, db_url)
    code, out, err = await herald_cli(env, "prune", "--older-than", "30d", "--forget-after",
                                      "365d", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["tombstones_forgotten"] == 1
    assert (await _claim(db, "last-year"))["outcome"] == "claimed"  # a new message now
    assert (await _claim(db, "this-year"))["outcome"] == "duplicate"


async def _claim(db: asyncpg.Connection, message_id: str, attempt: int = 1) -> asyncpg.Record:
    (row,) = await db.fetch("SELECT * FROM herald_claim_batch($1::text::jsonb)", json.dumps([{
        "idx": 0, "message_id": message_id, "channel": "sms", "recipient": "+15551234567",
        "campaign_id": None, "payload": {}, "attempt": attempt, "owner": "test",
        "lease_s": 30}]))
    return row


async def test_a_claim_never_sees_a_row_pruned_without_its_tombstone(
    db_url: str, db: asyncpg.Connection,
) -> None:
    """A prune batch commits only once no claim is in flight, and claims that
    come meanwhile either see the row (the batch is undone and tried again) or
    wait for the commit: each sees the row or the tombstone, never neither."""
    await _message(db, "finished", "sent", 30)
    in_flight = await asyncpg.connect(db_url)
    late = await asyncpg.connect(db_url)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        transaction = in_flight.transaction()
        await transaction.start()
        await _claim(in_flight, "unrelated")  # holds the prune lock shared until commit

        async def prune_waiting() -> bool:
            return bool(await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))

        pruning = asyncio.create_task(prune(pool, timedelta(days=7)))
        await wait_for(prune_waiting, timeout=10, what="prune waiting for the claim")
        claim = await asyncio.wait_for(_claim(late, "finished"), 10)
        assert (claim["outcome"], claim["status"]) == ("duplicate", "sent")
        assert not pruning.done()
        assert await db.fetchval("SELECT count(*) FROM message_tombstones") == 0
        await transaction.commit()
        report = await asyncio.wait_for(pruning, 30)
        assert report.messages == 1
        claim = await _claim(late, "finished")
        assert (claim["outcome"], claim["status"]) == ("duplicate", "sent")
        assert await db.fetchval("SELECT count(*) FROM messages WHERE message_id = 'finished'"
                                 ) == 0
    finally:
        await pool.close()
        await late.close()
        await in_flight.close()
