"""Flow control end to end: rate limits (fixed and adaptive), outage detection,
campaign daily limits with a controllable clock, quiet hours, and transactional
messages that never wait behind a campaign."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.topology import Names
from tests.conftest import RunningSandbox, SandboxServices
from tests.helpers import publish_all, queue_depth, request, wait_for


async def _count(db: asyncpg.Connection, where: str = "status = 'sent'") -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM messages WHERE {where}"))


def _max_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_rate_limit_paces_a_channel(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """Limited to 50/s, 1,000 messages take 20 ± 1 s by the provider's clock, and no
    1-second window has more than the rate plus the bucket (one second's worth)."""
    await sandbox_services(HERALD_HTTP_RATE="50")
    url = sandbox.url("paced")
    await publish_all(amqp, prefix, [request(f"r-{i}", url) for i in range(1000)])

    async def all_sent() -> bool:
        return await _count(db) == 1000

    await wait_for(all_sent, timeout=60, interval=0.5, what="1,000 sent")
    times = [r.at for r in sandbox.sandbox.received if r.accepted]
    span = max(times) - min(times)
    print(f"1,000 messages at 50/s took {span:.2f} s; busiest second: "
          f"{_max_in_any_second(times)}")
    assert 19.0 <= span <= 21.0, span
    assert _max_in_any_second(times) <= 50 + 50


async def test_adaptive_rate_settles_under_the_providers_limit(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """The endpoint answers 429 above 40/s; Herald (configured for 100/s) settles near
    40/s with few 429s, and nothing is parked for rate limiting."""
    await sandbox_services(HERALD_HTTP_RATE="100")
    url = sandbox.url("limited", rate_limit=40)
    total = 1200
    await publish_all(amqp, prefix, [request(f"a-{i}", url) for i in range(total)])

    async def all_sent() -> bool:
        return await _count(db) == total

    await wait_for(all_sent, timeout=120, interval=0.5, what="all sent under a 40/s limit")
    received = sandbox.sandbox.received
    accepted = sorted(r.at for r in received if r.accepted)
    refused = sum(1 for r in received if r.status == 429)
    steady = [t for t in accepted if t >= accepted[0] + 5]  # after the first cuts
    rate = len(steady) / (steady[-1] - steady[0])
    print(f"steady rate {rate:.1f}/s, {refused} 429s for {total} messages")
    assert 30 <= rate <= 42, rate
    assert refused <= 0.15 * total, refused
    assert await queue_depth(amqp, Names(prefix).parked) == 0


@pytest.mark.slow
async def test_an_outage_pauses_instead_of_burning_attempts(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """A 2-minute 503 outage of the http endpoint during 2,000 messages: its failure
    domain opens, attempts charged during the outage stay within the detector's window
    (48 of the last 60 first attempts failed), nothing is parked, and everything is
    delivered after it ends."""
    await sandbox_services(HERALD_HTTP_RATE="100", HERALD_PAUSE_BASE_S="2", HERALD_PAUSE_MAX_S="10")
    urls = [sandbox.url(f"hook-{n}") for n in range(20)]
    requests = [request(f"o-{i}", urls[i % 20]) for i in range(2000)]
    # 300 sent before the outage, the rest published once it has begun (the outage
    # must not depend on how fast the machine publishes).
    await publish_all(amqp, prefix, requests[:300])

    async def some_sent() -> bool:
        return await _count(db) >= 300

    await wait_for(some_sent, timeout=60, what="300 sent before the outage")
    sandbox.sandbox.http_outage(120)
    await publish_all(amqp, prefix, requests[300:])

    async def all_sent() -> bool:
        return await _count(db) == 2000

    await wait_for(all_sent, timeout=260, interval=1.0, what="all 2,000 sent after the outage")
    charged = await db.fetchval(
        "SELECT count(*) FROM delivery_attempts WHERE outcome = 'retrying' AND error_code = '503'")
    uncharged = await db.fetchval(
        "SELECT count(*) FROM delivery_attempts WHERE outcome = 'paused'")
    refused = sum(1 for r in sandbox.sandbox.received if r.status == 503)
    print(f"outage: {refused} calls refused, {charged} attempts charged, "
          f"{uncharged} not charged (domain open)")
    # The failures that opened the domain (and their retries before it opened), not
    # one per message.
    assert charged <= 60, charged
    assert uncharged >= 1
    assert await queue_depth(amqp, Names(prefix).parked) == 0
    # Probing kept the calls during two minutes of outage to a small number.
    assert refused <= charged + uncharged
    assert max(sandbox.sandbox.accepted_counts().values()) == 1


class OffsetClock:
    """Real time moved by a fixed offset: day boundaries arrive in seconds."""

    def __init__(self, seconds_to_midnight: float) -> None:
        real = datetime.now(UTC)
        midnight = (real + timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                      microsecond=0)
        self.offset = midnight - real - timedelta(seconds=seconds_to_midnight)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def _publish_raw(amqp: AbstractRobustConnection, prefix: str,
                       bodies: list[tuple[dict[str, object], dict[str, object]]],
                       lane_key: str) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(prefix, ensure=False)
    for body, headers in bodies:
        await exchange.publish(aio_pika.Message(
            json.dumps(body).encode(), headers=headers, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT), lane_key)
    await channel.close()


async def test_daily_limit_first_attempts_before_retries(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """Limit 250. Day D: 450 first attempts (250 go, 200 wait for D+1) and 100 retries
    (quota gone: wait for D+1). Day D+1: the 200 first attempts and 100 retries are due:
    200 first sends + 50 retries go, the other 50 retries wait for D+2."""
    clock = OffsetClock(seconds_to_midnight=25)
    await db.execute("INSERT INTO campaigns (campaign_id, daily_limit, timezone) "
                     "VALUES ('spring', 250, 'UTC')")
    await sandbox_services(now=clock)
    deferred = "herald_messages_deferred_total"
    deferred_before = _sample(deferred, channel="http", reason="daily_limit")
    url = sandbox.url("campaign")
    firsts = [({"message_id": f"f-{i}", "channel": "http", "to": url, "body": {"i": i},
                "campaign_id": "spring"}, {}) for i in range(450)]
    await _publish_raw(amqp, prefix, firsts, "send.http.bulk")

    async def day_one_firsts() -> bool:
        return (await _count(db) == 250
                and await _count(db, "status = 'queued'") == 200)

    await wait_for(day_one_firsts, timeout=20, what="250 sent and 200 queued on day D")
    retries = [({"message_id": f"r-{i}", "channel": "http", "to": url, "body": {"i": i},
                 "campaign_id": "spring"}, {"x-herald-attempt": 2}) for i in range(100)]
    await _publish_raw(amqp, prefix, retries, "send.http.bulk")

    await wait_for(lambda: _sample(deferred, channel="http", reason="daily_limit")
                   - deferred_before >= 300,
                   timeout=20, what="200 first attempts and 100 retries deferred")
    assert _sent_ids(sandbox, "r-") == set()
    day_one = clock().date()

    async def day_two() -> bool:
        return await _count(db) >= 250 + 200 + 50

    try:
        await wait_for(day_two, timeout=60, interval=0.5, what="day D+1 sends")
    finally:
        print("statuses:", await db.fetch("SELECT status, count(*) FROM messages GROUP BY 1"),
              "usage:", await db.fetch("SELECT * FROM campaign_daily_usage"),
              "sent r-:", len(_sent_ids(sandbox, "r-")), "sent f-:", len(_sent_ids(sandbox, "f-")))
    assert clock().date() == day_one + timedelta(days=1)
    assert len(_sent_ids(sandbox, "f-")) == 450
    assert len(_sent_ids(sandbox, "r-")) == 50
    usage = await db.fetchrow("SELECT first_attempts, retries FROM campaign_daily_usage "
                              "WHERE campaign_id = 'spring' AND day = $1",
                              day_one + timedelta(days=1))
    assert (usage["first_attempts"], usage["retries"]) == (200, 50)
    # No attempt was used by waiting.
    assert await db.fetchval("SELECT max(attempts) FROM messages WHERE message_id LIKE 'f-%'") == 1


async def test_quiet_hours_defer_until_they_end(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    clock = OffsetClock(seconds_to_midnight=3600)  # 23:00 by the campaign's clock
    now = clock()
    start = (now - timedelta(minutes=5)).time().replace(microsecond=0)
    end = (now + timedelta(seconds=4)).time().replace(microsecond=0)
    await db.execute("INSERT INTO campaigns (campaign_id, timezone, quiet_start, quiet_end) "
                     "VALUES ('night', 'UTC', $1, $2)", start, end)
    await sandbox_services(now=clock)
    await _publish_raw(amqp, prefix, [({"message_id": "q-1", "channel": "http",
                                        "to": sandbox.url("quiet"), "body": {},
                                        "campaign_id": "night"}, {})], "send.http.bulk")

    async def queued() -> bool:
        return await _count(db, "status = 'queued'") == 1

    await wait_for(queued, timeout=5, what="q-1 waiting for the end of quiet hours")
    assert sandbox.sandbox.received == []

    async def sent() -> bool:
        return await _count(db) == 1

    await wait_for(sent, timeout=15, what="q-1 sent after quiet hours")
    sent_at = clock() - timedelta(seconds=time.time() - sandbox.sandbox.received[0].at)
    assert sent_at.time() >= end


@pytest.mark.slow
async def test_transactional_message_does_not_wait_behind_a_campaign(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """100,000 campaign messages wait on sms; a one-time code published afterwards is
    sent within a second, while the campaign keeps flowing."""
    bulk = [({"message_id": f"c-{i}", "channel": "sms", "to": f"+1555{i:07d}",
              "body": "sale", "campaign_id": "mega"}, {}) for i in range(100_000)]
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(prefix, ensure=False)
    for start in range(0, len(bulk), 2000):
        await _publish_batch(exchange, bulk[start:start + 2000], "send.sms.bulk")
    await channel.close()
    await sandbox_services()
    box = sandbox.sandbox.providers

    async def campaign_flowing() -> bool:
        return len(box.accepted("twilio")) >= 500

    await wait_for(campaign_flowing, timeout=60, what="the campaign flowing")
    assert await queue_depth(amqp, Names(prefix).send_queue("sms", "bulk")) > 50_000
    before = len(box.accepted("twilio"))
    published = time.time()
    await publish_all(amqp, prefix, [{"message_id": "otp-1", "channel": "sms",
                                      "to": "+15559999999", "body": "code 123456"}])

    def otp_sent() -> bool:
        return any(r.recipient == "+15559999999" for r in box.accepted("twilio"))

    await wait_for(otp_sent, timeout=10, interval=0.02, what="the one-time code sent")
    (otp,) = [r for r in box.accepted("twilio") if r.recipient == "+15559999999"]
    delay = otp.at - published
    during = len(box.accepted("twilio")) - before
    print(f"one-time code sent {delay * 1000:.0f} ms after publish, behind 100,000 "
          f"campaign messages; {during} campaign sends meanwhile")
    assert delay < 1.0, delay
    assert during > 1  # the campaign did not stop for it


async def _publish_batch(exchange: aio_pika.abc.AbstractExchange,
                         bodies: list[tuple[dict[str, object], dict[str, object]]],
                         key: str) -> None:
    await asyncio.gather(*(exchange.publish(aio_pika.Message(
        json.dumps(body).encode(), headers=headers, content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT), key) for body, headers in bodies))


def _sent_ids(sandbox: RunningSandbox, prefix: str) -> set[str]:
    return {r.message_id for r in sandbox.sandbox.received
            if r.accepted and r.message_id and r.message_id.startswith(prefix)}


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


