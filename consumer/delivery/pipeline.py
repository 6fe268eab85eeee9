"""The delivery pipeline of one message (DESIGN.md §5).

decode → expiry / send_at → claim → send → classify → record → republish or
park → ack. The ack is always last and happens in exactly one place
(:meth:`Pipeline.process`): a crash anywhere before it means the broker
redelivers the message, and the idempotent claim in PostgreSQL turns that
redelivery into no second send.

Order of the final steps: a retry or a park is *published first* (and
confirmed), *then* its outcome is committed, *then* the delivery is acked.
Committing first would lose the message if the process died before the
publish (the redelivered copy would look already handled); publishing first
at worst leaves an extra copy, which the claim's attempt fencing recognises
as stale.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from consumer import metrics
from consumer.delivery import quota
from consumer.delivery.decision import (
    Park,
    Pause,
    Retry,
    copy_headers,
    decide,
    defer_seconds,
    deferred_headers,
)
from consumer.delivery.outage import outage_key
from consumer.delivery.recipients import validate_recipient
from consumer.delivery.rules import RetryPlan
from consumer.errors import DeliveryError, ErrorType, Unstorable
from consumer.logs import bound
from consumer.parking.park import park
from consumer.providers.base import Provider
from consumer.publisher import Publisher
from consumer.settings import DEFAULT_MAX_BODY_BYTES, Settings
from consumer.store import (
    Campaign,
    Claim,
    RecordOutcome,
    Store,
    is_data_error,
    is_transient_db_error,
    retry_plan,
)
from consumer.text import storable
from consumer.wire import PER_ATTEMPT, CopyHeaders, read_copy_headers
from schemas import SendRequest
from schemas.send_request import MAX_NESTING

# How often the successes are summed up in the log (each is a debug line).
SENT_SUMMARY_S = 10.0

log = structlog.get_logger("herald.pipeline")

T = TypeVar("T")


# A message whose body is larger than this (HERALD_MAX_BODY_BYTES's default) is
# parked without being parsed.
MAX_BODY_BYTES = DEFAULT_MAX_BODY_BYTES
# Extra lease beyond the send timeout, so a live consumer's claim never runs out
# while it is still waiting for the provider.
LEASE_MARGIN_S = 5.0


class ChannelHooks(Protocol):
    """What the pipeline asks of the channels and failure domains (see
    :class:`consumer.delivery.registry.ChannelRegistry`)."""

    def domain_of(self, channel: str, request: SendRequest | None) -> str:
        """The message's failure domain."""
        ...

    def admit(self, channel: str, domain: str, *, first: bool) -> float | None:
        """None to send now; seconds to defer by when the domain is open or probing."""
        ...

    async def acquire(self, channel: str, domain: str, lane: str) -> None:
        """Wait for the domain's rate limiter to allow one more send."""
        ...

    def succeeded(self, channel: str, domain: str, *, first: bool, key: str) -> None:
        """A send went through (closes a probing domain, feeds the adaptive rate)."""
        ...

    def failed(self, channel: str, domain: str, error: DeliveryError, *, first: bool,
               key: str) -> float | None:
        """A send failed; seconds to pause the message (uncharged) when its domain is
        open, else None."""
        ...


class Stopping(Exception):
    """The service is stopping: leave the message unacked so the broker requeues it."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery (returned for tests and metrics)."""

    result: str  # sent | retrying | parked | expired | deferred | duplicate | paused
    message_id: str | None = None
    attempt: int = 1
    error_type: str | None = None


