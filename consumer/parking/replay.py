"""Replay: move chosen parked messages back to the send exchange.

One ordered pass over the parking queue (:mod:`consumer.parking.passes`); for
each copy taken, its index row decides:

- row already done (replayed, rejected, purged, resolved): ack it away;
- not selected: leave it held, so it stays parked in its place;
- its message is already sent/delivered/read (a late webhook): ack it away,
  row 'resolved', nothing sent;
- otherwise: fix the copy's attempt number in the row (``replay_attempt`` =
  the message's attempts + 1, kept when already set), publish to
  ``{prefix}`` as ``send.{channel}`` with publisher confirms, mark the row
  'replayed', and only then ack.

The claim in PostgreSQL fences on attempt numbers, so the fixed
``replay_attempt`` makes an interrupted replay safe to run again: a copy
published but not yet acked when the replay died is published again with the
same attempt number, and the claim sends it at most once.

A parked provider event (channel ``events``: one the events consumer could
not apply) goes back to ``{prefix}.events`` with its event id, not to a send
queue; it has no attempts and cannot be edited.

``x-herald-attempt-base`` (with ``--reset-attempts``, the default) tells the
pipeline to count the message's attempt budget from the replay on, while the
attempt numbers, and with them the history, go on from the earlier ones.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import connect
from consumer.delivery.pipeline import decode_request, lane_of
from consumer.logs import mask_tree
from consumer.parking.lot import (
    DELIVERED,
    DONE_STATES,
    MESSAGE_STATUS,
    PRUNED,
    WITH_MESSAGE,
    Lot,
    LotError,
    Selection,
    rows_for,
)
from consumer.parking.passes import Delivery, lot_lock
from consumer.publisher import Publisher
from consumer.wire import HEADER_ATTEMPT, HEADER_ATTEMPT_BASE, HEADER_EVENT_ID, HEADER_REPLAY_OF
from schemas import ProviderEvent, SendRequest
from schemas.parking import PARKED_EVENTS_CHANNEL

log = structlog.get_logger("herald.replay")

DRY_RUN_ITEMS = 1000


@dataclass(frozen=True)
class Edit:
    """A change to one message before it is replayed: a new value for the
    request's ``body`` field, or a whole new send request."""

    body: str | None = None
    request: bytes | None = None


@dataclass(frozen=True)
class ReplayOptions:
    selection: Selection
    dry_run: bool = False
    rate: float | None = None
    reset_attempts: bool = True
    edit: Edit | None = None
    batch_size: int = 200


@dataclass
class ReplayReport:
    dry_run: bool
    selected: int = 0
    replayed: int = 0
    already_delivered: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    not_found: int = 0
    removed: int = 0
    indexed: int = 0
    scanned: int = 0
    truncated: bool = False
    interrupted: bool = False
    by_error_type: dict[str, int] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.skipped or self.not_found or self.truncated or self.interrupted)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _validated(body: bytes, channel: str) -> tuple[SendRequest | None, str]:
    """The request in a body, exactly as the pipeline would decode it (else it
    would only be parked again), or None and why not."""
    return decode_request(body, channel)


def _event(body: bytes) -> tuple[ProviderEvent | None, str]:
    """The provider event in a parked event's body, or None and why not."""
    try:
        return ProviderEvent.model_validate_json(body), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "event"
        return None, f"not a provider event ({where}: {first['msg']}): reject it"


def edited_body(edit: Edit, original: bytes, channel: str) -> bytes:
    """The send request an edit produces, validated; raises LotError."""
    if channel == PARKED_EVENTS_CHANNEL:
        raise LotError("a parked provider event cannot be edited: replay it as it is,"
                       " or reject it")
    current, problem = _validated(original, channel)
    if edit.request is not None:
        request, problem = _validated(edit.request, channel)
        if request is None:
            raise LotError(f"--set-request: {problem}")
        # A valid original's message_id is the message's idempotency key. (An
        # invalid one has none: any AMQP message id it had says nothing.)
        if current is not None and request.message_id != current.message_id:
            raise LotError(f"--set-request: message_id must stay {current.message_id!r} (the"
                           " message's idempotency key); publish a new message instead")
        return request.model_dump_json(exclude_none=True).encode()
    assert edit.body is not None
    if current is None:
        raise LotError(f"--set-body: {problem}; use --set-request to replace all of it")
    body: Any = edit.body
    if channel == "http":
        try:
            body = json.loads(edit.body)
        except ValueError:
            body = edit.body
    fields = current.model_dump(mode="json", exclude_none=True) | {"body": body}
    try:
        return SendRequest.model_validate(fields).model_dump_json(exclude_none=True).encode()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise LotError(f"--set-body: {str(first['msg']).removeprefix('Value error, ')}"
                       ) from None


