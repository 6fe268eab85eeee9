"""How much a lane holds in flight, through the real broker: a slow endpoint
makes it raise its prefetch (consumer.delivery.inflight); a channel with a rate
keeps the configured one; a channel that probed takes its whole prefetch again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from consumer.delivery.channels import ChannelControl
from consumer.topology import Names
from tests.conftest import RunningSandbox, ServiceFactory
from tests.helpers import metric, publish_all, queue_depth, request, wait_for


def prefetch(channel: str, lane: str) -> float:
    return metric("herald_prefetch", channel=channel, lane=lane)


async def _sent(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'"))


async def test_a_slow_endpoint_makes_the_lane_hold_more_in_flight(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    # 100 ms per answer and 4 in flight: 40/s at most. The lane must find that more
    # in flight pays, up to its ceiling, and every message is still sent once.
    slow = sandbox.url("slow", latency_ms=100)
    total = 1500
    await publish_all(amqp, prefix, [request(f"s-{i}", slow) for i in range(total)])
    await start_service(prefetch=4, prefetch_max=64)

    await wait_for(lambda: prefetch("http", "main") >= 32, timeout=60,
                   what="the main lane's prefetch raised")
    assert prefetch("http", "main") <= 64

    async def all_sent() -> bool:
        return await _sent(db) == total

    await wait_for(all_sent, timeout=120, what="every message sent")
    assert await queue_depth(amqp, Names(prefix).send_queue("http", "main")) == 0
    counts = sandbox.sandbox.accepted_counts()
    assert all(counts[f"s-{i}"] == 1 for i in range(total))


async def test_a_channel_with_a_rate_keeps_the_configured_prefetch(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    slow = sandbox.url("slow", latency_ms=100)
    await publish_all(amqp, prefix, [request(f"r-{i}", slow) for i in range(300)])
    await start_service(prefetch=4, prefetch_max=64, http_rate=1000.0)

    async def some_sent() -> bool:
        return await _sent(db) >= 150

    # 150 sends at 40/s: several of the lane's periods, in which it would have grown.
    await wait_for(some_sent, timeout=60, what="150 sent")
    assert prefetch("http", "main") == 4
    assert prefetch("http", "bulk") == 2


class HoldingPipeline:
    """Stands in for the pipeline (the broker is real): holds every delivery until
    the test lets it go."""

    def __init__(self) -> None:
        self.held = 0
        self.gate = asyncio.Semaphore(0)

    def let_go(self, count: int) -> None:
        for _ in range(count):
            self.gate.release()

    async def process(self, message: AbstractIncomingMessage, channel: str,
                      lane: str = "main", *,
                      ack: Callable[[], Awaitable[None]] | None = None) -> None:
        self.held += 1
        try:
            await self.gate.acquire()
            await (message.ack() if ack is None else ack())
        finally:
            self.held -= 1


async def test_after_probing_a_channel_takes_its_full_prefetch_again(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """A paused channel probes with one message at a time; once its domain closes it
    must take its whole prefetch again (a quorum queue applies a new prefetch only
    to a consumer started after it, so the lane consumes again)."""
    names = Names(prefix)
    pipeline = HoldingPipeline()
    control = ChannelControl(amqp, names, "sms", pipeline, 8)  # type: ignore[arg-type]
    await publish_all(amqp, prefix, [
        {"message_id": f"p-{i}", "channel": "sms", "to": "+15551234567", "body": "hi"}
        for i in range(100)])
    await control.start()
    try:
        await wait_for(lambda: pipeline.held == 8, timeout=10, what="8 held")
        control.pause("test", 0.0)
        # The probe's consumer takes one message, beside the 8 the old one holds.
        await wait_for(lambda: control.mode == "probing" and pipeline.held == 9, timeout=10,
                       what="probing with one more")
        pipeline.let_go(9)
        await wait_for(lambda: pipeline.held == 1, timeout=10, what="the next probe alone")
        control.resume()
        await wait_for(lambda: pipeline.held >= 9, timeout=10,
                       what="the full prefetch taken again")
    finally:
        pipeline.let_go(1000)
        await control.stop_consuming()
        await control.drain(5.0)
        await control.close()
