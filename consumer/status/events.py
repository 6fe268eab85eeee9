"""The events consumer (role ``events``): provider status events applied to messages.

It takes :class:`ProviderEvent` messages from ``{prefix}.events`` in batches
(whatever arrived while the previous batch was being written, up to
:attr:`EventsConsumer.max_batch`) and applies each batch in one transaction
with ``herald_apply_events`` (sql/0003): every event is stored in
``provider_events`` and moves its message forward only (sent < delivered <
read, read implying delivered, repeats changing nothing, each status time set
once). Then the batch is acked: a crash before that means redelivery, and
the stored ``event_id`` (the AMQP message id) makes the redelivered copy a
no-op.

Events that arrive before their send is recorded (a fast provider calls back
before the pipeline has committed the provider message id) are stored as
pending. Once a second the consumer applies the pending events whose
provider message id has meanwhile been recorded; pending events older than
:attr:`EventsConsumer.orphan_after_s` are marked ``orphan`` and logged.
Polling keeps this independent of the pipeline (which is not told about
events); the cost is up to a second of delay for early events, and one
index probe per second when there are none.

A failure reported after the provider accepted a send (Twilio
``undelivered``/``failed`` with ``ErrorCode``, WhatsApp ``failed`` with
``errors[]``) is classified with the provider's code table and decided as a
synchronous failure would be: retried through the delay levels as a new
attempt, re-sent without charging an attempt (provider-wide errors), or
parked. The decision is committed together with the events (message status
``retrying``/``failed``, a ``delivery_attempts`` row, and an
``event_actions`` row), and the publish happens right after the commit; an
action a crash left undone is done by the next sweep (an outbox), and a
second copy of a re-send is fenced by its attempt number in the claim.

Per attempt the first terminal report wins: a ``delivered`` that arrives
after a ``failed`` of the same provider message id is stored as
``superseded`` and does not resurrect the message (its re-send or parking
has already happened and cannot be undone); a failure reported after
``delivered``/``read`` is ``ignored``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import watch_cancellations
from consumer.delivery.decision import Park, copy_headers, decide
from consumer.delivery.pipeline import lane_of
from consumer.errors import DeliveryError, ErrorType
from consumer.logs import bound, mask_recipient
from consumer.parking.park import park
from consumer.providers.classify import Rule, as_int, make_error, mask_recipient_in, rule
from consumer.providers.messenger import messenger_rule
from consumer.providers.twilio import twilio_rule
from consumer.providers.whatsapp import whatsapp_rule
from consumer.publisher import Publisher, Unroutable
from consumer.settings import Settings
from consumer.store import Store, is_transient_db_error, retry_plan
from consumer.topology import Names
from consumer.wire import HEADER_EVENT_ID
from schemas import ProviderEvent, SendRequest
from schemas.parking import PARKED_EVENTS_CHANNEL

log = structlog.get_logger("herald.events")

T = TypeVar("T")
# A pooled connection or a plain one.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# A code no table knows, reported after acceptance, is not retried: the
# provider has already said no once, and a person can replay it from the
# parking lot (DESIGN.md §5: 'other' is not retryable).
UNKNOWN_CODE_RULE = rule(ErrorType.OTHER, retryable=False)

# Opens the message's failure domain (ChannelRegistry.provider_wide): pauses the
# channel's senders and says how long until it probes the provider again.
ProviderWideHook = Callable[[str, DeliveryError, SendRequest | None], float]


class _Stopping(Exception):
    """The service is stopping while the broker or database is away."""


# -- deciding on a reported failure (pure) ----------------------------------------------


def reported_error(
    provider: str, code: str | None, text: str | None, recipient: str | None = None
) -> DeliveryError:
    """The :class:`DeliveryError` for a failure a provider reported after accepting a send."""
    found: Rule | None = None
    if provider == "twilio":
        found = twilio_rule(code)
    elif provider == "whatsapp":
        found = whatsapp_rule(as_int(code))
    elif provider == "messenger":
        found = messenger_rule(as_int(code))
    label = {"twilio": "Twilio", "whatsapp": "WhatsApp", "messenger": "Messenger"}.get(
        provider, provider)
    message = f"{label} {code or '(no code)'} reported after acceptance: {text or 'no error text'}"
    if recipient:
        message = mask_recipient_in(message, recipient)
    return make_error(found or UNKNOWN_CODE_RULE, message, code=code or "unknown",
                      retry_after=None)


def _request(payload: Any) -> SendRequest | None:
    """The stored request (None when it no longer validates: defaults apply)."""
    try:
        return SendRequest.model_validate(payload)
    except ValidationError:
        return None


def event_item(idx: int, event: ProviderEvent, event_id: str, row_id: int | None = None
               ) -> dict[str, Any]:
    """One element of ``herald_apply_events``' input."""
    item = event.model_dump(mode="json")
    item.update(idx=idx, id=row_id, event_id=event_id)
    return item


