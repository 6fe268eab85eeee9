"""herald prune: old finished messages go in batches with everything about
them; failed ones, recent ones and the parked lot stay."""

from __future__ import annotations

import json
import uuid

import asyncpg

from tests.conftest import herald_env
from tests.integration.operator_tools import herald_cli


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
                                "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report == {"dry_run": False, "messages": 8, "attempts": 8, "provider_events": 2,
                      "actions": 1, "parked_rows": 1, "batches": 3}
    left = dict(await db.fetch("SELECT message_id, status FROM messages"))
    assert left == {"old-failed": "failed", "new-sent": "sent"}
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

