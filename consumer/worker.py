"""Consuming a channel's queue with bounded, visible concurrency.

Each delivery becomes one task kept in a set (never fire-and-forget); the
broker's prefetch bounds how many exist at once. Stopping cancels the
consumer first (no new work), waits up to a grace period for the tasks in
flight, then cancels the rest, which leaves their messages unacked for the
broker to requeue.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from consumer import metrics
from consumer.pipeline import Pipeline
from consumer.topology import Names

log = structlog.get_logger("herald.worker")


class ChannelConsumer:
    """Consumes ``{prefix}.send.{channel}`` and feeds each delivery to the pipeline."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        names: Names,
        channel_name: str,
        pipeline: Pipeline,
        prefetch: int,
    ) -> None:
        self.connection = connection
        self.names = names
        self.channel_name = channel_name
        self.pipeline = pipeline
        self.prefetch = prefetch
        self.tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = metrics.IN_FLIGHT.labels(channel_name)
        self._amqp_channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None

    @property
    def active(self) -> bool:
        return self._consumer_tag is not None

    async def start(self) -> None:
        self._amqp_channel = await self.connection.channel(publisher_confirms=False)
        await self._amqp_channel.set_qos(prefetch_count=self.prefetch)
        self._queue = await self._amqp_channel.get_queue(
            self.names.send_queue(self.channel_name), ensure=False
        )
        self._consumer_tag = await self._queue.consume(self._on_message)
        metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(1)
        log.info("consumer.started", channel=self.channel_name, prefetch=self.prefetch)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika already runs each delivery in a task of its own: track that task
        # (for the graceful drain) rather than spawning another one per message.
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self._in_flight.inc()
        try:
            await self.pipeline.process(message, self.channel_name)
        except Exception as exc:
            # Unexpected (e.g. a database error that is not an outage): hand the
            # message back for redelivery; x-delivery-limit parks one that keeps
            # failing this way instead of letting it loop for ever.
            log.error("delivery.crashed", channel=self.channel_name, error=repr(exc)[:500],
                      exc_info=exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        finally:
            self._in_flight.dec()
            self.tasks.discard(task)

    async def stop_consuming(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception as exc:
                log.warning("consumer.cancel_failed", channel=self.channel_name, error=repr(exc))
        self._consumer_tag = None
        metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(0)

    async def drain(self, grace_s: float) -> int:
        """Wait for in-flight work up to ``grace_s``; cancel what is left. Returns that count."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace_s)
        left = [t for t in self.tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        return len(left)

    async def close(self) -> None:
        if self._amqp_channel is not None and not self._amqp_channel.is_closed:
            try:
                await self._amqp_channel.close()
            except Exception as exc:
                log.warning("consumer.close_failed", channel=self.channel_name, error=repr(exc))
