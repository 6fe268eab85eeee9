"""``herald publish``: one send request, a JSONL file, or a campaign from CSV, with
publisher confirms and a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from consumer.broker import connect_robust
from consumer.cli.common import progress_bar
from consumer.delivery.pipeline import lane_of
from consumer.errors import ConfigError
from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.text import printable
from consumer.topology import Names
from schemas import SendRequest
from schemas.send_request import CHANNELS


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    publish = sub.add_parser("publish", help="publish send requests with publisher confirms")
    publish.add_argument("--file", help="JSONL file of send requests ('-' for stdin)")
    publish.add_argument("--channel", choices=CHANNELS)
    publish.add_argument("--to", help="recipient")
    publish.add_argument("--body", help="message text (JSON allowed for http)")
    publish.add_argument("--message-id", help="idempotency key (default: a new UUID)")
    publish.add_argument("--campaign", help="campaign id")
    publish.add_argument("--max-attempts", type=int)
    publish.add_argument("--send-at", help="ISO-8601 time with a zone")
    publish.add_argument("--expires-at", help="ISO-8601 time with a zone")
    publish.add_argument("--quiet", action="store_true", help="no progress output")
    publish.add_argument("--csv", help="recipients CSV ('to' column): one message per row of"
                         " --campaign, with --channel and --body-template")
    publish.add_argument("--body-template", help="body text with {column} fields of --csv")
    publish.set_defaults(handler=_publish)


def _jsonl(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{source}:{number}: not JSON: {exc}") from None
            except RecursionError:
                raise ConfigError(f"{source}:{number}: nested too deep") from None


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
        except (ValueError, RecursionError):
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


async def _publish(args: argparse.Namespace, settings: Settings) -> int:
    # Validate everything first: a bad line is reported before anything is sent.
    requests = []
    for number, raw in _requests_from_args(args):
        try:
            requests.append(SendRequest.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            source = f"{args.file or args.csv}:{number}" if args.file or args.csv else "publish"
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"{source}: {where}: {message}") from None
    names = Names(settings.prefix)
    connection = await connect_robust(settings.amqp_urls)
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
                print(f"\r{progress_bar(accepted, total)}", end="", file=sys.stderr,
                      flush=True)
        if not args.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
    print(f"accepted {accepted} message(s) (publisher confirms received)")
    if accepted == 1 and len(requests) == 1:
        print(f"message_id {printable(requests[0].message_id)}")
    return 0
