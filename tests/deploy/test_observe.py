"""consumer.gauges against the real broker and database: queue gauges from
passive declares, and the backlog age of overdue known messages."""

from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from consumer.gauges import Observer
from consumer.metrics import BACKLOG_OLDEST, QUEUE_CONSUMERS, QUEUE_MESSAGES
from consumer.topology import Names
from tests.helpers import publish_raw


async def test_queue_depths_and_consumers(amqp: AbstractRobustConnection, prefix: str) -> None:
    names = Names(prefix)
    for _ in range(3):
        await publish_raw(amqp, prefix, "sms", b'{"not": "consumed"}')
    channel = await amqp.channel()
    queue = await channel.get_queue(names.events, ensure=False)

    async def ack(message: AbstractIncomingMessage) -> None:
        await message.ack()

    tag = await queue.consume(ack)
    observer = Observer(amqp, names, None)
    try:
        await observer.poll()
        assert QUEUE_MESSAGES.labels(names.send_queue("sms"))._value.get() == 3
        assert QUEUE_MESSAGES.labels(names.send_queue("http"))._value.get() == 0
        assert QUEUE_MESSAGES.labels(names.parked)._value.get() == 0
        assert QUEUE_MESSAGES.labels(names.delay(17))._value.get() == 0
        assert QUEUE_CONSUMERS.labels(names.events)._value.get() == 1
        assert QUEUE_CONSUMERS.labels(names.send_queue("sms"))._value.get() == 0
        # Every round asks the broker again (no cached declare).
        await publish_raw(amqp, prefix, "sms", b'{"not": "consumed"}')
        await observer.poll()
        assert QUEUE_MESSAGES.labels(names.send_queue("sms"))._value.get() == 4
    finally:
        await queue.cancel(tag)
        await channel.close()
        await observer.stop()


async def test_missing_queue_drops_its_series(amqp: AbstractRobustConnection,
                                              prefix: str) -> None:
    names = Names(prefix)
    observer = Observer(amqp, names, None)
    await observer.poll()
    channel = await amqp.channel()
    await channel.queue_delete(names.parked)
    await channel.close()
    try:
        await observer.poll()
        exposed = {s.labels["queue"] for m in QUEUE_MESSAGES.collect() for s in m.samples}
        assert names.parked not in exposed
        assert names.events in exposed  # the others are still observed
    finally:
        await observer.stop()


async def test_backlog_age_counts_overdue_known_messages(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection
) -> None:
    await db.execute("""
        INSERT INTO messages (message_id, status, channel, recipient, payload, next_attempt_at)
        VALUES ('late', 'retrying', 'whatsapp', '+1', '{}', now() - interval '120 seconds'),
               ('later', 'queued', 'whatsapp', '+1', '{}', now() - interval '30 seconds'),
               ('future', 'retrying', 'sms', '+1', '{}', now() + interval '1 hour'),
               ('done', 'sent', 'messenger', '+1', '{}', now() - interval '1 hour')""")
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    observer = Observer(amqp, Names(prefix), pool)
    try:
        await observer.poll()
        assert 119 <= BACKLOG_OLDEST.labels("whatsapp")._value.get() < 180
        assert BACKLOG_OLDEST.labels("sms")._value.get() == 0
        assert BACKLOG_OLDEST.labels("messenger")._value.get() == 0
    finally:
        await observer.stop()
        await pool.close()
