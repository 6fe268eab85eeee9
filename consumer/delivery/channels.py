"""Consuming a channel's queues with bounded, visible concurrency.

Each channel has two lanes (see :mod:`consumer.topology`): ``main`` for
transactional messages and ``bulk`` for campaigns, each consumed by a
:class:`LaneConsumer` with its own prefetch, so neither waits behind the
other. A :class:`ChannelControl` holds what the lanes share: whether the
channel is paused (see :mod:`consumer.delivery.registry`).

Each delivery runs in a task of its own, kept in a set (never
fire-and-forget); the broker's prefetch bounds how many exist at once. A
lane of a channel without a configured rate finds its prefetch itself,
between ``HERALD_PREFETCH`` and ``HERALD_PREFETCH_MAX``
(:mod:`consumer.delivery.inflight`): slow providers need more in flight.
Stopping cancels the consumers first (no new work), waits up to a grace
period for the tasks in flight, then cancels the rest, which leaves their
messages unacked for the broker to requeue.

**Consumers the broker cancels.** RabbitMQ cancels a consumer
(``basic.cancel``) when its queue is deleted, and from 4.3 on when a
delivery outlasts the consumer timeout. The queue is declared on aio-pika's
robust channel, which consumes again with the same tag as soon as the queue
exists (a passive declare every few seconds until then); a lost connection
is likewise followed by a new one, to the next node of a cluster
(:mod:`consumer.broker`). :func:`~consumer.broker.watch_cancellations` makes each
cancellation visible (a log line and ``herald_consumer_cancelled_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from consumer import metrics
from consumer.broker import watch_cancellations
from consumer.delivery.acks import ChannelAcks
from consumer.delivery.inflight import InFlight
from consumer.delivery.pipeline import Pipeline
from consumer.topology import LANES, Names

log = structlog.get_logger("herald.worker")


class LaneConsumer:
    """Consumes one queue of a channel and feeds each delivery to the pipeline."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        names: Names,
        channel_name: str,
        lane: str,
        pipeline: Pipeline,
        prefetch: int,
        ceiling: int | None = None,
    ) -> None:
        self.connection = connection
        self.queue_name = names.send_queue(channel_name, lane)
        self.channel_name = channel_name
        self.lane = lane
        self.pipeline = pipeline
        self.prefetch = prefetch
        self.tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = metrics.IN_FLIGHT.labels(channel_name)
        self._amqp_channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        # ceiling None: the prefetch stays as configured (a rate bounds the lane).
        self._adapt = InFlight(prefetch, ceiling) if ceiling and ceiling > prefetch else None
        self._adapt_task: asyncio.Task[None] | None = None
        self.full_speed = True  # False while the channel is paused or probing
        self._qos: int | None = None  # the prefetch the current consumer started with
        self._lock = asyncio.Lock()  # consuming, cancelling and re-consuming
        # The acks of each AMQP channel delivering to this lane, by the channel's
        # id: a robust channel replaces its channel after a reconnection, and a
        # late delivery of the old one must not reset the new one's ledger.
        self._acks: dict[int, tuple[Any, ChannelAcks]] = {}
        self._prefetch_gauge = metrics.PREFETCH.labels(channel_name, lane)
        self._prefetch_gauge.set(prefetch)

    @property
    def consuming(self) -> bool:
        return self._consumer_tag is not None

    async def start(self) -> None:
        self._amqp_channel = await self.connection.channel(publisher_confirms=False)
        await self._amqp_channel.set_qos(prefetch_count=self.prefetch)
        self._qos = self.prefetch
        # declare_queue (passive), not get_queue: only queues declared on a robust
        # channel are re-attached, with their consumer, after a broker restart.
        self._queue = await self._amqp_channel.declare_queue(self.queue_name, passive=True)
        await watch_cancellations(self._amqp_channel, self.queue_name)
        await self.consume()
        if self._adapt is not None:
            self._adapt_task = asyncio.create_task(self._adapt_prefetch(self._adapt),
                                                   name=f"prefetch-{self.queue_name}")

    async def _adapt_prefetch(self, adapt: InFlight) -> None:
        """Every period, let the controller move the prefetch (at full speed only)."""
        loop = asyncio.get_running_loop()
        paused = False
        while True:
            await asyncio.sleep(adapt.period_s)
            now = loop.time()
            if not self.full_speed:
                paused = True
                continue
            if paused:
                paused = False
                adapt.restart(now)
                continue
            changed = adapt.tick(now)
            if changed is None:
                continue
            self.prefetch = changed
            self._prefetch_gauge.set(changed)
            try:
                applied = await self.set_prefetch(changed)
            except Exception as exc:  # the channel is being replaced: resumed with it
                log.warning("consumer.prefetch_failed", queue=self.queue_name, error=repr(exc))
            else:
                if applied:
                    log.info("consumer.prefetch", queue=self.queue_name, prefetch=changed)

    async def consume(self, prefetch: int | None = None) -> None:
        """Consume (again), with ``prefetch`` when given."""
        async with self._lock:
            await self._consume(prefetch)

    async def _consume(self, prefetch: int | None) -> None:
        assert self._queue is not None and self._amqp_channel is not None
        if prefetch is not None and prefetch != self._qos:
            await self._amqp_channel.set_qos(prefetch_count=prefetch)
            self._qos = prefetch
            if self._consumer_tag is not None:
                # A quorum queue applies a prefetch only to consumers that start
                # after it (and has no channel-wide one): consume again. What the
                # old consumer holds stays with this channel, acked as usual.
                tag, self._consumer_tag = self._consumer_tag, None
                await self._queue.cancel(tag)
        if self._consumer_tag is None:
            self._consumer_tag = await self._queue.consume(self._on_message)

    async def set_prefetch(self, prefetch: int) -> bool:
        """Run with ``prefetch`` from now on, if consuming at full speed (a paused
        or probing lane takes ``self.prefetch`` when it resumes). Whether it did."""
        async with self._lock:
            if not self.full_speed or self._consumer_tag is None:
                return False
            if self._amqp_channel is None or self._amqp_channel.is_closed:
                return False
            await self._consume(prefetch)
            return True

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # The delivery runs in a task of our own, shielded from aio-pika's: when the
        # broker connection drops, aio-pika cancels its consumer tasks, and a send
        # already made must still be recorded (or the redelivered copy would be
        # sent again). Only the graceful drain cancels our tasks.
        task = asyncio.create_task(self._process(message, self._acks_of(message)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        await asyncio.shield(task)

    def _acks_of(self, message: AbstractIncomingMessage) -> tuple[ChannelAcks, int] | None:
        """The acks of the channel that delivered ``message``, which is counted
        in, and its delivery tag; None when that channel is already closed (the
        ack fails as usual)."""
        try:
            channel = message.channel
        except Exception:
            return None
        tag = message.delivery_tag
        if tag is None:  # never, consuming with acks
            return None
        known = self._acks.get(id(channel))
        if known is None or known[0] is not channel:
            for key, (other, _) in list(self._acks.items()):
                if other.is_closed:
                    del self._acks[key]
            known = (channel, ChannelAcks(
                lambda tag, multiple: channel.basic_ack(delivery_tag=tag, multiple=multiple)))
            self._acks[id(channel)] = known
        acks = known[1]
        acks.delivered(tag)
        return acks, tag

    async def _process(self, message: AbstractIncomingMessage,
                       settle: tuple[ChannelAcks, int] | None) -> None:
        self._in_flight.inc()
        adapt = self._adapt
        if adapt is not None:
            adapt.sample(asyncio.get_running_loop().time(), len(self.tasks))
        try:
            await self.pipeline.process(
                message, self.channel_name, self.lane,
                ack=None if settle is None else functools.partial(settle[0].ack, settle[1]))
        except Exception as exc:
            # Unexpected (e.g. a database error that is not an outage): hand the
            # message back for redelivery; x-delivery-limit parks one that keeps
            # failing this way instead of letting it loop for ever. reject, not
            # nack: from RabbitMQ 4.3 on a nack no longer counts as a delivery.
            log.error("delivery.crashed", channel=self.channel_name, error=repr(exc)[:500],
                      exc_info=exc)
            with contextlib.suppress(Exception):
                await message.reject(requeue=True)
                # Only once the reject is written: an ack run after it may pass over it.
                if settle is not None:
                    settle[0].rejected(settle[1])
        finally:
            self._in_flight.dec()
            if adapt is not None:
                adapt.completed()
                # This task leaves the set just after (its done callback).
                adapt.sample(asyncio.get_running_loop().time(), len(self.tasks) - 1)

    async def stop_consuming(self) -> None:
        async with self._lock:
            if self._queue is not None and self._consumer_tag is not None:
                try:
                    await self._queue.cancel(self._consumer_tag)
                except Exception as exc:
                    log.warning("consumer.cancel_failed", queue=self.queue_name,
                                error=repr(exc))
            self._consumer_tag = None

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
        if self._adapt_task is not None:
            self._adapt_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adapt_task
            self._adapt_task = None
        if self._amqp_channel is not None and not self._amqp_channel.is_closed:
            try:
                await self._amqp_channel.close()
            except Exception as exc:
                log.warning("consumer.close_failed", queue=self.queue_name, error=repr(exc))


class ChannelControl:
    r"""A channel's lanes, consumed together.

    When the channel has a single failure domain (Twilio's account,
    WhatsApp's phone number, Messenger's page) and that domain opens, the
    registry :meth:`pause`\ s the channel: it stops taking work (its messages
    wait in their queues) and, after the cool-down, takes one message at a
    time per lane (prefetch 1) while the domain probes; :meth:`resume`
    restores the prefetch once it closes. The ``http`` channel has a domain per
    destination and is never paused as a whole.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        names: Names,
        channel_name: str,
        pipeline: Pipeline,
        prefetch: int,
        ceiling: int | None = None,
    ) -> None:
        self.channel_name = channel_name
        self.prefetch = prefetch
        # Campaign traffic gets half the in-flight budget, so a burst of it cannot
        # crowd out the event loop that transactional messages also need.
        self.lanes = [LaneConsumer(connection, names, channel_name, lane, pipeline,
                                   *((prefetch, ceiling) if lane == "main" else
                                     (max(1, prefetch // 2),
                                      None if ceiling is None else max(1, ceiling // 2))))
                      for lane in LANES]
        self.mode = "running"  # running | paused | probing
        self.reason: str | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._control = asyncio.Lock()

    @property
    def tasks(self) -> set[asyncio.Task[Any]]:
        return set().union(*(lane.tasks for lane in self.lanes))

    @property
    def active(self) -> bool:
        """Consuming, or deliberately paused (a paused channel is healthy)."""
        return all(lane.consuming for lane in self.lanes) or self.mode == "paused"

    async def start(self) -> None:
        for lane in self.lanes:
            await lane.start()
        metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(1)
        log.info("consumer.started", channel=self.channel_name, prefetch=self.prefetch)

    # -- pausing ----------------------------------------------------------------------

    def pause(self, reason: str, wait_s: float) -> None:
        """Stop taking work; after ``wait_s``, take one message at a time (the probe)."""
        if self._stopped:
            return
        self.mode = "paused"
        self.reason = reason
        metrics.CHANNEL_PAUSED.labels(self.channel_name, reason).set(1)
        previous = self._resume_task
        self._resume_task = asyncio.create_task(self._pause_then_probe(reason, wait_s, previous))

    async def _pause_then_probe(self, reason: str, wait_s: float,
                                previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            previous.cancel()
        async with self._control:
            for lane in self.lanes:
                lane.full_speed = False
                await lane.stop_consuming()
            metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(0)
        await asyncio.sleep(wait_s)
        async with self._control:
            if self._stopped or self.mode != "paused":
                return
            self.mode = "probing"
            metrics.CHANNEL_PAUSED.labels(self.channel_name, reason).set(0)
            for lane in self.lanes:
                await lane.consume(prefetch=1)
            metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(1)
            log.info("channel.probing", channel=self.channel_name, reason=reason)

    def resume(self) -> None:
        """The domain closed: take work at full speed again."""
        if self.mode == "running":
            return
        if self.reason is not None:
            metrics.CHANNEL_PAUSED.labels(self.channel_name, self.reason).set(0)
        self.mode = "running"
        self.reason = None
        if self._resume_task is not None:
            self._resume_task.cancel()
        log.info("channel.resumed", channel=self.channel_name)
        task = asyncio.create_task(self._restore())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restore(self) -> None:
        async with self._control:
            if self._stopped:
                return
            for lane in self.lanes:
                await lane.consume(prefetch=lane.prefetch)
                lane.full_speed = True
            metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(1)

    async def stop_consuming(self) -> None:
        self._stopped = True
        if self._resume_task is not None:
            self._resume_task.cancel()
        for lane in self.lanes:
            lane.full_speed = False
            await lane.stop_consuming()
        metrics.CONSUMERS_ACTIVE.labels(self.channel_name).set(0)

    async def drain(self, grace_s: float) -> int:
        results = await asyncio.gather(*(lane.drain(grace_s) for lane in self.lanes))
        return sum(results)

    async def close(self) -> None:
        for lane in self.lanes:
            await lane.close()
