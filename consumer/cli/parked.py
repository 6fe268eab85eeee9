"""``herald parked list|show|replay|reject|purge|sync``: the parking lot from a terminal.

The work is done by :mod:`consumer.parking` (which the admin API shares);
this module turns arguments into calls and results into text or ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumer.cli.common import (
    add_json_flag,
    audit,
    count,
    counts,
    cut,
    duration,
    moment,
    natural,
    positive,
    print_json,
    with_pool,
)
from consumer.errors import ConfigError, ErrorType
from consumer.text import printable
from consumer.wire import HEADER_EVENT_ID
from schemas.parking import PARKED_CHANNELS, PARKED_EVENTS_CHANNEL

if TYPE_CHECKING:
    import asyncpg

    from consumer.parking.lot import Lot, Selection
    from consumer.settings import Settings


def add_filters(p: argparse.ArgumentParser) -> None:
    """The options that select parked messages (list and replay)."""
    p.add_argument("--channel", choices=PARKED_CHANNELS)
    p.add_argument("--error-type", action="append", dest="error_types", metavar="TYPE",
                   choices=[e.value for e in ErrorType],
                   help="repeatable: " + ", ".join(e.value for e in ErrorType))
    p.add_argument("--campaign", help="campaign id")
    p.add_argument("--recipient", help="exact recipient (number, PSID or URL)")
    p.add_argument("--since", type=moment, help="parked at or after: ISO time or age (2h)")
    p.add_argument("--until", type=moment, help="parked before: ISO time or age")


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    parked = sub.add_parser("parked", help="inspect, replay, reject, purge parked messages")
    psub = parked.add_subparsers(dest="parked_command", required=True, parser_class=parser_class)
    p = psub.add_parser("list", help="parked messages with counts per error_type")
    add_filters(p)
    p.add_argument("--limit", type=count, default=50)
    p.add_argument("--offset", type=natural, default=0)
    p.add_argument("--newest-first", action="store_true", help="default: queue order")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_list))
    p = psub.add_parser("show", help="one parked message: body, headers, full history")
    p.add_argument("id", help="parked id (or a unique prefix)")
    p.add_argument("--reveal", action="store_true", help="show recipients unmasked")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_show))
    p = psub.add_parser("replay", help="send parked messages again (ids, filters or --all)")
    p.add_argument("ids", nargs="*", metavar="ID", help="parked ids (or unique prefixes)")
    add_filters(p)
    p.add_argument("--all", action="store_true", help="everything parked")
    p.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")
    p.add_argument("--rate", type=positive, help="messages per second (default: no limit)")
    p.add_argument("--reset-attempts", action=argparse.BooleanOptionalAction, default=True,
                   help="give the message a fresh attempt budget (default: yes)")
    p.add_argument("--set-body", help="new value of the message's body field (one ID)")
    p.add_argument("--set-request", metavar="JSON|@FILE",
                   help="a whole new send request (one ID; the way to replay an invalid one)")
    p.add_argument("--window", type=count, default=2000,
                   help="messages held per channel while passing over the queue")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_replay))
    p = psub.add_parser("reject", help="remove parked messages for good (status cancelled)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--reason", required=True)
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_reject))
    p = psub.add_parser("purge", help="remove messages parked longer ago than --older-than")
    p.add_argument("--older-than", type=duration, required=True, help="e.g. 30d")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_purge))
    p = psub.add_parser("sync", help="index copies the broker parked by itself; tidy the queue")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_sync))


def _lot(settings: Settings, pool: asyncpg.Pool, window: int = 2000) -> Lot:
    from consumer.parking.lot import Lot
    from consumer.topology import Names

    return Lot(pool, settings.amqp_url, Names(settings.prefix), window=window)


async def _selection(args: argparse.Namespace, pool: asyncpg.Pool) -> Selection:
    from consumer.parking.lot import Selection, resolve_ids

    ids = await resolve_ids(pool, getattr(args, "ids", None) or [])
    return Selection(ids=ids, channel=args.channel, error_types=tuple(args.error_types or ()),
                     campaign=args.campaign, recipient=args.recipient, since=args.since,
                     until=args.until, all=getattr(args, "all", False))



async def _list(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.parking.lot import list_parked, queue_depth
    from consumer.topology import Names

    selection = await _selection(args, pool)
    listing = await list_parked(pool, selection, limit=args.limit, offset=args.offset,
                                newest_first=args.newest_first)
    depth: int | None = None
    if selection.empty:
        try:
            depth = await asyncio.wait_for(queue_depth(settings.amqp_url,
                                                       Names(settings.prefix)), 5)
        except Exception:
            depth = None  # the listing stands without the broker
    if args.json:
        print_json(listing.to_json() | {"queue_depth": depth})
        return 0
    header = ("ID", "PARKED AT (UTC)", "CHANNEL", "RECIPIENT", "CAMPAIGN", "ATT", "ERROR TYPE",
              "CODE", "LAST ERROR")
    # Channel, error type and code of a copy the broker parked come from its headers.
    rows = [(str(r.parked_id)[:8], r.parked_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
             cut(r.channel, 12), cut(r.to_json()["recipient"], 20), cut(r.campaign_id, 16),
             str(r.attempts), cut(r.error_type, 20), cut(r.error_code, 8),
             cut(r.last_error, 60))
            for r in listing.rows]
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    shown = (f"showing {args.offset + 1}-{args.offset + len(rows)}" if rows else "none shown")
    print(f"{listing.total} parked: {counts(listing.by_error_type)} ({shown})")
    if depth is not None and depth > listing.total:
        print(f"note: the parking queue holds {depth} messages, {depth - listing.total} more"
              " than the index knows (the broker parked some by itself):"
              " run `herald parked sync` to index them")
    return 0


async def _show(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.parking.lot import resolve_ids, show

    (parked_id,) = await resolve_ids(pool, [args.id])
    found = await show(pool, parked_id, reveal=args.reveal)
    if args.json:
        print_json(found)
        return 0
    p, m = found["parked"], found["message"]
    # Every value below may come from a publisher or a provider: shown escaped.
    p = {k: printable(str(v)) if v is not None else None for k, v in p.items()}
    print(f"parked {p['id']}  state {p['state']}"
          + (f" ({p['resolution']})" if p["resolution"] else ""))
    if p["channel"] == PARKED_EVENTS_CHANNEL:
        event_id = found["headers"].get(HEADER_EVENT_ID)
        print(f"  provider event {printable(str(event_id))}  (a replay puts it back on the"
              " events queue)")
    else:
        print(f"  message {p['message_id']}  channel {p['channel']}  to {p['recipient']}"
              f"  campaign {p['campaign_id'] or '-'}  attempts {p['attempts']}")
    if m is not None:
        print(f"  status now {m['status']} after {m['attempts']} attempt(s)")
    print(f"  error {p['error_type']}  code {p['error_code'] or '-'}  {p['last_error'] or ''}")
    print(f"  parked at {p['parked_at']}")
    print("headers:")
    for key, value in sorted(found["headers"].items()):
        print(f"  {printable(str(key))}: {printable(str(value))}")
    print("body" + ("" if args.reveal else " (recipients masked; --reveal shows them)") + ":")
    if found["parked"].get("body_size"):
        print(f"  (the first bytes of {found['parked']['body_size']}; the parking queue holds"
              " all of them)")
    print(_indent(found["body"]))
    if found["edited_body"] is not None:
        print("edited body (replayed instead):")
        print(_indent(found["edited_body"]))
    print("history:")
    for h in found["history"]:
        rest = {k: v for k, v in h.items() if k not in ("at", "kind") and v not in (None, "")}
        print(f"  {h['at']}  {h['kind']:<15} {json.dumps(rest, default=str)}")
    return 0


def _indent(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    # Printed over several lines on purpose; str.splitlines would also split
    # on \r, \x0b, \x1c… which printable() shows escaped instead.
    return "\n".join("  " + line for line in printable(text, newlines=True).split("\n"))


def _stop_on_signals() -> tuple[Callable[[], bool], Callable[[], None]]:
    """SIGINT/SIGTERM end a replay after the message in hand; a second SIGINT aborts."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first() -> None:
        print("herald: stopping after the current message (Ctrl-C again to abort)",
              file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, first)
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def restore() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)

    return stop.is_set, restore


