"""Failure domains end to end (real broker and database, defaults): flaky recipients
never pause a healthy provider, and one destination's outage or 429s touch only
that destination's messages."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.sandbox import Sandbox
from consumer.topology import Names
from tests.conftest import RunningSandbox, SandboxServices, free_port
from tests.helpers import publish_all, queue_depth, request, wait_for


@pytest.fixture
async def second_sandbox() -> AsyncIterator[RunningSandbox]:
    """Another fake HTTP endpoint on another port: another failure domain."""
    box = Sandbox()
    runner = web.AppRunner(box.app, access_log=None, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield RunningSandbox(box, f"http://127.0.0.1:{port}")
    await runner.cleanup()


async def _sent(db: asyncpg.Connection, prefix: str = "") -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM messages WHERE status = 'sent' AND message_id LIKE $1",
        prefix + "%"))


async def test_ten_percent_flaky_recipients_never_pause_the_channel(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """400 messages, 10 % of the recipients answer 503 twice and then 200: every flaky
    message is sent after exactly 3 attempts, every other once, nothing deferred."""
    service = await sandbox_services()
    requests = [request(f"f-{i}", sandbox.url(f"r{i}", fail=2, fail_status=503) if i % 10 == 3
                        else sandbox.url(f"r{i}")) for i in range(400)]
    started = time.monotonic()
    await publish_all(amqp, prefix, requests)

    async def all_sent() -> bool:
        return await _sent(db) == 400

    await wait_for(all_sent, timeout=60, interval=0.2, what="400 sent")
    print(f"\n400 messages (10 % flaky) sent in {time.monotonic() - started:.1f} s")
    counts = sandbox.sandbox.accepted_counts()
    attempts = {r["message_id"]: r["attempts"] for r in await db.fetch(
        "SELECT message_id, attempts FROM messages")}
    for i in range(400):
        assert counts[f"f-{i}"] == 1
        assert attempts[f"f-{i}"] == (3 if i % 10 == 3 else 1), i
    assert await db.fetchval(
        "SELECT count(*) FROM delivery_attempts WHERE outcome = 'paused'") == 0
    assert service.channels.trips("http") == 0


async def test_one_dead_host_defers_only_its_own_messages(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, second_sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """One webhook host answers 503 to everything while another is healthy: the dead
    host's domain opens (its messages wait, uncharged once it is open); the healthy
    host's messages are never deferred or retried, and flow as fast as beside a healthy
    neighbour with the same traffic."""
    service = await sandbox_services()

    async def run(tag: str) -> float:
        mixed = []
        for i in range(300):
            mixed.append(request(f"{tag}-ok-{i}", sandbox.url(f"h{i % 20}")))
            mixed.append(request(f"{tag}-other-{i}", second_sandbox.url(f"d{i % 20}")))
        await publish_all(amqp, prefix, mixed)

        async def healthy_sent() -> bool:
            return await _sent(db, f"{tag}-ok-") == 300

        await wait_for(healthy_sent, timeout=60, interval=0.05, what="300 healthy sent")
        times = [r.at for r in sandbox.sandbox.received
                 if r.message_id and r.message_id.startswith(f"{tag}-ok-") and r.accepted]
        return max(times) - min(times)

    beside_healthy = await run("calm")

    async def calm_done() -> bool:
        return await _sent(db, "calm-other-") == 300

    await wait_for(calm_done, timeout=60, what="the healthy neighbour's 300 sent")
    second_sandbox.sandbox.http_outage(3600)
    beside_dead = await run("storm")
    print(f"\nhealthy host, 300 messages: {beside_healthy:.2f} s beside a healthy host,"
          f" {beside_dead:.2f} s beside a dead one")

    async def dead_domain_open() -> bool:
        return any(d["domain"] == second_sandbox.base_url
                   for d in service.channels.open_domains())

    await wait_for(dead_domain_open, timeout=30, what="the dead host's domain open")
    ok_attempts = await db.fetch(
        "SELECT outcome, count(*) AS n FROM delivery_attempts"
        " WHERE message_id LIKE '%-ok-%' GROUP BY outcome")
    assert {r["outcome"]: r["n"] for r in ok_attempts} == {"sent": 600}
    assert await db.fetchval("SELECT count(*) FROM messages WHERE message_id LIKE '%-ok-%'"
                             " AND attempts <> 1") == 0
    # Only the dead host's domain opened; the healthy host's never did.
    assert [d["domain"] for d in service.channels.open_domains()] == [
        second_sandbox.base_url]
    assert service.channels.domain("http", sandbox.base_url).detector.trips == 0
    # The dead host's messages: charged until its domain opened, then paused.
    charged = await db.fetchval(
        "SELECT count(*) FROM delivery_attempts WHERE message_id LIKE 'storm-other-%'"
        " AND outcome = 'retrying'")
    assert charged <= 60, charged  # at most the detector's window
    assert await queue_depth(amqp, Names(prefix).parked) == 0
    # Generous (a shared 2-core machine): a dead neighbour costs no more than a live one.
    assert beside_dead <= 1.5 * beside_healthy + 1.0, (beside_healthy, beside_dead)


async def test_one_host_answering_429_leaves_the_others_alone(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, second_sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """A host that answers 429 above 5 requests/s: its messages are retried after its
    Retry-After; the other host's messages go through once each, none deferred."""
    service = await sandbox_services()
    mixed = []
    for i in range(200):
        mixed.append(request(f"ok-{i}", sandbox.url(f"h{i % 10}")))
        mixed.append(request(f"slow-{i}", second_sandbox.url("limited", rate_limit=5,
                                                              retry_after="1")))
    await publish_all(amqp, prefix, mixed)

    async def healthy_sent() -> bool:
        return await _sent(db, "ok-") == 200

    await wait_for(healthy_sent, timeout=60, interval=0.1, what="200 healthy sent")
    assert await db.fetchval("SELECT count(*) FROM delivery_attempts"
                             " WHERE message_id LIKE 'ok-%' AND outcome <> 'sent'") == 0
    assert sum(1 for r in second_sandbox.sandbox.received if r.status == 429) > 0
    assert service.channels.trips("http") == 0  # 429s never open a domain
    limited = service.channels.domain("http", second_sandbox.base_url)
    assert limited.limiter.rate is None  # no configured rate: nothing adapts
