"""Retention (``herald prune``): delete old finished messages in batches,
remembering each one's ``message_id`` in a tombstone.

Messages that are ``sent``, ``delivered``, ``read``, ``cancelled`` or
``expired`` and unchanged for longer than the cut-off go, with their
attempts (cascade), provider events, operator actions and resolved parking
index rows; so do old finished provider events that belong to no single
message (Messenger watermarks, orphans). ``failed`` messages stay (someone
may still replay them), so does every message with a copy still parked,
and so does every row of the parking lot that is still parked. Each batch
is its own short transaction, so pruning never holds locks on many rows at
once and can be interrupted at any point.

**Idempotency survives pruning.** The ``message_id`` is the idempotency key,
and copies of a message can outlive its row: a retry copy still in the
delay levels, a parked copy a crash left in the queue before it was
indexed, a publisher publishing the same request again. Each pruned
message leaves a tombstone (``message_tombstones``: a 16-byte hash of its
id, when it finished and its status), the claim (``herald_claim_batch``)
answers ``duplicate`` for a tombstoned id, and nothing else re-creates its
row (sql/0009). A batch writes its tombstones and deletes its rows while
holding the prune lock exclusively; every claim holds it shared, so no
claim can see the row gone without also seeing the tombstone. The lock is
taken just before each batch commits, so claims wait for the commit only,
not for the deleting.

**The cut-off** (``--older-than``) must be at least :data:`MIN_OLDER_THAN`:
one trip through the delay levels (2^18 - 1 s, about 72.8 h) plus a day.
A trip is the longest a copy waits in the broker without a consumer seeing
it, and every configurable retry delay is capped at it (``HERALD_MAX_DELAY_S``
and a request's ``retry.max_delay_s`` both stop at 262143 s). So a message
finished longer ago than that has no ordinary retry copy in flight, and its
late provider events have had time to arrive: the row, with its history, is
kept for everything the normal flow still needs. Longer waits exist (a
provider's ``Retry-After`` of days, a campaign's larger ``max_delay_s``,
``send_at`` far ahead, all carried round again with ``x-herald-due-at``);
those copies find the tombstone, which is what keeps them from being sent
twice, not the cut-off.

**Tombstones are kept** until the message finished longer ago than
``--forget-after`` (default :data:`DEFAULT_FORGET_AFTER`, 365 days, and
never less than ``--older-than``); then the same ``herald prune`` removes
them and the id counts as new again. So Herald remembers every
``message_id`` for that long after its message finished: a re-published
request or a stale copy within that window is never sent, one after it is
a new message. A tombstone takes about 110 bytes (row and index entry), so
a year of 1,000,000 messages a day is about 40 GB; choose a shorter window
if publishers never re-publish that late.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from consumer.topology import MAX_DELAY_S

if TYPE_CHECKING:
    from consumer.parking.passes import Conn

log = structlog.get_logger("herald.retention")

PRUNABLE = ("sent", "delivered", "read", "cancelled", "expired")

# One trip through the delay levels, the ceiling of every configurable retry delay.
LONGEST_TRIP = timedelta(seconds=MAX_DELAY_S)
# For copies that waited behind a backlog or a paused failure domain after their
# trip (HERALD_PAUSE_MAX_S is at most a day), and for clocks that disagree.
MARGIN = timedelta(days=1)
MIN_OLDER_THAN = LONGEST_TRIP + MARGIN
DEFAULT_FORGET_AFTER = timedelta(days=365)

# A batch waits at most this long for the prune lock (claims in flight hold it
# for milliseconds, and new claims queue behind the request meanwhile), less
# than PostgreSQL's deadlock_timeout (1 s by default): see _batch. Then it is
# undone and tried again after a pause, up to LOCK_ATTEMPTS times.
LOCK_TIMEOUT_MS = 300
LOCK_ATTEMPTS = 20
# Rows locked by other writers (the events consumer's outbox, a replay) are
# waited for this long before the batch is tried again.
ROW_LOCK_TIMEOUT_MS = 5000


class RetentionError(Exception):
    """A retention window that would break idempotency, or a prune that cannot proceed."""


def describe(window: timedelta) -> str:
    """A window as people write it (``4d 49m``; ``90d``)."""
    seconds = int(window.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts) or "0s"


def window_problem(older_than: timedelta, forget_after: timedelta | None = None) -> str | None:
    """Why these retention windows are refused (one line), or None when they are fine."""
    if older_than < MIN_OLDER_THAN:
        return (f"--older-than must be at least {describe(MIN_OLDER_THAN)}: a retry copy of a"
                f" message can wait {LONGEST_TRIP.total_seconds() / 3600:.1f} h in the delay"
                f" levels, plus a day's margin")
    if forget_after is not None and forget_after < older_than:
        return (f"--forget-after ({describe(forget_after)}) must not be shorter than"
                f" --older-than ({describe(older_than)}): tombstones are the only memory of"
                " a pruned message_id")
    return None


@dataclass
class PruneReport:
    dry_run: bool
    messages: int = 0
    attempts: int = 0
    provider_events: int = 0
    actions: int = 0
    parked_rows: int = 0
    batches: int = 0
    # Finished messages old enough that stay because a copy of them is still parked.
    kept_parked: int = 0
    # Tombstones removed because their message finished before --forget-after.
    tombstones_forgotten: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def _has_events(conn: Conn) -> bool:
    return bool(await conn.fetchval(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('provider_events')"
        " AND attname = 'message_id' AND NOT attisdropped"))


_DUE = """FROM messages m
         WHERE m.status = ANY($1::text[]) AND m.updated_at < $2"""
_PARKED = """EXISTS (SELECT 1 FROM parked_messages p
                      WHERE p.message_id = m.message_id AND p.state = 'parked')"""


async def prune(pool: asyncpg.Pool, older_than: timedelta, *,
                forget_after: timedelta = DEFAULT_FORGET_AFTER, batch_size: int = 1000,
                dry_run: bool = False) -> PruneReport:
    """Prune finished messages older than ``older_than`` (leaving tombstones) and
    tombstones older than ``forget_after``; see the module's docstring."""
    problem = window_problem(older_than, forget_after)
    if problem is not None:
        raise RetentionError(problem)
    report = PruneReport(dry_run=dry_run)
    async with pool.acquire() as conn:
        times = await conn.fetchrow(
            "SELECT now() - $1::interval AS cutoff, now() - $2::interval AS forget",
            older_than, forget_after)
        assert times is not None
        cutoff, forget = times["cutoff"], times["forget"]
        if dry_run:
            await _count(conn, report, cutoff, forget)
            return report
        events = await _has_events(conn)
        while True:
            ids = await _locked_batch(conn, report, cutoff, batch_size, events)
            if not ids:
                break
            report.batches += 1
        # Counted once the others are gone: then it is a short scan.
        report.kept_parked = int(await conn.fetchval(
            f"SELECT count(*) {_DUE} AND {_PARKED}", list(PRUNABLE), cutoff))
        await _tidy(conn, report, cutoff, forget, batch_size, events)
    log.info("prune.done", **report.to_json())
    return report


