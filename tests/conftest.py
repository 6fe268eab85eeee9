"""Fixtures: a real RabbitMQ and PostgreSQL (started by deploy/local/up.sh, which
`make test` runs first), a fresh prefix and schema per test, the sandbox, and
in-process Herald services. Cleanup runs in reverse order of set-up."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp import web

from consumer.migrate import migrate
from consumer.sandbox import Sandbox
from consumer.service import Service
from consumer.settings import Settings
from consumer.topology import Names, Topology

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("HERALD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5673/")
DATABASE_URL = os.environ.get(
    "HERALD_DATABASE_URL", "postgresql://herald:herald@127.0.0.1:5433/herald"
)


def with_search_path(url: str, schema: str) -> str:
    # asyncpg passes unknown DSN query parameters on as server settings.
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


async def _open_channel(connection: AbstractRobustConnection) -> AbstractChannel:
    """A channel, once the session's connection is back (a fault test restarts the broker)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await connection.channel()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.fixture
async def prefix(amqp: AbstractRobustConnection) -> AsyncIterator[str]:
    """A fresh exchange/queue prefix, deleted after the test."""
    name = f"t{uuid.uuid4().hex[:10]}"
    topology = Topology(Names(name))
    await (await _open_channel(amqp)).close()  # once the session's connection is back
    assert await topology.declare(amqp) == []
    yield name
    channel = await _open_channel(amqp)
    try:
        for q in topology.queues:
            await channel.queue_delete(q["name"])
        for e in topology.exchanges:
            await channel.exchange_delete(e["name"])
    finally:
        await channel.close()


@pytest.fixture
async def db_url() -> AsyncIterator[str]:
    """A fresh, migrated schema; the URL selects it through search_path."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.close()
    url = with_search_path(DATABASE_URL, schema)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield url
    # A fresh connection: a fault test may have restarted the database meanwhile.
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_url)
    yield conn
    if not conn.is_closed():
        await conn.close()


class RunningSandbox:
    def __init__(self, sandbox: Sandbox, base_url: str) -> None:
        self.sandbox = sandbox
        self.base_url = base_url

    def url(self, name: str, **script: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in script.items())
        return f"{self.base_url}/http/{name}" + (f"?{query}" if query else "")


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    box = Sandbox()
    runner = web.AppRunner(box.app, access_log=None, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield RunningSandbox(box, f"http://127.0.0.1:{port}")
    await runner.cleanup()


def herald_env(prefix: str, db_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "HERALD_AMQP_URL": AMQP_URL,
        "HERALD_DATABASE_URL": db_url,
        "HERALD_PREFIX": prefix,
        "HERALD_HTTP_PORT": "0",
        "HERALD_HTTP_HOST": "127.0.0.1",
        "HERALD_ADMIN_PORT": "0",
        "HERALD_ADMIN_HOST": "127.0.0.1",
        "HERALD_BASE_DELAY_S": "1",
        "HERALD_MAX_DELAY_S": "8",
        "HERALD_RETRY_JITTER": "0",
        # The shipped retry rules wait an hour for some codes; tests compress time
        # through the settings above, and turn the rules on where they test them.
        "HERALD_RETRY_RULES": "off",
        "HERALD_SEND_TIMEOUT_S": "2",
        # The tests' http endpoints (the sandbox, small apps) listen on loopback,
        # which the http channel refuses unless allowed.
        "HERALD_HTTP_ALLOW_NETWORKS": "127.0.0.0/8",
    }
    env.update(overrides)
    return env


@pytest.fixture
def settings(prefix: str, db_url: str) -> Settings:
    return Settings.from_env(herald_env(prefix, db_url))


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(settings: Settings) -> AsyncIterator[ServiceFactory]:
    """Start in-process Herald services; all are stopped after the test."""
    started: list[Service] = []

    async def factory(**changes: object) -> Service:
        service = Service(settings.replace(**changes) if changes else settings,
                          serve_http=False)
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in reversed(started):
        await service.stop()


SandboxServices = Callable[..., Awaitable[Service]]


@pytest.fixture
async def sandbox_services(
    prefix: str, db_url: str, sandbox: RunningSandbox
) -> AsyncIterator[SandboxServices]:
    """In-process services pointed at the sandbox's fake providers (callbacks off),
    configured by ``HERALD_*`` overrides and optionally a clock; stopped after the test."""
    sandbox.sandbox.providers.configure_callbacks(enabled=False)
    port = int(sandbox.base_url.rsplit(":", 1)[1])
    started: list[Service] = []

    async def factory(now: Callable[[], datetime] | None = None, **env: str) -> Service:
        from consumer.sandbox.env import sandbox_env

        settings = Settings.from_env(herald_env(prefix, db_url) | sandbox_env(port) | env)
        service = Service(settings, serve_http=False, now=now)
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in reversed(started):
        await service.stop()
