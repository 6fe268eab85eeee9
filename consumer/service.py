"""``herald run``: the composition root.

:class:`Service` builds every part from the settings (database pool, broker
connection, publisher, provider adapters, the pipeline, the channel
registry, the background components of its roles and the HTTP routes),
hands each part the few things it needs, starts them, and stops them
gracefully in reverse order. Nothing reaches back into the service.

Roles (``herald run --roles``) let operators scale parts apart:

- ``senders``: the channel consumers (delivery pipeline);
- ``events``: the consumer of ``{prefix}.events`` (provider status updates),
  escalation of parked messages to people, and the campaigns' completion;
- ``gateway``: the HTTP routes providers and people call (webhooks, admin
  API) and the queue/backlog gauges.

Every role serves ``/healthz`` and ``/readyz`` on both listeners, and
``/metrics`` on the admin listener (:mod:`consumer.http_server`): webhooks go
on the public listener, the admin API and console on the admin one.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer import metrics
from consumer.admin.api import add_admin_routes
from consumer.broker import connect_robust
from consumer.delivery.channels import ChannelControl
from consumer.delivery.pipeline import LEASE_MARGIN_S, Pipeline
from consumer.delivery.registry import ChannelRegistry
from consumer.gauges import Observer
from consumer.http_server import (
    ADMIN_DEADLINES,
    PUBLIC_DEADLINES,
    Listener,
    ThrottledCheck,
    create_app,
)
from consumer.migrate import MigrationError, verify
from consumer.parking.escalation import Escalator
from consumer.providers.base import Provider
from consumer.providers.http import HttpProvider
from consumer.providers.messenger import MessengerProvider
from consumer.providers.twilio import TwilioProvider
from consumer.providers.whatsapp import WhatsAppProvider
from consumer.publisher import Publisher
from consumer.records.completion import CampaignWatch
from consumer.settings import Settings
from consumer.status.events import EventsConsumer
from consumer.status.webhooks import WebhookReceiver, callback_problem
from consumer.store import Store, create_pool
from consumer.topology import Names, Topology
from schemas.send_request import CHANNELS

log = structlog.get_logger("herald.service")

ROLES: tuple[str, ...] = ("senders", "events", "gateway")
# How long /readyz may answer from its last check (a flood costs one ping a second).
READINESS_TTL_S = 1.0


class Component(Protocol):
    """A background part of the service, started after the consumers and stopped before."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class NotMigrated(Exception):
    pass


async def check_migrated(pool: asyncpg.Pool) -> None:
    """Refuse to run on a database that lacks some of Herald's migrations, or applied
    another version of one."""
    async with pool.acquire() as conn:
        try:
            await verify(conn)
        except MigrationError as exc:
            raise NotMigrated(str(exc)) from None


