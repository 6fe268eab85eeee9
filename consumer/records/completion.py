"""Campaigns that finish: ``completed_at`` and the ``campaign.completed`` notice.

A campaign is complete when at least one of its messages exists, none is
``queued``, ``sending`` or ``retrying`` (a message waiting in a delay queue is
``retrying``: open), and nothing happened to any of them in the pipeline for
``HERALD_CAMPAIGN_QUIET_S``. The quiet period stands for what Herald cannot
see: a message published but not consumed yet has no row. Delivery and read
reports are not activity (they may trickle in for days); a claim, a send, a
retry, a parking or an expiry is.

How it is noticed, cheaply: :class:`CampaignWatch` (role ``events``) makes
one pass every quarter of the quiet period (a minute at most). A pass reads
the messages changed since the last one (the index on ``(status,
updated_at)``: the cost follows the traffic, not the table; a margin of
:attr:`CampaignWatch.overlap_s` catches transactions that committed late) and
keeps per campaign the time of its latest pipeline event
(``campaign_completion``). Only a campaign quiet for the period is then
probed for open messages (three probes of ``(campaign_id, status)``); a
success costs nothing on the hot path. A completed campaign with a pipeline
event after its completion (a replay, a failure reported after acceptance,
more messages) is reopened and completes again later with the next
``completion`` number.

Race-free: a pass holds the row lock of ``campaign_watch``, so one replica
passes at a time (the others skip), and a campaign is completed by an
``UPDATE … WHERE state = 'open'`` in that transaction. The notice goes out
after the commit from the rows still unpublished (an outbox, locked while
publishing), so a crash republishes it with the same message id rather than
losing it.

Known limit: a message that waits unconsumed longer than the quiet period
without a row (a channel without credentials, a first attempt deferred round
and round by an open failure domain) lets its campaign complete early; when
the message is finally handled, the campaign reopens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from consumer import metrics
from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.store import is_transient_db_error
from consumer.topology import Names
from schemas.campaigns import CampaignCompleted, CampaignCounters
from schemas.parking import ESCALATION_CAMPAIGN

log = structlog.get_logger("herald.campaigns")

STATUSES = ("queued", "sending", "sent", "delivered", "read", "retrying", "failed",
            "expired", "cancelled")
OPEN = ("queued", "sending", "retrying")
ROUTING_KEY = "campaign.completed"
# A message's latest pipeline event (delivery and read reports excluded).
_ACTIVITY = ("COALESCE(GREATEST(queued_at, sending_at, sent_at, retrying_at, failed_at,"
             " expired_at), updated_at)")


def counters(rows: list[asyncpg.Record] | list[dict[str, Any]]) -> CampaignCounters:
    """The counters of a campaign from (status, last_error_type, n) rows."""
    by_status = dict.fromkeys(STATUSES, 0)
    failed_by: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + int(r["n"])
        if r["status"] == "failed":
            key = r["last_error_type"] or "other"
            failed_by[key] = failed_by.get(key, 0) + int(r["n"])
    return CampaignCounters(
        total=sum(by_status.values()),
        accepted=by_status["sent"] + by_status["delivered"] + by_status["read"],
        sent=by_status["sent"], delivered=by_status["delivered"], read=by_status["read"],
        failed=by_status["failed"], failed_by_error_type=dict(sorted(failed_by.items())),
        expired=by_status["expired"], cancelled=by_status["cancelled"])


def notice_id(campaign_id: str, completion: int) -> str:
    """The AMQP message id of one completion's notice, the same for every copy."""
    return f"{ROUTING_KEY}/{campaign_id}/{completion}"


async def completion_of(pool: asyncpg.Pool | asyncpg.Connection, campaign_id: str
                        ) -> dict[str, Any] | None:
    """A campaign's completion record (``herald campaign show``, ``herald stats``)."""
    row = await pool.fetchrow(
        """SELECT state, first_seen_at, last_activity_at, completed_at, completions,
                  reopened_at, counters, notice_published_at
             FROM campaign_completion WHERE campaign_id = $1""", campaign_id)
    if row is None:
        return None
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(row).items()}


