"""Escalation: parked messages told to people, one digest per window (role ``events``).

Every parked message's notice (``parked.{channel}.{error_type}`` on
``{prefix}.notifications``, see :mod:`consumer.parking.park`) also lands in
the quorum queue ``{prefix}.escalations``. This component takes the notices
in batches and counts those the escalation rules
(:mod:`consumer.records.escalations`) select into each rule's current
window in PostgreSQL (``herald_escalation_count``, sql/0010), then acks the
batch: a restart loses nothing, and a notice delivered again after a crash is
recognised by its parked id and not counted twice.

Once a window has ended, its digest is closed (under a row lock, so a count
in flight waits and goes to the next window, and another replica skips it)
and sent as an ordinary send request through Herald's own publish path, to
the rule's target: "campaign spring: 9,800 parked as invalid_recipient, 200
as provider_error; replay with …". A burst of 10,000 parked messages is one
message per rule and window, never 10,000. The digest's ``message_id`` is
``herald-escalation-{rule}-{window start}``: a digest published twice (a
crash between the publish and its record) is delivered once, by the claim.
Digests belong to the campaign :data:`ESCALATION_CAMPAIGN`, whose parked
messages are never counted: a digest that cannot be delivered is parked like
any message (an operator sees it in the lot) and never escalates itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
from consumer.publisher import Publisher
from consumer.store import is_transient_db_error
from consumer.text import printable
from consumer.topology import Names
from schemas.parking import ESCALATION_CAMPAIGN, ParkingNotice

log = structlog.get_logger("herald.escalation")

# Longest digest text for a phone (one long SMS); an http target also gets the figures.
MAX_PHONE_TEXT = 1500
# Campaign lines a digest shows; the rest are summed up in one line.
MAX_LINES = 8


@dataclass(frozen=True)
class Count:
    """Parked messages of one campaign ('' for none), channel and error type in a window."""

    campaign_id: str
    channel: str
    error_type: str
    parked: int


@dataclass(frozen=True)
class Digest:
    """One window of one rule, closed and ready to send."""

    rule_id: int
    rule: str
    window_start: datetime
    window_end: datetime
    target_channel: str
    target: str
    counts: tuple[Count, ...]

    @property
    def message_id(self) -> str:
        return f"herald-escalation-{self.rule_id}-{int(self.window_start.timestamp())}"

    @property
    def total(self) -> int:
        return sum(c.parked for c in self.counts)


def _n(value: int) -> str:
    return f"{value:,}"


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def digest_lines(digest: Digest) -> list[str]:
    """What a digest says, one line per campaign (largest first), with the command
    that replays it."""
    by_campaign: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    channels: dict[str, set[str]] = defaultdict(set)
    for c in digest.counts:
        by_campaign[c.campaign_id][c.error_type] += c.parked
        channels[c.campaign_id].add(c.channel)
    order = sorted(by_campaign, key=lambda k: (-sum(by_campaign[k].values()), k))
    since = _when(digest.window_start - timedelta(minutes=1))
    lines = [f"Herald: {_n(digest.total)} message{'s' if digest.total != 1 else ''} parked"
             f" {digest.window_start.strftime('%H:%M:%S')}-"
             f"{digest.window_end.strftime('%H:%M:%S')} UTC (escalation"
             f" {printable(digest.rule)[:60]})."]
    for campaign in order[:MAX_LINES]:
        types = sorted(by_campaign[campaign].items(), key=lambda kv: (-kv[1], kv[0]))
        parts = [f"{_n(n)} parked as {t}" if i == 0 else f"{_n(n)} as {t}"
                 for i, (t, n) in enumerate(types)]
        if campaign:
            who = f"campaign {printable(campaign)[:60]}"
            replay = f"herald parked replay --campaign {_quoted(campaign)} --since {since}"
        else:
            chans = sorted(channels[campaign])
            who = "no campaign (" + ", ".join(chans) + ")"
            replay = "herald parked replay" + (f" --channel {chans[0]}" if len(chans) == 1
                                               else "") + f" --since {since}"
        lines.append(f"{who}: {', '.join(parts)}; replay with: {replay} --dry-run")
    rest = order[MAX_LINES:]
    if rest:
        more = sum(sum(by_campaign[c].values()) for c in rest)
        lines.append(f"and {_n(more)} more in {len(rest)} other campaign"
                     f"{'s' if len(rest) != 1 else ''}: herald parked list --since {since}")
    return lines


def _quoted(text: str) -> str:
    """A campaign id as one shell word (printable, quoted when it needs to be)."""
    shown = printable(text)[:60]
    if shown and all(ch.isalnum() or ch in "-_.:" for ch in shown):
        return shown
    return "'" + shown.replace("'", "'\\''") + "'"


def digest_request(digest: Digest) -> dict[str, Any]:
    """The send request that delivers a digest to its rule's target."""
    lines = digest_lines(digest)
    text = "\n".join(lines)
    body: Any
    if digest.target_channel == "http":
        # A chat's incoming webhook shows "text"; a program reads the figures.
        body = {"text": text, "rule": digest.rule, "window_start": digest.window_start.isoformat(),
                "window_end": digest.window_end.isoformat(), "parked": digest.total,
                "counts": [{"campaign_id": c.campaign_id or None, "channel": c.channel,
                            "error_type": c.error_type, "parked": c.parked}
                           for c in digest.counts]}
    else:
        body = text if len(text) <= MAX_PHONE_TEXT else text[: MAX_PHONE_TEXT - 1] + "…"
    return {
        "message_id": digest.message_id,
        "channel": digest.target_channel,
        "to": digest.target,
        "body": body,
        "campaign_id": ESCALATION_CAMPAIGN,
        # On the transactional lane: a person is waiting for it.
        "priority": "high",
        # A digest a day late helps nobody; it then expires instead.
        "expires_at": (digest.window_end + timedelta(days=1)).isoformat(),
        "metadata": {"escalation": digest.rule, "window_start": digest.window_start.isoformat()},
    }


