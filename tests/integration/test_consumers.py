"""Herald's consumers against what the broker does to them: a handler that
crashes, consumers the broker cancels, a connection that is lost, a list of
nodes of which some are down. On every broker of the matrix (make test-broker).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import REGISTRY

from consumer.broker import ClusterConnection, connect, connect_robust, node_name
from consumer.errors import BrokerUnreachable
from consumer.publisher import Publisher
from consumer.service import Service
from consumer.topology import Names, Topology
from tests.conftest import AMQP_URL, RunningSandbox, ServiceFactory, free_port
from tests.helpers import broker_version, drain_queue, publish_all, queue_depth, request, wait_for

DELIVERY_LIMIT = 20  # HERALD_DELIVERY_LIMIT's default, which the prefix fixture declares


def _cancelled(queue: str) -> float:
    return REGISTRY.get_sample_value("herald_consumer_cancelled_total", {"queue": queue}) or 0.0


async def _status(db: asyncpg.Connection, message_id: str) -> str | None:
    value = await db.fetchval("SELECT status FROM messages WHERE message_id = $1", message_id)
    return None if value is None else str(value)


def crash_on(service: Service, message_id: str) -> list[int]:
    """Make the service's handler raise for one message id; returns the list that
    records each delivery of it (a crash the pipeline did not foresee)."""
    assert service.pipeline is not None
    pipeline = service.pipeline
    real = pipeline.process
    calls: list[int] = []

    async def process(message: AbstractIncomingMessage, channel: str,
                      lane: str = "main", **kwargs: Any) -> Any:
        if json.loads(message.body).get("message_id") == message_id:
            calls.append(1)
            raise RuntimeError(f"the handler crashes on {message_id}")
        return await real(message, channel, lane, **kwargs)

    pipeline.process = process  # type: ignore[method-assign]
    return calls


# -- a handler that crashes ---------------------------------------------------------------


async def test_a_message_that_crashes_the_handler_ends_in_the_parking_queue(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    """Handed back with reject, which every version counts (4.3 does not count a
    nack): past the send queue's delivery limit the broker dead-letters it to the
    parking queue, and the other messages flow meanwhile."""
    names = Names(prefix)
    service = await start_service()
    calls = crash_on(service, "crash-1")
    await publish_all(amqp, prefix, [request("crash-1", sandbox.url("ok")),
                                     *(request(f"ok-{i}", sandbox.url("ok")) for i in range(5))])

    async def parked() -> bool:
        return await queue_depth(amqp, names.parked) == 1

    await wait_for(parked, timeout=60, what="the crashing message dead-lettered to parked")
    for i in range(5):
        assert await _status(db, f"ok-{i}") == "sent"
    # Delivered once, then handed back DELIVERY_LIMIT times before the broker gave up.
    assert len(calls) == DELIVERY_LIMIT + 1
    assert await queue_depth(amqp, names.send_queue("http")) == 0
    (copy,) = await drain_queue(amqp, names.parked, expect=1, timeout=10)
    assert json.loads(copy.body)["message_id"] == "crash-1"
    assert copy.headers["x-first-death-reason"] == "delivery_limit"
    assert copy.headers["x-first-death-queue"] == names.send_queue("http")
    assert sandbox.sandbox.accepted_counts()["crash-1"] == 0


# -- consumers the broker cancels -----------------------------------------------------------


async def _delete_and_declare_again(amqp: AbstractRobustConnection, prefix: str,
                                    queue: str) -> None:
    channel = await amqp.channel()
    await channel.queue_delete(queue)
    await channel.close()
    # What an operator (or another Herald starting) does: herald topology declare.
    await asyncio.sleep(0.5)
    assert await Topology(Names(prefix)).declare(amqp) == []


async def test_a_send_queue_deleted_and_declared_again_is_consumed_again(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    names = Names(prefix)
    queue = names.send_queue("http")
    await start_service()
    await publish_all(amqp, prefix, [request("before-1", sandbox.url("ok"))])
    await wait_for(lambda: _is_sent(db, "before-1"), timeout=20, what="before-1 sent")
    cancelled = _cancelled(queue)

    await _delete_and_declare_again(amqp, prefix, queue)
    await publish_all(amqp, prefix, [request(f"after-{i}", sandbox.url("ok")) for i in range(3)])

    for i in range(3):
        await wait_for(lambda i=i: _is_sent(db, f"after-{i}"), timeout=30,
                       what=f"after-{i} sent after the queue came back")
    assert _cancelled(queue) == cancelled + 1
    assert await _consumers(amqp, queue) == 1


async def test_the_events_queue_deleted_and_declared_again_is_consumed_again(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    names = Names(prefix)
    await start_service()
    await publish_all(amqp, prefix, [request("ev-1", sandbox.url("ok"))])
    await wait_for(lambda: _is_sent(db, "ev-1"), timeout=20, what="ev-1 sent")
    provider_id = await db.fetchval(
        "SELECT provider_message_id FROM messages WHERE message_id = 'ev-1'")
    cancelled = _cancelled(names.events)

    await _delete_and_declare_again(amqp, prefix, names.events)
    await _publish_event(amqp, prefix, provider_id, "delivered")

    await wait_for(lambda: _has_status(db, "ev-1", "delivered"), timeout=30,
                   what="the event applied after the events queue came back")
    assert _cancelled(names.events) == cancelled + 1


@pytest.mark.slow
async def test_a_consumer_cancelled_for_its_timeout_consumes_again_on_4_3(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    """From RabbitMQ 4.3 a delivery held past the consumer timeout cancels the
    consumer (basic.cancel) instead of closing the channel; earlier versions
    close the channel, and only at their 60 s check (deploy/local/BROKERS.md)."""
    if broker_version(amqp) < (4, 3):
        pytest.skip("RabbitMQ < 4.3 closes the channel instead (covered by restarts)")
    names = Names(prefix)
    queue = names.send_queue("http")
    policy = f"{prefix}-timeout"
    await _rabbitmqctl("set_policy", policy, f"^{queue}$", '{"consumer-timeout": 1000}',
                       "--apply-to", "queues", "--priority", "10")
    try:
        await start_service()
        cancelled = _cancelled(queue)
        # The provider answers after 1.5 s: the broker cancels the consumer at 1 s.
        await publish_all(amqp, prefix, [request("slow-1", sandbox.url("slow", latency_ms=1500))])
        await wait_for(lambda: _cancelled(queue) > cancelled, timeout=20,
                       what="the broker cancelling the consumer")
        await wait_for(lambda: _is_sent(db, "slow-1"), timeout=20, what="slow-1 sent")
    finally:
        await _rabbitmqctl("clear_policy", policy)
    await publish_all(amqp, prefix, [request("next-1", sandbox.url("ok"))])
    await wait_for(lambda: _is_sent(db, "next-1"), timeout=30,
                   what="next-1 sent by the consumer that came back")
    # The copy the broker gave back was not sent a second time.
    assert sandbox.sandbox.accepted_counts()["slow-1"] == 1


# -- a list of nodes ---------------------------------------------------------------------------


def _dead_node() -> str:
    """A loopback address where nothing listens."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"


