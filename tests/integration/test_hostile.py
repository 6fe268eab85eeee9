"""One hostile message never stalls, loses or duplicates the others (issue #11).

Several thousand hostile messages (random bytes, truncated JSON, NUL in every
field, huge and deep values, wrong types, numbers no float holds, unknown
channels, hostile x-herald-* headers, publisher headers and AMQP strings the
client cannot read or write back, ids over 255 bytes within 200 characters)
interleaved with 1,000 valid requests, through the real pipeline, broker,
database and sandbox. The randomness is seeded (``FUZZ_SEED``, default below)
so that a failure reproduces.

What must hold:

- every valid request is sent exactly once (the sandbox counts), all within
  :data:`BOUND_S` of the last publish (Herald consumes while they are
  published; on a 2-core machine it has usually caught up a few seconds
  after the last one);
- every hostile one ends where its kind says: parked as ``invalid_payload``
  with a reason and its original bytes, recorded (``failed`` for a recipient
  the channel cannot use, ``expired``), or sent once when only what Herald
  ignores was hostile;
- no ``delivery.crashed`` (no redelivery loop), no write retried for its
  content (``database.write_failed``), no broker "outage";
- ``herald parked show`` and ``herald status`` work on the hostile ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from pamqp import encode
from structlog.testing import capture_logs

from consumer.topology import Names
from tests.conftest import RunningSandbox, ServiceFactory, herald_env
from tests.helpers import drain_queue, queue_depth, wait_for
from tests.integration.operator_tools import herald_cli

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("FUZZ_SEED", "1101"))
VALID = 1000
HOSTILE = 4000
# Every valid request sent, and every message settled, within this many seconds
# of the last publish (the broker has confirmed them all).
BOUND_S = 60.0
LIMIT = 256 * 1024  # HERALD_MAX_BODY_BYTES's default

# -- bytes the AMQP client would not write ----------------------------------------------------

RAW = "\ue000RAW:"  # a string starting so is written to the wire as the hex that follows


def raw(data: bytes) -> str:
    return RAW + data.hex()


@contextlib.contextmanager
def raw_amqp() -> Iterator[None]:
    """Let this test publish what a careless client can: header names and short
    strings that are not UTF-8, doubles the client only writes as 32-bit floats."""
    short_string, field_table, table_value = (encode.short_string, encode.field_table,
                                              encode.encode_table_value)
    timestamp = encode.METHODS["timestamp"]

    def raw_timestamp(value: Any) -> bytes:
        if value == FAR_FUTURE:  # past datetime's range: no datetime can carry it
            return struct.pack(">Q", 2**63 - 1)
        return bytes(timestamp(value))

    def raw_short_string(value: str) -> bytes:
        if isinstance(value, str) and value.startswith(RAW):
            data = bytes.fromhex(value[len(RAW):])
            return struct.pack("B", len(data)) + data
        return short_string(value)

    def raw_table_value(value: Any) -> bytes:
        if isinstance(value, str) and value.startswith(RAW):
            return bytes.fromhex(value[len(RAW):])  # type byte included
        return table_value(value)

    def raw_field_table(value: Any) -> bytes:
        if not value:
            return field_table(value)
        data = b""
        for key, item in value.items():
            name = (bytes.fromhex(key[len(RAW):]) if key.startswith(RAW)
                    else key.encode("utf-8"))
            data += struct.pack("B", len(name)) + name + encode.encode_table_value(item)
        return struct.pack(">I", len(data)) + data

    encode.short_string = raw_short_string
    encode.encode_table_value = raw_table_value
    encode.field_table = raw_field_table
    encode.METHODS["shortstr"] = raw_short_string
    encode.METHODS["table"] = raw_field_table
    encode.METHODS["timestamp"] = raw_timestamp
    try:
        yield
    finally:
        encode.short_string, encode.encode_table_value, encode.field_table = (
            short_string, table_value, field_table)
        encode.METHODS["shortstr"] = short_string
        encode.METHODS["table"] = field_table
        encode.METHODS["timestamp"] = timestamp


# Stands for a timestamp property beyond the year 9999 (written by raw_amqp).
FAR_FUTURE = datetime(1999, 12, 31, 23, 59, 59, 424242, tzinfo=UTC)


def double(value: float) -> str:
    """A 64-bit float header value. (Not NaN or an infinity: RabbitMQ cannot read
    those and closes the publisher's connection, so they never reach Herald.)"""
    return raw(b"d" + struct.pack(">d", value))


def longstr(data: bytes) -> str:
    return raw(b"S" + struct.pack(">I", len(data)) + data)


# -- the messages -----------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    body: bytes
    expect: str  # sent | parked | failed | expired
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None  # of a decodable request
    amqp_message_id: str | None = None
    content_type: str | None = "application/json"
    timestamp: datetime | None = None
    error_type: str = "invalid_payload"  # of a parked or failed one


class Fuzz:
    def __init__(self, rng: random.Random, ok: str, flaky: Callable[[], str]) -> None:
        self.rng = rng
        self.ok = ok
        self.flaky = flaky
        self.n = 0

    def mid(self, prefix: str = "h") -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def request(self, **fields: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"message_id": self.mid(), "channel": "http", "to": self.ok,
                                "body": {"n": self.n, "text": "hi"}}
        base.update(fields)
        return base

    def case(self, kind: str, expect: str, request: dict[str, Any] | None = None,
             body: bytes | None = None, **extra: Any) -> Case:
        if body is None:
            assert request is not None
            body = json.dumps(request).encode()
        mid = request.get("message_id") if request is not None else None
        return Case(kind, body, expect, message_id=mid if isinstance(mid, str) else None,
                    **extra)

    # Each returns one hostile message.
    def random_bytes(self) -> Case:
        size = self.rng.choice([0, 1, 7, 100, 2000])
        return self.case("random bytes", "parked",
                         body=f"{self.mid()}:".encode() + self.rng.randbytes(size))

    def truncated(self) -> Case:
        text = json.dumps(self.request())
        cut = self.rng.randrange(1, len(text) - 1)
        return self.case("truncated JSON", "parked", body=text[:cut].encode())

    def nul(self) -> Case:
        where = self.rng.choice(["message_id", "to", "body", "body key", "deep body",
                                 "metadata value", "metadata key", "campaign_id"])
        request = self.request()
        if where in ("message_id", "to", "campaign_id"):
            request[where] = f"{request['message_id'] if where != 'to' else self.ok}\x00x"
        elif where == "body":
            request["body"] = f"text\x00{self.n}"
        elif where == "body key":
            request["body"] = {f"k\x00{self.n}": 1}
        elif where == "deep body":
            request["body"] = {"a": [{"b": [f"x{self.n}\x00"]}]}
        elif where == "metadata value":
            request["metadata"] = {"k": f"v\x00{self.n}"}
        else:
            request["metadata"] = {f"\x00{self.n}": "v"}
        return self.case(f"NUL in {where}", "parked", request)

    def huge(self) -> Case:
        choice = self.rng.choice(["body", "message_id", "to", "id bytes", "campaign bytes"])
        if choice == "body":
            request = self.request(body="x" * (LIMIT + self.rng.randrange(1, 50_000)))
            return self.case("body over the limit", "parked", request)
        if choice == "message_id":
            return self.case("message_id over 200", "parked",
                             self.request(message_id=f"{self.n}-" + "m" * 200))
        if choice == "to":
            return self.case("to over 2048 bytes", "parked",
                             self.request(to=self.ok + "?" + "é" * 1100))
        if choice == "id bytes":
            # Within 200 characters, over 255 bytes: not an AMQP message-id.
            return self.case("message_id over 255 bytes", "parked",
                             self.request(message_id=f"{self.n:04d}" + "é" * 126))
        # 200 characters, 800 bytes: a campaign id PostgreSQL stores; diverted to bulk.
        request = self.request(campaign_id=f"{self.n:05d}" + "😀" * 195)
        return self.case("campaign_id of 800 bytes", "sent", request)

    def deep(self) -> Case:
        depth = self.rng.choice([33, 100, 300, 5000, 100_000])
        inner = "[" * depth + "]" * depth
        where = self.rng.choice(["body", "metadata"])
        request = self.request()
        text = json.dumps(request)
        if where == "body":
            text = text.replace(json.dumps(request["body"]), inner)
        else:
            text = text[:-1] + f', "metadata": {{"k": {inner}}}}}'
        return self.case(f"{where} {depth} deep", "parked", body=text.encode())

    def wrong_type(self) -> Case:
        field_name, value = self.rng.choice([
            ("message_id", 12345), ("channel", ["http"]), ("to", {"url": self.ok}),
            ("retry", "often"), ("send_at", "yesterday"), ("metadata", [1, 2]),
            ("priority", 1), ("expires_at", "tomorrow"), ("retry", {"max_attempts": 1000}),
            ("unknown_field", True), ("channel", "fax"), ("channel", "sms"),
            ("body", None),
        ])
        request = self.request(**{field_name: value})
        if field_name == "body":
            del request["body"]
        return self.case(f"wrong {field_name}", "parked", request)

    def number(self) -> Case:
        token = self.rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "1e-400",
                                 "9" * 400, "-4.2e-99999"])
        text = json.dumps(self.request(body={"n": "@N@"})).replace('"@N@"', token)
        return self.case(f"number {token[:10]}", "parked", body=text.encode())

    def hostile_attempt(self) -> Case:
        headers: dict[str, Any] = self.rng.choice([
            {"x-herald-attempt": 10**12}, {"x-herald-attempt": -1}, {"x-herald-attempt": 0},
            {"x-herald-attempt": "lots"}, {"x-herald-attempt": double(2.5)},
            {"x-herald-attempt": longstr(b"\xff\xfe")}, {"x-herald-attempt": [1]},
            {"x-herald-attempt": 2, "x-herald-attempt-base": 5},
            {"x-herald-attempt-base": 2**40},
        ])
        return self.case("hostile attempt header", "parked", self.request(), headers=headers)

    def ignored_headers(self) -> Case:
        """x-herald-* headers Herald ignores or that give nothing: sent once."""
        headers: dict[str, Any] = self.rng.choice([
            {"x-herald-due-at": double(-1e300)}, {"x-herald-due-at": double(1e300)},
            {"x-herald-due-at": "soon"}, {"x-herald-due-at": 0},
            {"x-herald-due-at": int(time.time()) + 10 * 366 * 86400},
            {"x-herald-first-seen": -5}, {"x-herald-first-seen": double(1e308)},
            {"x-herald-attempt": 7, "x-herald-attempt-base": 6},
            {"x-herald-attempt": 3},
            {"x-death": "forged", "x-delivery-count": 10**9},
            {"x-herald-last-error": "z" * 50_000, "x-herald-error-type": 7},
        ])
        return self.case("ignored x-herald headers", "sent", self.request(), headers=headers)

    def publisher_headers(self) -> Case:
        """The publisher's own headers, which Herald carries on the copy it sends
        round again (the endpoint fails once): they must be publishable again."""
        headers: dict[str, Any] = self.rng.choice([
            {"x-app": double(1e300)}, {"x-app": longstr(b"\xff\xfe\xfd")},
            {"x-big": "b" * 120_000}, {"x-app": {"nested": [double(-1e300)]}},
            {raw(b"\xff\xfename"): 1},
        ])
        return self.case("publisher headers on a retried message", "sent",
                         self.request(to=self.flaky()), headers=headers)

    def odd_amqp_strings(self) -> Case:
        roll = self.rng.random()
        if roll < 0.4:
            return self.case("message-id property not UTF-8", "sent", self.request(),
                             amqp_message_id=raw(b"\xff\xfe" + str(self.n).encode()))
        if roll < 0.5:
            # Past the year 9999, as the timestamp property and as a header value.
            return self.case("timestamp no datetime holds", "sent", self.request(),
                             timestamp=FAR_FUTURE,
                             headers={"x-sent": raw(b"T" + struct.pack(">Q", 2**64 - 1))})
        if roll < 0.6:
            # Parked with its properties: 255 bytes that are not UTF-8 read back as
            # 765 (U+FFFD each), too long to be the parked copy's content type.
            return self.case("content type not UTF-8", "parked",
                             body=f"{self.mid()} not JSON".encode(),
                             content_type=raw(b"\xff" * 255))
        # Valid (only NUL is refused in an id), but the http channel sends the id
        # as a header, where control characters cannot go: recorded failed.
        request = self.request(message_id=f"{self.mid()}\x1b[31m\u202eevil\r")
        return self.case("id with escapes", "failed", request, error_type="invalid_request")

    def unusable_recipient(self) -> Case:
        to = self.rng.choice(["not a url", "ftp://127.0.0.1/x", "http://"])
        return self.case("recipient the channel cannot use", "failed", self.request(to=to),
                         error_type="invalid_recipient")

    def expired(self) -> Case:
        past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        return self.case("expired", "expired", self.request(expires_at=past))

    def hostile(self) -> Case:
        makers = [self.random_bytes, self.truncated, self.nul, self.nul, self.huge,
                  self.deep, self.wrong_type, self.wrong_type, self.number,
                  self.hostile_attempt, self.ignored_headers, self.publisher_headers,
                  self.odd_amqp_strings, self.unusable_recipient, self.expired]
        return self.rng.choice(makers)()


