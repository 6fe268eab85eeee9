from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractRobustConnection

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
