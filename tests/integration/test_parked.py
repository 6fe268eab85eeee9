"""Operator tools on the parking lot: list, show, replay, reject, purge, sync.

Against the real broker and database; messages are parked by the real
pipeline through the sandbox, or (where the pipeline is not the point) put in
the lot as the pipeline would put them (tests/integration/parking.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.parking.lot import Lot, Selection, list_parked, show
from consumer.parking.passes import LotBusy, LotPass, lot_lock
from consumer.parking.replay import Edit, ReplayOptions, replay
from consumer.settings import Settings
from consumer.store import create_pool
from consumer.topology import Names
from tests.conftest import AMQP_URL, REPO, RunningSandbox, ServiceFactory, herald_env
from tests.helpers import (
    broker_version,
    drain_queue,
    publish_all,
    publish_raw,
    queue_depth,
    request,
    wait_for,
)
from tests.integration.operator_tools import (
    herald_cli,
    park_directly,
    parked_ids,
    peek,
    wait_parked,
)


@pytest.fixture
async def lot(settings: Settings) -> AsyncIterator[Lot]:
    pool = await create_pool(settings)
    yield Lot(pool, settings.amqp_url, Names(settings.prefix))
    await pool.close()


# -- the broker behaviour the ordered pass rests on ------------------------------------


async def test_quorum_queue_returns_held_messages_to_the_head_in_order_on_channel_close(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """Pins what consumer/parking/passes.py relies on: closing a channel puts
    its unacked messages back at the head, in order, channel by channel as
    they close, ahead of messages published meanwhile."""
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
    finally:
        await admin.queue_delete(name)
        await admin.close()


async def test_quorum_queue_puts_a_nacked_message_at_the_tail_on_3_10_and_back_in_place_on_4(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """Why a pass never nacks what it leaves parked: where a nacked message
    goes depends on the broker (behind everything else on RabbitMQ 3.10, back
    in its place on 4.x), and a pass must keep the order on every version."""
    name = f"{prefix}.nack-probe"
    admin = await amqp.channel(publisher_confirms=True)
    await admin.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        channel = await amqp.channel()
        queue = await channel.get_queue(name, ensure=False)
        for i in range(3):
            await admin.default_exchange.publish(aio_pika.Message(str(i).encode()), name)
        first = await queue.get(no_ack=False)
        await first.nack(requeue=True)
        await channel.close()
        order = [int(m.body) for m in await drain_queue(amqp, name, expect=3, timeout=10)]
        assert order == ([1, 2, 0] if broker_version(amqp) < (4, 0) else [0, 1, 2])
    finally:
        await admin.queue_delete(name)
        await admin.close()


async def test_a_pass_ending_with_free_slots_returns_the_rest_in_order(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """The last window acks what it took as the queue runs out: closing the
    older windows must not feed their returned messages to it (a window with a
    free prefetch slot would take them, and put them back behind its own)."""
    names = Names(prefix)
    admin = await amqp.channel(publisher_confirms=True)
    try:
        for i in range(11):
            await admin.default_exchange.publish(aio_pika.Message(str(i).encode()),
                                                 names.parked)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection, LotPass(connection, names, window=3) as lot_pass:
            taken = []
            while batch := await lot_pass.batch(2):
                taken += batch
                for d in batch:
                    if int(d.message.body) in (9, 10):
                        await lot_pass.ack(d)
            assert [int(d.message.body) for d in taken] == list(range(11))
            assert len(lot_pass._windows) == 4
        order = [int(m.body) for m in await drain_queue(amqp, names.parked, expect=9,
                                                        timeout=10)]
        assert order == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    finally:
        await admin.close()


async def test_a_pass_right_after_another_counts_everything_the_first_held(
    amqp: AbstractRobustConnection, prefix: str,
) -> None:
    """The broker answers a channel's close before the quorum queue has put
    back what it held: a pass ends only once they are ready again, so the
    next pass (a replay after a dry run, say) counts and finds them all."""
    names = Names(prefix)
    admin = await amqp.channel(publisher_confirms=True)
    try:
        for i in range(300):
            await admin.default_exchange.publish(aio_pika.Message(str(i).encode()),
                                                 names.parked)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            for _ in range(20):
                async with LotPass(connection, names) as lot_pass:
                    assert lot_pass.depth == 300
                    seen = 0
                    while batch := await lot_pass.batch(500):
                        seen += len(batch)
                    assert seen == 300
    finally:
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
    assert sorted(m.headers["x-herald-replay-of"] for m in sent) == sorted(chosen)
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


async def test_campaign_traffic_is_replayed_onto_the_bulk_lane(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, lot: Lot,
) -> None:
    names = Names(prefix)
    await park_directly(amqp, db, prefix, [
        (request("c-1", "http://127.0.0.1:9/x", campaign_id="spring"), "permission"),
        (request("t-1", "http://127.0.0.1:9/x"), "permission")])
    assert (await replay(lot, ReplayOptions(Selection(all=True)), "test")).replayed == 2
    (bulk,) = await drain_queue(amqp, names.send_queue("http", "bulk"), expect=1, timeout=10)
    (main,) = await drain_queue(amqp, names.send_queue("http"), expect=1, timeout=10)
    assert (bulk.message_id, main.message_id) == ("c-1", "t-1")


async def test_thirty_passes_over_the_parking_queue_leave_every_other_message_parked(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    """Issue #13: one message replayed (and parked again) 20 times, and RabbitMQ
    4.0 dropped the others, each pass having counted as one of their 20 default
    deliveries. Every pass holds and returns every parked message."""
    names = Names(prefix)
    await start_service()
    broken = sandbox.url("broken", status=400)
    await publish_all(amqp, prefix, [request("again-1", broken)]
                      + [request(f"stay-{i}", broken) for i in range(5)])
    await wait_parked(db, amqp, prefix, 6)
    stay = [pid for pid in parked_ids(await peek(names.parked))
            if pid != str(await _parked_id(db, "again-1"))]
    assert len(stay) == 5

    for round_ in range(30):
        chosen = await _parked_id(db, "again-1")
        report = await replay(lot, ReplayOptions(Selection(ids=(chosen,))), "test")
        assert report.replayed == 1, (round_, report)

        async def parked_again(chosen: uuid.UUID = chosen) -> bool:
            again = await _parked_id(db, "again-1")
            return again not in (None, chosen) and await queue_depth(amqp, names.parked) == 6

        await wait_for(parked_again, timeout=30, what=f"again-1 parked again (round {round_})")

    order = parked_ids(await peek(names.parked))
    assert order[:5] == stay and order[5] == str(await _parked_id(db, "again-1")), (order, stay)
    for held in names.holding:
        assert await queue_depth(amqp, names.overflow_of(held)) == 0
    assert sandbox.sandbox.accepted_counts()["stay-0"] == 0


@pytest.mark.parametrize("every", [1, 2], ids=["all", "every-other"])
async def test_a_replay_acks_every_message_it_replayed(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, lot: Lot, every: int,
) -> None:
    """Acks sent in a burst and the channel closed at once: RabbitMQ 4.0 kept
    the settlements past the first 32 and dropped them with the channel, and
    the replayed messages came back to the lot (24 of 64). Replaying all of
    them gives one run of acks; every other one gives single acks."""
    names = Names(prefix)
    reqs = [(request(f"w-{i}", "http://127.0.0.1:9/x"),
             "permission" if i % every == 0 else "invalid") for i in range(64)]
    await park_directly(amqp, db, prefix, reqs, attempts=1)
    kept = [f"w-{i}" for i in range(64) if i % every != 0]

    report = await replay(lot, ReplayOptions(Selection(error_types=("permission",))), "test")

    assert report.replayed == 64 - len(kept)
    left = await peek(names.parked)
    assert [m.message_id for m in left] == kept
    assert await queue_depth(amqp, names.send_queue("http")) == 64 - len(kept)


async def _parked_id(db: asyncpg.Connection, message_id: str) -> uuid.UUID | None:
    value = await db.fetchval(
        "SELECT parked_id FROM parked_messages WHERE message_id = $1 AND state = 'parked'",
        message_id)
    return None if value is None else uuid.UUID(str(value))


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
# whole (transient ones would feed outage detection): the sandbox
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



async def _count(db: asyncpg.Connection, sql: str, *args: object) -> int:
    return int(await db.fetchval(sql, *args))


async def test_a_replay_killed_halfway_loses_nothing_and_the_next_one_finishes_it(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    await start_service()
    kinds = {f"k-{i}": "permission" for i in range(150)}
    await _park_through_pipeline(amqp, prefix, db, sandbox, kinds)
    env = herald_env(prefix, db_url)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "parked", "replay", "--error-type", "permission",
        "--rate", "40", env={**os.environ, **env}, cwd=str(REPO),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def halfway() -> bool:
        return await _count(db, "SELECT count(*) FROM parked_messages"
                                " WHERE state = 'replayed'") >= 50

    await wait_for(halfway, timeout=30, what="a third replayed")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    replayed_at_kill = await _count(
        db, "SELECT count(*) FROM parked_messages WHERE state = 'replayed'")
    assert replayed_at_kill < 150, "the kill should land mid-replay"
    # Nothing lost: what the killed replay held is back in the queue.
    names = Names(prefix)

    async def returned() -> bool:
        return await queue_depth(amqp, names.parked) >= 150 - replayed_at_kill

    await wait_for(returned, timeout=10, what="held messages back in the parking queue")

    code, out, err = await herald_cli(env, "parked", "replay", "--error-type", "permission")
    assert code == 0, (out, err)

    async def all_sent() -> bool:
        return await _count(db, "SELECT count(*) FROM messages WHERE status = 'sent'") == 150

    await wait_for(all_sent, timeout=30, what="all 150 sent")
    assert sandbox.sandbox.accepted_counts() == Counter({mid: 1 for mid in kinds})
    assert await queue_depth(amqp, names.parked) == 0
    states = dict(await db.fetch("SELECT state, count(*) FROM parked_messages GROUP BY 1"))
    # A copy replayed just before the kill may be found sent by the second run.
    assert states["replayed"] + states.get("resolved", 0) == 150
    assert (await list_parked_total(db)) == 0


async def list_parked_total(db: asyncpg.Connection) -> int:
    return await _count(db, "SELECT COALESCE(sum(parked), 0) FROM parked_counts")


async def test_a_message_delivered_meanwhile_is_not_sent_again(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    await start_service()
    await _park_through_pipeline(amqp, prefix, db, sandbox, {"late-1": "permission",
                                                            "late-2": "permission"})
    # A late webhook says late-1 was delivered after all.
    await db.execute("UPDATE messages SET status = 'delivered', delivered_at = now()"
                     " WHERE message_id = 'late-1'")
    seen = len(sandbox.sandbox.received)
    report = await replay(lot, ReplayOptions(Selection(all=True)), "test")
    assert (report.replayed, report.already_delivered) == (1, 1)

    async def sent() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id = 'late-2'") == "sent"

    await wait_for(sent, timeout=15, what="late-2 sent")
    assert [r.message_id for r in sandbox.sandbox.received[seen:]] == ["late-2"]
    row = await db.fetchrow("SELECT state, resolution FROM parked_messages"
                            " WHERE message_id = 'late-1'")
    assert row["state"] == "resolved" and "delivered" in row["resolution"]
    assert await db.fetchval("SELECT status FROM messages WHERE message_id = 'late-1'") == (
        "delivered")
    assert await queue_depth(amqp, Names(prefix).parked) == 0


async def test_dry_run_changes_nothing(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    lot: Lot,
) -> None:
    reqs = [(request(f"d-{i}", "http://127.0.0.1:9/x"), "invalid_request") for i in range(5)]
    await park_directly(amqp, db, prefix, reqs)
    await db.execute("UPDATE messages SET status = 'read' WHERE message_id = 'd-0'")

    async def snapshot() -> tuple[object, ...]:
        return (
            [tuple(r) for r in await db.fetch(
                "SELECT parked_id, state, replay_attempt, replay_body FROM parked_messages"
                " ORDER BY parked_id")],
            [tuple(r) for r in await db.fetch(
                "SELECT message_id, status, attempts, updated_at FROM messages ORDER BY 1")],
            await _count(db, "SELECT count(*) FROM message_actions"),
            await _count(db, "SELECT count(*) FROM audit_log"),
            parked_ids(await peek(Names(prefix).parked)),
            await queue_depth(amqp, Names(prefix).send_queue("http")),
        )

    before = await snapshot()
    report = await replay(lot, ReplayOptions(Selection(all=True), dry_run=True), "test")
    assert (report.selected, report.replayed, report.already_delivered) == (5, 4, 1)
    assert [i["action"] for i in report.items].count("replay") == 4
    code, out, err = await herald_cli(herald_env(prefix, db_url), "parked", "replay", "--all",
                                      "--dry-run")
    assert code == 0, err
    assert out.startswith("dry run: would replay 4 of 5 selected"), out
    assert await snapshot() == before


async def test_an_edited_body_is_what_the_provider_receives_and_the_edit_is_in_the_history(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    await start_service()
    await publish_all(amqp, prefix, [request("e-1", _recipient(sandbox, "invalid_request"),
                                             body={"text": "Hi {name}"})])
    await wait_parked(db, amqp, prefix, 1)
    parked_id = await db.fetchval("SELECT parked_id FROM parked_messages")
    code, out, err = await herald_cli(
        herald_env(prefix, db_url), "parked", "replay", str(parked_id)[:8],
        "--set-body", '{"text": "Hi Ada"}')
    assert code == 0, (out, err)

    async def sent() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id='e-1'") == "sent"

    await wait_for(sent, timeout=15, what="e-1 sent")
    bodies = [r.body for r in sandbox.sandbox.attempts_for("e-1")]
    assert bodies == [{"text": "Hi {name}"}, {"text": "Hi Ada"}]
    shown = await show(lot.pool, parked_id)
    assert shown["body"]["body"] == {"text": "Hi {name}"}  # the original stays
    assert shown["edited_body"]["body"] == {"text": "Hi Ada"}
    (edit,) = [h for h in shown["history"] if h["kind"] == "edited"]
    assert edit["old_body"] == {"text": "Hi {name}"} and edit["new_body"] == {"text": "Hi Ada"}
    assert edit["actor"].startswith("cli")
    kinds = [h["kind"] for h in shown["history"]]
    assert kinds.index("parked") < kinds.index("edited") < kinds.index("replayed")
    assert [(a["attempt"], a["outcome"]) for a in shown["attempts"]] == [
        (1, "failed"), (2, "sent")]
    payload = await db.fetchval("SELECT payload FROM messages WHERE message_id = 'e-1'")
    assert json.loads(payload)["body"] == {"text": "Hi Ada"}
    (audit_row,) = await db.fetch("SELECT source, action, affected, params FROM audit_log")
    assert (audit_row["source"], audit_row["action"], audit_row["affected"]) == (
        "cli", "parked.replay", 1)


async def test_an_invalid_payload_is_replayed_only_with_a_new_request(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    await start_service()
    await publish_raw(amqp, prefix, "http", b"{not json")
    await wait_parked(db, amqp, prefix, 1)
    report = await replay(lot, ReplayOptions(Selection(all=True)), "test")
    assert report.replayed == 0 and len(report.skipped) == 1 and not report.complete
    assert "--set-request" in report.skipped[0]["why"]
    assert await queue_depth(amqp, Names(prefix).parked) == 1

    parked_id = await db.fetchval("SELECT parked_id FROM parked_messages")
    fixed = json.dumps(request("fixed-1", sandbox.url("ok"))).encode()
    report = await replay(lot, ReplayOptions(Selection(ids=(parked_id,)),
                                             edit=Edit(request=fixed)), "test")
    assert report.replayed == 1 and report.complete

    async def sent() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='fixed-1'") == "sent"

    await wait_for(sent, timeout=15, what="fixed-1 sent")
    assert sandbox.sandbox.accepted_counts() == Counter({"fixed-1": 1})
    assert await queue_depth(amqp, Names(prefix).parked) == 0


async def test_a_message_the_broker_parked_by_itself_is_indexed_by_sync_and_replayed(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    names = Names(prefix)
    await publish_all(amqp, prefix, [request("crashy-1", sandbox.url("ok"))])
    # A consumer that keeps dying on it: the delivery limit dead-letters it to parked.
    # (reject, not nack: from RabbitMQ 4.3 on a nack does not count as a delivery.)
    channel = await amqp.channel()
    queue = await channel.get_queue(names.send_queue("http"), ensure=False)
    for _ in range(100):
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            if await queue_depth(amqp, names.parked) == 1:
                break
            await asyncio.sleep(0.05)
            continue
        await message.reject(requeue=True)
    await channel.close()
    assert await queue_depth(amqp, names.parked) == 1
    env = herald_env(prefix, db_url)
    code, out, _ = await herald_cli(env, "parked", "list")
    assert code == 0 and "run `herald parked sync`" in out, out

    code, out, err = await herald_cli(env, "parked", "sync")
    assert code == 0, err
    assert "indexed 1" in out
    listing = await list_parked(lot.pool, Selection())
    (row,) = listing.rows
    assert (row.message_id, row.error_type, row.channel) == ("crashy-1", "other", "http")
    assert row.error_code == "delivery_limit" and "kept failing" in (row.last_error or "")
    code, out, _ = await herald_cli(env, "parked", "sync")
    assert "indexed 0" in out  # the same id every time

    await start_service()
    report = await replay(lot, ReplayOptions(Selection(error_types=("other",))), "test")
    assert report.replayed == 1

    async def sent() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id='crashy-1'") == "sent"

    await wait_for(sent, timeout=15, what="crashy-1 sent")
    assert sandbox.sandbox.accepted_counts() == Counter({"crashy-1": 1})


async def test_reject_cancels_with_the_reason_and_takes_the_copies_out(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    lot: Lot,
) -> None:
    reqs = [(request(f"r-{i}", "http://127.0.0.1:9/x"), "invalid_request") for i in range(4)]
    ids = await park_directly(amqp, db, prefix, reqs)
    code, out, err = await herald_cli(herald_env(prefix, db_url), "parked", "reject",
                                      str(ids[0]), str(ids[2])[:8], "--reason", "opted out")
    assert code == 0, err
    assert "rejected 2" in out
    assert parked_ids(await peek(Names(prefix).parked)) == [str(ids[1]), str(ids[3])]
    statuses = dict(await db.fetch("SELECT message_id, status FROM messages"))
    assert statuses == {"r-0": "cancelled", "r-1": "failed", "r-2": "cancelled",
                        "r-3": "failed"}
    rows = await db.fetch("SELECT state, resolution FROM parked_messages"
                          " WHERE parked_id = ANY($1)", [ids[0], ids[2]])
    assert {tuple(r) for r in rows} == {("rejected", "opted out")}
    actions = await db.fetch("SELECT action, detail FROM message_actions ORDER BY id")
    assert [(a["action"], json.loads(a["detail"])["reason"]) for a in actions] == [
        ("rejected", "opted out")] * 2
    assert (await list_parked(lot.pool, Selection())).total == 2
    # Rejecting again is refused per id, and changes nothing.
    code, out, err = await herald_cli(herald_env(prefix, db_url), "parked", "reject",
                                      str(ids[0]), "--reason", "again")
    assert code == 1 and "not parked (state rejected)" in out


async def test_purge_asks_then_removes_only_the_old_ones_and_sync_tidies_leftovers(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    reqs = [(request(f"o-{i}", "http://127.0.0.1:9/x"), "permission") for i in range(5)]
    ids = await park_directly(amqp, db, prefix, reqs)
    await db.execute("UPDATE parked_messages SET parked_at = now() - interval '40 days'"
                     " WHERE parked_id = ANY($1)", [ids[0], ids[1]])
    env = herald_env(prefix, db_url)
    code, _, err = await herald_cli(env, "parked", "purge", "--older-than", "30d")
    assert code == 2 and "--yes" in err  # not interactive: confirmation required
    assert await queue_depth(amqp, Names(prefix).parked) == 5
    code, out, err = await herald_cli(env, "parked", "purge", "--older-than", "30d", "--yes")
    assert code == 0, err
    assert "purged 2" in out
    assert parked_ids(await peek(Names(prefix).parked)) == [str(i) for i in ids[2:]]
    # A reject that died between marking its rows and taking the copies out:
    # the next pass takes them out.
    await db.execute("UPDATE parked_messages SET state = 'rejected' WHERE parked_id = $1",
                     ids[3])
    code, out, _ = await herald_cli(env, "parked", "sync")
    assert "removed 1" in out
    assert parked_ids(await peek(Names(prefix).parked)) == [str(ids[2]), str(ids[4])]


async def test_every_parked_message_posts_a_notice(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    channel = await amqp.channel()
    notices = await channel.declare_queue(exclusive=True)
    await notices.bind(Names(prefix).notifications, "parked.#")
    await start_service()
    kinds = {"n-1": "invalid_request", "n-2": "permission", "n-3": "invalid_recipient"}
    await _park_through_pipeline(amqp, prefix, db, sandbox, kinds)
    got = []
    for _ in range(3):
        message = await notices.get(timeout=10, no_ack=True)
        got.append((message.routing_key, json.loads(message.body)))
    await channel.close()
    assert sorted(key for key, _ in got) == [f"parked.http.{k}" for k in sorted(kinds.values())]
    by_id = {str(r["parked_id"]): r["message_id"]
             for r in await db.fetch("SELECT parked_id, message_id FROM parked_messages")}
    for key, notice in got:
        assert by_id[notice["parked_id"]] == notice["message_id"]
        assert key == f"parked.http.{kinds[notice['message_id']]}"


async def test_list_and_show_on_the_command_line_mask_recipients(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    phone = "+15551234567"
    reqs = [({"message_id": f"s-{i}", "channel": "sms", "to": phone, "body": "code 1"},
             kind) for i, kind in enumerate(["invalid_recipient", "permission", "permission"])]
    ids = await park_directly(amqp, db, prefix, reqs)
    env = herald_env(prefix, db_url)
    code, out, err = await herald_cli(env, "parked", "list", "--error-type", "permission",
                                      "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert listing["total"] == 2 and listing["by_error_type"] == {"permission": 2}
    assert [i["id"] for i in listing["items"]] == [str(ids[1]), str(ids[2])]
    code, out, _ = await herald_cli(env, "parked", "list", "--recipient", phone)
    assert "3 parked: invalid_recipient 1, permission 2" in out
    assert phone not in out and "+15*******67" in out
    code, out, _ = await herald_cli(env, "parked", "show", str(ids[0]))
    assert code == 0 and phone not in out and "+15*******67" in out
    assert "history:" in out and "x-herald-parked-id" in out
    code, out, _ = await herald_cli(env, "parked", "show", str(ids[0]), "--reveal", "--json")
    assert json.loads(out)["body"]["to"] == phone
    code, _, err = await herald_cli(env, "parked", "show", "0000000000")
    assert code == 1 and err.startswith("herald: no parked message")


@pytest.mark.slow
async def test_listing_fifty_of_a_million_parked_rows_is_fast(
    db: asyncpg.Connection, lot: Lot,
) -> None:
    """The index answers, not the queue: a page and the counts per error_type
    for the usual filters, on a lot of 1,000,000 rows (5 % already replayed)."""
    await db.execute("""
        INSERT INTO parked_messages (parked_id, message_id, channel, recipient, campaign_id,
            attempts, error_type, error_code, last_error, parked_at, body, state)
        SELECT gen_random_uuid(), 'm-' || i,
               (ARRAY['http', 'sms', 'whatsapp', 'messenger'])[1 + i % 4],
               '+1555' || lpad((i % 100000)::text, 7, '0'),
               CASE WHEN i % 10 = 0 THEN NULL ELSE 'camp-' || (i % 97) END, 1 + i % 5,
               (ARRAY['access_token', 'permission', 'rate_limit', 'network', 'provider_error',
                      'invalid_recipient', 'invalid_request', 'invalid_payload', 'expired',
                      'other'])[1 + (i * 7) % 10],
               '400', 'HTTP 400', now() - make_interval(secs => 1000000 - i), '\\x7b7d',
               CASE WHEN i % 20 = 0 THEN 'replayed' ELSE 'parked' END
          FROM generate_series(1, 1000000) AS i""")
    await db.execute("ANALYZE parked_messages")
    cases = {
        "channel": Selection(channel="sms"),
        "error_type": Selection(error_types=("network",)),
        "two error_types": Selection(error_types=("network", "permission")),
        "channel and error_type": Selection(channel="sms", error_types=("network",)),
        "campaign": Selection(campaign="camp-5"),
        "recipient": Selection(recipient="+15550001234"),
        "last two hours": Selection(since=datetime.now(UTC) - timedelta(hours=2)),
        "none": Selection(),
    }
    timings = {}
    for name, selection in cases.items():
        for newest_first in (False, True):
            started = time.perf_counter()
            listing = await list_parked(lot.pool, selection, newest_first=newest_first)
            timings[f"{name}{' newest' if newest_first else ''}"] = time.perf_counter() - started
            assert len(listing.rows) == min(50, listing.total)
            assert all(r.state == "parked" for r in listing.rows)
    assert (await list_parked(lot.pool, Selection())).total == 950_000
    assert (await list_parked(lot.pool, Selection(channel="sms"))).total == 250_000
    print({k: round(v, 4) for k, v in timings.items()})
    slowest = max(timings.values())
    assert slowest < 0.5, timings


async def test_reset_attempts_gives_a_replayed_message_a_fresh_budget(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, lot: Lot,
) -> None:
    """Through the pipeline: two attempts, parked; replayed with a fresh budget
    it gets two more (numbered 3 and 4), replayed without one a single try."""
    await start_service()
    down = sandbox.url("down", status=503)  # two failures: far from an outage
    await publish_all(amqp, prefix, [request(f"b-{i}", down, retry={"max_attempts": 2})
                                     for i in range(2)])
    await wait_parked(db, amqp, prefix, 2, timeout=30)

    async def numbers(message_id: str) -> list[int]:
        return [r["attempt"] for r in await db.fetch(
            "SELECT attempt FROM delivery_attempts WHERE message_id = $1 ORDER BY attempt",
            message_id)]

    assert await numbers("b-0") == [1, 2]
    (fresh,) = await db.fetch("SELECT parked_id FROM parked_messages WHERE message_id='b-0'")
    await replay(lot, ReplayOptions(Selection(ids=(fresh["parked_id"],))), "test")
    (once,) = await db.fetch("SELECT parked_id FROM parked_messages WHERE message_id='b-1'")
    await replay(lot, ReplayOptions(Selection(ids=(once["parked_id"],)),
                                    reset_attempts=False), "test")
    await wait_parked(db, amqp, prefix, 2, timeout=30)
    assert await numbers("b-0") == [1, 2, 3, 4]
    assert await numbers("b-1") == [1, 2, 3]
    assert len(sandbox.sandbox.attempts_for("b-0")) == 4