async def completions(pool: asyncpg.Pool, campaign_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Completion records of several campaigns (the console's list)."""
    rows = await pool.fetch(
        """SELECT campaign_id, state, completed_at, completions, reopened_at
             FROM campaign_completion WHERE campaign_id = ANY($1::text[])""", campaign_ids)
    return {r["campaign_id"]: {"state": r["state"], "completed_at": r["completed_at"],
                               "completions": r["completions"],
                               "reopened_at": r["reopened_at"]} for r in rows}


class CampaignWatch:
    """Judges campaigns complete and publishes their notices (a Component)."""

    name = "campaign-watch"
    # Messages changed this long before the last pass are read again: a
    # transaction stamps its rows when it starts, and may commit later.
    overlap_s = 30.0
    # At most this many campaigns completed per pass (the rest in the next).
    max_per_pass = 200

    def __init__(self, *, connection: AbstractRobustConnection, names: Names,
                 pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.names = names
        self.quiet_s = settings.campaign_quiet_s
        self.publisher = Publisher(connection, names)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def interval_s(self) -> float:
        """A few passes per quiet period (completion comes within a quarter of it, a
        minute at most); each pass reads the messages changed since the last one."""
        return min(60.0, max(0.5, self.quiet_s / 4))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="campaign-watch")
        log.info("campaigns.watch_started", quiet_s=self.quiet_s, interval_s=self.interval_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=10.0)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.publisher.close()

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.pass_once()
                await self.publish_notices()
            except Exception as exc:  # an outage or a bug must not end the watch
                level = log.warning if is_transient_db_error(exc) else log.error
                level("campaigns.watch_failed", error=repr(exc)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)

    async def pass_once(self) -> list[str]:
        """One pass: record activity, reopen, complete. Returns the campaigns completed
        (empty when another replica holds the pass)."""
        async with self.pool.acquire() as conn, conn.transaction():
            watch = await conn.fetchrow(
                """SELECT scanned_to, clock_timestamp() AS now FROM campaign_watch
                    WHERE id = 1 FOR UPDATE SKIP LOCKED""")
            if watch is None:
                return []
            now: datetime = watch["now"]
            await conn.execute(
                f"""INSERT INTO campaign_completion AS c (campaign_id, first_seen_at,
                                                          last_activity_at)
                    SELECT campaign_id, min(COALESCE(queued_at, updated_at)), max({_ACTIVITY})
                      FROM messages
                     WHERE status = ANY($1::text[]) AND updated_at > $2
                       AND campaign_id IS NOT NULL AND campaign_id <> $3
                     GROUP BY campaign_id
                    ON CONFLICT (campaign_id) DO UPDATE
                       SET last_activity_at = GREATEST(c.last_activity_at,
                                                       EXCLUDED.last_activity_at)""",
                list(STATUSES), watch["scanned_to"] - timedelta(seconds=self.overlap_s),
                ESCALATION_CAMPAIGN)
            reopened = await conn.fetch(
                """UPDATE campaign_completion SET state = 'open', reopened_at = $1
                    WHERE state = 'completed' AND last_activity_at > completed_at
                RETURNING campaign_id""", now)
            for r in reopened:
                log.info("campaigns.reopened", campaign_id=r["campaign_id"])
            quiet = await conn.fetch(
                """SELECT c.campaign_id FROM campaign_completion c
                    WHERE c.state = 'open' AND c.last_activity_at <= $1
                      AND EXISTS (SELECT 1 FROM messages m WHERE m.campaign_id = c.campaign_id)
                      AND NOT EXISTS (SELECT 1 FROM messages m
                                       WHERE m.campaign_id = c.campaign_id
                                         AND m.status = ANY($2::text[]))
                    ORDER BY c.last_activity_at LIMIT $3""",
                now - timedelta(seconds=self.quiet_s), list(OPEN), self.max_per_pass)
            done = []
            for r in quiet:
                found = counters(await conn.fetch(
                    """SELECT status, last_error_type, count(*) AS n FROM messages
                        WHERE campaign_id = $1 GROUP BY 1, 2""", r["campaign_id"]))
                completed = await conn.fetchval(
                    """UPDATE campaign_completion
                          SET state = 'completed', completed_at = $2,
                              completions = completions + 1, counters = $3::text::jsonb,
                              notice_published_at = NULL
                        WHERE campaign_id = $1 AND state = 'open'
                    RETURNING completions""",
                    r["campaign_id"], now, found.model_dump_json())
                if completed is not None:
                    done.append(r["campaign_id"])
                    log.info("campaigns.completed", campaign_id=r["campaign_id"],
                             completion=completed, **found.model_dump(exclude={
                                 "failed_by_error_type"}))
            await conn.execute("UPDATE campaign_watch SET scanned_to = $1 WHERE id = 1", now)
        # Counted once the transaction committed: a pass that failed completed nothing.
        metrics.CAMPAIGNS_COMPLETED.inc(len(done))
        return done

    async def publish_notices(self) -> int:
        """Publish the notices of completions not yet published (an outbox)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT campaign_id, first_seen_at, completed_at, completions, counters
                     FROM campaign_completion
                    WHERE state = 'completed' AND notice_published_at IS NULL
                    ORDER BY completed_at LIMIT 100
                      FOR UPDATE SKIP LOCKED""")
            for r in rows:
                stored = r["counters"]
                notice = CampaignCompleted(
                    campaign_id=r["campaign_id"], completion=r["completions"],
                    first_seen_at=r["first_seen_at"], completed_at=r["completed_at"],
                    counters=CampaignCounters.model_validate(
                        json.loads(stored) if isinstance(stored, str) else stored))
                # Nobody may be listening yet: an unroutable notice is fine.
                await self.publisher.publish(
                    self.names.notifications, ROUTING_KEY, notice.model_dump_json().encode(),
                    message_id=notice_id(r["campaign_id"], r["completions"]), mandatory=False)
            if rows:
                await conn.execute(
                    """UPDATE campaign_completion SET notice_published_at = now()
                        WHERE campaign_id = ANY($1::text[])""",
                    [r["campaign_id"] for r in rows])
        return len(rows)