class _Pacer:
    """Spaces publishes ``1/rate`` seconds apart (no bursts after a pause)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next > now:
            await asyncio.sleep(self.next - now)
        self.next = max(self.next, now) + self.interval


Progress = Callable[["ReplayReport"], None]


async def replay(lot: Lot, options: ReplayOptions, actor: str,
                 stopping: Callable[[], bool] = lambda: False,
                 progress: Progress | None = None) -> ReplayReport:
    """Replay the selected parked messages (see the module's docstring).

    ``stopping`` is asked between publishes (a true answer ends the replay,
    ``interrupted``); ``progress`` is handed the report as it grows, once the
    selection is counted and after every batch (the console's background jobs
    show it)."""
    selection = options.selection
    if selection.empty:
        raise LotError("say what to replay: ids, filters, or --all")
    if options.edit is not None and len(selection.ids) != 1:
        raise LotError("an edit (--set-body/--set-request) applies to exactly one id")
    if options.dry_run:
        return await _plan(lot, options)
    report = ReplayReport(dry_run=False)
    async with lot_lock(lot.pool, lot.names.prefix):
        started: datetime = await lot.pool.fetchval("SELECT now()")
        if options.edit is not None:
            await _apply_edit(lot.pool, selection.ids[0], options.edit, actor)
        params: list[Any] = [started]
        where = " AND ".join(["p.state = 'parked'", "p.parked_at <= $1",
                              *selection.conditions(params)])
        report.selected = int(await lot.pool.fetchval(
            f"SELECT count(*) FROM parked_messages p WHERE {where}", *params))
        if progress is not None:
            progress(report)
        if report.selected:
            await _pass(lot, options, actor, started, report, stopping, progress)
    log.info("parked.replay_done", replayed=report.replayed, selected=report.selected,
             already_delivered=report.already_delivered, skipped=len(report.skipped),
             not_found=report.not_found, interrupted=report.interrupted)
    return report


async def _apply_edit(pool: asyncpg.Pool, parked_id: uuid.UUID, edit: Edit, actor: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT * FROM parked_messages WHERE parked_id = $1 FOR UPDATE", parked_id)
        if row is None or row["state"] != "parked":
            raise LotError(f"{parked_id} is not parked"
                           + (f" (state {row['state']})" if row is not None else ""))
        before = bytes(row["replay_body"] or row["body"])
        after = edited_body(edit, before, row["channel"])
        request = SendRequest.model_validate_json(after)
        await conn.execute("UPDATE parked_messages SET replay_body = $2 WHERE parked_id = $1",
                           parked_id, after)
        old: Any = before.decode("utf-8", "replace")
        old_request, _ = _validated(before, row["channel"])
        detail: dict[str, Any] = {
            "old_body": old_request.body if old_request else old,
            "new_body": request.body,
        }
        if edit.request is not None:
            detail["new_request"] = json.loads(after)
            detail["old_request"] = json.loads(before) if old_request else old
        await conn.execute(
            """INSERT INTO message_actions (message_id, parked_id, action, actor, detail)
               VALUES ($1, $2, 'edited', $3, $4)""",
            request.message_id, parked_id, actor, detail)
        await conn.execute(
            """UPDATE messages SET payload = $2::text::jsonb, recipient = $3, updated_at = now()
                WHERE message_id = $1 AND status NOT IN ('sent', 'delivered', 'read')""",
            request.message_id, after.decode(), request.to)
    log.info("parked.edited", parked_id=str(parked_id), message_id=request.message_id)


async def _pass(lot: Lot, options: ReplayOptions, actor: str, started: datetime,
                report: ReplayReport, stopping: Callable[[], bool],
                progress: Progress | None) -> None:
    pacer = _Pacer(options.rate)
    size = options.batch_size
    if options.rate:
        size = max(1, min(size, int(options.rate)))
    found = 0
    connection = await connect(lot.amqp_url)
    async with connection, lot.new_pass(connection) as lot_pass:
        publisher = Publisher(cast(AbstractRobustConnection, connection), lot.names)
        while found < report.selected and not stopping():
            batch = await lot_pass.batch(size)
            if not batch:
                break
            async with lot.pool.acquire() as conn:
                rows = await rows_for(conn, batch, lot.names, actor, options.selection, started)
            report.indexed += rows.indexed
            ready: list[tuple[Delivery, asyncpg.Record, SendRequest, bytes]] = []
            events: list[tuple[Delivery, asyncpg.Record, ProviderEvent]] = []
            for d in batch:
                row = rows.get(d)
                if row["state"] in DONE_STATES:
                    await lot_pass.ack(d)
                    report.removed += 1
                    continue
                if not row["selected"]:
                    continue
                if d.parked_id not in rows.new:
                    found += 1
                if row["channel"] == PARKED_EVENTS_CHANNEL:
                    event, problem = _event(d.message.body)
                    if event is None:
                        report.skipped.append({"id": str(d.parked_id), "message_id": None,
                                               "why": problem})
                    else:
                        events.append((d, row, event))
                    continue
                status = row["message_status"]
                if status in DELIVERED or status == "cancelled" or row["pruned"]:
                    await _resolve(lot.pool, row, status, actor)
                    await lot_pass.ack(d)
                    report.already_delivered += 1
                    continue
                body = bytes(row["replay_body"]) if row["replay_body"] else d.message.body
                request, problem = _validated(body, row["channel"])
                if request is None:
                    report.skipped.append({
                        "id": str(d.parked_id), "message_id": row["message_id"],
                        "why": problem + ": replay it with --set-request"})
                    continue
                ready.append((d, row, request, body))
            if events:
                done = await _replay_events(lot, publisher, events, actor, pacer, stopping)
                for d in done:
                    await lot_pass.ack(d)
                report.replayed += len(done)
                for _, row, _ in events[:len(done)]:
                    report.by_error_type[row["error_type"]] = (
                        report.by_error_type.get(row["error_type"], 0) + 1)
                if len(done) < len(events):
                    break
            if ready:
                done = await _replay_batch(lot, publisher, ready, options, actor, pacer,
                                           stopping)
                for d in done:
                    await lot_pass.ack(d)
                report.replayed += len(done)
                for _, row, _, _ in ready[:len(done)]:
                    report.by_error_type[row["error_type"]] = (
                        report.by_error_type.get(row["error_type"], 0) + 1)
                if len(done) < len(ready):
                    break
            if progress is not None:
                progress(report)
        report.interrupted = stopping()
        report.scanned = lot_pass.seen
        report.truncated = lot_pass.truncated
        if not report.interrupted:
            report.not_found = max(0, report.selected - found)


async def _replay_events(
    lot: Lot, publisher: Publisher, ready: list[tuple[Delivery, asyncpg.Record, ProviderEvent]],
    actor: str, pacer: _Pacer, stopping: Callable[[], bool],
) -> list[Delivery]:
    """Publish parked provider events back to ``{prefix}.events`` (confirmed) with
    the event id they arrived with, so that a copy the consumer did store after all
    is recognised; mark them replayed. Returns the deliveries now safe to ack."""
    published: list[tuple[Delivery, asyncpg.Record]] = []
    for d, row, event in ready:
        if stopping():
            break
        await pacer.wait()
        event_id = (d.message.headers or {}).get(HEADER_EVENT_ID)
        if isinstance(event_id, bytes):
            event_id = event_id.decode("utf-8", "replace")
        await publisher.publish(
            lot.names.events, f"{event.provider}.{event.status}", d.message.body,
            headers={HEADER_REPLAY_OF: str(d.parked_id)},
            message_id=event_id if isinstance(event_id, str) and event_id else None)
        published.append((d, row))
    if not published:
        return []
    async with lot.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE parked_messages SET state = 'replayed', resolved_at = now(),
                      resolution = 'replayed to the events queue', resolved_by = $2
                WHERE parked_id = ANY($1::uuid[]) AND state = 'parked'""",
            [d.parked_id for d, _ in published], actor)
        await conn.executemany(
            """INSERT INTO message_actions (parked_id, action, actor, detail)
               VALUES ($1, 'replayed', $2, $3)""",
            [(d.parked_id, actor, {"event": True}) for d, _ in published])
    for _, row in published:
        metrics.REPLAYED.labels(PARKED_EVENTS_CHANNEL, row["error_type"]).inc()
    return [d for d, _ in published]


