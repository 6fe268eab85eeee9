"""The events consumer never drops or strands an event: what the database
refuses for good is isolated and parked with its raw body (and replayed back
to the events queue by an operator), what is not a provider event is parked,
a failing outbox action leaves the batch settled, and a database outage is
waited out."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import REGISTRY

from consumer.publisher import Publisher
from consumer.status import events as events_module
from consumer.status.events import EventsConsumer
from consumer.topology import Names
from schemas import ProviderEvent
from tests.conftest import REPO, herald_env
from tests.helpers import queue_depth, wait_for
from tests.integration.operator_tools import herald_cli
from tests.integration.test_events import at, ev, insert_message
from tests.integration.test_webhooks import HeraldFactory, start_herald

__all__ = ["start_herald"]  # the fixture, used here too


def _body(event: ProviderEvent) -> bytes:
    """An event's bytes as the webhook receiver publishes them."""
    return event.model_dump_json(exclude_none=True).encode()


async def _publish(amqp: AbstractRobustConnection, prefix: str,
                   *bodies: tuple[bytes, str]) -> None:
    """Publish raw event bodies with their AMQP message ids, in this order."""
    publisher = Publisher(amqp, Names(prefix))
    try:
        for body, event_id in bodies:
            await publisher.publish(f"{prefix}.events", "twilio.delivered", body,
                                    message_id=event_id)
    finally:
        await publisher.close()


async def _statuses(db: asyncpg.Connection) -> dict[str, str]:
    return dict(await db.fetch("SELECT message_id, status FROM messages"))


async def _parked_events(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM parked_messages WHERE channel = 'events'"
                          " ORDER BY parked_at")


def _retries(component: str) -> float:
    return REGISTRY.get_sample_value("herald_infrastructure_retries_total",
                                     {"component": component}) or 0.0


async def test_an_event_the_database_refuses_is_parked_alone_and_replayed_once_it_can_be(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EventsConsumer, "max_batch", 4)
    monkeypatch.setattr(EventsConsumer, "prefetch", 4)
    for i in range(1, 9):
        await insert_message(db, f"m{i}", pmid=f"SM{i}")
    # The database refuses one event for good (a constraint it breaks).
    await db.execute("ALTER TABLE provider_events ADD CONSTRAINT refuse_sm3"
                     " CHECK (provider_message_id IS DISTINCT FROM 'SM3')")
    events = {i: ev("twilio", f"SM{i}", "delivered", at(i)) for i in range(1, 9)}
    refused_id = str(uuid.uuid4())
    # One batch of four, the refused event inside it.
    await _publish(amqp, prefix, *((_body(events[i]), refused_id if i == 3 else str(uuid.uuid4()))
                                   for i in range(1, 5)))
    await start_herald(roles=("events",))

    async def applied(*ids: int) -> bool:
        statuses = await _statuses(db)
        return all(statuses[f"m{i}"] == "delivered" for i in ids)

    await wait_for(lambda: applied(1, 2, 4), timeout=15, what="the other three applied")
    (parked,) = await _parked_events(db)
    assert (parked["error_type"], parked["error_code"]) == ("invalid_payload", "23514")
    assert "refuse_sm3" in parked["last_error"]
    assert bytes(parked["body"]) == _body(events[3])
    assert "Failing row" not in parked["last_error"]  # PostgreSQL's detail quotes the row
    assert json.loads(parked["headers"])["x-herald-event-id"] == refused_id
    assert parked["message_id"] is None and parked["state"] == "parked"
    assert (await _statuses(db))["m3"] == "sent"
    # Nothing is left holding prefetch: a whole window more is applied.
    await _publish(amqp, prefix, *((_body(events[i]), str(uuid.uuid4())) for i in range(5, 9)))
    await wait_for(lambda: applied(5, 6, 7, 8), timeout=15, what="the next four applied")
    assert await queue_depth(amqp, f"{prefix}.events") == 0
    assert await queue_depth(amqp, f"{prefix}.parked") == 1

    # An operator finds it, sees why, and replays it once the database takes it.
    env = herald_env(prefix, db_url)
    code, out, err = await herald_cli(env, "parked", "list", "--channel", "events", "--json")
    assert code == 0, err
    assert [i["id"] for i in json.loads(out)["items"]] == [str(parked["parked_id"])]
    code, out, err = await herald_cli(env, "parked", "show", str(parked["parked_id"]))
    assert code == 0, err
    assert f"provider event {refused_id}" in out and "SM3" in out
    code, out, err = await herald_cli(env, "parked", "replay", "--channel", "events",
                                      "--dry-run", "--json")
    assert code == 0, err
    assert [i["action"] for i in json.loads(out)["items"]] == ["replay to the events queue"]
    await db.execute("ALTER TABLE provider_events DROP CONSTRAINT refuse_sm3")
    code, out, err = await herald_cli(env, "parked", "replay", "--channel", "events", "--json")
    assert code == 0, err
    assert json.loads(out)["replayed"] == 1
    await wait_for(lambda: applied(3), timeout=15, what="the replayed event applied")
    # Applied as the event it was (same id), and only the events queue saw it.
    stored = await db.fetchval("SELECT event_id::text FROM provider_events"
                               " WHERE provider_message_id = 'SM3'")
    assert stored == refused_id
    assert await db.fetchval("SELECT state FROM parked_messages") == "replayed"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE status <> 'delivered'") == 0
    for channel in ("http", "sms", "whatsapp", "messenger"):
        assert await queue_depth(amqp, f"{prefix}.send.{channel}") == 0


