"""The http channel's outbound edge end to end, through the real broker and
database: refused destinations (loopback only: every endpoint here listens on
127.0.0.1, and no test sends a packet anywhere else), bounded answers
(50 MB, NUL bytes, a gzip bomb), no shared cookies, signed requests; and the
provider transport's bounded answers.

The non-loopback ranges are unit-tested without traffic in
tests/unit/test_destinations.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.errors import DeliveryError
from consumer.providers.transport import ACCEPTED_BODY_S, MAX_ANSWER_BYTES, Answer, post
from consumer.providers.twilio import TwilioProvider, classify_twilio
from consumer.sandbox.env import sandbox_env
from consumer.settings import Settings
from consumer.topology import Names
from schemas import SendRequest
from tests.conftest import ServiceFactory
from tests.helpers import publish_all, queue_depth, request, wait_for
from tests.providers_fixtures import start_app
from tests.unit.test_signing import readme_recipe

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The bound on Herald's memory while it takes a 50 MB (or 200 MB decompressed)
# answer: generous, yet far below what holding the body would cost.
MEMORY_BOUND = 20 * 1024 * 1024


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Endpoint:
    """A loopback HTTP endpoint that records what reaches it."""

    base_url: str
    port: int
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


EndpointFactory = Callable[[Handler], Awaitable[Endpoint]]


@pytest.fixture
async def endpoint() -> AsyncIterator[EndpointFactory]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Endpoint:
        app = web.Application()
        box: list[Endpoint] = []

        async def record(request: web.Request) -> web.StreamResponse:
            box[0].seen.append(Seen(request.path, dict(request.headers), await request.read()))
            return await handler(request)

        app.router.add_route("*", "/{tail:.*}", record)
        runner, base_url = await start_app(app)
        runners.append(runner)
        box.append(Endpoint(base_url, int(base_url.rsplit(":", 1)[1])))
        return box[0]

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


async def ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"id": "ep-1"})


async def row(db: asyncpg.Connection, mid: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT status, attempts, provider_message_id, last_error_type, last_error_code,"
        " last_error FROM messages WHERE message_id = $1", mid)


async def wait_status(db: asyncpg.Connection, mids: list[str], status: str,
                      timeout: float = 20) -> None:
    async def done() -> bool:
        n = await db.fetchval("SELECT count(*) FROM messages WHERE message_id = ANY($1)"
                              " AND status = $2", mids, status)
        return int(n) == len(mids)

    await wait_for(done, timeout=timeout, what=f"{mids} {status}")


def resolves_to_loopback(name: str) -> bool:
    """Whether ``name`` resolves (from /etc/hosts; no packet leaves) to 127.0.0.0/8."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET)
    except OSError:
        return False
    return bool(infos) and all(info[4][0].startswith("127.") for info in infos)


# -- destinations -------------------------------------------------------------------------


async def test_loopback_is_refused_without_an_allow_list(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    """Every spelling of the loopback endpoint ends failed as invalid_recipient /
    destination_not_allowed, and the endpoint (listening on 127.0.0.1, where all
    of them lead) receives nothing."""
    target = await endpoint(ok)
    await start_service(http_allow_networks=())
    hosts = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "017700000001", "0.0.0.0",
             "[::1]", "[::ffff:127.0.0.1]", "127.0.0.2"]
    if resolves_to_loopback("localhost"):
        hosts.append("localhost")
    requests = [request(f"ssrf-{i}", target.url(host=host)) for i, host in enumerate(hosts)]
    requests.append(request("ssrf-creds", f"http://user:hunter2@127.0.0.1:{target.port}/hook"))
    mids = [r["message_id"] for r in requests]
    await publish_all(amqp, prefix, requests)

    await wait_status(db, mids, "failed")
    for mid in mids:
        found = await row(db, mid)
        assert found is not None
        assert (found["last_error_type"], found["last_error_code"]) == (
            "invalid_recipient", "destination_not_allowed"), (mid, dict(found))
        assert found["attempts"] == 1  # never retried
    refused = await row(db, "ssrf-0")
    assert refused is not None and "loopback" in refused["last_error"]
    assert "HERALD_HTTP_ALLOW_NETWORKS" in refused["last_error"]
    creds = await row(db, "ssrf-creds")
    assert creds is not None and "hunter2" not in creds["last_error"]
    assert target.seen == []


