"""``herald run``: wire settings, broker, database, providers, consumers and the
HTTP server together; start them, and stop them gracefully."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.components import ROLES, Component, add_routes, build_components
from consumer.delivery.channels import ChannelControl
from consumer.delivery.pause import PauseState
from consumer.delivery.pipeline import LEASE_MARGIN_S, Pipeline
from consumer.delivery.rate import Breaker
from consumer.errors import DeliveryError
from consumer.http_server import create_app, start_site
from consumer.migrate import discover
from consumer.providers.base import Provider
from consumer.providers.http import HttpProvider
from consumer.providers.messenger import MessengerProvider
from consumer.providers.twilio import TwilioProvider
from consumer.providers.whatsapp import WhatsAppProvider
from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.store import Store, create_pool
from consumer.topology import Names, Topology
from schemas.send_request import CHANNELS

log = structlog.get_logger("herald.service")


class NotMigrated(Exception):
    pass


async def check_migrated(pool: asyncpg.Pool) -> None:
    """Refuse to run on a database that lacks some of Herald's migrations."""
    wanted = {m.version for m in discover()}
    done: set[str] = set()
    if await pool.fetchval("SELECT to_regclass('schema_migrations')") is not None:
        done = {r["version"] for r in await pool.fetch("SELECT version FROM schema_migrations")}
    missing = sorted(wanted - done)
    if missing:
        raise NotMigrated(
            f"the database lacks migration(s) {', '.join(missing)}: run `herald migrate` first"
        )


def build_providers(
    settings: Settings, session: aiohttp.ClientSession
) -> tuple[dict[str, Provider], dict[str, str]]:
    """Adapters for the channels whose credentials are set, and why the others are off."""
    providers: dict[str, Provider] = {"http": HttpProvider(session)}
    inactive: dict[str, str] = {}
    adapters: dict[str, Any] = {
        "sms": TwilioProvider, "whatsapp": WhatsAppProvider, "messenger": MessengerProvider,
    }
    for channel, adapter in adapters.items():
        missing = adapter.missing(settings)
        if missing:
            inactive[channel] = "not configured: " + ", ".join(missing)
        else:
            providers[channel] = adapter(settings, session)
    return providers, inactive


