"""The sms, whatsapp and messenger channels through the whole pipeline, against
the sandbox's fake Twilio, WhatsApp Cloud API and Messenger Send API."""

from __future__ import annotations

import json
from collections import Counter

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.topology import Names
from tests.conftest import RunningSandbox, SandboxServices
from tests.helpers import drain_queue, publish_all, queue_depth, wait_for
from tests.providers_fixtures import MESSENGER_ROWS, TWILIO_ROWS, WHATSAPP_ROWS, Row

CHANNEL_PROVIDER = {"sms": "twilio", "whatsapp": "whatsapp", "messenger": "messenger"}


def recipient(channel: str, n: int) -> str:
    return f"+1555{n:07d}" if channel in ("sms", "whatsapp") else f"{7_000_000 + n:016d}"


def send(mid: str, channel: str, to: str, **extra: object) -> dict[str, object]:
    return {"message_id": mid, "channel": channel, "to": to, "body": f"hello {mid}", **extra}


async def _status(db: asyncpg.Connection, mid: str) -> str | None:
    return await db.fetchval("SELECT status FROM messages WHERE message_id = $1", mid)


@pytest.mark.parametrize("channel,prefix_id", [
    ("sms", "SM"), ("whatsapp", "wamid."), ("messenger", "m_"),
])
async def test_success_records_the_providers_message_id(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices, channel: str, prefix_id: str,
) -> None:
    await sandbox_services()
    to = recipient(channel, 1)
    await publish_all(amqp, prefix, [send("ok-1", channel, to)])

    async def sent() -> bool:
        return await _status(db, "ok-1") == "sent"

    await wait_for(sent, timeout=10, what="ok-1 sent")
    row = await db.fetchrow("SELECT provider, provider_message_id FROM messages "
                            "WHERE message_id = 'ok-1'")
    assert row["provider"] == CHANNEL_PROVIDER[channel]
    assert row["provider_message_id"].startswith(prefix_id)
    (accepted,) = sandbox.sandbox.providers.accepted(CHANNEL_PROVIDER[channel])
    assert accepted.provider_message_id == row["provider_message_id"]


def _rows() -> list[tuple[str, Row]]:
    rows = [("sms", r) for r in TWILIO_ROWS] + [("whatsapp", r) for r in WHATSAPP_ROWS]
    rows += [("messenger", r) for r in MESSENGER_ROWS]
    return [(channel, r) for channel, r in rows if not r.provider_wide]


async def test_every_table_code_ends_as_its_error_type(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """Each code of PROVIDERS.md's tables (per message, not provider-wide): a
    retryable one is retried until max_attempts (2) and then parked, a permanent
    one is parked after its single attempt; either way with its error_type."""
    await sandbox_services()
    box = sandbox.sandbox.providers
    requests, expected = [], {}
    for n, (channel, row) in enumerate(_rows()):
        to = recipient(channel, 100 + n)
        box.script(CHANNEL_PROVIDER[channel], to, always=True, code=row.code,
                   subcode=row.subcode, retry_after="1" if row.retryable else None)
        mid = f"code-{channel}-{row.id()}"
        requests.append(send(mid, channel, to, retry={"max_attempts": 2, "base_delay_s": 1}))
        expected[mid] = row

    await publish_all(amqp, prefix, requests)

    async def all_failed() -> bool:
        n = await db.fetchval("SELECT count(*) FROM messages WHERE status = 'failed'")
        return n == len(expected)

    await wait_for(all_failed, timeout=60, interval=0.3, what="every scripted code parked")
    rows = {r["message_id"]: r for r in await db.fetch(
        "SELECT message_id, attempts, last_error_type, last_error_code FROM messages")}
    for mid, row in expected.items():
        got = rows[mid]
        assert got["last_error_type"] == row.error_type, (mid, got["last_error_type"])
        assert got["last_error_code"] == str(row.code), mid
        assert got["attempts"] == (2 if row.retryable else 1), mid
    parked = await drain_queue(amqp, Names(prefix).parked, expect=len(expected), timeout=10)
    by_id = {json.loads(m.body)["message_id"]: m.headers for m in parked}
    for mid, row in expected.items():
        assert by_id[mid]["x-herald-error-type"] == row.error_type


@pytest.mark.parametrize("channel,to", [
    ("sms", "5551234567"), ("whatsapp", "+1 555 123"), ("messenger", "not-a-psid"),
    ("http", "ftp://example.com/x"),
])
async def test_invalid_recipient_is_parked_without_calling_the_provider(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices, channel: str, to: str,
) -> None:
    await sandbox_services()
    await publish_all(amqp, prefix, [send("bad-to", channel, to)])
    parked = await drain_queue(amqp, Names(prefix).parked, expect=1, timeout=10)
    assert parked[0].headers["x-herald-error-type"] == "invalid_recipient"

    async def failed() -> bool:
        return await _status(db, "bad-to") == "failed"

    await wait_for(failed, timeout=5, what="bad-to failed")
    assert sandbox.sandbox.received == []


@pytest.mark.slow
async def test_whatsapp_token_outage_pauses_only_whatsapp(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """A 2-minute expired-token outage on WhatsApp while 500 WhatsApp and 500 SMS
    messages flow: SMS is unaffected, WhatsApp pauses, no WhatsApp message is parked
    or charged an attempt, and all 1,000 end sent after the outage."""
    box = sandbox.sandbox.providers
    box.set_mode("whatsapp", "token_expired", seconds=120)
    service = await sandbox_services(HERALD_PAUSE_BASE_S="2", HERALD_PAUSE_MAX_S="16")
    requests = []
    for i in range(500):
        requests.append(send(f"wa-{i}", "whatsapp", recipient("whatsapp", i)))
        requests.append(send(f"sms-{i}", "sms", recipient("sms", i)))
    await publish_all(amqp, prefix, requests)

    async def sms_all_sent() -> bool:
        n = await db.fetchval("SELECT count(*) FROM messages "
                              "WHERE channel = 'sms' AND status = 'sent'")
        return n == 500

    # SMS goes through while WhatsApp's token is expired.
    await wait_for(sms_all_sent, timeout=60, interval=0.5, what="all SMS sent")
    assert await db.fetchval("SELECT count(*) FROM messages "
                             "WHERE channel = 'whatsapp' AND status = 'sent'") == 0
    assert service.channels.trips("whatsapp") >= 1
    assert service.channels.trips("sms") == 0

    async def all_sent() -> bool:
        n = await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'")
        return n == 1000

    await wait_for(all_sent, timeout=240, interval=1.0, what="all 1,000 sent after the outage")
    # Nothing parked, and no WhatsApp message was charged for the outage.
    assert await queue_depth(amqp, Names(prefix).parked) == 0
    attempts = Counter(r["attempts"] for r in await db.fetch(
        "SELECT attempts FROM messages WHERE channel = 'whatsapp'"))
    assert attempts == {1: 500}
    paused = await db.fetchval("SELECT count(*) FROM delivery_attempts "
                               "WHERE outcome = 'paused' AND error_type = 'access_token'")
    assert paused >= 1
    # The pause bounded the calls made during the outage: far fewer than one per
    # message per probe interval.
    refused = [r for r in sandbox.sandbox.received
               if r.provider == "whatsapp" and not r.accepted]
    assert 1 <= len(refused) <= 500 + 40
    assert Counter(r.recipient for r in box.accepted("whatsapp")).most_common(1)[0][1] == 1


