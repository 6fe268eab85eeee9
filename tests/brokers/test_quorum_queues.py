"""What the broker under test does with quorum-queue messages handed back.

Herald's parking, crash-loop and replay rules rest on these facts, and they
differ between RabbitMQ 3.10, 4.0 and 4.3 (deploy/local/BROKERS.md). Each
test states what every version does, so the matrix (``make test-broker
BROKER=...``) shows at once when a broker behaves otherwise.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

# Enough hand-backs to pass 4.x's default limit of 20.
ROUNDS = 25
# A limit that means the same on every version (-1 does not: see test_minus_one).
LARGE_LIMIT = 1_000_000


@pytest.fixture
async def version(amqp: AbstractRobustConnection) -> tuple[int, int]:
    raw = str(amqp.transport.connection.server_properties["version"])
    major, minor = raw.split(".")[:2]
    return int(major), int(minor)


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    ch = await amqp.channel()
    yield ch
    await ch.close()


@pytest.fixture
async def queue_name(amqp: AbstractRobustConnection) -> AsyncIterator[str]:
    name = f"t-qq-{uuid.uuid4().hex[:10]}"
    yield name
    ch = await amqp.channel()
    await ch.queue_delete(name)
    await ch.close()


async def declare(channel: AbstractChannel, name: str, **arguments: Any) -> None:
    await channel.declare_queue(name, durable=True,
                                arguments={"x-queue-type": "quorum", **arguments})


async def publish(channel: AbstractChannel, name: str, *bodies: str) -> None:
    for body in bodies:
        await channel.default_exchange.publish(
            aio_pika.Message(body.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=name)


async def take(channel: AbstractChannel, name: str) -> AbstractIncomingMessage | None:
    """One message, unacked; None once the queue stays empty for a second."""
    queue = await channel.get_queue(name, ensure=False)
    for _ in range(20):
        message = await queue.get(no_ack=False, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    return None


async def hand_back_until_gone(
    amqp: AbstractRobustConnection, name: str, how: str,
) -> tuple[int, list[Any]]:
    """Take the queue's one message and hand it back ``how`` until it is gone
    or ROUNDS hand-backs passed: (deliveries, x-delivery-count seen)."""
    counts: list[Any] = []
    channel = await amqp.channel()
    try:
        for _ in range(ROUNDS + 1):
            if how == "close":
                holder = await amqp.channel()
                message = await take(holder, name)
            else:
                message = await take(channel, name)
            if message is None:
                break
            counts.append((message.headers or {}).get("x-delivery-count"))
            if how == "nack":
                await message.nack(requeue=True)
            elif how == "reject":
                await message.reject(requeue=True)
            else:
                await holder.close()
    finally:
        await channel.close()
    return len(counts), counts


async def drain(channel: AbstractChannel, name: str) -> list[str]:
    queue = await channel.get_queue(name, ensure=False)
    bodies = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        bodies.append(message.body.decode())
    return bodies


@pytest.mark.parametrize("how", ["reject", "close"])
async def test_the_default_delivery_limit_is_none_on_3_10_and_20_on_4(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
    version: tuple[int, int], how: str,
) -> None:
    await declare(channel, queue_name)
    await publish(channel, queue_name, "m")
    deliveries, _ = await hand_back_until_gone(amqp, queue_name, how)
    if version >= (4, 0):
        assert deliveries == 21, "4.x drops a message handed back the 21st time"
    else:
        assert deliveries == ROUNDS + 1, "3.10 has no default limit"


async def test_nack_counts_as_a_delivery_before_4_3_only(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
    version: tuple[int, int],
) -> None:
    await declare(channel, queue_name, **{"x-delivery-limit": 3})
    await publish(channel, queue_name, "m")
    deliveries, counts = await hand_back_until_gone(amqp, queue_name, "nack")
    if version >= (4, 3):
        assert deliveries == ROUNDS + 1, "4.3: nack never reaches the limit"
        assert not any(counts), counts
    else:
        assert deliveries == 4
        assert counts[1:] == [1, 2, 3]


async def test_minus_one_is_no_limit_on_4_but_loses_the_message_on_3_10(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
    version: tuple[int, int],
) -> None:
    await declare(channel, queue_name, **{"x-delivery-limit": -1})
    await publish(channel, queue_name, "m")
    deliveries, _ = await hand_back_until_gone(amqp, queue_name, "reject")
    assert deliveries == (ROUNDS + 1 if version >= (4, 0) else 1)


async def test_a_large_limit_keeps_the_message_on_every_version(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
) -> None:
    await declare(channel, queue_name, **{"x-delivery-limit": LARGE_LIMIT})
    await publish(channel, queue_name, "m")
    deliveries, counts = await hand_back_until_gone(amqp, queue_name, "close")
    assert deliveries == ROUNDS + 1
    assert counts[-1] == ROUNDS


async def test_over_the_limit_a_message_is_dead_lettered_when_the_queue_says_where(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
) -> None:
    target = f"{queue_name}.dead"
    await declare(channel, target)
    try:
        await declare(channel, queue_name, **{
            "x-delivery-limit": 2, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target, "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish"})
        await publish(channel, queue_name, "m")
        deliveries, _ = await hand_back_until_gone(amqp, queue_name, "reject")
        assert deliveries == 3
        dead = await take(channel, target)
        assert dead is not None and dead.body == b"m"
        assert (dead.headers or {}).get("x-first-death-reason") == "delivery_limit"
        await dead.ack()
    finally:
        await channel.queue_delete(target)


async def test_declaring_again_with_other_arguments_is_refused(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
) -> None:
    await declare(channel, queue_name)
    other = await amqp.channel()
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="inequivalent arg"):
        await declare(other, queue_name, **{"x-delivery-limit": LARGE_LIMIT})


Requeue = Callable[[AbstractIncomingMessage], Any]


@pytest.mark.parametrize("hand_back", [
    pytest.param(lambda m: m.nack(requeue=True), id="nack"),
    pytest.param(lambda m: m.reject(requeue=True), id="reject"),
])
async def test_a_requeued_message_goes_to_the_tail_on_3_10_and_back_in_place_on_4(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
    version: tuple[int, int], hand_back: Requeue,
) -> None:
    await declare(channel, queue_name)
    await publish(channel, queue_name, "0", "1", "2")
    holder = await amqp.channel()
    first = await take(holder, queue_name)
    assert first is not None
    await hand_back(first)
    await holder.close()
    order = await drain(channel, queue_name)
    assert order == (["0", "1", "2"] if version >= (4, 0) else ["1", "2", "0"])


async def test_a_closed_channel_returns_what_it_held_to_the_head_in_order(
    amqp: AbstractRobustConnection, channel: AbstractChannel, queue_name: str,
) -> None:
    await declare(channel, queue_name)
    await publish(channel, queue_name, "0", "1", "2", "3")
    holder = await amqp.channel()
    held = [await take(holder, queue_name) for _ in range(2)]
    assert [m.body for m in held if m is not None] == [b"0", b"1"]
    await holder.close()
    assert await drain(channel, queue_name) == ["0", "1", "2", "3"]
