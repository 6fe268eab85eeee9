"""The parking lot for operators: list, show, reject, purge, sync.

The index (``parked_messages``) answers questions; the queue
(``{prefix}.parked``) holds the messages. Listing and showing read only the
index, so they are fast on any lot size. Reject and purge mark index rows
first and then take the copies out of the queue in an ordered pass
(:mod:`consumer.parking.passes`); a pass interrupted in between leaves copies
whose rows are no longer 'parked', and every later pass (replay, reject,
purge, sync) acks those away. Replay is :mod:`consumer.parking.replay`.

Recipients leave this module masked unless a caller asks to reveal them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import structlog

from consumer.broker import connect
from consumer.logs import mask_headers, mask_recipient, mask_tree
from consumer.parking.passes import (
    Conn,
    Delivery,
    LotPass,
    index_missing,
    index_row,
    jsonable,
    lot_lock,
    ready_count,
)
from consumer.records.history import load_history
from consumer.topology import Names

log = structlog.get_logger("herald.parked")

# States of an index row that mean "its copy no longer belongs in the queue".
DONE_STATES = ("replayed", "rejected", "purged", "resolved")
# Message statuses a replay must never send again.
DELIVERED = ("sent", "delivered", "read")
# A parked copy's message (m), or the tombstone it left when it was pruned (t):
# its status either way, and whether it was pruned (herald prune, sql/0009).
WITH_MESSAGE = """LEFT JOIN messages m ON m.message_id = p.message_id
                  LEFT JOIN message_tombstones t
                         ON m.message_id IS NULL
                        AND t.message_key = herald_message_key(p.message_id)"""
MESSAGE_STATUS = "COALESCE(m.status, t.status)"
PRUNED = "(t.status IS NOT NULL)"


class LotError(Exception):
    """An operator's request that cannot be done as asked (one line, for people)."""


class NotFound(LotError):
    pass


@dataclass(frozen=True)
class Lot:
    """Where the parking lot lives: the index's pool and the queue's broker."""

    pool: asyncpg.Pool
    amqp_url: str
    names: Names
    window: int = 2000
    max_held: int = 200_000

    def new_pass(self, connection: aio_pika.abc.AbstractConnection) -> LotPass:
        return LotPass(connection, self.names, window=self.window, max_held=self.max_held)


@dataclass(frozen=True)
class Selection:
    """Which parked messages: by ids, by filters, or everything (``all``)."""

    ids: tuple[uuid.UUID, ...] = ()
    channel: str | None = None
    error_types: tuple[str, ...] = ()
    error_code: str | None = None
    campaign: str | None = None
    recipient: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    all: bool = False

    @property
    def empty(self) -> bool:
        return not (self.ids or self.channel or self.error_types or self.error_code
                    or self.campaign or self.recipient or self.since or self.until
                    or self.all)

    def conditions(self, params: list[Any], *, alias: str = "p",
                   with_error_types: bool = True) -> list[str]:
        """SQL conditions (besides the row's state) with their parameters appended."""

        def arg(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        found = []
        if self.ids:
            found.append(f"{alias}.parked_id = ANY({arg(list(self.ids))}::uuid[])")
        if self.channel:
            found.append(f"{alias}.channel = {arg(self.channel)}")
        if with_error_types and self.error_types:
            if len(self.error_types) == 1:
                found.append(f"{alias}.error_type = {arg(self.error_types[0])}")
            else:
                found.append(f"{alias}.error_type = ANY({arg(list(self.error_types))}::text[])")
        if self.error_code:
            found.append(f"{alias}.error_code = {arg(self.error_code)}")
        if self.campaign:
            found.append(f"{alias}.campaign_id = {arg(self.campaign)}")
        if self.recipient:
            found.append(f"{alias}.recipient = {arg(self.recipient)}")
        if self.since:
            found.append(f"{alias}.parked_at >= {arg(self.since)}")
        if self.until:
            found.append(f"{alias}.parked_at < {arg(self.until)}")
        return found

    def describe(self) -> dict[str, Any]:
        """The selection as JSON (for the audit log and reports)."""
        shown: dict[str, Any] = {}
        if self.ids:
            shown["ids"] = [str(i) for i in self.ids]
        for key in ("channel", "error_code", "campaign"):
            if getattr(self, key):
                shown[key] = getattr(self, key)
        if self.error_types:
            shown["error_types"] = list(self.error_types)
        if self.recipient:
            shown["recipient"] = mask_recipient(self.recipient)
        for key in ("since", "until"):
            value = getattr(self, key)
            if value is not None:
                shown[key] = value.isoformat()
        if self.all:
            shown["all"] = True
        return shown


@dataclass(frozen=True)
class ParkedRow:
    parked_id: uuid.UUID
    message_id: str | None
    channel: str
    recipient: str | None
    campaign_id: str | None
    attempts: int
    error_type: str
    error_code: str | None
    last_error: str | None
    parked_at: datetime
    state: str

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> ParkedRow:
        return cls(**{k: r[k] for k in cls.__dataclass_fields__})

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        return {
            "id": str(self.parked_id),
            "message_id": self.message_id,
            "channel": self.channel,
            "recipient": self.recipient if reveal else mask_recipient(self.recipient),
            "campaign_id": self.campaign_id,
            "attempts": self.attempts,
            "error_type": self.error_type,
            "error_code": self.error_code,
            "last_error": self.last_error,
            "parked_at": self.parked_at.isoformat(),
            "state": self.state,
        }


@dataclass(frozen=True)
class Listing:
    rows: list[ParkedRow]
    by_error_type: dict[str, int]
    limit: int
    offset: int
    # error_type → error code ('' for none) → parked copies
    by_error_code: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_error_type.values())

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_error_type": self.by_error_type,
                "by_error_code": self.by_error_code, "limit": self.limit, "offset": self.offset,
                "items": [r.to_json() for r in self.rows]}