async def _resolve(pool: asyncpg.Pool, row: asyncpg.Record, status: str, actor: str) -> None:
    why = (f"not replayed: the message was {status} and has been pruned" if row["pruned"]
           else f"not replayed: the message is already {status}")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE parked_messages SET state = 'resolved', resolved_at = now(),
                      resolution = $2, resolved_by = $3
                WHERE parked_id = $1 AND state = 'parked'""", row["parked_id"], why, actor)
        await conn.execute(
            """INSERT INTO message_actions (message_id, parked_id, action, actor, detail)
               VALUES ($1, $2, 'resolved', $3, $4)""",
            row["message_id"], row["parked_id"], actor, {"reason": why, "status": status})
    log.info("parked.resolved", parked_id=str(row["parked_id"]), message_id=row["message_id"],
             status=status)


async def _replay_batch(
    lot: Lot, publisher: Publisher,
    ready: list[tuple[Delivery, asyncpg.Record, SendRequest, bytes]],
    options: ReplayOptions, actor: str, pacer: _Pacer, stopping: Callable[[], bool],
) -> list[Delivery]:
    """Fix attempt numbers, publish with confirms, mark replayed; returns the
    deliveries now safe to ack (a stop request ends the batch early)."""
    async with lot.pool.acquire() as conn:
        attempts = {r["parked_id"]: r["replay_attempt"] for r in await conn.fetch(
            """WITH x AS (SELECT * FROM unnest($1::uuid[], $2::text[]) AS x(parked_id, mid))
               UPDATE parked_messages p
                  SET replay_attempt = COALESCE(p.replay_attempt, COALESCE(
                      (SELECT m.attempts FROM messages m WHERE m.message_id = x.mid), 0) + 1)
                 FROM x WHERE p.parked_id = x.parked_id
            RETURNING p.parked_id, p.replay_attempt""",
            [d.parked_id for d, _, _, _ in ready], [r.message_id for _, _, r, _ in ready])}
    published: list[tuple[Delivery, asyncpg.Record, SendRequest, int]] = []

    async def publish(d: Delivery, request: SendRequest, body: bytes) -> None:
        attempt = int(attempts[d.parked_id])
        headers: dict[str, Any] = {HEADER_ATTEMPT: attempt, HEADER_REPLAY_OF: str(d.parked_id)}
        if options.reset_attempts:
            headers[HEADER_ATTEMPT_BASE] = attempt - 1
        # Campaign traffic to the bulk lane, as herald publish does (the pipeline
        # moves a copy whose campaign says otherwise).
        await publisher.publish_send(request.channel, body, headers=headers,
                                     message_id=request.message_id,
                                     lane=lane_of(request, None))

    if pacer.interval:
        for d, row, request, body in ready:
            if stopping():
                break
            await pacer.wait()
            await publish(d, request, body)
            published.append((d, row, request, int(attempts[d.parked_id])))
    elif not stopping():
        # Unpaced: the whole batch's confirms in flight at once.
        await asyncio.gather(*(publish(d, request, body) for d, _, request, body in ready))
        published = [(d, row, request, int(attempts[d.parked_id]))
                     for d, row, request, _ in ready]
    if not published:
        return []
    now = datetime.now(UTC)
    async with lot.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE parked_messages SET state = 'replayed', resolved_at = now(),
                      resolution = 'replayed as attempt ' || replay_attempt, resolved_by = $2
                WHERE parked_id = ANY($1::uuid[]) AND state = 'parked'""",
            [d.parked_id for d, _, _, _ in published], actor)
        await conn.executemany(
            """INSERT INTO message_actions (message_id, parked_id, action, actor, detail)
               VALUES ($1, $2, 'replayed', $3, $4)""",
            [(r.message_id, d.parked_id, actor,
              {"attempt": a, "reset_attempts": options.reset_attempts,
               "edited": row["replay_body"] is not None})
             for d, row, r, a in published])
        # Shown as retrying until the pipeline takes it (the claim fences on attempts).
        await conn.execute(
            """UPDATE messages m SET status = 'retrying', retrying_at = $3, updated_at = $3,
                      next_attempt_at = $3
                 FROM unnest($1::text[], $2::int[]) AS x(mid, attempt)
                WHERE m.message_id = x.mid AND m.status = 'failed' AND m.attempts < x.attempt""",
            [r.message_id for _, _, r, _ in published], [a for _, _, _, a in published], now)
    for d, row, request, attempt in published:
        metrics.REPLAYED.labels(request.channel, row["error_type"]).inc()
        # Per message at debug: message_actions records every replay anyway.
        log.debug("parked.replayed", parked_id=str(d.parked_id), message_id=request.message_id,
                 channel=request.channel, to=request.to, attempt=attempt)
    return [d for d, _, _, _ in published]


