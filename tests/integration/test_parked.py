"""Operator tools on the parking lot: list, show, replay, reject, purge, sync.

Against the real broker and database; messages are parked by the real
pipeline through the sandbox, or (where the pipeline is not the point) put in
the lot as the pipeline would put them (tests/integration/parking.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.parked import Lot, Selection, list_parked
from consumer.parking_queue import LotBusy, lot_lock
from consumer.replay import ReplayOptions, replay
from consumer.settings import Settings
from consumer.store import create_pool
from consumer.topology import Names
from tests.conftest import AMQP_URL, RunningSandbox, ServiceFactory
from tests.helpers import drain_queue, publish_all, queue_depth, request, wait_for
from tests.integration.parking import park_directly, parked_ids, peek, wait_parked


@pytest.fixture
async def lot(settings: Settings) -> AsyncIterator[Lot]:
    pool = await create_pool(settings)
    yield Lot(pool, settings.amqp_url, Names(settings.prefix))
    await pool.close()


# -- the broker behaviour the ordered pass rests on ------------------------------------


async def test_quorum_queue_returns_held_messages_to_the_head_in_order_on_channel_close(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """Pins what consumer/parking_queue.py relies on: closing a channel puts
    its unacked messages back at the head, in order, channel by channel as
    they close; nack/reject with requeue would put them at the tail instead."""
    name = f"{prefix}.order-probe"
    admin = await amqp.channel(publisher_confirms=True)
    await admin.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        for i in range(12):
            await admin.default_exchange.publish(aio_pika.Message(str(i).encode()), name)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            windows = []
            for acked in ({1, 3}, {6}):
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=4)
                queue = await channel.get_queue(name, ensure=False)
                inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
                tag = await queue.consume(inbox.put)
                held = 0
                while held < 4:
                    message = await asyncio.wait_for(inbox.get(), 10)
                    if int(message.body) in acked:
                        await message.ack()
                    else:
                        held += 1
                await queue.cancel(tag)
                windows.append(channel)
            # A message published meanwhile stays behind the returned ones.
            await admin.default_exchange.publish(aio_pika.Message(b"99"), name)
            for channel in windows:
                await channel.close()
        order = [int(m.body) for m in await drain_queue(amqp, name, expect=10, timeout=10)]
        assert order == [0, 2, 4, 5, 7, 8, 9, 10, 11, 99]

        # nack(requeue=True) on the other hand sends a message to the tail.
        channel = await amqp.channel()
        queue = await channel.get_queue(name, ensure=False)
        for i in range(3):
            await admin.default_exchange.publish(aio_pika.Message(str(i).encode()), name)
        first = await queue.get(no_ack=False)
        await first.nack(requeue=True)
        await channel.close()
        order = [int(m.body) for m in await drain_queue(amqp, name, expect=3, timeout=10)]
        assert order == [1, 2, 0]
    finally:
        await admin.queue_delete(name)
        await admin.close()


# -- replay mechanics without the pipeline ---------------------------------------------


async def test_replay_across_several_windows_keeps_the_rest_in_order_and_sets_attempts(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, lot: Lot,
) -> None:
    names = Names(prefix)
    kinds = ["invalid_request", "permission", "provider_error"]
    reqs = [(request(f"w-{i}", "http://127.0.0.1:9/x"), kinds[i % 3]) for i in range(30)]
    ids = await park_directly(amqp, db, prefix, reqs, attempts=2)
    before = parked_ids(await peek(names.parked))
    assert before == [str(i) for i in ids]

    small = Lot(lot.pool, lot.amqp_url, names, window=4)
    report = await replay(small, ReplayOptions(Selection(error_types=("permission",))), "test")
    assert report.replayed == 10 and report.complete, report

    chosen = {str(ids[i]) for i in range(1, 30, 3)}
    assert parked_ids(await peek(names.parked)) == [i for i in before if i not in chosen]
    sent = await drain_queue(amqp, names.send_queue("http"), expect=10, timeout=10)
    assert [m.headers["x-herald-replay-of"] for m in sent] == [
        i for i in before if i in chosen]
    for m in sent:
        assert m.headers["x-herald-attempt"] == 3
        assert m.headers["x-herald-attempt-base"] == 2
    states = dict(await db.fetch("SELECT state, count(*) FROM parked_messages GROUP BY state"))
    assert states == {"parked": 20, "replayed": 10}
    statuses = dict(await db.fetch("SELECT status, count(*) FROM messages GROUP BY status"))
    assert statuses == {"failed": 20, "retrying": 10}


async def test_replay_without_reset_sends_no_attempt_base(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, lot: Lot,
) -> None:
    names = Names(prefix)
    (parked_id,) = await park_directly(
        amqp, db, prefix, [(request("nr-1", "http://127.0.0.1:9/x"), "invalid_request")],
        attempts=5)
    report = await replay(lot, ReplayOptions(Selection(ids=(parked_id,)),
                                             reset_attempts=False), "test")
    assert report.replayed == 1
    (sent,) = await drain_queue(amqp, names.send_queue("http"), expect=1, timeout=10)
    assert sent.headers["x-herald-attempt"] == 6
    assert "x-herald-attempt-base" not in sent.headers


async def test_a_second_pass_waits_for_the_first(lot: Lot, prefix: str) -> None:
    async with lot_lock(lot.pool, prefix):
        with pytest.raises(LotBusy):
            await replay(lot, ReplayOptions(Selection(all=True)), "test")


async def test_list_counts_and_filters(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, lot: Lot,
) -> None:
    kinds = ["invalid_request", "permission", "provider_error"]
    reqs = []
    for i in range(12):
        r = request(f"l-{i}", f"http://127.0.0.1:9/{i}")
        if i < 4:
            r["campaign_id"] = "spring"
        reqs.append((r, kinds[i % 3]))
    ids = await park_directly(amqp, db, prefix, reqs)
    listing = await list_parked(lot.pool, Selection())
    assert listing.by_error_type == {k: 4 for k in kinds}
    assert [r.parked_id for r in listing.rows] == ids
    two = await list_parked(lot.pool, Selection(error_types=("permission", "provider_error")),
                            limit=3, offset=2)
    expected = [ids[i] for i in range(12) if i % 3]
    assert [r.parked_id for r in two.rows] == expected[2:5]
    assert two.total == 8
    spring = await list_parked(lot.pool, Selection(campaign="spring"), newest_first=True)
    assert [r.parked_id for r in spring.rows] == ids[3::-1]
    one = await list_parked(lot.pool, Selection(recipient="http://127.0.0.1:9/7"))
    assert [r.parked_id for r in one.rows] == [ids[7]]
    assert one.rows[0].to_json()["recipient"] == "http://127.0.0.1/…"
    assert json.loads(json.dumps(one.to_json()))["total"] == 1
    none = await list_parked(lot.pool, Selection(ids=(uuid.uuid4(),)))
    assert none.total == 0 and none.rows == []
    assert await queue_depth(amqp, Names(prefix).parked) == 12


# -- end to end, parked by the real pipeline -------------------------------------------

# Three error types that park at once and say nothing about the channel as a
# whole (transient ones would feed the channel's circuit breaker): the sandbox
# fails the first attempt with 400 or 403; a URL without a host never gets there.
KINDS = ("invalid_request", "permission", "invalid_recipient")


def _recipient(sandbox: RunningSandbox, kind: str) -> str:
    if kind == "invalid_recipient":
        return "http:///no-host"
    return sandbox.url(kind, fail=1, fail_status=400 if kind == "invalid_request" else 403)


def _lot_requests(n: int, prefix: str = "p") -> dict[str, str]:
    """n send requests per error_type, interleaved; message_id -> error_type."""
    return {f"{prefix}-{i}": KINDS[i % 3] for i in range(3 * n)}


async def _park_through_pipeline(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, kinds: dict[str, str],
) -> None:
    reqs = [request(mid, _recipient(sandbox, kind)) for mid, kind in kinds.items()]
    await publish_all(amqp, prefix, reqs)
    await wait_parked(db, amqp, prefix, len(kinds))


async def test_replaying_one_error_type_sends_exactly_those_and_keeps_the_rest_in_order(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    await start_service()
    kinds = _lot_requests(100)
    await _park_through_pipeline(amqp, prefix, db, sandbox, kinds)

    listing = await list_parked(lot.pool, Selection(), limit=300)
    assert listing.by_error_type == {kind: 100 for kind in KINDS}
    assert {r.message_id: r.error_type for r in listing.rows} == kinds
    names = Names(prefix)
    before = await peek(names.parked)
    by_copy = {str(m.headers["x-herald-parked-id"]): str(m.headers["x-herald-message-id"])
               for m in before}
    seen = len(sandbox.sandbox.received)

    report = await replay(lot, ReplayOptions(Selection(error_types=("permission",))), "test")
    assert (report.replayed, report.selected, report.complete) == (100, 100, True), report
    chosen = {mid for mid, kind in kinds.items() if kind == "permission"}

    async def all_sent() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'") == 100

    await wait_for(all_sent, timeout=30, what="the 100 replayed messages sent")
    assert sandbox.sandbox.accepted_counts() == Counter({mid: 1 for mid in chosen})
    assert Counter(r.message_id for r in sandbox.sandbox.received[seen:]) == Counter(chosen)
    after = parked_ids(await peek(names.parked))
    assert after == [c for c in parked_ids(before) if by_copy[c] not in chosen]
    listing = await list_parked(lot.pool, Selection())
    assert listing.by_error_type == {"invalid_request": 100, "invalid_recipient": 100}
    attempts = await db.fetch("SELECT DISTINCT attempt, outcome FROM delivery_attempts"
                              " WHERE message_id = ANY($1)", list(chosen))
    assert {tuple(r) for r in attempts} == {(1, "failed"), (2, "sent")}
