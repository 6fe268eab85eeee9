"""The batch functions reach messages by primary key, one probe per item,
however large the table has grown since it was last analyzed (sql/0012).

Counted with pg_stat_xact_user_tables, which reports the current
transaction's reads: a batch joined to messages with a merge or hash join
fetches every row through the primary-key index instead.
"""

from __future__ import annotations

import json

import asyncpg

ROWS = 4000
BATCH = 20


def claims(first: int, n: int) -> str:
    return json.dumps([
        {"idx": i, "message_id": f"m-{first + i}", "channel": "http",
         "recipient": "http://127.0.0.1:9/hook", "campaign_id": None, "attempt": 1,
         "attempt_base": 0, "owner": "test", "lease_s": 60.0, "payload": {"body": {"n": i}}}
        for i in range(n)])


def records(first: int, n: int) -> str:
    return json.dumps([
        {"idx": i, "message_id": f"m-{first + i}", "attempt": 1, "outcome": "sent",
         "started_at": "2026-12-03T17:00:00+00:00", "latency_ms": 1.0, "provider": "http",
         "provider_message_id": f"p-{first + i}", "error_type": None, "error_code": None,
         "error_text": None, "next_attempt_at": None, "retry_rule": None}
        for i in range(n)])


async def index_fetches(db: asyncpg.Connection) -> int:
    return int(await db.fetchval(
        "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables"
        " WHERE relname = 'messages' AND schemaname = current_schema()"))


async def test_claims_and_records_probe_messages_by_key_on_a_grown_table(
    db: asyncpg.Connection,
) -> None:
    # Statistics as stale as they get under load: autovacuum never analyzes.
    await db.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    # The functions' plans are cached while the table is nearly empty (after
    # five calls PostgreSQL keeps a generic plan), then the table grows.
    for first in range(10):
        await db.fetch("SELECT * FROM herald_claim_batch($1::text::jsonb)", claims(first, 1))
        await db.fetch("SELECT * FROM herald_record_batch($1::text::jsonb)", records(first, 1))
    for first in range(10, ROWS, 500):
        await db.fetch("SELECT * FROM herald_claim_batch($1::text::jsonb)", claims(first, 500))
        await db.fetch("SELECT * FROM herald_record_batch($1::text::jsonb)", records(first, 500))
    assert await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'") >= ROWS

    for first in (ROWS + 1000, ROWS + 2000, ROWS + 3000):
        # The view adds this transaction's reads to those not yet flushed: deltas.
        async with db.transaction():
            before = await index_fetches(db)
            await db.fetch("SELECT * FROM herald_claim_batch($1::text::jsonb)",
                           claims(first, BATCH))
            between = await index_fetches(db)
            rows = await db.fetch("SELECT * FROM herald_record_batch($1::text::jsonb)",
                                  records(first, BATCH))
            claim_reads, record_reads = between - before, await index_fetches(db) - between
        assert [r["status"] for r in rows] == ["sent"] * BATCH
        # One probe per item, a few more for the insert's conflict checks.
        assert claim_reads <= 4 * BATCH, claim_reads
        assert record_reads <= 4 * BATCH, record_reads
