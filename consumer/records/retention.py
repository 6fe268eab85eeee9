"""Retention (``herald prune``): delete old finished messages in batches.

Messages that are ``sent``, ``delivered``, ``read``, ``cancelled`` or
``expired`` and unchanged for longer than the cut-off go, with their
attempts (cascade), provider events, operator actions and resolved parking
index rows; so do old finished provider events that belong to no single
message (Messenger watermarks, orphans). ``failed`` messages stay (someone
may still replay them), and so does every row of the parking lot that is
still parked. Each batch is its own short transaction, so pruning never
holds locks on many rows at once and can be interrupted at any point.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from consumer.parking.passes import Conn

log = structlog.get_logger("herald.retention")

PRUNABLE = ("sent", "delivered", "read", "cancelled", "expired")


@dataclass
class PruneReport:
    dry_run: bool
    messages: int = 0
    attempts: int = 0
    provider_events: int = 0
    actions: int = 0
    parked_rows: int = 0
    batches: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def _has_events(conn: Conn) -> bool:
    return bool(await conn.fetchval(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('provider_events')"
        " AND attname = 'message_id' AND NOT attisdropped"))


async def prune(pool: asyncpg.Pool, older_than: timedelta, *, batch_size: int = 5000,
                dry_run: bool = False) -> PruneReport:
    report = PruneReport(dry_run=dry_run)
    async with pool.acquire() as conn:
        cutoff = await conn.fetchval("SELECT now() - $1::interval", older_than)
        if dry_run:
            row = await conn.fetchrow(
                """SELECT count(*) AS messages, COALESCE(sum(
                          (SELECT count(*) FROM delivery_attempts a
                            WHERE a.message_id = m.message_id)), 0) AS attempts
                     FROM messages m WHERE status = ANY($1::text[]) AND updated_at < $2""",
                list(PRUNABLE), cutoff)
            assert row is not None
            report.messages, report.attempts = int(row["messages"]), int(row["attempts"])
            report.parked_rows = int(await conn.fetchval(
                "SELECT count(*) FROM parked_messages WHERE state <> 'parked'"
                " AND COALESCE(resolved_at, parked_at) < $1", cutoff))
            return report
        events = await _has_events(conn)
        while True:
            async with conn.transaction():
                ids = [r["message_id"] for r in await conn.fetch(
                    """SELECT message_id FROM messages
                        WHERE status = ANY($1::text[]) AND updated_at < $2
                        LIMIT $3 FOR UPDATE SKIP LOCKED""", list(PRUNABLE), cutoff, batch_size)]
                if not ids:
                    break
                report.attempts += int(await conn.fetchval(
                    "SELECT count(*) FROM delivery_attempts WHERE message_id = ANY($1)", ids))
                # Attempts (and the events consumer's outbox rows) go by cascade.
                deleted = await conn.execute(
                    "DELETE FROM messages WHERE message_id = ANY($1)", ids)
                report.messages += int(deleted.split()[-1])
                if events:
                    deleted = await conn.execute(
                        "DELETE FROM provider_events WHERE message_id = ANY($1)", ids)
                    report.provider_events += int(deleted.split()[-1])
                deleted = await conn.execute(
                    "DELETE FROM message_actions WHERE message_id = ANY($1)", ids)
                report.actions += int(deleted.split()[-1])
                deleted = await conn.execute(
                    "DELETE FROM parked_messages WHERE message_id = ANY($1)"
                    " AND state <> 'parked'", ids)
                report.parked_rows += int(deleted.split()[-1])
            report.batches += 1
            log.info("prune.batch", messages=len(ids), total=report.messages)
        # Resolved parking rows of messages that stay (failed ones, invalid payloads).
        while True:
            deleted = await conn.execute(
                """DELETE FROM parked_messages WHERE parked_id IN (
                       SELECT parked_id FROM parked_messages
                        WHERE state <> 'parked' AND COALESCE(resolved_at, parked_at) < $1
                        LIMIT $2)""", cutoff, batch_size)
            count = int(deleted.split()[-1])
            report.parked_rows += count
            if count < batch_size:
                break
        # Events tied to no one message (Messenger watermarks, orphans) that are
        # finished with: nothing else would ever delete them.
        while events:
            deleted = await conn.execute(
                """DELETE FROM provider_events WHERE id IN (
                       SELECT id FROM provider_events
                        WHERE message_id IS NULL AND outcome IS NOT NULL
                          AND stored_at < $1
                        LIMIT $2)""", cutoff, batch_size)
            count = int(deleted.split()[-1])
            report.provider_events += count
            if count < batch_size:
                break
    log.info("prune.done", **report.to_json())
    return report