class Service:
    def __init__(self, settings: Settings, *, channels: tuple[str, ...] | None = None,
                 serve_http: bool = True, roles: tuple[str, ...] = ROLES,
                 now: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.only_channels = channels
        self.roles = roles
        # The pipeline's clock (tests move it to test day boundaries and quiet hours).
        self.now = now or (lambda: datetime.now(UTC))
        self.components: list[Component] = []
        self.serve_http = serve_http
        self.instance_id = f"{uuid.uuid4().hex[:12]}"
        self.stopping = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None
        self.pool: asyncpg.Pool | None = None
        self.session: aiohttp.ClientSession | None = None
        self.publisher: Publisher | None = None
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.consumers: dict[str, ChannelControl] = {}
        self.providers: dict[str, Provider] = {}
        self.inactive: dict[str, str] = {}
        self.runner: web.AppRunner | None = None
        self.grace_s = settings.send_timeout_s + LEASE_MARGIN_S

    async def start(self) -> None:
        s = self.settings
        self.pool = await create_pool(s)
        await check_migrated(self.pool)
        self.store = Store(self.pool)
        self.connection = await aio_pika.connect_robust(s.amqp_url, client_properties={
            "connection_name": f"herald-{self.instance_id}"})
        declare_channel = await self.connection.channel()
        await Topology(self.names, delivery_limit=s.delivery_limit).declare(declare_channel)
        await declare_channel.close()
        self.publisher = Publisher(self.connection, self.names)

        connector = aiohttp.TCPConnector(limit=max(100, s.prefetch * 2), limit_per_host=0,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
            total=None, connect=min(10.0, s.send_timeout_s)))
        self.providers, self.inactive = build_providers(s, self.session)
        self.pipeline = Pipeline(
            s, self.store, self.publisher, self.providers,
            instance_id=self.instance_id, stopping=self.stopping, hooks=self, now=self.now,
        )
        active = [c for c in CHANNELS if c in self.providers
                  and (self.only_channels is None or c in self.only_channels)]
        if "senders" not in self.roles:
            active = []
        for channel in active:
            consumer = ChannelControl(
                self.connection, self.names, channel, self.pipeline, s.prefetch,
                pause=PauseState(base_cooldown_s=s.pause_base_s, max_cooldown_s=s.pause_max_s),
                rate=s.rate_for(channel),
                breaker=Breaker(threshold=s.breaker_threshold),
            )
            await consumer.start()
            self.consumers[channel] = consumer
        self.components = build_components(self)
        for component in self.components:
            await component.start()
        if self.serve_http:
            app = create_app(self.readiness)
            add_routes(app, self)
            self.runner = await start_site(app, s.http_host, s.http_port)
        log.info("service.started", roles=list(self.roles), active_channels=active,
                 inactive_channels=self.inactive,
                 prefix=s.prefix, instance=self.instance_id, http_port=s.http_port
                 if self.serve_http else None)

    # -- ChannelHooks (called by the pipeline) ----------------------------------------

    def provider_wide(self, channel: str, error: DeliveryError) -> float:
        consumer = self.consumers.get(channel)
        if consumer is None:
            return self.settings.pause_base_s
        consumer.trip(f"{error.error_type.value}:{error.code or '?'}")
        return max(consumer.pause.remaining(time.monotonic()), 1.0)

    def sent(self, channel: str) -> None:
        consumer = self.consumers.get(channel)
        if consumer is not None:
            consumer.sent_ok()

    async def acquire(self, channel: str, lane: str) -> None:
        consumer = self.consumers.get(channel)
        if consumer is not None:
            await consumer.limiter.acquire(lane)

    def rate_limited(self, channel: str) -> None:
        consumer = self.consumers.get(channel)
        if consumer is not None:
            consumer.rate_limited()

    def transient_failure(self, channel: str, recipient: str) -> bool:
        consumer = self.consumers.get(channel)
        return consumer is not None and consumer.transient_failure(recipient)

    async def readiness(self) -> dict[str, bool]:
        checks = {"broker": bool(self.connection and not self.connection.is_closed)}
        if "senders" in self.roles:
            checks["consumers"] = bool(self.consumers) and all(
                c.active for c in self.consumers.values())
        db_ok = False
        if self.store is not None:
            try:
                await asyncio.wait_for(self.store.ping(), 2.0)
                db_ok = True
            except Exception:
                db_ok = False
        checks["database"] = db_ok
        return checks

    async def stop(self) -> None:
        """Stop taking work, finish what is in flight (within a grace period), close."""
        log.info("service.stopping", in_flight=sum(len(c.tasks) for c in self.consumers.values()))
        for consumer in self.consumers.values():
            await consumer.stop_consuming()
        left = 0
        for consumer in self.consumers.values():
            left += await consumer.drain(self.grace_s)
        # Anything still waiting on an outage gives up now and stays unacked.
        self.stopping.set()
        for consumer in self.consumers.values():
            left += await consumer.drain(1.0)
            await consumer.close()
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception as exc:
                log.warning("component.stop_failed", component=component.name, error=repr(exc))
        if self.runner is not None:
            await self.runner.cleanup()
        for provider in self.providers.values():
            await provider.close()
        if self.session is not None:
            await self.session.close()
        if self.publisher is not None:
            with suppress(Exception):
                await self.publisher.close()
        if self.connection is not None:
            with suppress(Exception):
                await self.connection.close()
        if self.store is not None:
            await self.store.close()
        if self.pool is not None:
            with suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 10)
        log.info("service.stopped", requeued=left)


async def run(settings: Settings, *, channels: tuple[str, ...] | None = None,
              roles: tuple[str, ...] = ROLES) -> None:
    service = Service(settings, channels=channels, roles=roles)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
