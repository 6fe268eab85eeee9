"""The parts of ``herald run`` beyond the channel consumers, by role.

Roles (``herald run --roles``) let operators scale parts apart:

- ``senders``: the channel consumers (delivery pipeline);
- ``events``: the consumer of ``{prefix}.events`` (provider status updates);
- ``gateway``: the HTTP routes providers and people call (webhooks, admin API).

Every role serves ``/metrics``, ``/healthz`` and ``/readyz``. Each feature adds
its background components to :func:`build_components` and its HTTP routes to
:func:`add_routes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from consumer.admin.api import add_admin_routes
from consumer.gauges import Observer
from consumer.publisher import Publisher
from consumer.status.events import EventsConsumer
from consumer.status.webhooks import WebhookReceiver

if TYPE_CHECKING:
    from consumer.service import Service

ROLES: tuple[str, ...] = ("senders", "events", "gateway")


class Component(Protocol):
    """A background part of the service, started after the consumers and stopped before."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_components(service: Service) -> list[Component]:
    """The background components for the service's roles."""
    components: list[Component] = []
    if "gateway" in service.roles and service.connection is not None:
        components.append(Observer(service.connection, service.names, service.pool))
    if ("events" in service.roles and service.connection is not None
            and service.pool is not None and service.store is not None):
        components.append(EventsConsumer(
            connection=service.connection, names=service.names, pool=service.pool,
            store=service.store, settings=service.settings,
            on_provider_wide=service.provider_wide,  # pauses the channel's senders
        ))
    return components


def add_routes(app: web.Application, service: Service) -> None:
    """HTTP routes for the service's roles (besides metrics and health)."""
    if "gateway" in service.roles and service.connection is not None:
        publisher = Publisher(service.connection, service.names)
        WebhookReceiver(service.settings, publisher).add_routes(app)
    if "gateway" in service.roles and service.settings.admin_token and service.pool is not None:
        add_admin_routes(app, service)