def build(rng: random.Random, sandbox: RunningSandbox) -> tuple[list[Case], list[str]]:
    fuzz = Fuzz(rng, sandbox.url("ok"), lambda: sandbox.url(f"flaky-{fuzz.n}", fail=1,
                                                            fail_status=503))
    hostile: list[Case] = []
    seen: set[bytes] = set()
    while len(hostile) < HOSTILE:
        case = fuzz.hostile()
        if case.body not in seen:  # parked copies are matched by their bytes
            seen.add(case.body)
            hostile.append(case)
    valid_ids = [f"valid-{i}" for i in range(VALID)]
    valid = [Case("valid", json.dumps(
        {"message_id": mid, "channel": "http", "to": sandbox.url("ok"), "body": {"i": i},
         **({"campaign_id": "spring"} if i % 10 == 0 else {})}).encode(), "sent",
        message_id=mid, amqp_message_id=mid) for i, mid in enumerate(valid_ids)]
    cases = hostile + valid
    rng.shuffle(cases)
    return cases, valid_ids


async def publish(connection: AbstractRobustConnection, prefix: str, cases: list[Case]) -> None:
    """Publish as a client would (aio-pika, confirms), not through Herald's Publisher,
    which would tidy up what a careless client sends."""
    names = Names(prefix)
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(names.exchange, ensure=False)
        with raw_amqp():
            for start in range(0, len(cases), 200):
                await asyncio.gather(*(
                    exchange.publish(
                        aio_pika.Message(c.body, headers=c.headers,
                                         content_type=c.content_type,
                                         message_id=c.amqp_message_id,
                                         timestamp=c.timestamp,
                                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        names.send_key("http", "main"), mandatory=True)
                    for c in cases[start:start + 200]))
    finally:
        await channel.close()


async def test_hostile_messages_never_stall_lose_or_duplicate_the_others(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, start_service: ServiceFactory,
) -> None:
    rng = random.Random(SEED)
    cases, valid_ids = build(rng, sandbox)
    expected = Counter(c.expect for c in cases)
    print(f"fuzz seed {SEED}: {len(cases)} messages, {dict(expected)},"
          f" kinds {dict(Counter(c.kind for c in cases if c.kind != 'valid'))}")
    await start_service()

    with capture_logs() as logs:
        started = time.monotonic()
        await publish(amqp, prefix, cases)
        # Herald consumes while the test publishes; the bound counts from the last
        # publish confirmed, so that a slow publisher does not eat into it.
        published_s = time.monotonic() - started
        started = time.monotonic()

        async def valid_sent() -> bool:
            counts = sandbox.sandbox.accepted_counts()
            return all(counts[mid] >= 1 for mid in valid_ids)

        await wait_for(valid_sent, timeout=BOUND_S, interval=0.5,
                       what=f"{VALID} valid requests sent")
        valid_s = time.monotonic() - started

        sent_ids = [c.message_id for c in cases if c.expect == "sent"]
        assert all(sent_ids)
        recorded = {c.message_id: c.expect for c in cases if c.expect in ("failed", "expired")}

        missing: list[str] = []

        async def settled() -> bool:
            counts = sandbox.sandbox.accepted_counts()
            statuses = dict(await db.fetch(
                "SELECT message_id, status FROM messages WHERE status IN ('failed', 'expired')"))
            depth = await queue_depth(amqp, Names(prefix).parked)
            missing[:] = (
                [f"not sent: {c.kind} {c.message_id!r}" for c in cases
                 if c.expect == "sent" and not counts[c.message_id or ""]]
                + [f"not {want}: {mid!r}" for mid, want in recorded.items()
                   if statuses.get(mid) != want]
                + ([f"parked {depth} of {expected['parked'] + expected['failed']}"]
                   if depth < expected["parked"] + expected["failed"] else []))
            return not missing

        try:
            await wait_for(settled, timeout=BOUND_S, interval=0.5, what="every message settled")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {missing[:20]}") from None
        settled_s = time.monotonic() - started

    # Sent exactly once, every one that should be; nothing else reached the endpoint.
    counts = sandbox.sandbox.accepted_counts()
    assert {mid for mid, n in counts.items() if n != 1} == set()
    assert set(counts) == set(sent_ids)

    parked = await drain_queue(amqp, Names(prefix).parked,
                               expect=expected["parked"] + expected["failed"], timeout=60)
    by_body: dict[bytes, Any] = {}
    for copy in parked:
        assert copy.body not in by_body, "parked twice"
        by_body[copy.body] = copy
    for case in cases:
        copy = by_body.get(case.body)
        if case.expect == "parked":
            assert copy is not None, f"{case.kind} not parked"
            # A copy without it was dead-lettered by the broker: a redelivery loop.
            assert copy.headers.get("x-herald-error-type") == "invalid_payload", (
                case.kind, copy.headers.get("x-first-death-reason"))
            reason = copy.headers["x-herald-last-error"]
            assert reason and "\n" not in reason, case.kind
        elif case.expect == "failed":
            assert copy is not None, f"{case.kind} not parked"
            assert copy.headers.get("x-herald-error-type") == case.error_type, (
                case.kind, copy.headers.get("x-first-death-reason"))
        else:
            assert copy is None, f"{case.kind} parked: {copy.headers['x-herald-last-error']}"
    assert await queue_depth(amqp, f"{prefix}.send.http") == 0
    assert await queue_depth(amqp, f"{prefix}.send.http.bulk") == 0

    # The index holds one row per parked copy, each body within the limit.
    rows = await db.fetch("SELECT length(body) AS size, body_size, error_type"
                          " FROM parked_messages")
    assert len(rows) == len(parked)
    assert max(r["size"] for r in rows) <= LIMIT
    assert sum(1 for r in rows if r["body_size"] is not None) == sum(
        1 for c in cases if c.expect == "parked" and len(c.body) > LIMIT)

    events = Counter(e["event"] for e in logs)
    assert events["delivery.crashed"] == 0
    assert events["database.write_failed"] == 0
    assert events["broker.unavailable"] == 0
    assert events["database.unavailable"] == 0
    print(f"published {len(cases)} in {published_s:.1f} s; then {VALID} valid sent after"
          f" {valid_s:.1f} s, all settled after {settled_s:.1f} s; parked {len(parked)};"
          f" log events {dict(events.most_common(8))}")

    # The operator tools work on what the hostile messages left behind.
    env = herald_env(prefix, db_url)
    for size_test in ("deep", "cut", "nul"):
        row = await db.fetchrow({
            "deep": "SELECT parked_id FROM parked_messages WHERE last_error LIKE"
                    " '%nested deeper%' ORDER BY length(body) DESC LIMIT 1",
            "cut": "SELECT parked_id FROM parked_messages WHERE body_size IS NOT NULL LIMIT 1",
            "nul": "SELECT parked_id FROM parked_messages WHERE last_error LIKE '%NUL%' LIMIT 1",
        }[size_test])
        assert row is not None, size_test
        code, out, err = await herald_cli(env, "parked", "show", str(row["parked_id"]))
        assert code == 0, (size_test, err)
        assert "\x1b" not in out and "\x00" not in out
        if size_test == "cut":
            assert "the parking queue holds all of them" in out
    odd = next(c.message_id for c in cases if c.kind == "id with escapes")
    assert odd is not None
    code, out, err = await herald_cli(env, "status", odd)
    assert code == 0, err
    assert "status    failed" in out
    assert "\x1b" not in out and "\u202e" not in out and "\r" not in out
    code, out, err = await herald_cli(env, "parked", "list")
    assert code == 0, err