_COLUMNS = ("p.parked_id, p.message_id, p.channel, p.recipient, p.campaign_id, p.attempts,"
            " p.error_type, p.error_code, p.last_error, p.parked_at, p.state")


async def list_parked(pool: asyncpg.Pool, selection: Selection, *, limit: int = 50,
                      offset: int = 0, newest_first: bool = False) -> Listing:
    """One page of the parked messages matching ``selection``, in queue order
    (oldest first) unless ``newest_first``, and the counts per error_type."""
    order = "DESC" if newest_first else "ASC"
    params: list[Any] = []
    if len(selection.error_types) > 1:
        # One index range per error_type, merged: with `error_type = ANY(...)`
        # the planner would read every matching row to sort them.
        parts = []
        for error_type in selection.error_types:
            params.append(error_type)
            where = ["p.state = 'parked'", f"p.error_type = ${len(params)}",
                     *selection.conditions(params, with_error_types=False)]
            params.append(limit + offset)
            parts.append(f"(SELECT {_COLUMNS} FROM parked_messages p WHERE {' AND '.join(where)}"
                         f" ORDER BY p.parked_at {order} LIMIT ${len(params)})")
        sql = (f"SELECT * FROM ({' UNION ALL '.join(parts)}) p"
               f" ORDER BY p.parked_at {order}, p.parked_id {order}")
    else:
        where = ["p.state = 'parked'", *selection.conditions(params)]
        sql = (f"SELECT {_COLUMNS} FROM parked_messages p WHERE {' AND '.join(where)}"
               f" ORDER BY p.parked_at {order}, p.parked_id {order}")
    params.extend([limit, offset])
    sql += f" LIMIT ${len(params) - 1} OFFSET ${len(params)}"
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, *params) if limit else []
        codes = await count_parked_codes(conn, selection)
    return Listing([ParkedRow.from_record(r) for r in rows], _by_type(codes), limit, offset,
                   by_error_code=codes)


async def count_parked(conn: Conn, selection: Selection) -> dict[str, int]:
    """Parked copies per error_type matching ``selection`` (see
    :func:`count_parked_codes`)."""
    return _by_type(await count_parked_codes(conn, selection))


def _by_type(codes: dict[str, dict[str, int]]) -> dict[str, int]:
    return {error_type: sum(per_code.values()) for error_type, per_code in codes.items()}