async def test_a_body_that_is_not_a_provider_event_is_parked_as_it_came(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    await insert_message(db, "m1", pmid="SM1")
    garbage = b"\xff\xfe not even text"
    stranger: dict[str, Any] = {"provider": "carrier-pigeon", "status": "delivered",
                                "occurred_at": "2026-11-01T12:00:00Z"}
    good = _body(ev("twilio", "SM1", "delivered", at(1)))
    await _publish(amqp, prefix, (garbage, str(uuid.uuid4())),
                   (json.dumps(stranger).encode(), str(uuid.uuid4())),
                   (good, str(uuid.uuid4())))
    await start_herald(roles=("events",))

    async def parked_both() -> bool:
        return len(await _parked_events(db)) == 2

    await wait_for(parked_both, timeout=15, what="both parked")
    rows = await _parked_events(db)
    assert {bytes(r["body"]) for r in rows} == {garbage, json.dumps(stranger).encode()}
    assert {(r["error_type"], r["error_code"]) for r in rows} == {
        ("invalid_payload", "event_schema")}
    assert all(r["last_error"].startswith("not a provider event") for r in rows)
    await wait_for(lambda: _delivered(db, "m1"), timeout=15, what="the good event applied")
    # Replaying them would only park them again: skipped, with the reason.
    code, out, _ = await herald_cli(herald_env(prefix, db_url), "parked", "replay",
                                    "--channel", "events", "--json")
    report = json.loads(out)
    assert code == 1 and report["replayed"] == 0
    assert all("not a provider event" in s["why"] for s in report["skipped"])
    assert len(report["skipped"]) == 2


async def _delivered(db: asyncpg.Connection, message_id: str) -> bool:
    return bool(await db.fetchval(
        "SELECT status = 'delivered' FROM messages WHERE message_id = $1", message_id))


async def test_an_action_the_database_refuses_leaves_the_batch_settled_for_the_sweep(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One event in flight at a time: a batch left unsettled would stop everything.
    monkeypatch.setattr(EventsConsumer, "max_batch", 1)
    monkeypatch.setattr(EventsConsumer, "prefetch", 1)
    monkeypatch.setattr(EventsConsumer, "action_retry_after_s", 0.5)
    monkeypatch.setattr(EventsConsumer, "sweep_interval_s", 0.2)
    await insert_message(db, "landline", pmid="SM1")
    await insert_message(db, "mobile", pmid="SM2")
    # Parking the first message (Twilio 30006: a landline) cannot be indexed, for
    # a reason that is the database's, not the data's (a refusal of the data is
    # logged and parked anyway: see test_isolation).
    await db.execute("""
        CREATE FUNCTION refuse_30006() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.error_code = '30006' THEN
                RAISE EXCEPTION 'parked index busy' USING ERRCODE = 'lock_not_available';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_30006 BEFORE INSERT ON parked_messages
            FOR EACH ROW EXECUTE FUNCTION refuse_30006();""")
    failed = ev("twilio", "SM1", "failed", at(1), error_code="30006", error_text="landline")
    await _publish(amqp, prefix, (_body(failed), str(uuid.uuid4())),
                   (_body(ev("twilio", "SM2", "delivered", at(2))), str(uuid.uuid4())))
    await start_herald(roles=("events",))

    await wait_for(lambda: _delivered(db, "mobile"), timeout=15,
                   what="the next event applied")
    # The failure report was applied and decided; its action waits in the outbox.
    assert (await _statuses(db))["landline"] == "failed"
    assert await db.fetchval("SELECT done_at IS NULL FROM event_actions") is True
    await db.execute("DROP TRIGGER refuse_30006 ON parked_messages")

    async def parked() -> bool:
        return bool(await db.fetchval(
            "SELECT count(*) FROM parked_messages WHERE message_id = 'landline'") == 1
            and await db.fetchval("SELECT done_at IS NOT NULL FROM event_actions"))

    await wait_for(parked, timeout=15, what="the sweep parks it")
    assert await queue_depth(amqp, f"{prefix}.events") == 0


async def test_a_batch_that_fails_unexpectedly_goes_back_to_the_queue(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_herald: HeraldFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EventsConsumer, "max_batch", 2)
    monkeypatch.setattr(EventsConsumer, "prefetch", 2)
    real_park = events_module.park
    calls: list[str] = []

    async def park_failing_once(*args: Any, **kwargs: Any) -> uuid.UUID:
        calls.append(kwargs["channel"])
        if len(calls) == 1:
            raise RuntimeError("a bug in parking")
        return await real_park(*args, **kwargs)

    # A failure no one planned for (a bug), in the middle of a batch whose
    # first event is applied already.
    monkeypatch.setattr(events_module, "park", park_failing_once)
    await insert_message(db, "m1", pmid="SM1")
    await insert_message(db, "m2", pmid="SM2")
    first = _body(ev("twilio", "SM1", "delivered", at(1)))
    await _publish(amqp, prefix, (first, str(uuid.uuid4())), (b"garbage", str(uuid.uuid4())))
    await start_herald(roles=("events",))

    async def done() -> bool:
        return len(await _parked_events(db)) == 1 and await _delivered(db, "m1")

    await wait_for(done, timeout=20, what="both delivered again and settled")
    assert len(calls) == 2
    # And the consumer goes on, with its prefetch free.
    second = _body(ev("twilio", "SM2", "delivered", at(2)))
    await _publish(amqp, prefix, (second, str(uuid.uuid4())))
    await wait_for(lambda: _delivered(db, "m2"), timeout=15, what="the next event applied")
    assert len(await _parked_events(db)) == 1


async def _run_script(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "bash", str(REPO / "deploy" / "local" / args[0]), *args[1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=os.environ.copy())
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")


@pytest.mark.fault
@pytest.mark.slow
async def test_a_database_outage_during_a_batch_is_waited_out(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    start_herald: HeraldFactory,
) -> None:
    for i in range(1, 4):
        await insert_message(db, f"m{i}", pmid=f"SM{i}")
    await db.close()
    await start_herald(roles=("events",))
    before = _retries("database")
    await _run_script("postgres.sh", "stop")
    try:
        await _publish(amqp, prefix, *((_body(ev("twilio", f"SM{i}", "delivered", at(i))),
                                        str(uuid.uuid4())) for i in range(1, 4)))
        await wait_for(lambda: _retries("database") > before, timeout=15,
                       what="the batch waiting for the database")
    finally:
        await _run_script("postgres.sh", "start")

    async def applied() -> bool:
        try:
            conn = await asyncpg.connect(db_url, timeout=2)
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            delivered = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE status = 'delivered'")
            assert await conn.fetchval("SELECT count(*) FROM parked_messages") == 0
            return bool(delivered == 3)
        finally:
            await conn.close()

    await wait_for(applied, timeout=60, interval=0.5, what="all three applied after the outage")
    assert await queue_depth(amqp, f"{prefix}.events") == 0