class _Stopping(Exception):
    """The service stops while the database is away: the batch stays unacked."""


class Escalator:
    """Consumes ``{prefix}.escalations``, counts, and sends the digests (a Component)."""

    name = "escalation"

    max_batch = 1000
    prefetch = 2000
    tick_s = 1.0
    # A digest closed this long ago and still not recorded as sent (its process
    # died in between) is published again, with the same message id.
    resend_after_s = 30.0
    # How long a counted notice is remembered against redelivery, and how often
    # old memories and old digests are pruned.
    seen_keep_s = 86400.0
    digests_keep_s = 30 * 86400.0
    prune_every_s = 600.0
    # Whether any rule exists is looked up this often: without rules, notices
    # are acked without a write.
    rules_cache_s = 5.0

    def __init__(self, *, connection: AbstractRobustConnection, names: Names,
                 pool: asyncpg.Pool) -> None:
        self.connection = connection
        self.names = names
        self.pool = pool
        self.publisher = Publisher(connection, names)
        self._buffer: list[AbstractIncomingMessage] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._rules_seen: tuple[float, bool] | None = None
        self._last_prune = 0.0

    async def start(self) -> None:
        self._channel = await self.connection.channel(publisher_confirms=False)
        await self._channel.set_qos(prefetch_count=self.prefetch)
        self._queue = await self._channel.get_queue(self.names.escalations, ensure=False)
        self._tag = await self._queue.consume(self._on_message)
        self._task = asyncio.create_task(self._run(), name="escalation")
        log.info("escalation.started", queue=self.names.escalations)

    async def stop(self) -> None:
        """Stop taking notices, finish the batch in hand, leave the rest unacked."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        self._tag = None
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=10.0)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()
        with contextlib.suppress(Exception):
            await self.publisher.close()
        self._buffer.clear()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_tick = 0.0
        while not self._closing:
            wait = max(0.0, last_tick + self.tick_s - loop.time())
            if not self._buffer:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
            self._wakeup.clear()
            try:
                while self._buffer and not self._closing:
                    batch = self._buffer[: self.max_batch]
                    del self._buffer[: self.max_batch]
                    await self.count(batch)
                if not self._closing and loop.time() - last_tick >= self.tick_s:
                    last_tick = loop.time()
                    await self.send_due()
                    await self._prune()
            except _Stopping:
                return
            except Exception as exc:  # a bug or an outage must not end the loop for good
                level = log.warning if _transient(exc) else log.error
                level("escalation.failed", error=repr(exc)[:300])
                await asyncio.sleep(1.0)

    # -- counting ----------------------------------------------------------------------

    async def count(self, messages: Sequence[AbstractIncomingMessage]) -> int:
        """Count a batch of notices into their rules' windows, then ack it. While the
        database is away the batch waits, unacked."""
        items = []
        for message in messages:
            try:
                notice = ParkingNotice.model_validate_json(message.body)
            except ValidationError as exc:
                # Anyone may publish to the notifications exchange: skip what is not ours.
                log.warning("escalation.invalid_notice", error=str(exc.errors()[:2])[:300])
                continue
            items.append({"parked_id": str(notice.parked_id), "channel": notice.channel,
                          "error_type": notice.error_type, "campaign_id": notice.campaign_id})
        counted = await self._write(items) if items and await self._any_rules() else 0
        await _ack(messages)
        metrics.ESCALATION_COUNTED.inc(counted)
        return counted

    async def _write(self, items: list[dict[str, Any]]) -> int:
        delay = 0.1
        while True:
            try:
                return int(await self.pool.fetchval(
                    "SELECT herald_escalation_count($1::text::jsonb, $2)", json.dumps(items),
                    ESCALATION_CAMPAIGN))
            except Exception as exc:
                if not _transient(exc):
                    if len(items) == 1:
                        # One notice the database refuses for good (text it cannot
                        # store, say): it must not hold up the others.
                        log.error("escalation.notice_refused", error=repr(exc)[:300],
                                  notice=items[0])
                        return 0
                    return sum([await self._write([item]) for item in items])
                if self._closing:
                    raise _Stopping() from exc
                log.warning("escalation.database_unavailable", error=repr(exc)[:300],
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _any_rules(self) -> bool:
        now = time.monotonic()
        if self._rules_seen is None or now - self._rules_seen[0] >= self.rules_cache_s:
            try:
                found = bool(await self.pool.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM escalation_rules)"))
            except Exception:
                return True  # the write finds out, and waits for the database
            self._rules_seen = (now, found)
        return self._rules_seen[1]

    # -- sending -------------------------------------------------------------------------

    async def send_due(self) -> int:
        """Close the windows that have ended (and re-send digests a dead process left
        unrecorded), send their digests, record them sent; returns how many."""
        digests = await self._close_due()
        for digest in digests:
            request = digest_request(digest)
            await self.publisher.publish_send(
                digest.target_channel, json.dumps(request).encode(),
                message_id=digest.message_id, lane="main")
            await self.pool.execute(
                """UPDATE escalation_digests SET state = 'sent', sent_at = now()
                    WHERE rule_id = $1 AND window_start = $2""",
                digest.rule_id, digest.window_start)
            metrics.ESCALATION_DIGESTS.labels(digest.target_channel).inc()
            log.info("escalation.digest_sent", rule=digest.rule, parked=digest.total,
                     window_start=digest.window_start.isoformat(),
                     target_channel=digest.target_channel, message_id=digest.message_id)
        return len(digests)

    async def _close_due(self) -> list[Digest]:
        async with self.pool.acquire() as conn, conn.transaction():
            due = await conn.fetch(
                """SELECT d.rule_id, d.window_start, d.window_end, r.name, r.target_channel,
                          r.target
                     FROM escalation_digests d JOIN escalation_rules r ON r.id = d.rule_id
                    WHERE d.state <> 'sent'
                      AND ((d.state = 'open' AND d.window_end <= now())
                           OR (d.state = 'closed'
                               AND d.closed_at < now() - make_interval(secs => $1)))
                    ORDER BY d.window_end LIMIT 100
                      FOR UPDATE OF d SKIP LOCKED""", self.resend_after_s)
            if not due:
                return []
            keys = ([r["rule_id"] for r in due], [r["window_start"] for r in due])
            counts: dict[tuple[int, datetime], list[Count]] = defaultdict(list)
            for c in await conn.fetch(
                    """SELECT c.rule_id, c.window_start, c.campaign_id, c.channel, c.error_type,
                              c.parked
                         FROM escalation_counts c
                         JOIN unnest($1::bigint[], $2::timestamptz[]) AS k(rule_id, window_start)
                           ON c.rule_id = k.rule_id AND c.window_start = k.window_start
                        ORDER BY c.parked DESC, c.campaign_id, c.channel, c.error_type""",
                    *keys):
                counts[(c["rule_id"], c["window_start"])].append(
                    Count(c["campaign_id"], c["channel"], c["error_type"], int(c["parked"])))
            digests = [Digest(r["rule_id"], r["name"], r["window_start"], r["window_end"],
                              r["target_channel"], r["target"],
                              tuple(counts[(r["rule_id"], r["window_start"])])) for r in due]
            await conn.execute(
                """UPDATE escalation_digests d SET state = 'closed', closed_at = now(),
                          message_id = k.message_id
                     FROM unnest($1::bigint[], $2::timestamptz[], $3::text[])
                          AS k(rule_id, window_start, message_id)
                    WHERE d.rule_id = k.rule_id AND d.window_start = k.window_start""",
                *keys, [d.message_id for d in digests])
        return digests

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < self.prune_every_s:
            return
        self._last_prune = now
        await self.pool.execute(
            """DELETE FROM escalation_seen WHERE parked_id IN (
                   SELECT parked_id FROM escalation_seen
                    WHERE seen_at < now() - make_interval(secs => $1) LIMIT 50000)""",
            self.seen_keep_s)
        await self.pool.execute(
            """DELETE FROM escalation_digests
                WHERE state = 'sent' AND sent_at < now() - make_interval(secs => $1)""",
            self.digests_keep_s)


def _transient(exc: BaseException) -> bool:
    return is_transient_db_error(exc) or isinstance(exc, ConnectionError)


async def _ack(messages: Sequence[AbstractIncomingMessage]) -> None:
    """Ack a batch: one ``multiple`` ack of its last delivery (one channel, in order)."""
    if not messages:
        return
    try:
        await messages[-1].ack(multiple=True)
    except Exception as exc:  # the channel died: the broker redelivers, seen dedupes
        log.warning("escalation.ack_lost", error=repr(exc)[:200])
