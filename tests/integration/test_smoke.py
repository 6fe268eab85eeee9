from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from tests.conftest import RunningSandbox, ServiceFactory
from tests.helpers import publish_all, request, wait_for


async def test_one_message_is_sent_and_recorded(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    await publish_all(amqp, prefix, [request("m-1", sandbox.url("ok"))])

    async def sent() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id='m-1'") == "sent"

    await wait_for(sent, timeout=10, what="m-1 sent")
    row = await db.fetchrow("SELECT * FROM messages WHERE message_id='m-1'")
    assert row["attempts"] == 1
    assert row["provider_message_id"].startswith("http-")
    assert sandbox.sandbox.accepted_counts() == {"m-1": 1}


async def test_with_a_backlog_waiting_the_senders_start_last(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    """Senders started first took the event loop for the backlog, and the events
    consumer and the listeners (/healthz for a startup probe) waited seconds."""
    await publish_all(amqp, prefix, [request(f"b-{i}", sandbox.url("ok")) for i in range(300)])
    with capture_logs() as logs:
        await start_service()

        async def all_sent() -> bool:
            return await db.fetchval(
                "SELECT count(*) FROM messages WHERE status = 'sent'") == 300

        await wait_for(all_sent, timeout=60, what="the backlog sent")
    events = [entry["event"] for entry in logs]
    assert events.index("events.started") < events.index("consumer.started")
    assert events.index("consumer.started") < events.index("service.started")
