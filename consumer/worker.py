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
import time
from typing import Any

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from consumer import metrics
from consumer.pause import Mode, PauseState
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
        pause: PauseState | None = None,
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
        self.pause = pause or PauseState()
        self._resume_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._control = asyncio.Lock()

    @property
    def active(self) -> bool:
        """Consuming, or deliberately paused (a paused channel is healthy)."""
        return self._consumer_tag is not None or self.pause.mode is Mode.PAUSED

    async def start(self) -> None:
        self._amqp_channel = await self.connection.channel(publisher_confirms=False)
        await self._amqp_channel.set_qos(prefetch_count=self.prefetch)
        # declare_queue (passive), not get_queue: only queues declared on a robust
        # channel are re-attached, with their consumer, after a broker restart.
        self._queue = await self._amqp_channel.declare_queue(
            self.names.send_queue(self.channel_name), passive=True
        )
        await self._consume()
        log.info("consumer.started", channel=self.channel_name, prefetch=self.prefetch)

    async def _consume(self) -> None:
        assert self._queue is not None
        self._consumer_tag = await self._queue.consume(self._on_message)
        metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(1)

    # -- pausing (see consumer.pause) ------------------------------------------------

    def trip(self, reason: str) -> None:
        """The provider failed for everyone: stop taking work, probe after a cool-down."""
        if self._stopped or not self.pause.trip(reason, time.monotonic()):
            return
        metrics.CHANNEL_PAUSED.labels(self.channel_name, reason).set(1)
        log.warning("channel.paused", channel=self.channel_name, reason=reason,
                    probe_in_s=round(self.pause.cooldown_s, 1), pauses=self.pause.pauses)
        previous = self._resume_task
        self._resume_task = asyncio.create_task(self._pause_then_probe(reason, previous))

    async def _pause_then_probe(self, reason: str, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            previous.cancel()
        async with self._control:
            if self._consumer_tag is not None:
                await self.stop_consuming(final=False)
        await asyncio.sleep(self.pause.remaining(time.monotonic()))
        async with self._control:
            if self._stopped:
                return
            # One message at a time until one gets through.
            self.pause.start_probe()
            metrics.CHANNEL_PAUSED.labels(self.channel_name, reason).set(0)
            assert self._amqp_channel is not None
            await self._amqp_channel.set_qos(prefetch_count=1)
            await self._consume()
            log.info("channel.probing", channel=self.channel_name, reason=reason)

    def sent_ok(self) -> None:
        """A send succeeded: a probing channel resumes at full speed."""
        if self.pause.mode is Mode.RUNNING or not self.pause.succeeded():
            return
        log.info("channel.resumed", channel=self.channel_name)
        task = asyncio.create_task(self._restore_prefetch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restore_prefetch(self) -> None:
        async with self._control:
            if self._amqp_channel is not None and not self._amqp_channel.is_closed:
                await self._amqp_channel.set_qos(prefetch_count=self.prefetch)

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

    async def stop_consuming(self, *, final: bool = True) -> None:
        if final:
            self._stopped = True
            if self._resume_task is not None:
                self._resume_task.cancel()
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