async def count_parked_codes(conn: Conn, selection: Selection) -> dict[str, dict[str, int]]:
    """Parked copies matching ``selection`` per error_type and error code ('' for
    none), both sorted: from parked_counts (a few rows, kept by triggers) when
    the selection is by channel, error_type, error code and campaign only, else
    counted from the index rows."""
    params: list[Any] = []
    if not (selection.ids or selection.recipient or selection.since or selection.until):
        # parked_counts has the same channel, error_type, error_code and campaign_id columns.
        where = ["c.parked <> 0", *selection.conditions(params, alias="c")]
        sql = (f"SELECT c.error_type, c.error_code, sum(c.parked) AS n FROM parked_counts c"
               f" WHERE {' AND '.join(where)} GROUP BY c.error_type, c.error_code")
    else:
        where = ["p.state = 'parked'", *selection.conditions(params)]
        sql = (f"SELECT p.error_type, COALESCE(p.error_code, '') AS error_code, count(*) AS n"
               f" FROM parked_messages p WHERE {' AND '.join(where)}"
               f" GROUP BY p.error_type, COALESCE(p.error_code, '')")
    found: dict[str, dict[str, int]] = {}
    for r in sorted(await conn.fetch(sql, *params),
                    key=lambda r: (r["error_type"], r["error_code"])):
        if r["n"]:
            found.setdefault(r["error_type"], {})[r["error_code"]] = int(r["n"])
    return found


async def parked_totals(conn: Conn, by: str) -> dict[str, int]:
    """Parked copies per ``channel``, ``campaign_id`` ('' for none) or
    ``error_type``, from parked_counts (a few rows however large the lot)."""
    if by not in ("channel", "campaign_id", "error_type"):
        raise ValueError(f"cannot count parked copies by {by!r}")
    rows = await conn.fetch(
        f"SELECT {by} AS key, sum(parked) AS n FROM parked_counts WHERE parked <> 0"
        f" GROUP BY {by} ORDER BY {by}")
    return {r["key"]: int(r["n"]) for r in rows if r["n"]}


async def resolve_ids(pool: asyncpg.Pool, texts: Sequence[str]) -> tuple[uuid.UUID, ...]:
    """Parked ids from what an operator typed: full ids or unique prefixes (>= 6 hex)."""
    found: list[uuid.UUID] = []
    for text in texts:
        raw = text.strip().lower()
        try:
            found.append(uuid.UUID(raw))
            continue
        except ValueError:
            pass
        hexed = raw.replace("-", "")
        if not 6 <= len(hexed) <= 32 or any(c not in "0123456789abcdef" for c in hexed):
            raise LotError(f"{text!r} is not a parked message id (or a prefix of 6+ hex digits)")
        low = uuid.UUID(hexed.ljust(32, "0"))
        high = uuid.UUID(hexed.ljust(32, "f"))
        matches = await pool.fetch(
            "SELECT parked_id FROM parked_messages WHERE parked_id BETWEEN $1 AND $2 LIMIT 2",
            low, high)
        if not matches:
            raise NotFound(f"no parked message with id {text!r}")
        if len(matches) > 1:
            raise LotError(f"id prefix {text!r} is ambiguous: give more of it")
        found.append(matches[0]["parked_id"])
    return tuple(found)