@dataclass(frozen=True)
class AttemptMade:
    """One attempt that was made, for recording its outcome."""

    attempt: int
    base: int  # attempts before the last fresh budget
    started: datetime
    latency_ms: float
    provider: str
    lane: str


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        providers: Mapping[str, Provider],
        *,
        instance_id: str,
        stopping: asyncio.Event,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        hooks: ChannelHooks | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.providers = providers
        self.instance_id = instance_id
        self.stopping = stopping
        self.now = now
        self.hooks = hooks
        self.lease_s = settings.send_timeout_s + LEASE_MARGIN_S
        self._sent_counts: dict[str, int] = {}
        self._summary_since = time.monotonic()

    # -- the one place that acks ------------------------------------------------

    async def process(
        self, message: AbstractIncomingMessage, channel: str, lane: str = "main", *,
        ack: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome | None:
        """Handle one delivery and ack it last (with ``ack`` when given: the lane's
        coalesced acks). Returns None when left unacked."""
        metrics.child(metrics.CONSUMED, channel).inc()
        try:
            with bound(channel=channel):
                outcome = await self._handle(message, channel, lane)
        except Stopping:
            log.info("delivery.left_for_redelivery", channel=channel)
            return None
        try:
            await (message.ack() if ack is None else ack())
        except Exception as exc:  # the channel died: the broker will redeliver
            log.warning("delivery.ack_lost", channel=channel, error=repr(exc))
        return outcome

    # -- steps --------------------------------------------------------------------

    async def _handle(
        self, message: AbstractIncomingMessage, channel: str, lane: str
    ) -> Outcome:
        headers = dict(message.headers or {})
        copy = read_copy_headers(headers, now=self.now().timestamp())
        if copy.ignored:
            log.warning("delivery.headers_ignored", headers=list(copy.ignored),
                        note="out of range or not a number; a publisher should not set them")
        if copy.first_seen is None:
            copy = replace(copy, first_seen=_published_at(message))
        request, problem = decode_request(message.body, channel,
                                          max_bytes=self.settings.max_body_bytes)
        if request is None:
            await self._park_invalid(message, channel, copy.attempt, problem)
            return Outcome("parked", None, copy.attempt, ErrorType.INVALID_PAYLOAD)

        with bound(
            message_id=request.message_id, campaign_id=request.campaign_id,
            attempt=copy.attempt
        ):
            if copy.problem is not None:
                await self._park_invalid(message, channel, copy.attempt, copy.problem,
                                         request=request)
                return Outcome("parked", request.message_id, copy.attempt,
                               ErrorType.INVALID_PAYLOAD)
            try:
                return await self._handle_request(message, request, headers, copy, lane)
            except Unstorable as exc:
                # Refused before the send (nothing was sent): this message alone is
                # parked; handing it back would only bring it round again.
                await self._park_invalid(message, channel, copy.attempt, str(exc),
                                         request=request)
                return Outcome("parked", request.message_id, copy.attempt,
                               ErrorType.INVALID_PAYLOAD)

    async def _handle_request(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        headers: dict[str, Any],
        copy: CopyHeaders,
        arrived_on: str,
    ) -> Outcome:
        attempt = copy.attempt
        channel = request.channel
        now = self.now()

        if request.is_expired(now):
            await self._infra(
                "database",
                lambda: self.store.record_expired(
                    message_id=request.message_id, channel=channel, recipient=request.to,
                    campaign_id=request.campaign_id, payload=_payload(request),
                ),
                before_send=True,
            )
            metrics.EXPIRED.labels(channel).inc()
            log.info("delivery.expired", to=request.to)
            return Outcome("expired", request.message_id, attempt)

        campaign = await self._campaign(request)
        lane = lane_of(request, campaign)
        due_at = _due_at(copy, request)
        if due_at is not None and (due_at - now).total_seconds() >= 1:
            return await self._defer(message, request, headers, copy, due_at, "send_at", lane)
        if lane != arrived_on:
            # Campaign traffic published on the transactional key moves to its lane.
            return await self._divert(message, request, headers, copy, lane)

        # A first attempt counts from the last fresh budget (only those feed outage
        # detection and take a campaign's first-attempt quota).
        first = used_first(copy)
        if campaign is not None:
            window = quota.zone(campaign.timezone)
            quiet_end = quota.quiet_until(now, window, campaign.quiet_start, campaign.quiet_end)
            if quiet_end is not None:
                return await self._defer(message, request, headers, copy, quiet_end,
                                         "quiet_hours", lane)
        domain = self.hooks.domain_of(channel, request) if self.hooks else channel
        if self.hooks is not None:
            wait = self.hooks.admit(channel, domain, first=first)
            if wait is not None:
                return await self._defer(message, request, headers, copy,
                                         now + timedelta(seconds=wait), "domain_open", lane)
        if campaign is not None and campaign.daily_limit is not None and not await self._take_quota(
                campaign, request.message_id, quota.zone(campaign.timezone), now, first=first):
            tomorrow = quota.next_day_start(now, quota.zone(campaign.timezone))
            return await self._defer(message, request, headers, copy, tomorrow,
                                     "daily_limit", lane)
        if self.hooks is not None:
            await self.hooks.acquire(channel, domain, lane)
        claim = await self._claim(request, message.body, attempt, copy.base,
                                  urgent=lane == "main")
        if claim is None:
            metrics.DUPLICATES.labels(channel).inc()
            return Outcome("duplicate", request.message_id, attempt)
        try:
            return await self._send_and_settle(message, request, headers, copy, claim,
                                               campaign, domain, first, lane)
        except Unstorable as exc:
            # Every step after the send deals with a refusal itself; one that got
            # here must not be taken for a refusal before the send (that parks).
            raise RuntimeError(f"refusal after the send left unhandled: {exc}") from exc

    async def _send_and_settle(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        headers: dict[str, Any],
        copy: CopyHeaders,
        claim: Claim,
        campaign: Campaign | None,
        domain: str,
        first: bool,
        lane: str,
    ) -> Outcome:
        """Send the claimed attempt, then record, retry or park it."""
        channel, attempt = request.channel, copy.attempt
        # The budget counts from the base PostgreSQL granted, not from the header.
        base = claim.attempt_base
        provider = self.providers[channel]
        started = self.now()
        t0 = time.perf_counter()
        provider_message_id: str | None = None
        problem = validate_recipient(channel, request.to)
        if problem is not None:
            # Not worth a call: the provider would refuse it (and might charge for it).
            error: DeliveryError | None = DeliveryError(
                ErrorType.INVALID_RECIPIENT, problem, code="recipient", retryable=False)
        else:
            error = None
            try:
                async with asyncio.timeout(self.settings.send_timeout_s):
                    result = await provider.send(request, attempt)
                provider_message_id = result.provider_message_id
            except DeliveryError as exc:
                error = exc
            except TimeoutError:
                error = DeliveryError(
                    ErrorType.PROVIDER_ERROR,
                    f"no answer within {self.settings.send_timeout_s:g} s",
                    code="timeout",
                    retryable=True,
                )
            except Exception as exc:  # an adapter bug must not take the consumer down
                log.exception("delivery.adapter_error", provider=provider.name)
                error = DeliveryError(ErrorType.OTHER, f"{type(exc).__name__}: {exc}",
                                      retryable=False)
            metrics.child(metrics.PROVIDER_LATENCY, channel, provider.name).observe(
                time.perf_counter() - t0)
        attempt_made = AttemptMade(attempt, base, started, (time.perf_counter() - t0) * 1000.0,
                                   provider.name, lane)

        if error is None:
            await self._record(
                message_id=request.message_id, attempt=attempt, outcome="sent",
                started_at=started, latency_ms=attempt_made.latency_ms,
                provider=provider.name, provider_message_id=provider_message_id,
                urgent=lane == "main",
            )
            metrics.child(metrics.SENT, channel).inc()
            metrics.child(metrics.ATTEMPTS, channel, provider.name, "sent", "").inc()
            if copy.first_seen is not None:
                metrics.child(metrics.END_TO_END, channel).observe(
                    max(0.0, time.time() - copy.first_seen))
            if self.hooks is not None:
                self.hooks.succeeded(channel, domain, first=first, key=outage_key(request))
            # One line per success would be most of the log at volume (and a tenth
            # of the CPU): debug, and an info summary per channel (see _sent_summary).
            log.debug("delivery.sent", provider_message_id=provider_message_id,
                      latency_ms=round(attempt_made.latency_ms, 1))
            self._sent_summary(channel)
            return Outcome("sent", request.message_id, attempt)

        metrics.ATTEMPTS.labels(channel, provider.name, "failed", error.error_type.value).inc()
        pause_s = None
        if self.hooks is not None:
            pause_s = self.hooks.failed(channel, domain, error, first=first,
                                        key=outage_key(request))
        # Built on failures only: a success never pays for the retry rules.
        plan = await self._plan(request, campaign)
        history = None
        if error.retryable and pause_s is None and not error.provider_wide \
                and plan.needs_history(attempt=attempt, base=base):
            # Only a failure after another since the base pays for this query.
            history = await self._infra("database", lambda: self.store.failure_history(
                request.message_id, base=base, before=attempt))
        decision = decide(error, attempt=attempt, base=base, plan=plan, history=history,
                          pause_s=pause_s)
        if isinstance(decision, Park):
            return await self._park(message, request, error, attempt_made, decision)
        return await self._send_again(message, request, headers, copy, error, decision,
                                      attempt_made)

    def _sent_summary(self, channel: str) -> None:
        """Count a success; every SENT_SUMMARY_S, log the counts per channel (info)."""
        self._sent_counts[channel] = self._sent_counts.get(channel, 0) + 1
        now = time.monotonic()
        if now - self._summary_since < SENT_SUMMARY_S:
            return
        counts, self._sent_counts = self._sent_counts, {}
        over_s, self._summary_since = now - self._summary_since, now
        # Logged outside this message's context: the line is about no one message.
        asyncio.get_running_loop().call_soon(
            lambda: log.info("delivery.sent_summary", sent=counts, over_s=round(over_s, 1)),
            context=contextvars.Context())

    async def _campaign(self, request: SendRequest) -> Campaign | None:
        if request.campaign_id is None:
            return None
        campaign_id = request.campaign_id
        return await self._infra("database", lambda: self.store.campaign(campaign_id),
                                 before_send=True)

    async def _plan(self, request: SendRequest, campaign: Campaign | None) -> RetryPlan:
        book = await self._infra("database", self.store.rule_book)
        return retry_plan(self.settings, channel=request.channel, spec=request.retry,
                          campaign_id=request.campaign_id, campaign=campaign, book=book)

    async def _take_quota(
        self, campaign: Campaign, message_id: str, window: ZoneInfo, now: datetime, *,
        first: bool,
    ) -> bool:
        day = quota.local_day(now, window)
        _, day_end = quota.day_bounds(day, window)
        limit = campaign.daily_limit or 0
        return await self._infra(
            "database",
            lambda: self.store.take_quota(campaign.campaign_id, message_id, day, first=first,
                                          limit=limit, day_end=day_end),
            before_send=True,
        )

    async def _divert(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        headers: dict[str, Any],
        copy: CopyHeaders,
        lane: str,
    ) -> Outcome:
        forwarded = deferred_headers(headers, attempt=copy.attempt, base=copy.base,
                                     first_seen=copy.first_seen)
        await self._infra(
            "broker",
            lambda: self.publisher.publish_send(
                request.channel, message.body, headers=forwarded,
                message_id=request.message_id, lane=lane,
            ),
            before_send=True,
        )
        metrics.DEFERRED.labels(request.channel, f"lane_{lane}").inc()
        return Outcome("diverted", request.message_id, copy.attempt)

    async def _claim(
        self, request: SendRequest, body: bytes, attempt: int, base: int, *, urgent: bool
    ) -> Claim | None:
        """Claim the attempt; the claim to send it, None when this copy must not be sent."""
        while True:
            claim = await self._infra(
                "database",
                lambda: self.store.claim(
                    message_id=request.message_id, channel=request.channel,
                    recipient=request.to, campaign_id=request.campaign_id,
                    payload_json=body.decode("utf-8"), attempt=attempt, owner=self.instance_id,
                    lease_s=self.lease_s, attempt_base=base, urgent=urgent,
                ),
                before_send=True,
            )
            if claim.outcome == "claimed":
                return claim
            if claim.outcome == "reclaimed":
                metrics.RESENT_AFTER_CRASH.labels(request.channel).inc()
                log.warning("delivery.resend_after_crash",
                            note="the earlier consumer died mid-attempt; the provider may"
                                 " have accepted it")
                return claim
            if claim.outcome in ("duplicate", "stale"):
                log.info("delivery.duplicate_suppressed", status=claim.status,
                         recorded_attempts=claim.attempts)
                return None
            # held: another consumer (or another copy here) holds a live lease on this
            # message. Wait for its outcome or for the lease to run out, then ask again.
            wait = 0.2
            if claim.claimed_until is not None:
                wait = (claim.claimed_until - self.now()).total_seconds()
            log.info("delivery.claim_held", wait_s=round(max(wait, 0.0), 1))
            await self._sleep(min(max(wait, 0.2), 2.0))

    async def _send_again(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        incoming: dict[str, Any],
        copy: CopyHeaders,
        error: DeliveryError,
        decision: Retry | Pause,
        made: AttemptMade,
    ) -> Outcome:
        """Republish through the delay levels (confirmed), then record the attempt.

        A :class:`Retry` charges the attempt (the copy is the next one); a
        :class:`Pause` does not (provider-wide error or open failure domain:
        the copy has the same attempt number). A copy the broker refuses to
        carry (it cannot be encoded) cannot be sent again: the message is
        parked instead, with both reasons.
        """
        headers = copy_headers(attempt=decision.attempt, base=made.base,
                               first_seen=copy.first_seen, error=error, carried=incoming)
        try:
            await self._infra(
                "broker",
                lambda: self.publisher.publish_delayed(
                    request.channel, message.body, decision.delay_s, headers=headers,
                    message_id=request.message_id, lane=made.lane,
                ),
            )
        except Unstorable as exc:
            log.error("delivery.copy_refused", error=exc.reason)
            error = DeliveryError(error.error_type, f"{error.message} (and the copy for"
                                  f" another attempt was refused: {exc.reason})",
                                  code=error.code, retryable=False)
            return await self._park(message, request, error, made,
                                    Park("permanent", decision.rule,
                                         decision.used if isinstance(decision, Retry) else 0))
        outcome: RecordOutcome = "retrying" if isinstance(decision, Retry) else "paused"
        await self._record(
            message_id=request.message_id, attempt=made.attempt, outcome=outcome,
            started_at=made.started, latency_ms=made.latency_ms, provider=made.provider,
            error_type=error.error_type.value, error_code=error.code,
            error_text=error.message,
            next_attempt_at=self.now() + timedelta(seconds=decision.delay_s),
            retry_rule=decision.rule,
        )
        if isinstance(decision, Retry):
            metrics.RETRIED.labels(request.channel, error.error_type.value).inc()
            metrics.RETRIES_BY_ATTEMPT.labels(request.channel,
                                              str(min(made.attempt, 10))).inc()
            log.info("delivery.retry_scheduled", error_type=error.error_type.value,
                     error_code=error.code, delay_s=decision.delay_s,
                     error=error.message[:200], rule=decision.rule, budget_used=decision.used)
            return Outcome("retrying", request.message_id, made.attempt,
                           error.error_type.value)
        metrics.DEFERRED.labels(request.channel, "provider_wide" if error.provider_wide
                                else "domain_open").inc()
        log.warning("delivery.paused", error_type=error.error_type.value,
                    error_code=error.code, delay_s=decision.delay_s)
        return Outcome("paused", request.message_id, made.attempt, error.error_type.value)

    async def _park(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        error: DeliveryError,
        made: AttemptMade,
        decision: Park,
    ) -> Outcome:
        await self._publish_parked(
            message.body, request.channel, request.message_id, made.attempt, error,
            content_type=message.content_type, recipient=request.to,
            campaign_id=request.campaign_id,
        )
        await self._record(
            message_id=request.message_id, attempt=made.attempt, outcome="failed",
            started_at=made.started, latency_ms=made.latency_ms, provider=made.provider,
            error_type=error.error_type.value, error_code=error.code,
            error_text=error.message, retry_rule=decision.rule,
        )
        log.warning("delivery.parked", error_type=error.error_type.value,
                    error_code=error.code, error=error.message[:200], why=decision.reason,
                    rule=decision.rule)
        return Outcome("parked", request.message_id, made.attempt, error.error_type.value)

    async def _record(self, **fields: Any) -> None:
        """Record an attempt's outcome, after the send.

        The send happened, so the outcome must be recorded, and handing the
        message back would send it again. An outage is waited out. A record
        the database refuses for its content (whatever the provider answered)
        is written again without any text from outside: ids, error code and
        text left out, the error type and a note kept. That one cannot be
        refused for its content (every value left is Herald's own or was
        validated at the edge); should it be all the same, the refusal is
        logged and the message acked, never retried for ever.
        """
        try:
            await self._infra("database", lambda: self.store.record(**fields))
            return
        except Unstorable as exc:
            metrics.RECORDS_REFUSED.labels(fields["outcome"]).inc()
            log.error("delivery.record_refused", outcome=fields["outcome"], error=exc.reason,
                      note="recording the outcome without the provider's texts")
            reason = exc.reason
        kept = ("message_id", "attempt", "outcome", "started_at", "provider", "error_type",
                "next_attempt_at", "urgent")
        plain: dict[str, Any] = {k: fields[k] for k in kept if k in fields}
        plain["latency_ms"] = None
        plain["error_text"] = storable(
            f"(the outcome's own texts could not be stored: {reason})", 500)
        try:
            await self._infra("database", lambda: self.store.record(**plain))
        except Unstorable as exc:
            log.error("delivery.record_lost", outcome=fields["outcome"], error=exc.reason,
                      note="the outcome could not be recorded in any form")

    async def _park_invalid(
        self, message: AbstractIncomingMessage, channel: str, attempt: int, problem: str,
        *, request: SendRequest | None = None,
    ) -> None:
        """Park a message that cannot be sent as it is (its original bytes, byte for
        byte, in the parking queue), with ``problem`` as the reason."""
        error = DeliveryError(ErrorType.INVALID_PAYLOAD, problem, retryable=False)
        await self._publish_parked(
            message.body, channel,
            request.message_id if request is not None else message.message_id, attempt, error,
            content_type=message.content_type,
            recipient=request.to if request is not None else None,
            campaign_id=request.campaign_id if request is not None else None,
        )
        log.warning("delivery.parked", error_type=ErrorType.INVALID_PAYLOAD.value,
                    error=problem[:200], bytes=len(message.body))

    async def _publish_parked(
        self,
        body: bytes,
        channel: str,
        message_id: str | None,
        attempt: int,
        error: DeliveryError,
        *,
        content_type: str | None,
        recipient: str | None,
        campaign_id: str | None,
    ) -> None:
        """Park the original bytes with the reason (see :mod:`consumer.parking.park`).

        The parked copy carries only Herald's headers and the publisher's
        content type; should the broker refuse even that copy, it is parked
        again without the content type (nothing else of the publisher's is
        on it), rather than looping.
        """
        try:
            await park(
                self.publisher, self.store, body=body, channel=channel, message_id=message_id,
                attempt=attempt, error=error, recipient=recipient, campaign_id=campaign_id,
                parked_at=self.now(), content_type=content_type, run=self._infra,
                body_limit=self.settings.max_body_bytes,
            )
        except Unstorable as exc:
            if content_type is None:
                raise
            log.error("delivery.parked_copy_refused", error=exc.reason,
                      note="parking it without the publisher's content type")
            await self._publish_parked(body, channel, message_id, attempt, error,
                                       content_type=None, recipient=recipient,
                                       campaign_id=campaign_id)

    async def _defer(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        headers: dict[str, Any],
        copy: CopyHeaders,
        due_at: datetime,
        reason: str,
        lane: str,
    ) -> Outcome:
        """Send the message round the delay levels until ``due_at``; no attempt is used."""
        delay = defer_seconds(due_at, self.now())
        forwarded = deferred_headers(headers, attempt=copy.attempt, base=copy.base,
                                     first_seen=copy.first_seen)
        await self._infra(
            "broker",
            lambda: self.publisher.publish_delayed(
                request.channel, message.body, delay, headers=forwarded,
                message_id=request.message_id, lane=lane,
            ),
            before_send=True,
        )
        # A first attempt deferred to a time of its own (send_at, quiet hours, a daily
        # limit) is recorded as queued until then. One deferred because its domain is
        # down is not: it is simply still waiting (as in its queue), and a dead host's
        # backlog costs a publish per round, not a database write.
        if reason != "domain_open" and used_first(copy):
            await self._infra(
                "database",
                lambda: self.store.record_scheduled(
                    message_id=request.message_id, channel=request.channel, recipient=request.to,
                    campaign_id=request.campaign_id, payload=_payload(request), due_at=due_at,
                ),
                before_send=True,
            )
        metrics.DEFERRED.labels(request.channel, reason).inc()
        log.info("delivery.deferred", reason=reason, delay_s=delay)
        return Outcome("deferred", request.message_id, copy.attempt)

    # -- infrastructure -------------------------------------------------------------

    async def _infra(
        self, component: str, operation: Callable[[], Awaitable[T]], *, before_send: bool = False
    ) -> T:
        """Run a database or broker operation until it succeeds.

        An outage holds the message (unacked, so nothing is lost) and, because
        prefetch bounds what is in flight, stops consumption until the
        service is back. Only stopping the service gives up, leaving the
        message for redelivery.

        A refusal of the message's own data (:func:`is_refusal`: a value
        PostgreSQL cannot store, a header the client cannot encode) is raised
        as :class:`Unstorable`, before or after the send: trying again cannot
        help, and the caller deals with that one message (before the send it
        is parked; after it, see :meth:`_record`). Before the send, any other
        error that is not an outage (a bug) is raised as it is: the message
        goes back to the broker, nothing was sent. After the send, such an
        error is retried: handing the message back would send it again.
        """
        delay = 0.1
        while True:
            try:
                return await operation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_refusal(component, exc):
                    raise Unstorable(component, exc) from exc
                transient = component == "broker" or is_transient_db_error(exc)
                if before_send and not transient:
                    raise
                metrics.INFRA_RETRIES.labels(component).inc()
                if transient:
                    log.warning(f"{component}.unavailable", error=repr(exc)[:300],
                                retry_in_s=round(delay, 2))
                else:
                    log.error(f"{component}.write_failed", error=repr(exc)[:300],
                              retry_in_s=round(delay, 2),
                              note="the message was sent; retrying the record, not the send")
                if self.stopping.is_set():
                    raise Stopping() from exc
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up and give up when the service stops."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Stopping()


def is_refusal(component: str, exc: BaseException) -> bool:
    """Whether ``exc`` refuses the data of the operation rather than reports an outage.

    Database: :func:`consumer.store.is_data_error`. Broker: the client raises
    ``TypeError``, ``ValueError``, ``OverflowError`` or ``struct.error`` while
    it encodes a message, before anything is sent (a message-id over 255
    bytes, a header value it has no type for); an outage raises the client's
    own connection and channel errors, or a timeout.
    """
    if component == "database":
        return is_data_error(exc)
    return isinstance(exc, TypeError | ValueError | OverflowError | struct.error)


# A number JSON can write and Python reads as 0.0 (an exponent of -324 or less,
# or hundreds of zeros after the point). Only a body with such a token pays for
# the second, exact look at its numbers.
_TINY_NUMBER_HINT = re.compile(r"[eE]-0*[1-9][0-9]{2}|\.0{300}")
_NONZERO_DIGIT = re.compile(r"[1-9]")


def decode_request(
    body: bytes, channel: str, *, max_bytes: int = MAX_BODY_BYTES
) -> tuple[SendRequest | None, str]:
    """Step 1 of the pipeline: the request in ``body``, or None and why not.

    Never raises, whatever the bytes: a body over ``max_bytes``, not UTF-8,
    not JSON, nested deeper than the parser goes, or refused by
    :class:`SendRequest` (types, NUL, sizes, nesting, numbers; see
    :mod:`schemas.send_request`) gets a one-line reason.
    """
    if len(body) > max_bytes:
        return None, f"body of {len(body)} bytes exceeds the {max_bytes}-byte limit"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"body is not UTF-8: {exc.reason} at byte {exc.start}"
    try:
        request = SendRequest.model_validate_json(text)
    except ValidationError as exc:
        return None, _describe_validation(exc)
    except RecursionError:  # pydantic's parser has a limit of its own; never hit, but
        return None, f"nested deeper than {MAX_NESTING} levels of arrays and objects"
    if request.channel != channel:
        return None, (
            f"channel {request.channel!r} in the body does not match the queue's channel "
            f"{channel!r}"
        )
    if _TINY_NUMBER_HINT.search(text):
        problem = _tiny_number(text)
        if problem is not None:
            return None, problem
    return request, ""


def _tiny_number(text: str) -> str | None:
    """Why a number in ``text`` cannot be kept (it is too small for a 64-bit float
    and would be read as 0, while PostgreSQL refuses the smallest), or None.

    Called only on a request that validated, so its depth is bounded and
    Python's own parser is safe to run on it.
    """
    found: list[str] = []

    def number(token: str) -> float:
        value = float(token)
        mantissa = re.split("[eE]", token, maxsplit=1)[0]
        if value == 0.0 and _NONZERO_DIGIT.search(mantissa) and not found:
            found.append(token if len(token) <= 30 else token[:27] + "...")
        return value

    try:
        json.loads(text, parse_float=number)
    except (ValueError, RecursionError):
        return None
    if found:
        return f"the number {found[0]} is too small for a 64-bit float (it would be read as 0)"
    return None


def _describe_validation(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    problems = []
    for err in errors[:5]:
        # An empty loc is the request as a whole; "body" would read as the field.
        where = ".".join(str(p) for p in err["loc"][:6]) or "request"
        if len(where) > 80:
            where = where[:77] + "..."
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            if "recursion limit" in message:
                problems.append(f"nested deeper than {MAX_NESTING} levels of arrays and"
                                f" objects ({message})")
            else:
                problems.append(f"not JSON: {message}")
        elif message.startswith(where):
            problems.append(message)
        else:
            problems.append(f"{where}: {message}")
    more = len(errors) - 5
    reason = "; ".join(problems) + (f" (+{more} more)" if more > 0 else "")
    # The reason travels in a header and a log line, and is stored.
    return storable(reason.replace("\n", " ").replace("\r", " "), 1000)


def _payload(request: SendRequest) -> Any:
    return request.model_dump(mode="json")


def _due_at(copy: CopyHeaders, request: SendRequest) -> datetime | None:
    """When this copy may be sent: a long delay's due time, or send_at for a first attempt."""
    if copy.due_at is not None:
        return datetime.fromtimestamp(copy.due_at, UTC)
    if copy.attempt == 1 and request.send_at is not None:
        return request.send_at
    return None


def lane_of(request: SendRequest, campaign: Campaign | None) -> str:
    """``main`` for transactional messages (no campaign, or priority high), else ``bulk``."""
    priority = request.priority or (campaign.priority if campaign is not None else None)
    if request.campaign_id is None or priority == "high":
        return "main"
    return "bulk"


def used_first(copy: CopyHeaders) -> bool:
    """Whether this copy is a first attempt (counting from the last fresh budget)."""
    return copy.attempt - copy.base <= 1


def _published_at(message: AbstractIncomingMessage) -> float:
    """The publisher's AMQP timestamp (epoch seconds), or now when it set none."""
    stamp = message.timestamp
    if isinstance(stamp, datetime):
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        try:
            return stamp.timestamp()
        except (OverflowError, ValueError, OSError):
            return time.time()
    return time.time()


def _forwarded(incoming: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a republished copy keeps (publisher's own, attempt base, first seen)."""
    return {k: v for k, v in incoming.items() if k not in PER_ATTEMPT}
