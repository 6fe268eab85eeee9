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
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import watch_cancellations
from consumer.delivery.backoff import RetryPolicy
from consumer.delivery.decision import Park, copy_headers, decide
from consumer.delivery.pipeline import lane_of
from consumer.errors import DeliveryError, ErrorType
from consumer.logs import mask_recipient
from consumer.parking.park import park
from consumer.providers.classify import Rule, as_int, make_error, mask_recipient_in, rule
from consumer.providers.messenger import messenger_rule
from consumer.providers.twilio import twilio_rule
from consumer.providers.whatsapp import whatsapp_rule
from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.store import Campaign, Store, is_transient_db_error, resolve_policy
from consumer.topology import Names
from schemas import ProviderEvent, SendRequest

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


def _policy(settings: Settings, request: SendRequest | None,
            campaign: Campaign | None) -> RetryPolicy:
    spec = request.retry if request is not None else None
    return resolve_policy(
        settings, campaign,
        max_attempts=spec.max_attempts if spec else None,
        base_delay_s=spec.base_delay_s if spec else None,
        max_delay_s=spec.max_delay_s if spec else None,
        mode=spec.mode if spec else None,
    )


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
            try:
                while self._buffer and not self._closing:
                    batch = self._buffer[: self.max_batch]
                    del self._buffer[: self.max_batch]
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
                await asyncio.sleep(1.0)

    # -- one batch -------------------------------------------------------------------------

    async def _handle_batch(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        decoded: list[tuple[AbstractIncomingMessage, str, ProviderEvent]] = []
        for message in messages:
            try:
                event = ProviderEvent.model_validate_json(message.body)
            except ValidationError as exc:
                # Only Herald's receiver publishes here: this is a bug, not input.
                log.error("events.invalid_event", error=str(exc.errors()[:3])[:500],
                          body=message.body[:500].decode("utf-8", "replace"))
                await _ack(message)
                continue
            decoded.append((message, event_id_of(message), event))
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
                # A single event the database refuses for good: say so loudly
                # (with the event) rather than block the queue behind it.
                log.error("events.event_failed", error=repr(exc)[:500],
                          event=decoded[0][2].model_dump(mode="json"))
                await _ack(decoded[0][0])
                return
            log.warning("events.batch_split", events=len(decoded), error=repr(exc)[:300])
            for message, _, _ in decoded:
                await self._handle_batch([message])
            return
        self._batch_size.observe(len(items))
        self._batch_seconds.observe(time.perf_counter() - started)
        if actions:
            await self._retrying("broker", lambda: self.run_actions(actions))
        await _ack_batch([message for message, _, _ in decoded])

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
            policy = _policy(self.settings, request, campaign)
            pause_s: float | None = None
            if error.provider_wide:
                pause_s = (self.on_provider_wide(row["channel"], error, request)
                           if self.on_provider_wide is not None else self.settings.pause_base_s)
            # The retry budget counts from the last replay with a fresh one.
            base = await conn.fetchval(
                "SELECT attempt_base FROM messages WHERE message_id = $1", row["message_id"])
            decision = decide(error, attempt=row["attempts"], base=base or 0, policy=policy,
                              pause_s=pause_s)
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
            with structlog.contextvars.bound_contextvars(
                message_id=row["message_id"], channel=row["channel"], attempt=row["attempts"]
            ):
                log.info("events.failure_reported", provider=row["provider"],
                         error_type=error.error_type.value, error_code=error.code,
                         decision=decision.kind, delay_s=delay)
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

        Database errors that are not an outage are raised; every broker error
        is taken as one (the events stay unacked meanwhile).
        """
        delay = 0.1
        while True:
            try:
                return await operation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                from_database = component == "database" or isinstance(
                    exc, asyncpg.PostgresError | asyncpg.InterfaceError)
                if from_database and not is_transient_db_error(exc):
                    raise
                metrics.INFRA_RETRIES.labels(component).inc()
                log.warning(f"events.{component}_unavailable", error=repr(exc)[:300],
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


async def _ack_batch(messages: Sequence[AbstractIncomingMessage]) -> None:
    """Ack a processed batch with one ``multiple`` ack per AMQP channel.

    Deliveries are processed in the order they arrived, so every earlier
    delivery of the channel is done (or was acked on its own as invalid,
    which is never the last one acked here).
    """
    last: dict[int, AbstractIncomingMessage] = {}
    for message in messages:
        last[id(message.channel)] = message
    for message in last.values():
        await _ack(message, multiple=True)
