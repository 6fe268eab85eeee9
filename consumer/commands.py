"""The CLI's subcommands (kept apart from argument parsing)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from pydantic import ValidationError

from consumer import ops_cmd
from consumer.delivery.pipeline import lane_of
from consumer.errors import ConfigError
from consumer.migrate import migrate
from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.topology import Names, Topology, declare_all, export_json
from schemas import SendRequest


async def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        return await cmd_run(args, settings)
    if args.command == "migrate":
        return await cmd_migrate(settings)
    if args.command == "topology":
        topology = Topology(Names(settings.prefix), delivery_limit=settings.delivery_limit)
        if args.topology_command == "export":
            sys.stdout.write(export_json(topology))
            return 0
        await declare_all(settings.amqp_url, topology)
        print(f"declared {len(topology.exchanges)} exchanges, {len(topology.queues)} queues, "
              f"{len(topology.bindings)} bindings with prefix {settings.prefix!r}")
        return 0
    if args.command == "publish":
        return await cmd_publish(args, settings)
    if args.command == "status":
        from consumer.status_cmd import cmd_status

        return await cmd_status(args, settings)
    if args.command in ops_cmd.COMMANDS:
        return await ops_cmd.dispatch(args, settings)
    if args.command == "demo":
        from consumer.demo import run_demo

        url = args.sandbox_url or f"http://127.0.0.1:{settings.sandbox_port}"
        return await run_demo(settings, sandbox_url=url.rstrip("/"), timeout_s=args.timeout)
    if args.command == "sandbox":
        from consumer.sandbox.app import serve

        await serve(args.host, args.port if args.port is not None else settings.sandbox_port,
                    settings.public_url)
        return 0
    raise AssertionError(args.command)


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.components import ROLES
    from consumer.service import NotMigrated, run

    channels = None
    if args.channels:
        channels = tuple(c.strip() for c in args.channels.split(",") if c.strip())
        unknown = [c for c in channels if c not in ("http", "sms", "whatsapp", "messenger")]
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


async def cmd_migrate(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    if applied:
        for m in applied:
            print(f"applied {m.version}_{m.name}")
    else:
        print("database is up to date")
    return 0


def _jsonl(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{source}:{number}: not JSON: {exc}") from None


def _requests_from_args(args: argparse.Namespace) -> Iterator[tuple[int, dict[str, Any]]]:
    if args.csv:
        from consumer.records.campaigns import requests_from_csv

        if args.file or args.body is not None:
            raise ConfigError("publish: --csv goes with --body-template, not --file or --body")
        extra: dict[str, Any] = {k: v for k, v in (("send_at", args.send_at),
                                                   ("expires_at", args.expires_at)) if v}
        if args.max_attempts is not None:
            extra["retry"] = {"max_attempts": args.max_attempts}
        yield from requests_from_csv(args.csv, channel=args.channel, campaign_id=args.campaign,
                                     template=args.body_template, extra=extra)
        return
    if args.file:
        if args.file == "-":
            yield from _jsonl(sys.stdin, "-")
        else:
            try:
                with Path(args.file).open(encoding="utf-8") as handle:
                    yield from _jsonl(handle, args.file)
            except OSError as exc:
                raise ConfigError(f"--file: cannot read {args.file}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"--file: {args.file} is not UTF-8: {exc.reason}") from None
        return
    missing = [flag for flag, value in (("--channel", args.channel), ("--to", args.to),
                                        ("--body", args.body)) if value is None]
    if missing:
        raise ConfigError(f"publish: {', '.join(missing)} required (or --file)")
    body: Any = args.body
    if args.channel == "http":
        try:
            body = json.loads(args.body)
        except ValueError:
            body = args.body
    request: dict[str, Any] = {
        "message_id": args.message_id or str(uuid.uuid4()),
        "channel": args.channel,
        "to": args.to,
        "body": body,
    }
    for key, value in (("campaign_id", args.campaign), ("send_at", args.send_at),
                       ("expires_at", args.expires_at)):
        if value is not None:
            request[key] = value
    if args.max_attempts is not None:
        request["retry"] = {"max_attempts": args.max_attempts}
    yield 1, request


async def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    # Validate everything first: a bad line is reported before anything is sent.
    requests = []
    for number, raw in _requests_from_args(args):
        try:
            requests.append(SendRequest.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            source = f"{args.file or args.csv}:{number}" if args.file or args.csv else "publish"
            raise ConfigError(f"{source}: {where}: {first['msg']}") from None
    names = Names(settings.prefix)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    accepted = 0
    async with connection:
        publisher = Publisher(connection, names)
        total = len(requests)
        window = 256  # confirms in flight at once: fast, and bounded
        for start in range(0, total, window):
            chunk = requests[start:start + window]
            await asyncio.gather(*(
                publisher.publish_send(
                    r.channel, r.model_dump_json(exclude_none=True).encode(),
                    message_id=r.message_id,
                    # Campaign traffic goes straight to the channel's bulk lane.
                    lane=lane_of(r, None),
                )
                for r in chunk
            ))
            accepted += len(chunk)
            if not args.quiet and sys.stderr.isatty():
                print(f"\r{ops_cmd.progress_bar(accepted, total)}", end="", file=sys.stderr,
                      flush=True)
        if not args.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
    print(f"accepted {accepted} message(s) (publisher confirms received)")
    if accepted == 1 and len(requests) == 1:
        print(f"message_id {requests[0].message_id}")
    return 0
