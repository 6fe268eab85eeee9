"""Shared test helpers: waiting on conditions with deadlines, broker inspection."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import REGISTRY

from consumer.publisher import Publisher
from consumer.topology import Names


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def request(message_id: str, to: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    return {"message_id": message_id, "channel": "http", "to": to,
            "body": body if body is not None else {"text": "hi"}, **extra}


async def publish_all(
    connection: AbstractRobustConnection, prefix: str, requests: Iterable[dict[str, Any]],
    *, window: int = 500,
) -> int:
    publisher = Publisher(connection, Names(prefix))
    batch: list[Awaitable[None]] = []
    count = 0
    for r in requests:
        batch.append(publisher.publish_send(r["channel"], json.dumps(r).encode(),
                                            message_id=r["message_id"]))
        if len(batch) >= window:
            await asyncio.gather(*batch)
            count += len(batch)
            batch = []
    await asyncio.gather(*batch)
    count += len(batch)
    await publisher.close()
    return count


async def publish_raw(
    connection: AbstractRobustConnection, prefix: str, channel: str, body: bytes,
    *, headers: dict[str, Any] | None = None,
) -> None:
    publisher = Publisher(connection, Names(prefix))
    await publisher.publish_send(channel, body, headers=headers)
    await publisher.close()


async def queue_depth(connection: AbstractRobustConnection, name: str) -> int:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def drain_queue(
    connection: AbstractRobustConnection, name: str, *, expect: int, timeout: float = 30.0
) -> list[AbstractIncomingMessage]:
    """Take (and ack) messages from a queue until ``expect`` arrived or the deadline passes."""
    channel = await connection.channel()
    got: list[AbstractIncomingMessage] = []
    try:
        queue = await channel.get_queue(name, ensure=False)
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            got.append(message)
        return got
    finally:
        await channel.close()


async def connect(url: str) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url)


def broker_version(connection: AbstractRobustConnection) -> tuple[int, int]:
    """The RabbitMQ version of the node ``connection`` talks to, as (major, minor)."""
    assert connection.transport is not None
    raw = str(connection.transport.connection.server_properties["version"])
    major, minor = raw.split(".")[:2]
    return int(major), int(minor)


def metric(name: str, **labels: str) -> float:
    """A sample of this process's Prometheus registry (0 before its first count)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
