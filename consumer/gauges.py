"""Broker and backlog state as metrics, polled by the gateway role.

Every few seconds the :class:`Observer` declares each of Herald's queues
passively (a declare that creates nothing and fails for a missing queue) and
sets ``herald_queue_messages`` (ready messages) and ``herald_queue_consumers``
from the broker's answer. That is all AMQP tells about a queue, and it needs
no management plugin or extra credentials.

**Oldest-message age.** RabbitMQ reports the timestamp of a queue's head
message only for classic queues (``head_message_timestamp`` in the management
API); Herald's queues are all quorum queues, for which neither AMQP nor the
management API exposes it (rabbitmq-server issue #6813), and peeking at the
head would count as a delivery against ``x-delivery-limit``. So the age Herald
reports comes from PostgreSQL instead: ``herald_backlog_oldest_seconds`` is how
long the most overdue message Herald already knows has been due — a retry or a
``send_at`` deferral whose ``next_attempt_at`` has passed without its attempt
starting. A message that was never consumed has no row yet and does not count:
for those, watch ``herald_queue_messages`` against the consumption rate, and
``herald_end_to_end_seconds`` once they are sent.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from consumer.metrics import BACKLOG_OLDEST, QUEUE_CONSUMERS, QUEUE_MESSAGES
from consumer.topology import Names, Topology
from schemas.send_request import CHANNELS

log = structlog.get_logger("herald.observe")

DEFAULT_INTERVAL_S = 5.0

# Known messages that are due and not yet attempted, per channel. Uses
# messages_status_idx (status, ...): few rows are ever queued or retrying.
BACKLOG_SQL = """
SELECT channel, extract(epoch FROM now() - min(next_attempt_at))::float8 AS age
  FROM messages
 WHERE status IN ('queued', 'retrying') AND next_attempt_at <= now()
 GROUP BY channel
"""


async def queue_depths(connection: AbstractRobustConnection,
                       names: Names) -> dict[str, dict[str, int]]:
    """Ready messages and consumers of each of Herald's queues, asked of the broker now."""
    found: dict[str, dict[str, int]] = {}
    channel = await connection.channel()
    try:
        # The underlying channel: a robust channel would answer from its cache.
        underlay = await channel.get_underlay_channel()
        for queue in Topology(names).queues:
            result = await underlay.queue_declare(queue["name"], passive=True, timeout=10)
            found[queue["name"]] = {"messages": int(result.message_count or 0),
                                    "consumers": int(result.consumer_count or 0)}
    finally:
        await channel.close()
    return found


async def backlog_ages(pool: asyncpg.Pool) -> dict[str, float]:
    """Per channel, how long the most overdue known message has waited for its
    attempt, in seconds (see the module's docstring)."""
    rows = await pool.fetch(BACKLOG_SQL, timeout=10)
    return {row["channel"]: max(0.0, float(row["age"])) for row in rows}


class Observer:
    """A component that sets the queue and backlog gauges every ``interval_s`` seconds."""

    name = "observe"

    def __init__(self, connection: AbstractRobustConnection, names: Names,
                 pool: asyncpg.Pool | None, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.connection = connection
        self.queues = [q["name"] for q in Topology(names).queues]
        self.pool = pool
        self.interval_s = interval_s
        self._channel: AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(self._loop(), name="herald-observe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None and not self._channel.is_closed:
            with suppress(Exception):
                await self._channel.close()
        self._channel = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll()

    async def poll(self) -> None:
        """One round: every queue, then the backlog age. Failures are logged, never raised."""
        for queue in self.queues:
            try:
                await self._observe_queue(queue)
            except Exception as exc:
                # A missing queue closes the channel (404); the next round opens another.
                log.warning("observe.queue_failed", queue=queue, error=repr(exc))
                with suppress(KeyError):
                    QUEUE_MESSAGES.remove(queue)
                with suppress(KeyError):
                    QUEUE_CONSUMERS.remove(queue)
        if self.pool is not None:
            try:
                await self._observe_backlog(self.pool)
            except Exception as exc:
                log.warning("observe.backlog_failed", error=repr(exc))

    async def _observe_queue(self, queue: str) -> None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self.connection.channel()
        # Straight to the AMQP channel: aio-pika's robust channel answers a repeated
        # passive declare from its cache, without asking the broker.
        underlay = await self._channel.get_underlay_channel()
        result = await underlay.queue_declare(queue, passive=True, timeout=10)
        QUEUE_MESSAGES.labels(queue).set(result.message_count or 0)
        QUEUE_CONSUMERS.labels(queue).set(result.consumer_count or 0)

    async def _observe_backlog(self, pool: asyncpg.Pool) -> None:
        ages = await backlog_ages(pool)
        for channel in sorted(set(CHANNELS) | set(ages)):
            BACKLOG_OLDEST.labels(channel).set(ages.get(channel, 0.0))
