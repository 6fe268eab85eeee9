"""Campaigns that finish: completed once (also with two replicas), with counters equal
to the rows, a campaign.completed notice, shown by the CLI; reopened by a replay; a
message retrying or not yet quiet keeps its campaign open."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from consumer.records.completion import CampaignWatch, counters
from consumer.settings import Settings
from consumer.topology import Names
from schemas import CampaignCompleted
from tests.conftest import AMQP_URL, RunningSandbox, SandboxServices
from tests.helpers import publish_all, request, wait_for
from tests.integration.test_retry_rules import herald_cli
from tests.integration.test_webhooks import metric


@pytest.fixture
async def completions(amqp: AbstractRobustConnection, prefix: str
                      ) -> AsyncIterator[AbstractQueue]:
    """A queue of the campaign.completed notices, as a listener would bind one."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(f"{prefix}.test-completions", exclusive=True)
    await queue.bind(f"{prefix}.notifications", "campaign.completed")
    yield queue
    await channel.close()


async def notices(queue: AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    found = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        found.append(message)
    return found


async def rows_counters(db: asyncpg.Connection, campaign_id: str) -> dict[str, Any]:
    rows = await db.fetch("""SELECT status, last_error_type, count(*) AS n FROM messages
                              WHERE campaign_id = $1 GROUP BY 1, 2""", campaign_id)
    return counters(list(rows)).model_dump()


async def test_a_campaign_of_500_completes_once_with_its_counters_and_reopens_on_replay(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, sandbox_services: SandboxServices, completions: AbstractQueue,
) -> None:
    # Two replicas: both watch, one completes.
    await sandbox_services(HERALD_CAMPAIGN_QUIET_S="2")
    await sandbox_services(HERALD_CAMPAIGN_QUIET_S="2")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    mixed = (
        [request(f"ok-{i}", sandbox.url("ok")) for i in range(300)]
        + [request(f"refused-{i}", sandbox.url("strict", status=400)) for i in range(100)]
        + [request(f"flaky-{i}", sandbox.url(f"flaky{i}", fail=1, fail_status=503))
           for i in range(50)]
        + [request(f"late-{i}", sandbox.url("ok"), expires_at=past) for i in range(50)])
    await publish_all(amqp, prefix, [r | {"campaign_id": "c500"} for r in mixed])

    async def completed() -> bool:
        return await db.fetchval("SELECT state FROM campaign_completion"
                                 " WHERE campaign_id = 'c500'") == "completed"

    await wait_for(completed, timeout=90, interval=0.5, what="c500 completed")
    await asyncio.sleep(3)  # more passes of both replicas: none may complete it again
    row = await db.fetchrow("SELECT * FROM campaign_completion WHERE campaign_id = 'c500'")
    assert row is not None and row["completions"] == 1 and row["completed_at"] is not None
    expected = await rows_counters(db, "c500")
    assert expected == {
        "total": 500, "accepted": 350, "sent": 350, "delivered": 0, "read": 0, "failed": 100,
        "failed_by_error_type": {"invalid_request": 100}, "expired": 50, "cancelled": 0}
    assert json.loads(row["counters"]) == expected
    (message,) = await notices(completions)
    notice = CampaignCompleted.model_validate_json(message.body)
    assert (notice.campaign_id, notice.completion) == ("c500", 1)
    assert notice.counters.model_dump() == expected
    assert message.message_id == "campaign.completed/c500/1"
    assert notice.completed_at == row["completed_at"]

    code, out, err = await herald_cli(db_url, "campaign", "show", "c500")
    assert code == 0, err
    assert ("completed at " in out and ": 500 messages, sent 350, delivered 0, read 0, failed"
            " 100 (invalid_request 100), expired 50, cancelled 0" in out), out
    code, out, _ = await herald_cli(db_url, "stats", "--campaign", "c500", "--json")
    assert json.loads(out)["completion"]["state"] == "completed"

    # A replay of its parked messages reopens it; they are refused again and parked,
    # and it completes a second time.
    code, out, err = await herald_cli(
        db_url, "parked", "replay", "--campaign", "c500", HERALD_AMQP_URL=AMQP_URL,
        HERALD_PREFIX=prefix)
    assert code == 0, err

    async def completed_again() -> bool:
        again = await db.fetchrow("SELECT state, completions, reopened_at FROM "
                                  "campaign_completion WHERE campaign_id = 'c500'")
        return again is not None and again["completions"] == 2 and again["state"] == \
            "completed" and again["reopened_at"] is not None

    await wait_for(completed_again, timeout=60, interval=0.5, what="c500 completed again")
    await asyncio.sleep(1)
    (message,) = await notices(completions)
    assert message.message_id == "campaign.completed/c500/2"
    assert CampaignCompleted.model_validate_json(message.body).counters.model_dump() == \
        await rows_counters(db, "c500")


async def insert(db: asyncpg.Connection, mid: str, campaign: str, status: str,
                 at: datetime, **extra: Any) -> None:
    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, campaign_id,
                                 payload, queued_at, sending_at, updated_at, last_error_type)
           VALUES ($1, $2, 'http', 'http://x', $3, '{}', $4, $4, $4, $5)""",
        mid, status, campaign, at, extra.get("error_type"))


@pytest.fixture
async def watches(amqp: AbstractRobustConnection, prefix: str, db_url: str
                  ) -> AsyncIterator[tuple[CampaignWatch, CampaignWatch]]:
    pool = await asyncpg.create_pool(db_url, min_size=2, max_size=4)
    assert pool is not None
    settings = Settings(campaign_quiet_s=30)
    first = CampaignWatch(connection=amqp, names=Names(prefix), pool=pool, settings=settings)
    second = CampaignWatch(connection=amqp, names=Names(prefix), pool=pool, settings=settings)
    yield first, second
    await first.publisher.close()
    await second.publisher.close()
    await pool.close()


async def test_open_messages_and_recent_activity_keep_a_campaign_open(
    db: asyncpg.Connection, watches: tuple[CampaignWatch, CampaignWatch],
    completions: AbstractQueue,
) -> None:
    first, second = watches
    now = datetime.now(UTC)
    old = now - timedelta(minutes=5)
    await db.execute("UPDATE campaign_watch SET scanned_to = $1", old - timedelta(minutes=1))
    await insert(db, "r1", "waiting", "retrying", old)  # in a delay queue: open
    await insert(db, "s1", "waiting", "sent", old)
    await insert(db, "q1", "quiet", "sent", old)
    await insert(db, "f1", "quiet", "failed", old, error_type="invalid_recipient")
    await insert(db, "n1", "recent", "sent", now)  # not quiet for 30 s yet
    # Two replicas pass at the same time: one holds the pass, the other skips it.
    before = metric("herald_campaigns_completed_total")
    done = await asyncio.gather(first.pass_once(), second.pass_once())
    assert sorted(done, key=len) == [[], ["quiet"]]
    assert metric("herald_campaigns_completed_total") - before == 1
    states = {r["campaign_id"]: r["state"] for r in await db.fetch(
        "SELECT campaign_id, state FROM campaign_completion")}
    assert states == {"waiting": "open", "quiet": "completed", "recent": "open"}
    assert await first.publish_notices() == 1 and await second.publish_notices() == 0
    (message,) = await notices(completions)
    assert CampaignCompleted.model_validate_json(message.body).counters.failed_by_error_type \
        == {"invalid_recipient": 1}
    # The retrying message is sent: after its quiet period the campaign completes.
    await db.execute("UPDATE messages SET status = 'sent', sent_at = $1, updated_at = $1"
                     " WHERE message_id = 'r1'", old + timedelta(seconds=1))
    assert await first.pass_once() == ["waiting"]
    # A delivery report is no activity; a claim after the completion reopens.
    await db.execute("UPDATE messages SET status = 'delivered', delivered_at = now(),"
                     " updated_at = now() WHERE message_id = 'q1'")
    assert await first.pass_once() == []
    assert await db.fetchval("SELECT state FROM campaign_completion"
                             " WHERE campaign_id = 'quiet'") == "completed"
    await db.execute("UPDATE messages SET status = 'sending', sending_at = now(),"
                     " updated_at = now() WHERE message_id = 'f1'")
    await first.pass_once()
    assert await db.fetchval("SELECT state FROM campaign_completion"
                             " WHERE campaign_id = 'quiet'") == "open"
    counts = Counter(r["state"] for r in await db.fetch("SELECT state FROM campaign_completion"))
    assert counts == {"open": 2, "completed": 1}