def _body_view(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # Not JSON, or nested past Python's stack (a hostile body): shown as text.
        return body.decode("utf-8", "replace")


async def show(pool: asyncpg.Pool, parked_id: uuid.UUID, *, reveal: bool = False
               ) -> dict[str, Any]:
    """Everything about one parked copy: its body and headers, its message's
    status, every copy of it parked, and its history (see
    :mod:`consumer.records.history`): attempts, provider events, parkings and
    operator actions (edits included)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM parked_messages WHERE parked_id = $1",
                                  parked_id)
        if row is None:
            raise NotFound(f"no parked message with id {parked_id}")
        message_id = row["message_id"]
        message = None
        copies = [row]
        if message_id is not None:
            message = await conn.fetchrow(
                """SELECT message_id, status, channel, recipient, campaign_id, attempts,
                          provider, provider_message_id, last_error_type, last_error_code,
                          last_error, created_at, updated_at, sent_at, delivered_at, read_at,
                          failed_at, cancelled_at, expired_at
                     FROM messages WHERE message_id = $1""", message_id)
            copies = await conn.fetch(
                f"SELECT {_COLUMNS}, p.resolved_at, p.resolution FROM parked_messages p"
                " WHERE p.message_id = $1 ORDER BY p.parked_at", message_id)
        history = await load_history(conn, message_id=message_id, parked_id=parked_id)

    def masked(value: Any) -> Any:
        return jsonable(value) if reveal else mask_tree(jsonable(value))

    def of_kind(*kinds: str) -> list[dict[str, Any]]:
        return [e.to_json(reveal=reveal) for e in history if e.kind in kinds]

    parked = ParkedRow.from_record(row).to_json(reveal=reveal) | {
        "resolved_at": row["resolved_at"].isoformat() if row["resolved_at"] else None,
        "resolution": row["resolution"], "replay_attempt": row["replay_attempt"],
        # Set when the index keeps only the first bytes of a long body (the parking
        # queue holds all of them): the whole body's size.
        "body_size": row["body_size"],
    }
    return {
        "parked": parked,
        "body": masked(_body_view(bytes(row["body"]))),
        "edited_body": masked(_body_view(bytes(row["replay_body"])))
        if row["replay_body"] is not None else None,
        "headers": mask_headers(row["headers"] or {}),
        "message": masked(dict(message)) if message else None,
        "attempts": of_kind("attempt"),
        "provider_events": of_kind("event"),
        "copies": [ParkedRow.from_record(c).to_json(reveal=reveal) for c in copies],
        "actions": [e.to_json(reveal=reveal) for e in history
                    if e.kind not in ("attempt", "event", "parked")],
        "history": [e.to_json(reveal=reveal) for e in history],
    }


# -- passes that take copies out of the queue -------------------------------------------


@dataclass
class BatchRows:
    """The index rows of a batch of taken copies (indexed first when missing)."""

    rows: dict[uuid.UUID, asyncpg.Record]
    new: frozenset[uuid.UUID] = frozenset()  # indexed just now

    @property
    def indexed(self) -> int:
        return len(self.new)

    def get(self, delivery: Delivery) -> asyncpg.Record:
        return self.rows[delivery.parked_id]


async def rows_for(conn: Conn, deliveries: Sequence[Delivery], names: Names,
                   actor: str, selection: Selection | None = None,
                   started: datetime | None = None) -> BatchRows:
    """Index rows (with the message's status and attempts, and whether each
    matches ``selection`` and was parked before ``started``) for taken copies;
    copies without a row are indexed first."""
    params: list[Any] = [[d.parked_id for d in deliveries]]
    if selection is not None:
        params.append(started)
        match = " AND ".join(["p.state = 'parked'", f"p.parked_at <= ${len(params)}",
                              *selection.conditions(params)])
    else:
        match = "false"
    sql = (f"SELECT p.*, {MESSAGE_STATUS} AS message_status,"
           f" m.attempts AS message_attempts, {PRUNED} AS pruned, ({match}) AS selected"
           f" FROM parked_messages p {WITH_MESSAGE}"
           " WHERE p.parked_id = ANY($1::uuid[])")
    rows = {r["parked_id"]: r for r in await conn.fetch(sql, *params)}
    missing = [d for d in deliveries if d.parked_id not in rows]
    if missing:
        await index_missing(
            conn, [index_row(d.message, d.parked_id, names) for d in missing], actor)
        params[0] = [d.parked_id for d in missing]
        rows.update({r["parked_id"]: r for r in await conn.fetch(sql, *params)})
    return BatchRows(rows, frozenset(d.parked_id for d in missing))


@dataclass
class SweepReport:
    """What a pass that only removes copies (reject, purge, sync) did."""

    marked: int = 0
    scanned: int = 0
    removed: int = 0
    indexed: int = 0
    not_found: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Mark index rows done ($2 the state, $3 the resolution, $4 who) and record the
# action ($5 its detail) in one statement: ``WITH done AS (_MARK WHERE … RETURNING
# parked_id, message_id) _RECORD``.
_MARK = """UPDATE parked_messages SET state = $2, resolved_at = now(), resolution = $3,
                  resolved_by = $4"""
_RECORD = """INSERT INTO message_actions (message_id, parked_id, action, actor, detail)
             SELECT message_id, parked_id, $2, $4, $5 FROM done
          RETURNING parked_id, message_id"""


async def _sweep(lot: Lot, actor: str, want: set[uuid.UUID] | None,
                 report: SweepReport) -> None:
    """Ack away every copy whose row is done; stop early once ``want`` are all gone."""
    connection = await connect(lot.amqp_url)
    async with connection, lot.new_pass(connection) as lot_pass:
        remaining = set(want) if want is not None else None
        while remaining is None or remaining:
            batch = await lot_pass.batch(500)
            if not batch:
                break
            async with lot.pool.acquire() as conn:
                rows = await rows_for(conn, batch, lot.names, actor)
            report.indexed += rows.indexed
            for d in batch:
                if rows.get(d)["state"] in DONE_STATES:
                    await lot_pass.ack(d)
                    report.removed += 1
                    if remaining is not None:
                        remaining.discard(d.parked_id)
        report.scanned = lot_pass.seen
        report.truncated = lot_pass.truncated
        report.not_found = len(remaining) if remaining else 0


async def reject(lot: Lot, ids: Sequence[uuid.UUID], reason: str, actor: str) -> SweepReport:
    """Remove parked copies for good: their messages become 'cancelled' (unless
    already delivered) with the reason recorded, and the copies leave the queue."""
    if not reason.strip():
        raise LotError("a reason is required to reject messages")
    report = SweepReport()
    async with lot_lock(lot.pool, lot.names.prefix):
        async with lot.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"""WITH done AS ({_MARK}
                      WHERE parked_id = ANY($1::uuid[]) AND state = 'parked'
                   RETURNING parked_id, message_id)
                   {_RECORD}""", list(ids), "rejected", reason, actor, {"reason": reason})
            done = {r["parked_id"] for r in rows}
            for other in await conn.fetch(
                    "SELECT parked_id, state FROM parked_messages WHERE parked_id = ANY($1)",
                    [i for i in ids if i not in done]):
                report.skipped.append({"id": str(other["parked_id"]),
                                       "why": f"not parked (state {other['state']})"})
            await conn.execute(
                """UPDATE messages SET status = 'cancelled', cancelled_at = now(),
                          updated_at = now(), claimed_by = NULL, claimed_until = NULL,
                          next_attempt_at = NULL
                    WHERE message_id = ANY($1::text[])
                      AND status IN ('queued', 'retrying', 'failed')""",
                [r["message_id"] for r in rows if r["message_id"] is not None])
        report.marked = len(rows)
        log.info("parked.rejected", count=len(rows), reason=reason[:200])
        if rows:
            await _sweep(lot, actor, done, report)
    return report


async def purge(lot: Lot, older_than: timedelta, actor: str) -> SweepReport:
    """Remove copies parked longer ago than ``older_than`` from the lot (their
    messages stay 'failed'; the index rows stay, marked 'purged')."""
    report = SweepReport()
    async with lot_lock(lot.pool, lot.names.prefix):
        rows = await lot.pool.fetch(
            f"""WITH done AS ({_MARK}
                  WHERE state = 'parked' AND parked_at < now() - $1::interval
               RETURNING parked_id, message_id)
               {_RECORD}""",
            older_than, "purged", f"purged: parked more than {older_than} ago", actor,
            {"older_than_s": older_than.total_seconds()})
        report.marked = len(rows)
        log.info("parked.purged", count=len(rows))
        if rows:
            await _sweep(lot, actor, {r["parked_id"] for r in rows}, report)
    return report


async def sync(lot: Lot, actor: str) -> SweepReport:
    """One pass over the whole queue: index copies without a row (the ones the
    broker dead-lettered) and remove copies whose rows are done."""
    report = SweepReport()
    async with lot_lock(lot.pool, lot.names.prefix):
        await _sweep(lot, actor, None, report)
    return report


async def queue_depth(amqp_url: str, names: Names) -> int:
    """Messages ready in the parking queue (not counting any a pass holds)."""
    connection = await connect(amqp_url)
    async with connection:
        return await ready_count(connection, names)