async def test_allowed_loopback_is_delivered(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    target = await endpoint(ok)
    service = await start_service()  # herald_env allows 127.0.0.0/8
    assert [str(n) for n in service.settings.http_allow_networks] == ["127.0.0.0/8"]
    requests = [request("allowed-ip", target.url()),
                request("allowed-short", target.url(host="127.1"))]
    if resolves_to_loopback("localhost"):
        requests.append(request("allowed-name", target.url(host="localhost")))
    # Credentials stay refused whatever the network.
    requests.append(request("allowed-creds", f"http://user:pass@127.0.0.1:{target.port}/x"))
    await publish_all(amqp, prefix, requests)

    sent = [r["message_id"] for r in requests if r["message_id"] not in
            ("allowed-short", "allowed-creds")]
    await wait_status(db, sent, "sent")
    await wait_status(db, ["allowed-short", "allowed-creds"], "failed")
    # Credentials, and legacy spellings of an address, stay refused whatever the network.
    for mid in ("allowed-short", "allowed-creds"):
        found = await row(db, mid)
        assert found is not None and found["last_error_code"] == "destination_not_allowed"
    assert sorted(s.headers["Idempotency-Key"] for s in target.seen) == sorted(sent)
    assert all("Authorization" not in s.headers for s in target.seen)


# -- answers ------------------------------------------------------------------------------


async def _stream(request: web.Request, response: web.StreamResponse,
                  chunks: Callable[[], Any]) -> web.StreamResponse:
    await response.prepare(request)
    try:
        for chunk in chunks():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError, RuntimeError):
        pass  # Herald hung up after its cap: that is the point
    return response


async def huge_nul_answer(request: web.Request) -> web.StreamResponse:
    """200 with 50 MB: JSON-looking text with NUL in it, then NUL bytes."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = 50 * 1024 * 1024

    def chunks() -> Any:
        head = b'{"id": "big\\u0000\x00", "note": "' + b"\x00" * 100
        yield head
        left = 50 * 1024 * 1024 - len(head)
        block = b"\x00" * 65536
        while left > 0:
            yield block[:left]
            left -= len(block)

    return await _stream(request, response, chunks)


@cache
def gzip_bomb() -> bytes:
    """200 MiB of zeros, gzip-compressed to about 200 KiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    parts = [packer.compress(block) for _ in range(200)]
    return b"".join(parts) + packer.flush()