async def test_a_node_that_is_down_is_skipped_at_start_and_after_a_lost_connection(
    prefix: str,
) -> None:
    dead = _dead_node()
    connection = await connect_robust([dead, AMQP_URL, dead])
    try:
        assert isinstance(connection, ClusterConnection)
        assert connection.node == node_name(AMQP_URL)
        names = Names(prefix)
        publisher = Publisher(connection, names)
        await publisher.publish(names.parked, names.parked, b"before")
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        # The connection drops (as when the node dies): the next node of the list is
        # tried at once (the dead one), then the one after, round to the live node.
        assert connection.transport is not None
        await connection.transport.connection.close(ConnectionResetError("test"))
        await asyncio.wait_for(reconnected.wait(), 30)
        assert connection.node == node_name(AMQP_URL)
        await publisher.publish(names.parked, names.parked, b"after")
    finally:
        await connection.close()
    plain = await connect([dead, AMQP_URL])
    async with plain:
        assert await queue_depth_on(plain, Names(prefix).parked) == 2


async def test_no_node_answering_is_one_line_naming_each(prefix: str) -> None:
    first, second = _dead_node(), _dead_node()
    with pytest.raises(BrokerUnreachable) as info:
        await connect_robust(f"{first},{second}", timeout_s=5)
    message = str(info.value)
    assert message.startswith("cannot reach RabbitMQ at 127.0.0.1:")
    assert node_name(first) in message and node_name(second) in message
    assert "guest" not in message and "\n" not in message
    with pytest.raises(BrokerUnreachable):
        await connect([first], timeout_s=5)


# -- helpers ----------------------------------------------------------------------------------


async def _is_sent(db: asyncpg.Connection, message_id: str) -> bool:
    return await _status(db, message_id) == "sent"


async def _has_status(db: asyncpg.Connection, message_id: str, status: str) -> bool:
    return await _status(db, message_id) == status


async def _consumers(amqp: AbstractRobustConnection, queue: str) -> int:
    channel = await amqp.channel()
    try:
        underlay = await channel.get_underlay_channel()
        result = await underlay.queue_declare(queue, passive=True)
        return int(result.consumer_count or 0)
    finally:
        await channel.close()


async def queue_depth_on(connection: Any, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def _publish_event(amqp: AbstractRobustConnection, prefix: str, provider_message_id: str,
                         status: str) -> None:
    names = Names(prefix)
    body = json.dumps({"provider": "http", "provider_message_id": provider_message_id,
                       "status": status, "occurred_at": "2026-01-01T00:00:00Z"}).encode()
    await Publisher(amqp, names).publish(names.events, f"http.{status}", body,
                                         message_id=None)


async def _rabbitmqctl(*args: str) -> None:
    from tests.conftest import REPO

    proc = await asyncio.create_subprocess_exec(
        "bash", str(REPO / "deploy" / "local" / "rabbitmq.sh"), "ctl", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")