def _request_text(value: str) -> bytes:
    if value.startswith("@"):
        source = value[1:]
        try:
            return sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--set-request: cannot read {source}: {exc.strerror}") from None
    return value.encode()


async def _replay(args: argparse.Namespace, settings: Settings,
                         pool: asyncpg.Pool) -> int:
    from consumer.parking.replay import Edit, ReplayOptions, replay

    if args.set_body is not None and args.set_request is not None:
        raise ConfigError("replay: --set-body and --set-request do not go together")
    edit = None
    if args.set_body is not None or args.set_request is not None:
        edit = Edit(body=args.set_body, request=_request_text(args.set_request)
                    if args.set_request is not None else None)
    selection = await _selection(args, pool)
    if args.all and selection.ids:
        raise ConfigError("replay: name ids or --all, not both")
    options = ReplayOptions(selection, dry_run=args.dry_run, rate=args.rate,
                            reset_attempts=args.reset_attempts, edit=edit)
    from consumer.admin.audit import cli_actor

    stopping, restore = _stop_on_signals()
    try:
        report = await replay(_lot(settings, pool, args.window), options, cli_actor(), stopping)
    finally:
        restore()
    if not args.dry_run:
        await audit(pool, "parked.replay",
                     {"selection": selection.describe(), "rate": args.rate,
                      "reset_attempts": args.reset_attempts, "edited": edit is not None,
                      "interrupted": report.interrupted}, report.replayed)
    if args.json:
        print_json(report.to_json())
        return 0 if report.complete or args.dry_run else 1
    if args.dry_run:
        print(f"dry run: would replay {report.replayed} of {report.selected} selected"
              f" ({counts(report.by_error_type)}); {report.already_delivered} already"
              " delivered (would be removed, not sent)"
              + (f"; {len(report.skipped)} would be skipped" if report.skipped else ""))
        for item in report.items[:20]:
            print(f"  {item['id'][:8]}  {printable(item['message_id'] or '-')}"
                  f"  {printable(item['error_type'])}"
                  f"  attempt {item['attempt']}  {item['action']}"
                  + (f"  body {json.dumps(item['body'])}" if "body" in item else ""))
        if len(report.items) > 20:
            print(f"  … and {report.selected - 20} more")
        return 0
    print(f"replayed {report.replayed} of {report.selected} selected"
          f" ({counts(report.by_error_type)}); {report.already_delivered} already delivered"
          " or cancelled (removed, not sent again)")
    for item in report.skipped:
        print(f"  skipped {item['id'][:8]} ({printable(item['message_id'] or 'no message id')}):"
              f" {printable(item['why'])}")
    if report.not_found:
        print(f"  {report.not_found} selected message(s) were not in the parking queue")
    if report.truncated:
        print("  the pass stopped after holding the most messages it may: replay again with"
              " a narrower selection")
    if report.interrupted:
        print("  interrupted: run the same replay again to finish (nothing is sent twice)")
    return 0 if report.complete else 1


