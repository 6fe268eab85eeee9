"""``herald run``, ``migrate``, ``topology declare|export`` and ``sandbox``: starting things."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg

from consumer.errors import ConfigError
from consumer.settings import Settings
from schemas.send_request import CHANNELS


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the service: consumers, webhooks, admin, metrics")
    run.add_argument("--channels", help="comma-separated channels to consume (default: all "
                     "channels with credentials)")
    run.add_argument("--roles", default="senders,events,gateway",
                     help="comma-separated roles: senders (channel consumers), events (status "
                          "updates), gateway (webhooks and admin API); default all")
    run.set_defaults(handler=_run)

    migrate = sub.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(handler=_migrate)

    topology = sub.add_parser("topology", help="declare or export exchanges and queues")
    topology_sub = topology.add_subparsers(dest="topology_command", required=True,
                                           parser_class=parser_class)
    p = topology_sub.add_parser("declare", help="declare everything on the broker (idempotent)")
    p.set_defaults(handler=_topology_declare)
    p = topology_sub.add_parser("export", help="print RabbitMQ definitions JSON")
    p.set_defaults(handler=_topology_export)

    sandbox = sub.add_parser("sandbox", help="run local fake providers for demos and tests")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, help="default HERALD_SANDBOX_PORT (8090)")
    sandbox.set_defaults(handler=_sandbox)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.service import ROLES, NotMigrated, run

    channels = None
    if args.channels:
        channels = tuple(c.strip() for c in args.channels.split(",") if c.strip())
        unknown = [c for c in channels if c not in CHANNELS]
        if unknown:
            raise ConfigError(f"--channels: unknown channel {unknown[0]!r}")
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    unknown_roles = [r for r in roles if r not in ROLES]
    if unknown_roles or not roles:
        raise ConfigError(f"--roles: unknown role {unknown_roles[0]!r}" if unknown_roles
                          else "--roles: name at least one role")
    try:
        await run(settings, channels=channels, roles=roles)
    except NotMigrated as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 1
    return 0


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.migrate import MigrationError, migrate

    try:
        conn = await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"herald: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    try:
        applied = await migrate(conn)
    except MigrationError as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    if applied:
        for m in applied:
            print(f"applied {m.version}_{m.name}")
    else:
        print("database is up to date")
    return 0


def _topology(settings: Settings) -> Any:
    from consumer.topology import Names, Topology

    return Topology(Names(settings.prefix), delivery_limit=settings.delivery_limit)


async def _topology_export(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.topology import export_json

    sys.stdout.write(export_json(_topology(settings)))
    return 0


async def _topology_declare(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.topology import declare_all

    topology = _topology(settings)
    outdated = await declare_all(settings.amqp_urls, topology)
    print(f"declared {len(topology.exchanges)} exchanges, {len(topology.queues)} queues, "
          f"{len(topology.bindings)} bindings with prefix {settings.prefix!r}")
    for queue in outdated:
        print(f"outdated: {queue.queue} was declared by an older Herald ({queue.broker_said});"
              " see 'Queues declared by an older Herald' in docs/operations.md")
    return 0


async def _sandbox(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.sandbox.app import serve

    await serve(args.host, args.port if args.port is not None else settings.sandbox_port,
                settings.public_url)
    return 0