async def _count(conn: Conn, report: PruneReport, cutoff: datetime, forget: datetime) -> None:
    row = await conn.fetchrow(
        f"""SELECT count(*) FILTER (WHERE NOT parked) AS messages,
                   COALESCE(sum(attempts) FILTER (WHERE NOT parked), 0) AS attempts,
                   count(*) FILTER (WHERE parked) AS kept_parked
              FROM (SELECT {_PARKED} AS parked,
                           (SELECT count(*) FROM delivery_attempts a
                             WHERE a.message_id = m.message_id) AS attempts
                      {_DUE}) AS due""",
        list(PRUNABLE), cutoff)
    assert row is not None
    report.messages, report.attempts = int(row["messages"]), int(row["attempts"])
    report.kept_parked = int(row["kept_parked"])
    report.parked_rows = int(await conn.fetchval(
        "SELECT count(*) FROM parked_messages WHERE state <> 'parked'"
        " AND COALESCE(resolved_at, parked_at) < $1", cutoff))
    report.tombstones_forgotten = int(await conn.fetchval(
        "SELECT count(*) FROM message_tombstones WHERE finished_at < $1", forget))


async def _locked_batch(conn: Conn, report: PruneReport, cutoff: datetime, batch_size: int,
                        events: bool) -> list[str]:
    """One batch (tried again while claims keep the prune lock busy)."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            locked: list[float] = []
            async with conn.transaction():
                ids = await _batch(conn, report, cutoff, batch_size, events, locked)
            if locked:
                log.info("prune.batch", messages=len(ids), total=report.messages,
                         lock_held_ms=round((time.perf_counter() - locked[0]) * 1000, 1))
            return ids
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            log.warning("prune.lock_busy", attempt=attempt, error=str(exc)[:200])
            await asyncio.sleep(min(attempt, 5) * 0.2)
    raise RetentionError(
        f"gave up after {LOCK_ATTEMPTS} tries: the prune lock or the rows to delete stayed"
        " busy each time (a long transaction on messages?)")


async def _batch(conn: Conn, report: PruneReport, cutoff: datetime, batch_size: int,
                 events: bool, locked: list[float]) -> list[str]:
    """Delete a batch of messages with their history, leaving tombstones; one transaction.

    The prune lock is taken last, just before the commit: it only has to be
    held while the deletions and the tombstones become visible together, and
    taking it waits for the claims in flight. A claim may meanwhile be
    waiting for one of this batch's rows (a copy of a message being pruned)
    while holding the lock shared: so the lock is asked for with a short
    timeout, and on timeout the batch is undone (the claim then finds the
    row) and tried again, rather than deadlocking.
    """
    await conn.execute(f"SET LOCAL lock_timeout = {ROW_LOCK_TIMEOUT_MS}")
    rows = await conn.fetch(
        f"""SELECT m.message_id {_DUE} AND NOT {_PARKED}
             LIMIT $3 FOR UPDATE OF m SKIP LOCKED""", list(PRUNABLE), cutoff, batch_size)
    ids = [r["message_id"] for r in rows]
    if not ids:
        return ids
    attempts = await conn.execute("DELETE FROM delivery_attempts WHERE message_id = ANY($1)", ids)
    provider_events = (await conn.execute(
        "DELETE FROM provider_events WHERE message_id = ANY($1)", ids) if events else "0")
    actions = await conn.execute("DELETE FROM message_actions WHERE message_id = ANY($1)", ids)
    parked_rows = await conn.execute(
        "DELETE FROM parked_messages WHERE message_id = ANY($1) AND state <> 'parked'", ids)
    # The events consumer's outbox rows go by cascade.
    gone = await conn.execute(
        """WITH gone AS (
               DELETE FROM messages WHERE message_id = ANY($1)
               RETURNING message_id, status, updated_at)
           INSERT INTO message_tombstones AS t (message_key, finished_at, status)
           SELECT herald_message_key(message_id), updated_at, status FROM gone
           ON CONFLICT (message_key) DO UPDATE
              SET finished_at = GREATEST(t.finished_at, EXCLUDED.finished_at),
                  status = EXCLUDED.status""", ids)
    await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
    await conn.execute("SELECT pg_advisory_xact_lock(herald_prune_lock_key())")
    locked.append(time.perf_counter())
    report.messages += _count_of(gone)
    report.attempts += _count_of(attempts)
    report.provider_events += _count_of(provider_events)
    report.actions += _count_of(actions)
    report.parked_rows += _count_of(parked_rows)
    return ids


def _count_of(status: str) -> int:
    """The row count of a command status (``DELETE 12``, ``INSERT 0 12``)."""
    return int(status.split()[-1])


async def _tidy(conn: Conn, report: PruneReport, cutoff: datetime, forget: datetime,
                batch_size: int, events: bool) -> None:
    """What goes besides messages: old resolved parking rows, old finished events
    of no one message, and tombstones past --forget-after."""
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
    while True:
        deleted = await conn.execute(
            """DELETE FROM message_tombstones WHERE message_key IN (
                   SELECT message_key FROM message_tombstones WHERE finished_at < $1
                    LIMIT $2)""", forget, batch_size)
        count = int(deleted.split()[-1])
        report.tombstones_forgotten += count
        if count < batch_size:
            break


async def tombstone(conn: Conn, message_id: str) -> dict[str, Any] | None:
    """What Herald still knows of a pruned message: its status and when it
    finished (None when the id has no tombstone)."""
    row = await conn.fetchrow(
        "SELECT status, finished_at FROM message_tombstones"
        " WHERE message_key = herald_message_key($1)", message_id)
    return None if row is None else {"message_id": message_id, "status": row["status"],
                                     "finished_at": row["finished_at"], "pruned": True}