async def _reject(args: argparse.Namespace, settings: Settings,
                         pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.parking.lot import reject, resolve_ids

    ids = await resolve_ids(pool, args.ids)
    report = await reject(_lot(settings, pool), ids, args.reason, cli_actor())
    await audit(pool, "parked.reject", {"ids": [str(i) for i in ids], "reason": args.reason},
                 report.marked)
    if args.json:
        print_json(report.to_json())
    else:
        print(f"rejected {report.marked} (messages cancelled, reason recorded);"
              f" removed {report.removed} from the parking queue")
        for item in report.skipped or []:
            print(f"  {item['id'][:8]}: {printable(item['why'])}")
    return 0 if not report.skipped else 1


async def _purge(args: argparse.Namespace, settings: Settings,
                        pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.parking.lot import purge

    due = int(await pool.fetchval(
        "SELECT count(*) FROM parked_messages WHERE state = 'parked'"
        " AND parked_at < now() - $1::interval", args.older_than))
    if not due:
        print("nothing parked that long")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("purge: confirm with --yes (not run interactively)")
        answer = await asyncio.to_thread(
            input, f"remove {due} parked message(s) older than {args.older_than} for good?"
                   " [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    report = await purge(_lot(settings, pool), args.older_than, cli_actor())
    await audit(pool, "parked.purge", {"older_than_s": args.older_than.total_seconds()},
                 report.marked)
    if args.json:
        print_json(report.to_json())
    else:
        print(f"purged {report.marked}; removed {report.removed} from the parking queue")
    return 0


async def _sync(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.parking.lot import sync

    report = await sync(_lot(settings, pool), cli_actor())
    await audit(pool, "parked.sync", {}, report.indexed + report.removed)
    if args.json:
        print_json(report.to_json())
    else:
        print(f"scanned {report.scanned}: indexed {report.indexed} found without a row,"
              f" removed {report.removed} already handled")
    return 0