def event_id_of(message: AbstractIncomingMessage) -> str:
    """The event's id: its AMQP message id (a UUID from the receiver), else one
    derived from the body so that a redelivered copy is still recognised."""
    if message.message_id:
        try:
            return str(uuid.UUID(message.message_id))
        except ValueError:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"herald-event:{message.message_id}"))
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "herald-event-body:" + message.body.hex()))


# Errors that mean the broker is away (or the topology is not there yet): waited out.
BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError, Unroutable)

# SQLSTATE classes that say nothing about an event but about the database: its
# schema is not migrated (yet), or Herald may not use it. Every event would be
# refused alike, so they are waited out like an outage, not parked one by one.
_SCHEMA_SQLSTATE_CLASSES = ("42", "3F", "3D", "28")


def waits_for_database(exc: BaseException) -> bool:
    """True when a database error is the database's state rather than the event's."""
    if is_transient_db_error(exc):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in _SCHEMA_SQLSTATE_CLASSES


def refused(exc: BaseException, recipient: str | None = None) -> DeliveryError:
    """Why the database (or the consumer) would not apply one event, as a parking reason.

    Only the error's first line: PostgreSQL's detail quotes the whole row
    (recipient included), and the reason goes to logs, headers and notices.
    """
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and state:
        # Data exceptions and integrity violations are about what the event says.
        kind = ErrorType.INVALID_PAYLOAD if state[:2] in ("22", "23") else ErrorType.OTHER
        text, code = f"the database refused this event: {exc.args[0] if exc.args else ''}", state
    else:
        text = f"applying this event failed: {type(exc).__name__}: {exc}"
        kind, code = ErrorType.OTHER, type(exc).__name__
    text = text.splitlines()[0][:1000] if text else text
    if recipient:
        text = mask_recipient_in(text, recipient)
    return DeliveryError(kind, text, code=code, retryable=False)


def _problems(exc: ValidationError) -> str:
    found = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
             for e in exc.errors()[:3]]
    return "; ".join(found) + (f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3
                               else "")


# -- the consumer --------------------------------------------------------------------------