async def _plan(lot: Lot, options: ReplayOptions) -> ReplayReport:
    """What a replay would do, from the index alone: nothing changes."""
    report = ReplayReport(dry_run=True)
    params: list[Any] = []
    where = " AND ".join(["p.state = 'parked'", *options.selection.conditions(params)])
    async with lot.pool.acquire() as conn:
        counts = await conn.fetch(
            f"""SELECT p.error_type, count(*) AS n,
                       count(*) FILTER (WHERE m.status = ANY($%d::text[]) OR {PRUNED})
                           AS delivered
                  FROM parked_messages p {WITH_MESSAGE}
                 WHERE {where} GROUP BY p.error_type""" % (len(params) + 1),
            *params, [*DELIVERED, "cancelled"])
        rows = await conn.fetch(
            f"""SELECT p.*, {MESSAGE_STATUS} AS message_status,
                       m.attempts AS message_attempts, {PRUNED} AS pruned
                  FROM parked_messages p {WITH_MESSAGE}
                 WHERE {where} ORDER BY p.parked_at LIMIT {DRY_RUN_ITEMS}""", *params)
    report.selected = sum(int(c["n"]) for c in counts)
    report.already_delivered = sum(int(c["delivered"]) for c in counts)
    for row in rows:
        status = row["message_status"]
        body = bytes(row["replay_body"] or row["body"])
        if options.edit is not None:
            body = edited_body(options.edit, body, row["channel"])
        if row["channel"] == PARKED_EVENTS_CHANNEL:
            event, problem = _event(body)
            request = None
            if event is not None:
                report.items.append({
                    "id": str(row["parked_id"]), "message_id": None, "channel": row["channel"],
                    "error_type": row["error_type"], "status": None, "attempt": None,
                    "action": "replay to the events queue"})
                continue
        else:
            request, problem = _validated(body, row["channel"])
        item: dict[str, Any] = {
            "id": str(row["parked_id"]), "message_id": row["message_id"],
            "channel": row["channel"], "error_type": row["error_type"],
            "status": status, "attempt": (row["replay_attempt"]
                                          or (row["message_attempts"] or 0) + 1),
        }
        if row["pruned"]:
            item["action"] = f"not sent: {status}, and pruned since"
        elif status in DELIVERED or status == "cancelled":
            item["action"] = f"not sent: already {status}"
        elif request is None:
            item["action"] = "skipped: " + problem
            report.skipped.append({"id": item["id"], "message_id": row["message_id"],
                                   "why": problem + ": replay it with --set-request"})
        else:
            item["action"] = "replay"
            if options.edit is not None:
                item["body"] = mask_tree(json.loads(body)).get("body")
        report.items.append(item)
    report.replayed = report.selected - report.already_delivered - len(report.skipped)
    report.by_error_type = {c["error_type"]: int(c["n"]) - int(c["delivered"]) for c in counts}
    return report