async def bomb_answer(request: web.Request) -> web.StreamResponse:
    status = 200 if request.path.startswith("/ok") else 500
    response = web.StreamResponse(status=status, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    data = gzip_bomb()
    return await _stream(request, response, lambda: (data[i:i + 65536]
                                                     for i in range(0, len(data), 65536)))


async def odd_id_answer(request: web.Request) -> web.StreamResponse:
    text = '{"id": "odd\\u0000id\\ud800' + "x" * 1000 + '"}'
    return web.Response(status=200, text=text, content_type="application/json")


async def _measure(work: Callable[[], Awaitable[None]]) -> int:
    """Peak bytes traced by tracemalloc while ``work`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        await work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def _settled(amqp: AbstractRobustConnection, prefix: str, service: Any) -> None:
    """Nothing left in the http queue and nothing in flight."""
    async def quiet() -> bool:
        return (await queue_depth(amqp, Names(prefix).send_queue("http")) == 0
                and service.channels.in_flight == 0)

    await wait_for(quiet, timeout=10, what="the http channel is idle")


async def test_a_huge_answer_with_nul_bytes_is_sent_once_in_bounded_memory(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    target = await endpoint(huge_nul_answer)
    service = await start_service()

    async def deliver() -> None:
        await publish_all(amqp, prefix, [request("huge-1", target.url())])
        await wait_status(db, ["huge-1"], "sent")

    peak = await _measure(deliver)
    assert peak < MEMORY_BOUND, f"peak {peak / 1e6:.1f} MB while taking a 50 MB answer"
    await _settled(amqp, prefix, service)
    found = await row(db, "huge-1")
    assert found is not None and found["status"] == "sent" and found["attempts"] == 1
    assert found["provider_message_id"] is None  # the answer was cut: no id from it
    assert len(target.seen) == 1  # never re-sent
    attempts = await db.fetchval("SELECT count(*) FROM delivery_attempts"
                                 " WHERE message_id = 'huge-1'")
    assert attempts == 1


async def test_an_accepted_send_is_recorded_whatever_id_the_endpoint_gives(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    target = await endpoint(odd_id_answer)
    service = await start_service()
    await publish_all(amqp, prefix, [request("odd-id", target.url())])
    await wait_status(db, ["odd-id"], "sent")
    await _settled(amqp, prefix, service)
    found = await row(db, "odd-id")
    assert found is not None
    assert found["provider_message_id"].startswith("odd\ufffdid\ufffd")
    assert len(found["provider_message_id"]) == 200
    assert len(target.seen) == 1


async def test_an_accepted_send_with_a_stalled_or_broken_body_is_sent_once(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    """A 2xx status is acceptance: a body that stalls or breaks off afterwards
    costs the id, never a second send (it used to become a retryable error)."""
    release = asyncio.Event()

    async def accept_then_misbehave(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"id": "never-fin')
        if request.path.startswith("/stall"):
            await release.wait()  # until the test ends
        elif request.transport is not None:
            request.transport.close()
        return response

    target = await endpoint(accept_then_misbehave)
    service = await start_service()
    try:
        await publish_all(amqp, prefix, [request("stalled", target.url("/stall")),
                                         request("broken", target.url("/broken"))])
        await wait_status(db, ["stalled", "broken"], "sent")
        await _settled(amqp, prefix, service)
        for mid in ("stalled", "broken"):
            found = await row(db, mid)
            assert found is not None and found["attempts"] == 1
            assert found["provider_message_id"] is None
        assert sorted(s.path for s in target.seen) == ["/broken", "/stall"]
    finally:
        release.set()


async def test_a_gzip_bomb_is_cut_after_decompression(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    gzip_bomb()  # built before measuring
    target = await endpoint(bomb_answer)
    service = await start_service()

    async def deliver() -> None:
        await publish_all(amqp, prefix, [
            request("bomb-ok", target.url("/ok")),
            request("bomb-err", target.url("/err"), retry={"max_attempts": 1}),
        ])
        await wait_status(db, ["bomb-ok"], "sent")
        await wait_status(db, ["bomb-err"], "failed")

    peak = await _measure(deliver)
    assert peak < MEMORY_BOUND, f"peak {peak / 1e6:.1f} MB while taking 200 MiB gzipped answers"
    await _settled(amqp, prefix, service)
    failed = await row(db, "bomb-err")
    assert failed is not None and failed["last_error_code"] == "500"
    assert len(failed["last_error"]) <= 300  # cut for the error text
    assert len(target.seen) == 2


async def test_no_cookie_travels_between_destinations(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    async def set_cookie(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"id": "c"})
        response.set_cookie("session", "from-the-first-endpoint", path="/")
        return response

    first, second = await endpoint(set_cookie), await endpoint(ok)
    # By name: a cookie jar refuses cookies for bare IP addresses anyway.
    host = "localhost" if resolves_to_loopback("localhost") else "127.0.0.1"
    await start_service()
    await publish_all(amqp, prefix, [request("cookie-1", first.url(host=host))])
    await wait_status(db, ["cookie-1"], "sent")
    await publish_all(amqp, prefix, [request("cookie-2", second.url(host=host)),
                                     request("cookie-3", first.url(host=host))])
    await wait_status(db, ["cookie-2", "cookie-3"], "sent")
    assert "Set-Cookie" not in first.seen[0].headers
    for seen in (*first.seen, *second.seen):
        assert "Cookie" not in seen.headers


# -- signatures ---------------------------------------------------------------------------


async def test_posts_are_signed_and_the_readme_recipe_verifies_them(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    new, old = "receiver-secret-new-0001", "receiver-secret-old-0002"
    target = await endpoint(ok)
    await start_service(http_signing_secrets=(new, old))
    body = {"order": 42, "text": "héllo", "nested": {"x": [1, 2]}}
    await publish_all(amqp, prefix, [request("signed-1", target.url(), body=body)])
    await wait_status(db, ["signed-1"], "sent")
    [seen] = target.seen
    header = seen.headers["X-Herald-Signature"]
    assert header.count("v1=") == 2
    recipe = readme_recipe()
    key = seen.headers["Idempotency-Key"]
    assert key == "signed-1"
    assert recipe(header, key, seen.body, [new])
    assert recipe(header, key, seen.body, [old])
    assert not recipe(header, key, seen.body, ["someone-elses-secret-x"])
    assert not recipe(header, "another-key", seen.body, [new])
    assert not recipe(header, key, seen.body + b" ", [new])
    assert json.loads(seen.body) == body


async def test_without_a_secret_there_is_no_signature_header(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    start_service: ServiceFactory, endpoint: EndpointFactory,
) -> None:
    target = await endpoint(ok)
    await start_service()
    await publish_all(amqp, prefix, [request("unsigned-1", target.url())])
    await wait_status(db, ["unsigned-1"], "sent")
    [seen] = target.seen
    assert "X-Herald-Signature" not in seen.headers


# -- provider answers (adapter level, no broker) ------------------------------------------


async def test_provider_answers_are_read_up_to_the_cap(endpoint: EndpointFactory) -> None:
    async def twilio_like(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/bomb"):
            return await bomb_answer(request)
        return await huge_nul_answer(request)

    gzip_bomb()
    target = await endpoint(twilio_like)
    settings = Settings.from_env(sandbox_env(target.port)).replace(
        twilio_base_url=target.base_url)
    sms = SendRequest(message_id="t-1", channel="sms", to="+15551234567", body="hi")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        twilio = TwilioProvider(settings, session)

        async def send_huge() -> None:
            result = await twilio.send(sms, 1)
            # Accepted, but the answer was cut: no sid can be read from it.
            assert result.provider_message_id is None

        peak = await _measure(send_huge)
        assert peak < MEMORY_BOUND, f"peak {peak / 1e6:.1f} MB"

        # A gzip bomb as a provider's error answer: cut after decompression.
        answers: list[Answer] = []

        async def post_bomb() -> None:
            answers.append(await post(session, f"{target.base_url}/bomb", data=b"x",
                                      headers={}, secrets=(), provider="Twilio"))

        peak = await _measure(post_bomb)
        assert peak < MEMORY_BOUND, f"peak {peak / 1e6:.1f} MB"
        [answer] = answers
        assert answer.status == 500 and answer.cut
        assert len(answer.text) == MAX_ANSWER_BYTES and answer.json() is None
        error = classify_twilio(answer.status, answer.json())
        assert error.error_type.value == "provider_error" and len(error.message) <= 300


async def test_a_provider_error_answer_with_nul_is_storable(endpoint: EndpointFactory) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, content_type="application/json",
                            text='{"code": 21211, "message": "bad\\u0000 \\ud800 number"}')

    target = await endpoint(refuse)
    settings = Settings.from_env(sandbox_env(target.port)).replace(
        twilio_base_url=target.base_url)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DeliveryError) as caught:
            await TwilioProvider(settings, session).send(
                SendRequest(message_id="t-2", channel="sms", to="+15551234567", body="hi"), 1)
    error = caught.value
    assert error.error_type.value == "invalid_recipient" and error.code == "21211"
    assert "\x00" not in error.message
    error.message.encode("utf-8")


async def test_a_provider_that_accepts_then_stalls_is_a_send_without_id(
    endpoint: EndpointFactory,
) -> None:
    release = asyncio.Event()

    async def accept_then_stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=201, headers={"Content-Type": "application/json"})
        response.content_length = 500
        await response.prepare(request)
        await response.write(b'{"sid": "SM')
        await release.wait()
        return response

    target = await endpoint(accept_then_stall)
    settings = Settings.from_env(sandbox_env(target.port)).replace(
        twilio_base_url=target.base_url)
    try:
        async with aiohttp.ClientSession() as session:
            result = await asyncio.wait_for(TwilioProvider(settings, session).send(
                SendRequest(message_id="t-3", channel="sms", to="+15551234567", body="hi"), 1),
                ACCEPTED_BODY_S + 5)
        assert result.provider_message_id is None  # accepted: not an error to retry
        assert len(target.seen) == 1
    finally:
        release.set()