class EventsConsumer:
    """Consumes ``{prefix}.events`` and applies the events in batches (a Component)."""

    name = "events"

    # Tunables (class attributes so tests and benchmarks can change them).
    max_batch = 1000
    prefetch = 4000
    sweep_interval_s = 1.0
    orphan_after_s = 3600.0
    # An action still undone after this long is taken to be abandoned by a
    # process that died, and is done by the sweep.
    action_retry_after_s = 30.0
    stop_grace_s = 10.0

    def __init__(
        self,
        *,
        connection: AbstractRobustConnection,
        names: Names,
        pool: asyncpg.Pool,
        store: Store,
        settings: Settings,
        on_provider_wide: ProviderWideHook | None = None,
    ) -> None:
        self.connection = connection
        self.names = names
        self.pool = pool
        self.store = store
        self.settings = settings
        self.on_provider_wide = on_provider_wide
        self.publisher = Publisher(connection, names)
        self._buffer: list[AbstractIncomingMessage] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        # The deliveries of the batch in hand already acked (by id), so that a
        # batch that fails part-way hands back exactly the others.
        self._settled: set[int] = set()
        self._batch_size = metrics.DB_BATCH_SIZE.labels("events")
        self._batch_seconds = metrics.DB_BATCH_SECONDS.labels("events")

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        channel = await self.connection.channel(publisher_confirms=False)
        self._channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        # declare_queue (passive), not get_queue: only a queue declared on the robust
        # channel is consumed again after a broker cancel or a reconnection.
        self._queue = await channel.declare_queue(self.names.events, passive=True)
        await watch_cancellations(channel, self.names.events)
        self._tag = await self._queue.consume(self._on_message)
        self._task = asyncio.create_task(self._run(), name="events-consumer")
        log.info("events.started", queue=self.names.events, max_batch=self.max_batch)

    async def stop(self) -> None:
        """Stop taking events, finish the batch in hand, leave the rest unacked."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception as exc:
                log.warning("events.cancel_failed", error=repr(exc))
        self._tag = None
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=self.stop_grace_s)
            if not done:
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                log.error("events.loop_failed", error=repr(exc))
        if self._channel is not None and not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as exc:
                log.warning("events.close_failed", error=repr(exc))
        await self.publisher.close()
        self._buffer.clear()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = 0.0
        while not self._closing:
            wait = max(0.0, last_sweep + self.sweep_interval_s - loop.time())
            if not self._buffer:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
            self._wakeup.clear()
            batch: list[AbstractIncomingMessage] = []
            try:
                while self._buffer and not self._closing:
                    batch = self._buffer[: self.max_batch]
                    del self._buffer[: self.max_batch]
                    self._settled.clear()
                    await self._handle_batch(batch)
                    if loop.time() - last_sweep >= self.sweep_interval_s:
                        break  # let the sweep run even during a long burst
                if not self._closing and loop.time() - last_sweep >= self.sweep_interval_s:
                    last_sweep = loop.time()
                    await self.sweep()
            except _Stopping:
                return
            except Exception as exc:  # a bug must not end the loop for good
                log.error("events.batch_failed", error=repr(exc)[:500], exc_info=exc)
                # Whatever of the batch is not settled goes back to the queue: held
                # unacked, it would take up prefetch until a restart.
                await self._hand_back(batch)
                await asyncio.sleep(1.0)

    # -- one batch -------------------------------------------------------------------------

    async def _handle_batch(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Apply a batch of deliveries and settle every one of them: applied and
        acked, or parked (with its raw body, for an operator to see and replay)
        and acked. Only a stop while the broker or database is away leaves some
        unacked, for the broker to deliver again."""
        decoded: list[tuple[AbstractIncomingMessage, str, ProviderEvent]] = []
        for message in messages:
            try:
                event = ProviderEvent.model_validate_json(message.body)
            except ValidationError as exc:
                # Only Herald's receiver publishes here, but a body from another
                # version, or another publisher, must not take anything with it.
                await self._park_event(message, None, DeliveryError(
                    ErrorType.INVALID_PAYLOAD, "not a provider event: " + _problems(exc),
                    code="event_schema"))
                continue
            decoded.append((message, event_id_of(message), event))
        await self._apply_and_ack(decoded)

    async def _apply_and_ack(
        self, decoded: Sequence[tuple[AbstractIncomingMessage, str, ProviderEvent]]
    ) -> None:
        """Apply events in one transaction, then ack them. When the database
        refuses the batch (not an outage: those are waited out), halve it until
        the event it refuses is alone, and park that one."""
        if not decoded:
            return
        items = [event_item(i, event, event_id) for i, (_, event_id, event) in enumerate(decoded)]
        started = time.perf_counter()
        try:
            actions = await self._retrying("database", lambda: self.apply(items))
        except _Stopping:
            raise
        except Exception as exc:
            if len(decoded) == 1:
                message, _, event = decoded[0]
                metrics.EVENTS_APPLIED.labels(event.provider, event.status, "parked").inc()
                await self._park_event(message, event, refused(exc, event.recipient))
                return
            half = len(decoded) // 2
            log.warning("events.batch_split", events=len(decoded), error=repr(exc)[:300])
            # In delivery order: each half is settled before the next is taken, so a
            # multiple ack never covers a delivery not yet done with.
            await self._apply_and_ack(decoded[:half])
            await self._apply_and_ack(decoded[half:])
            return
        self._batch_size.observe(len(items))
        self._batch_seconds.observe(time.perf_counter() - started)
        if actions:
            try:
                await self._retrying("broker", lambda: self.run_actions(actions))
            except _Stopping:
                raise
            except Exception as exc:
                # The events and their decisions are committed, and the actions wait
                # in the outbox (event_actions), which the sweep keeps trying: the
                # events themselves are done with.
                log.error("events.actions_failed", actions=len(actions), error=repr(exc)[:500],
                          exc_info=exc)
        await self._ack_batch([message for message, _, _ in decoded])

    async def _park_event(self, message: AbstractIncomingMessage, event: ProviderEvent | None,
                          error: DeliveryError) -> None:
        """Park one event exactly as it arrived (see :mod:`consumer.parking.park`),
        then ack it; ``herald parked replay`` puts it back on ``{prefix}.events``."""
        event_id = event_id_of(message)
        parked_id = await park(
            self.publisher, self.store, body=message.body, channel=PARKED_EVENTS_CHANNEL,
            message_id=None, attempt=1, error=error,
            recipient=event.recipient if event is not None else None, campaign_id=None,
            parked_at=datetime.now(UTC), content_type=message.content_type,
            headers={HEADER_EVENT_ID: event_id}, run=self._park_step,
        )
        log.error("events.parked", parked_id=str(parked_id), event_id=event_id,
                  provider=event.provider if event is not None else None,
                  error_type=error.error_type.value, error_code=error.code,
                  error=error.message[:500])
        await self._ack_one(message)

    async def _park_step(self, component: str, step: Callable[[], Awaitable[Any]]) -> Any:
        if component == "broker":
            return await self._retrying("broker", step)
        try:
            return await self._retrying("database", step)
        except _Stopping:
            raise
        except Exception as exc:
            # The copy is in the parking queue already (confirmed): `herald parked
            # sync` indexes it. Not worth holding the event for.
            log.error("events.park_index_failed", error=repr(exc)[:500])
            return None

    async def _ack_batch(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Ack a processed batch with one ``multiple`` ack per AMQP channel.

        Deliveries are processed in the order they arrived, so every earlier
        delivery of the channel is done (applied, or parked and acked on its own).
        """
        last: dict[int, AbstractIncomingMessage] = {}
        for message in messages:
            with contextlib.suppress(ChannelInvalidStateError):
                # (A closed channel's deliveries are back in the queue already.)
                last[id(message.channel)] = message
        for message in last.values():
            await _ack(message, multiple=True)
        self._settled.update(id(message) for message in messages)

    async def _ack_one(self, message: AbstractIncomingMessage) -> None:
        await _ack(message)
        self._settled.add(id(message))

    async def _hand_back(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Return the deliveries of a batch that are not settled to the queue
        (with RabbitMQ's requeue: at the tail; events may come in any order)."""
        for message in messages:
            if id(message) in self._settled:
                continue
            try:
                # reject, not nack: from RabbitMQ 4.3 on only a reject counts as a
                # delivery, and the queue's delivery limit must see an event that
                # keeps coming back.
                await message.reject(requeue=True)
            except Exception as exc:  # the channel died: the broker has them back already
                log.warning("events.nack_lost", error=repr(exc)[:200])
        self._settled.clear()

    async def apply(self, items: list[dict[str, Any]]) -> list[int]:
        """Apply events in one transaction; returns the ids of the actions to carry out."""
        async with self.pool.acquire() as conn, conn.transaction():
            return await self._apply_in(conn, items)

    async def _apply_in(self, conn: Connection, items: list[dict[str, Any]]) -> list[int]:
        rows = await conn.fetch("SELECT * FROM herald_apply_events($1::text::jsonb)",
                                json.dumps(items))
        failures = [r for r in rows if r["outcome"] == "failure"]
        decided: dict[int, str] = {}
        actions: list[int] = []
        if failures:
            decided, actions = await self._decide_failures(conn, failures)
        by_idx = {r["idx"]: r for r in rows}
        counts: Counter[tuple[str, str, str]] = Counter()
        for item in items:
            row = by_idx.get(item["idx"])
            result = ("redelivered" if row is None
                      else decided.get(row["row_id"]) or row["outcome"] or "pending")
            counts[(item["provider"], item["status"], result)] += 1
        for labels, count in counts.items():
            metrics.EVENTS_APPLIED.labels(*labels).inc(count)
        return actions

    async def _decide_failures(
        self, conn: Connection, failures: Sequence[asyncpg.Record]
    ) -> tuple[dict[int, str], list[int]]:
        """Retry, pause or park each message a failure report is about (rows locked),
        with the pipeline's own decision and re-sent copy (consumer.delivery.decision)."""
        records: list[dict[str, Any]] = []
        actions: list[dict[str, Any]] = []
        outcomes: dict[int, str] = {}
        for idx, row in enumerate(failures):
            error = reported_error(row["provider"], row["error_code"], row["error_text"],
                                   row["recipient"])
            request = _request(row["payload"])
            campaign = None
            if request is not None and request.campaign_id is not None:
                campaign = await self.store.campaign(request.campaign_id)
            plan = retry_plan(self.settings, channel=row["channel"],
                              spec=request.retry if request is not None else None,
                              campaign_id=row["campaign_id"], campaign=campaign,
                              book=await self.store.rule_book())
            pause_s: float | None = None
            if error.provider_wide:
                pause_s = (self.on_provider_wide(row["channel"], error, request)
                           if self.on_provider_wide is not None else self.settings.pause_base_s)
            # The retry budgets count from the last replay with a fresh one, each the
            # failures of its kind since then (consumer.delivery.rules).
            found = await conn.fetchrow(
                """SELECT m.attempt_base,
                          (SELECT COALESCE(jsonb_agg(jsonb_build_array(t.error_type,
                                                     t.error_code, t.n)), '[]'::jsonb)
                             FROM (SELECT a.error_type, a.error_code, count(*) AS n
                                     FROM delivery_attempts a
                                    WHERE a.message_id = m.message_id
                                      AND a.attempt > m.attempt_base AND a.attempt < $2
                                      AND a.outcome IN ('retrying', 'failed')
                                      AND a.error_type IS NOT NULL
                                    GROUP BY 1, 2) t) AS history
                     FROM messages m WHERE m.message_id = $1""",
                row["message_id"], row["attempts"])
            base = found["attempt_base"] if found is not None else 0
            history = {(t, c): int(n) for t, c, n in (found["history"] if found else [])}
            decision = decide(error, attempt=row["attempts"], base=base or 0, plan=plan,
                              history=history, pause_s=pause_s)
            delay = 0 if isinstance(decision, Park) else decision.delay_s
            next_at = datetime.now(UTC) + timedelta(seconds=delay) if delay else None
            outcome = {"retry": "retrying", "pause": "paused", "park": "failed"}[decision.kind]
            records.append({
                "idx": idx, "message_id": row["message_id"], "attempt": row["attempts"],
                "outcome": outcome, "started_at": row["occurred_at"].isoformat(),
                "latency_ms": None, "provider": row["provider"],
                "provider_message_id": row["provider_message_id"],
                "error_type": error.error_type.value, "error_code": error.code,
                "error_text": error.message[:2000],
                "next_attempt_at": None if next_at is None else next_at.isoformat(),
                "retry_rule": decision.rule,
            })
            actions.append({
                "event_row": row["row_id"], "message_id": row["message_id"],
                "kind": {"retry": "resend"}.get(decision.kind, decision.kind),
                "channel": row["channel"],
                "attempt": row["attempts"] if isinstance(decision, Park) else decision.attempt,
                "attempt_base": base or 0,
                "lane": lane_of(request, campaign) if request is not None else "main",
                "delay_s": delay, "error_type": error.error_type.value,
                "error_code": error.code, "error_text": error.message[:2000],
                "parked_id": str(uuid.uuid4()) if isinstance(decision, Park) else None,
            })
            outcomes[row["row_id"]] = decision.kind
            with bound(
                message_id=row["message_id"], channel=row["channel"], attempt=row["attempts"]
            ):
                log.info("events.failure_reported", provider=row["provider"],
                         error_type=error.error_type.value, error_code=error.code,
                         decision=decision.kind, delay_s=delay,
                         rule=decision.rule)
        await conn.fetch("SELECT * FROM herald_record_batch($1::text::jsonb)",
                         json.dumps(records))
        ids = await conn.fetch(
            """INSERT INTO event_actions (event_row, message_id, kind, channel, attempt,
                                          attempt_base, lane, delay_s, error_type, error_code,
                                          error_text, parked_id)
               SELECT event_row, message_id, kind, channel, attempt, attempt_base, lane,
                      delay_s, error_type, error_code, error_text, parked_id
                 FROM jsonb_to_recordset($1::text::jsonb) AS x(
                      event_row bigint, message_id text, kind text, channel text,
                      attempt integer, attempt_base integer, lane text, delay_s integer,
                      error_type text, error_code text, error_text text, parked_id uuid)
               RETURNING id""",
            json.dumps(actions),
        )
        await conn.execute(
            """UPDATE provider_events p SET outcome = x.outcome
                 FROM unnest($1::bigint[], $2::text[]) AS x(id, outcome)
                WHERE p.id = x.id""",
            list(outcomes), list(outcomes.values()),
        )
        return outcomes, [r["id"] for r in ids]

    # -- actions (the outbox) ----------------------------------------------------------------

    async def run_actions(self, ids: Sequence[int] | None = None) -> int:
        """Carry out undone actions: those in ``ids``, or (None) those abandoned for a while.

        The rows stay locked while their copies are published, so a sweep of
        another replica skips them. Returns how many were done.
        """
        failed: list[BaseException] = []
        async with self.pool.acquire() as conn, conn.transaction():
            select = """SELECT a.*, m.payload, m.recipient, m.campaign_id, m.queued_at
                          FROM event_actions a JOIN messages m USING (message_id)
                         WHERE a.done_at IS NULL AND {where}
                         ORDER BY a.id LIMIT 500
                           FOR UPDATE OF a SKIP LOCKED"""
            if ids is not None:
                rows = await conn.fetch(select.format(where="a.id = ANY($1::bigint[])"),
                                        list(ids))
            else:
                rows = await conn.fetch(
                    select.format(where="a.created_at < now() - make_interval(secs => $1)"),
                    self.action_retry_after_s)
            if not rows:
                return 0
            results = await asyncio.gather(*(self._perform(r) for r in rows),
                                           return_exceptions=True)
            done = [r["id"] for r, result in zip(rows, results, strict=True)
                    if not isinstance(result, BaseException)]
            failed = [result for result in results if isinstance(result, BaseException)]
            if done:
                await conn.execute(
                    "UPDATE event_actions SET done_at = now() WHERE id = ANY($1::bigint[])", done)
        if failed:
            raise failed[0]
        return len(rows)

    async def _perform(self, action: asyncpg.Record) -> None:
        error = DeliveryError(ErrorType(action["error_type"]), action["error_text"] or "",
                              code=action["error_code"])
        body = json.dumps(action["payload"]).encode()
        if action["kind"] in ("resend", "pause"):
            # End-to-end time counts from the first sight of the message.
            first_seen = action["queued_at"].timestamp() if action["queued_at"] else None
            headers = copy_headers(attempt=action["attempt"], base=action["attempt_base"],
                                   first_seen=first_seen, error=error)
            await self.publisher.publish_delayed(
                action["channel"], body, action["delay_s"], headers=headers,
                message_id=action["message_id"], lane=action["lane"],
            )
            if action["kind"] == "pause":
                metrics.DEFERRED.labels(action["channel"], "provider_wide").inc()
            else:
                metrics.RETRIED.labels(action["channel"], error.error_type.value).inc()
            return
        await self._park(action, body, error)

    async def _park(self, action: asyncpg.Record, body: bytes, error: DeliveryError) -> None:
        """Park as the pipeline does (see :mod:`consumer.parking.park`)."""
        await park(
            self.publisher, self.store, body=body, channel=action["channel"],
            message_id=action["message_id"], attempt=action["attempt"], error=error,
            recipient=action["recipient"], campaign_id=action["campaign_id"],
            parked_at=datetime.now(UTC), parked_id=action["parked_id"],
            body_limit=self.settings.max_body_bytes,
        )
        log.warning("delivery.parked", message_id=action["message_id"],
                    channel=action["channel"], error_type=error.error_type.value,
                    error_code=error.code, to=action["recipient"], source="provider_report")

    # -- the sweep -------------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Apply pending events that can now be, mark old ones orphans, redo lost actions."""
        try:
            actions = await self.apply_pending()
            if actions:
                await self.run_actions(actions)
            await self.mark_orphans()
            await self.run_actions(None)
        except Exception as exc:
            if not is_transient_db_error(exc):
                log.error("events.sweep_failed", error=repr(exc)[:500], exc_info=exc)
            else:
                log.warning("events.sweep_failed", error=repr(exc)[:300])

    async def apply_pending(self) -> list[int]:
        """Apply stored pending events whose provider message id is now known."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT p.id, p.event_id, p.provider, p.provider_message_id, p.status,
                          p.occurred_at, p.recipient, p.error_code, p.error_text, p.watermark,
                          p.raw
                     FROM provider_events p
                    WHERE p.outcome IS NULL
                      AND (p.provider_message_id IS NULL
                           OR EXISTS (SELECT 1 FROM messages m
                                       WHERE m.provider = p.provider
                                         AND m.provider_message_id = p.provider_message_id
                                         AND m.provider_message_id IS NOT NULL)
                           OR EXISTS (SELECT 1 FROM provider_events q
                                       WHERE q.provider = p.provider
                                         AND q.provider_message_id = p.provider_message_id
                                         AND q.message_id IS NOT NULL))
                    ORDER BY p.id LIMIT $1
                      FOR UPDATE OF p SKIP LOCKED""",
                self.max_batch,
            )
            if not rows:
                return []
            items = []
            for idx, r in enumerate(rows):
                event = ProviderEvent(
                    provider=r["provider"], provider_message_id=r["provider_message_id"],
                    status=r["status"], occurred_at=r["occurred_at"], recipient=r["recipient"],
                    error_code=r["error_code"], error_text=r["error_text"],
                    watermark=r["watermark"], raw=r["raw"],
                )
                items.append(event_item(idx, event, str(r["event_id"]), r["id"]))
            # The pending rows stay locked (SKIP LOCKED keeps another replica off them).
            return await self._apply_in(conn, items)

    async def mark_orphans(self) -> int:
        rows = await self.pool.fetch(
            """UPDATE provider_events SET outcome = 'orphan', applied_at = now()
                WHERE outcome IS NULL AND stored_at < now() - make_interval(secs => $1)
            RETURNING provider, provider_message_id, status, recipient, stored_at""",
            self.orphan_after_s,
        )
        for r in rows[:20]:
            log.warning("events.orphan", provider=r["provider"],
                        provider_message_id=r["provider_message_id"], status=r["status"],
                        recipient=mask_recipient(r["recipient"]),
                        stored_at=r["stored_at"].isoformat())
        if len(rows) > 20:
            log.warning("events.orphans_more", count=len(rows) - 20)
        for r in rows:
            metrics.EVENTS_APPLIED.labels(r["provider"], r["status"], "orphan").inc()
        return len(rows)

    # -- infrastructure ------------------------------------------------------------------------

    async def _retrying(self, component: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` until it succeeds while the broker or database is away.

        Other errors are raised: a database error that is not an outage (nor a
        schema not migrated yet, see :func:`waits_for_database`), and anything
        that is neither a database nor a broker error (a bug does not go away
        by waiting; the events stay unacked meanwhile).
        """
        delay = 0.1
        while True:
            try:
                return await operation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                away = component
                if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError
                              | asyncpg.InternalClientError):
                    away = "database"
                    wait = waits_for_database(exc)
                elif component == "database":
                    wait = is_transient_db_error(exc)  # the connection: OSError, a timeout
                else:
                    wait = isinstance(exc, BROKER_ERRORS)
                if not wait:
                    raise
                metrics.INFRA_RETRIES.labels(away).inc()
                log.warning(f"events.{away}_unavailable", error=repr(exc)[:300],
                            retry_in_s=round(delay, 2))
                if self._closing:
                    raise _Stopping() from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


async def _ack(message: AbstractIncomingMessage, *, multiple: bool = False) -> None:
    try:
        await message.ack(multiple=multiple)
    except Exception as exc:  # the channel died: the broker redelivers, the event_id dedupes
        log.warning("events.ack_lost", error=repr(exc)[:200])