def build_providers(
    settings: Settings, session: aiohttp.ClientSession
) -> tuple[dict[str, Provider], dict[str, str]]:
    """Adapters for the channels whose credentials are set, and why the others are off."""
    # The http channel has its own guarded session (consumer.providers.destinations).
    providers: dict[str, Provider] = {"http": HttpProvider(settings)}
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
        self.channels = ChannelRegistry(
            thresholds=settings.outage_thresholds(),
            rates={c: settings.rate_for(c) for c in CHANNELS})
        self.providers: dict[str, Provider] = {}
        self.public_listener: Listener | None = None
        self.admin_listener: Listener | None = None
        # Both listeners' /readyz share it: one database ping a second at most.
        self.ready = ThrottledCheck(self.readiness, ttl_s=READINESS_TTL_S)
        self.grace_s = settings.send_timeout_s + LEASE_MARGIN_S

    async def start(self) -> None:
        s = self.settings
        self.pool = await create_pool(s)
        await check_migrated(self.pool)
        self.store = Store(self.pool)
        self.connection = await connect_robust(s.amqp_urls, name=f"herald-{self.instance_id}")
        # Outdated queues are logged by declare(); Herald runs on them meanwhile.
        await Topology(self.names, delivery_limit=s.delivery_limit).declare(self.connection)
        self.publisher = Publisher(self.connection, self.names)

        connector = aiohttp.TCPConnector(limit=max(100, s.prefetch * 2, s.prefetch_max * 3 // 2),
                                         limit_per_host=0,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=min(10.0, s.send_timeout_s)))
        self.providers, self.channels.inactive = build_providers(s, self.session)
        self.channels.providers = self.providers
        self.pipeline = Pipeline(
            s, self.store, self.publisher, self.providers,
            instance_id=self.instance_id, stopping=self.stopping, hooks=self.channels,
            now=self.now,
        )
        active = [c for c in CHANNELS if c in self.providers
                  and (self.only_channels is None or c in self.only_channels)]
        if "senders" not in self.roles:
            active = []
        self.components = self._components(self.connection, self.pool, self.store)
        for component in self.components:
            await component.start()
        if self.serve_http:
            await self._start_listeners(self.connection, self.pool)
        # The senders last: with a backlog waiting they take the whole event loop,
        # and whatever started after them (the events consumer, /healthz) waited
        # seconds for it, long enough for a startup probe to give up.
        for channel in active:
            # A channel with a rate keeps its prefetch: the rate, not the
            # provider's latency, bounds what it has in flight.
            consumer = ChannelControl(self.connection, self.names, channel, self.pipeline,
                                      s.prefetch,
                                      None if s.rate_for(channel) else s.prefetch_max)
            await consumer.start()
            self.channels.add(consumer)
            metrics.CHANNEL_RATE.labels(channel).set(s.rate_for(channel) or 0)
        if "sms" in self.providers:
            problem = callback_problem(s.public_url, s.twilio_base_url)
            if problem:
                log.warning("service.twilio_callbacks_unreachable", problem=problem)
        log.info("service.started", roles=list(self.roles), active_channels=active,
                 inactive_channels=self.channels.inactive,
                 prefix=s.prefix, instance=self.instance_id,
                 http_port=self.public_listener.port if self.public_listener else None,
                 admin_port=self.admin_listener.port if self.admin_listener else None)

    def _components(self, connection: AbstractRobustConnection, pool: asyncpg.Pool,
                    store: Store) -> list[Component]:
        """The background components of this process's roles."""
        components: list[Component] = []
        if "gateway" in self.roles:
            components.append(Observer(connection, self.names, pool))
        if "events" in self.roles:
            components.append(EventsConsumer(
                connection=connection, names=self.names, pool=pool, store=store,
                settings=self.settings,
                on_provider_wide=self.channels.provider_wide,  # pauses the channel's senders
            ))
            # Parked messages told to people, and campaigns judged complete.
            components.append(Escalator(connection=connection, names=self.names, pool=pool))
            components.append(CampaignWatch(connection=connection, names=self.names, pool=pool,
                                            settings=self.settings))
        return components

    async def _start_listeners(self, connection: AbstractRobustConnection,
                               pool: asyncpg.Pool) -> None:
        s = self.settings
        public = create_app(self.ready, with_metrics=False)
        admin = create_app(self.ready, with_metrics=True)
        self._add_routes(public, admin, connection, pool)
        self.public_listener = Listener("public", public, s.http_host, s.http_port,
                                        PUBLIC_DEADLINES)
        self.admin_listener = Listener("admin", admin, s.admin_host, s.admin_port,
                                       ADMIN_DEADLINES)
        await self.public_listener.start()
        await self.admin_listener.start()

    def _add_routes(self, public: web.Application, admin: web.Application,
                    connection: AbstractRobustConnection, pool: asyncpg.Pool) -> None:
        """The HTTP routes of this process's roles (besides metrics and health):
        webhooks on the public listener, the admin API and console on the admin one."""
        if "gateway" not in self.roles:
            return
        WebhookReceiver(self.settings, Publisher(connection, self.names)).add_routes(public)
        if self.settings.admin_token:
            add_admin_routes(admin, settings=self.settings, pool=pool, names=self.names,
                             connection=connection, status=self.status)

    def status(self) -> dict[str, Any]:
        """This process's part of ``/admin/status``."""
        return {
            "instance": self.instance_id,
            "roles": list(self.roles),
            "prefix": self.settings.prefix,
            "stopping": self.stopping.is_set(),
            "channels": {name: state.to_json()
                         for name, state in self.channels.snapshot().items()},
            "open_domains": self.channels.open_domains(),
            "in_flight": self.channels.in_flight,
        }

    async def readiness(self) -> dict[str, bool]:
        checks = {"broker": bool(self.connection and not self.connection.is_closed)}
        if "senders" in self.roles:
            checks["consumers"] = self.channels.active
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
        log.info("service.stopping", in_flight=self.channels.in_flight)
        await self.channels.stop_consuming()
        left = await self.channels.drain(self.grace_s)
        # Anything still waiting on an outage gives up now and stays unacked.
        self.stopping.set()
        left += await self.channels.drain(1.0)
        await self.channels.close()
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception as exc:
                log.warning("component.stop_failed", component=component.name, error=repr(exc))
        for listener in (self.public_listener, self.admin_listener):
            if listener is not None:
                await listener.stop()
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


# Allocations between two young-generation collections of the cyclic garbage
# collector (CPython's default: 700). See settle_garbage_collector.
GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Make the cyclic garbage collector cheap for a long-running consumer.

    A delivery allocates a few hundred objects that reference counting
    frees; with CPython's defaults the collector still ran every 700
    allocations and walked the same long-lived objects each time: 7 % of the
    consumer's CPU in bench-peers (0.67 s of 9.1 s), 0.2 % after this.
    Everything loaded before the service starts (modules, settings) is moved
    out of the collector's sight, and young collections run every
    GC_YOUNG_THRESHOLD allocations instead.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def run(settings: Settings, *, channels: tuple[str, ...] | None = None,
              roles: tuple[str, ...] = ROLES) -> None:
    service = Service(settings, channels=channels, roles=roles)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settle_garbage_collector()
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
