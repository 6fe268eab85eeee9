"""Helpers for the operator-tool tests: the herald CLI as a child process,
filling the parking lot, and peeking at its order without changing it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from consumer.publisher import Publisher
from consumer.topology import Names
from tests.conftest import AMQP_URL, REPO
from tests.helpers import queue_depth, wait_for


async def herald_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``python -m consumer ARGS`` with the test's environment, to completion:
    (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *args, env={**os.environ, **env}, cwd=str(REPO),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def park_directly(
    amqp: AbstractRobustConnection, db: asyncpg.Connection, prefix: str,
    requests: Iterable[tuple[dict[str, Any], str]], *, attempts: int = 1,
) -> list[uuid.UUID]:
    """Park send requests as the pipeline would (copy in the queue, row in the
    index, a failed message row), without running it: (request, error_type)."""
    names = Names(prefix)
    publisher = Publisher(amqp, names)
    ids = []
    try:
        for req, error_type in requests:
            parked_id = uuid.uuid4()
            body = json.dumps(req).encode()
            headers = {"x-herald-attempt": attempts, "x-herald-error-type": error_type,
                       "x-herald-error-code": "400", "x-herald-last-error": "HTTP 400",
                       "x-herald-parked-at": datetime.now(UTC).isoformat(),
                       "x-herald-channel": req["channel"], "x-herald-message-id":
                       req["message_id"], "x-herald-parked-id": str(parked_id)}
            await publisher.publish(names.parked, names.parked, body, headers=headers,
                                    message_id=req["message_id"])
            await db.execute(
                """INSERT INTO messages (message_id, status, channel, recipient, campaign_id,
                       payload, attempts, failed_at, last_error_type)
                   VALUES ($1, 'failed', $2, $3, $4, $5::text::jsonb, $6, now(), $7)""",
                req["message_id"], req["channel"], req["to"], req.get("campaign_id"),
                body.decode(), attempts, error_type)
            await db.execute(
                """INSERT INTO parked_messages (parked_id, message_id, channel, recipient,
                       campaign_id, attempts, error_type, error_code, last_error, body, headers)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, '400', 'HTTP 400', $8, $9::text::jsonb)""",
                parked_id, req["message_id"], req["channel"], req["to"], req.get("campaign_id"),
                attempts, error_type, body, json.dumps(headers))
            ids.append(parked_id)
    finally:
        await publisher.close()
    return ids


async def peek(queue_name: str) -> list[AbstractIncomingMessage]:
    """Every message of a quorum queue in order, left where it was: taken
    unacked on a channel that is then closed (the broker returns them to the
    head in order, which test_parked.py pins)."""
    connection = await aio_pika.connect(AMQP_URL)
    got: list[AbstractIncomingMessage] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        depth = int(queue.declaration_result.message_count or 0)
        if depth:
            await channel.set_qos(prefetch_count=depth)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(inbox.put)
            while len(got) < depth:
                got.append(await asyncio.wait_for(inbox.get(), 10))
        await channel.close()
    if got:
        # The broker answers the close before the queue has put them back.
        async def returned() -> bool:
            return await queue_depth_at(queue_name) >= len(got)

        await wait_for(returned, timeout=10, what="peeked messages ready again")
    got.sort(key=lambda m: m.delivery_tag or 0)
    return got


async def queue_depth_at(queue_name: str) -> int:
    """Messages ready in ``queue_name``, over a connection of its own."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)


def parked_ids(messages: Iterable[AbstractIncomingMessage]) -> list[str]:
    return [str((m.headers or {}).get("x-herald-parked-id")) for m in messages]


async def wait_parked(db: asyncpg.Connection, amqp: AbstractRobustConnection, prefix: str,
                      count: int, *, timeout: float = 60) -> None:
    """Wait until ``count`` copies are indexed and in the parking queue."""

    async def done() -> bool:
        rows = await db.fetchval("SELECT count(*) FROM parked_messages WHERE state = 'parked'")
        return bool(rows == count and await queue_depth(amqp, Names(prefix).parked) == count)

    await wait_for(done, timeout=timeout, interval=0.2, what=f"{count} parked")
