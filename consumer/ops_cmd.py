"""Operator commands: ``herald parked …``, ``stats``, ``campaign …``, ``prune``.

Argument parsing (:func:`add_parsers`, called by ``consumer.cli``) and the
handlers (:func:`dispatch`, called by ``consumer.commands``). The work is
done by :mod:`consumer.parking.lot`, :mod:`consumer.parking.replay`, :mod:`consumer.records.stats`,
:mod:`consumer.records.campaigns` and :mod:`consumer.records.retention`, which the admin API
shares; this module only turns arguments into calls and results into text
or ``--json``. Errors a person can fix are one line on stderr (exit 1);
usage errors exit 2 like every other command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumer.errors import ConfigError, ErrorType
from schemas.send_request import CHANNELS

if TYPE_CHECKING:
    import asyncpg

    from consumer.parking.lot import Lot, Selection
    from consumer.settings import Settings

COMMANDS = ("parked", "stats", "campaign", "prune")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``45m``, ``90s``, ``2w``."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 45m, 90s")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def moment(text: str) -> datetime:
    """An ISO-8601 time with a zone, or an age (``2h``: two hours ago)."""
    if _DURATION_RE.fullmatch(text.strip().lower()):
        return datetime.now(UTC) - duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time with a zone (2026-11-23T10:00:00Z) or an age (2h)")
    return when


def _quiet_hours(text: str) -> tuple[Any, Any]:
    from consumer.records.campaigns import quiet_hours

    try:
        return quiet_hours(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """The operator subcommands, on the ``herald`` parser's subparsers."""

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--channel", choices=CHANNELS)
        p.add_argument("--error-type", action="append", dest="error_types", metavar="TYPE",
                       choices=[e.value for e in ErrorType],
                       help="repeatable: " + ", ".join(e.value for e in ErrorType))
        p.add_argument("--campaign", help="campaign id")
        p.add_argument("--recipient", help="exact recipient (number, PSID or URL)")
        p.add_argument("--since", type=moment, help="parked at or after: ISO time or age (2h)")
        p.add_argument("--until", type=moment, help="parked before: ISO time or age")

    def as_json(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")

    parked = sub.add_parser("parked", help="inspect, replay, reject, purge parked messages")
    psub = parked.add_subparsers(dest="parked_command", required=True, parser_class=parser_class)
    p = psub.add_parser("list", help="parked messages with counts per error_type")
    filters(p)
    p.add_argument("--limit", type=count, default=50)
    p.add_argument("--offset", type=natural, default=0)
    p.add_argument("--newest-first", action="store_true", help="default: queue order")
    as_json(p)
    p = psub.add_parser("show", help="one parked message: body, headers, full history")
    p.add_argument("id", help="parked id (or a unique prefix)")
    p.add_argument("--reveal", action="store_true", help="show recipients unmasked")
    as_json(p)
    p = psub.add_parser("replay", help="send parked messages again (ids, filters or --all)")
    p.add_argument("ids", nargs="*", metavar="ID", help="parked ids (or unique prefixes)")
    filters(p)
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
    as_json(p)
    p = psub.add_parser("reject", help="remove parked messages for good (status cancelled)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--reason", required=True)
    as_json(p)
    p = psub.add_parser("purge", help="remove messages parked longer ago than --older-than")
    p.add_argument("--older-than", type=duration, required=True, help="e.g. 30d")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    as_json(p)
    p = psub.add_parser("sync", help="index copies the broker parked by itself; tidy the queue")
    as_json(p)

    p = sub.add_parser("stats", help="delivery and retry statistics")
    p.add_argument("--campaign", help="one campaign (default: all messages)")
    p.add_argument("--recent", type=count, default=10, help="recent errors shown")
    as_json(p)

    campaign = sub.add_parser("campaign", help="per-campaign retry defaults")
    csub = campaign.add_subparsers(dest="campaign_command", required=True,
                                   parser_class=parser_class)
    p = csub.add_parser("create", help="create a campaign, or change the fields given")
    p.add_argument("campaign_id")
    p.add_argument("--name")
    p.add_argument("--max-attempts", type=count)
    p.add_argument("--base-delay", type=positive, help="seconds")
    p.add_argument("--max-delay", type=positive, help="seconds")
    p.add_argument("--retry-mode", choices=("auto", "manual"))
    p.add_argument("--priority", choices=("high", "normal"),
                   help="high: the campaign's messages use the transactional lane")
    p.add_argument("--daily-limit", type=count, help="sends per day (first attempts first)")
    p.add_argument("--timezone", help="IANA zone of the campaign's days and quiet hours")
    p.add_argument("--quiet-hours", type=_quiet_hours, metavar="HH:MM-HH:MM",
                   help="no sends in this window, e.g. 22:00-07:00")
    as_json(p)
    p = csub.add_parser("show", help="a campaign's defaults, policy in force and statistics")
    p.add_argument("campaign_id")
    as_json(p)
    p = csub.add_parser("list", help="all campaigns")
    as_json(p)

    p = sub.add_parser("prune", help="delete old finished messages (retention)")
    p.add_argument("--older-than", type=duration, required=True, help="e.g. 90d")
    p.add_argument("--batch-size", type=count, default=5000)
    p.add_argument("--dry-run", action="store_true", help="count only")
    as_json(p)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    percent = 100 * done // total if total else 100
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent:3d}% {done}/{total}"


# -- dispatch -------------------------------------------------------------------------


async def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    import aio_pika
    import asyncpg

    from consumer.parking.lot import LotError
    from consumer.parking.passes import LotBusy
    from consumer.store import create_pool

    try:
        pool = await create_pool(settings)
    except (OSError, asyncpg.PostgresError) as exc:
        return _fail(f"cannot reach the database: {exc}")
    try:
        handler = _HANDLERS[args.command]
        return await handler(args, settings, pool)
    except (LotError, LotBusy) as exc:
        return _fail(str(exc))
    except asyncpg.UndefinedTableError as exc:
        return _fail(f"{exc}: run `herald migrate` first")
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        return _fail(f"cannot reach the broker: {exc!r}")
    finally:
        await pool.close()


def _fail(message: str) -> int:
    print(f"herald: {message}", file=sys.stderr)
    return 1


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


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


async def _audit(pool: asyncpg.Pool, action: str, params: dict[str, Any], affected: int) -> None:
    from consumer.admin import audit

    await audit.record(pool, source="cli", actor=audit.cli_actor(), action=action,
                       params=params, affected=affected)


async def _parked(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    handler = {"list": _parked_list, "show": _parked_show, "replay": _parked_replay,
               "reject": _parked_reject, "purge": _parked_purge, "sync": _parked_sync}
    return await handler[args.parked_command](args, settings, pool)


def _cut(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _counts(by_type: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(by_type.items())) or "none"


async def _parked_list(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
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
        _print_json(listing.to_json() | {"queue_depth": depth})
        return 0
    header = ("ID", "PARKED AT (UTC)", "CHANNEL", "RECIPIENT", "CAMPAIGN", "ATT", "ERROR TYPE",
              "CODE", "LAST ERROR")
    rows = [(str(r.parked_id)[:8], r.parked_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
             r.channel, _cut(r.to_json()["recipient"], 20), _cut(r.campaign_id, 16),
             str(r.attempts), r.error_type, _cut(r.error_code, 8), _cut(r.last_error, 60))
            for r in listing.rows]
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        for row in (header, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    shown = (f"showing {args.offset + 1}-{args.offset + len(rows)}" if rows else "none shown")
    print(f"{listing.total} parked: {_counts(listing.by_error_type)} ({shown})")
    if depth is not None and depth > listing.total:
        print(f"note: the parking queue holds {depth} messages, {depth - listing.total} more"
              " than the index knows (the broker parked some by itself):"
              " run `herald parked sync` to index them")
    return 0


async def _parked_show(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.parking.lot import resolve_ids, show

    (parked_id,) = await resolve_ids(pool, [args.id])
    found = await show(pool, parked_id, reveal=args.reveal)
    if args.json:
        _print_json(found)
        return 0
    p, m = found["parked"], found["message"]
    print(f"parked {p['id']}  state {p['state']}"
          + (f" ({p['resolution']})" if p["resolution"] else ""))
    print(f"  message {p['message_id']}  channel {p['channel']}  to {p['recipient']}"
          f"  campaign {p['campaign_id'] or '-'}  attempts {p['attempts']}")
    if m is not None:
        print(f"  status now {m['status']} after {m['attempts']} attempt(s)")
    print(f"  error {p['error_type']}  code {p['error_code'] or '-'}  {p['last_error'] or ''}")
    print(f"  parked at {p['parked_at']}")
    print("headers:")
    for key, value in sorted(found["headers"].items()):
        print(f"  {key}: {value}")
    print("body" + ("" if args.reveal else " (recipients masked; --reveal shows them)") + ":")
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
    return "\n".join("  " + line for line in text.splitlines())


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


async def _parked_replay(args: argparse.Namespace, settings: Settings,
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
        await _audit(pool, "parked.replay",
                     {"selection": selection.describe(), "rate": args.rate,
                      "reset_attempts": args.reset_attempts, "edited": edit is not None,
                      "interrupted": report.interrupted}, report.replayed)
    if args.json:
        _print_json(report.to_json())
        return 0 if report.complete or args.dry_run else 1
    if args.dry_run:
        print(f"dry run: would replay {report.replayed} of {report.selected} selected"
              f" ({_counts(report.by_error_type)}); {report.already_delivered} already"
              " delivered (would be removed, not sent)"
              + (f"; {len(report.skipped)} would be skipped" if report.skipped else ""))
        for item in report.items[:20]:
            print(f"  {item['id'][:8]}  {item['message_id'] or '-'}  {item['error_type']}"
                  f"  attempt {item['attempt']}  {item['action']}"
                  + (f"  body {json.dumps(item['body'])}" if "body" in item else ""))
        if len(report.items) > 20:
            print(f"  … and {report.selected - 20} more")
        return 0
    print(f"replayed {report.replayed} of {report.selected} selected"
          f" ({_counts(report.by_error_type)}); {report.already_delivered} already delivered"
          " or cancelled (removed, not sent again)")
    for item in report.skipped:
        print(f"  skipped {item['id'][:8]} ({item['message_id'] or 'no message id'}):"
              f" {item['why']}")
    if report.not_found:
        print(f"  {report.not_found} selected message(s) were not in the parking queue")
    if report.truncated:
        print("  the pass stopped after holding the most messages it may: replay again with"
              " a narrower selection")
    if report.interrupted:
        print("  interrupted: run the same replay again to finish (nothing is sent twice)")
    return 0 if report.complete else 1


async def _parked_reject(args: argparse.Namespace, settings: Settings,
                         pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.parking.lot import reject, resolve_ids

    ids = await resolve_ids(pool, args.ids)
    report = await reject(_lot(settings, pool), ids, args.reason, cli_actor())
    await _audit(pool, "parked.reject", {"ids": [str(i) for i in ids], "reason": args.reason},
                 report.marked)
    if args.json:
        _print_json(report.to_json())
    else:
        print(f"rejected {report.marked} (messages cancelled, reason recorded);"
              f" removed {report.removed} from the parking queue")
        for item in report.skipped or []:
            print(f"  {item['id'][:8]}: {item['why']}")
    return 0 if not report.skipped else 1


async def _parked_purge(args: argparse.Namespace, settings: Settings,
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
    await _audit(pool, "parked.purge", {"older_than_s": args.older_than.total_seconds()},
                 report.marked)
    if args.json:
        _print_json(report.to_json())
    else:
        print(f"purged {report.marked}; removed {report.removed} from the parking queue")
    return 0


async def _parked_sync(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.parking.lot import sync

    report = await sync(_lot(settings, pool), cli_actor())
    await _audit(pool, "parked.sync", {}, report.indexed + report.removed)
    if args.json:
        _print_json(report.to_json())
    else:
        print(f"scanned {report.scanned}: indexed {report.indexed} found without a row,"
              f" removed {report.removed} already handled")
    return 0


# -- stats, campaigns, prune ------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def print_stats(s: dict[str, Any]) -> None:
    print(f"campaign {s['campaign']}" if s["campaign"] else "all messages")
    totals = s["totals"]
    print(f"  messages {totals['all']}: "
          + ", ".join(f"{k} {v}" for k, v in totals.items() if k != "all" and v))
    print(f"  attempted {s['attempted']}; sent on first attempt {s['sent_first_attempt']}"
          f" ({_percent(s['first_attempt_success_rate'])}); needed retries"
          f" {s['needed_retries']} (retry rate {_percent(s['retry_rate'])}), of which"
          f" {s['recovered_by_retries']} succeeded")
    print(f"  average attempts per message {s['average_attempts'] or '-'}; success rate"
          f" {_percent(s['success_rate'])} ({s['succeeded']} of {s['finished']} finished)")
    if s["failures_by_error_type"]:
        print("  failures by error_type:")
        for name, f in s["failures_by_error_type"].items():
            print(f"    {name:<18} attempts {f['failed_attempts']:<6} messages"
                  f" {f['messages_affected']:<6} ended failed {f['messages_failed']:<6}"
                  f" last {f['last_failure_at']}")
    if s["by_attempt"]:
        print("  by attempt number:")
        for a in s["by_attempt"]:
            print(f"    #{a['attempt']:<3} made {a['attempts']:<6} sent {a['sent']:<6}"
                  f" retried {a['retried']:<6} failed {a['failed']:<6}"
                  f" success {_percent(a['success_rate'])}")
    c = s["retry_config"]
    print(f"  retry configuration: max_attempts {c['max_attempts']}, base_delay_s"
          f" {c['base_delay_s']:g}, max_delay_s {c['max_delay_s']:g}, mode {c['mode']},"
          f" jitter {c['jitter']:g}"
          + (f" (from the campaign: {', '.join(c['from_campaign'])})" if c["from_campaign"]
             else " (settings)")
          + "; a message's own retry fields win")
    if s["parked_by_error_type"]:
        print(f"  parked now: {_counts(s['parked_by_error_type'])}")
    if s["recent_errors"]:
        print("  most recent errors:")
        for e in s["recent_errors"]:
            print(f"    {e['at']}  {e['message_id']} #{e['attempt']} {e['error_type']}"
                  f" {e['error_code'] or '-'} {e['recipient']}: {_cut(e['error'], 80)}")


async def _stats(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records.stats import statistics

    found = await statistics(pool, settings, args.campaign, recent=args.recent)
    if args.json:
        _print_json(found)
    else:
        print_stats(found)
    return 0


async def _campaign(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import campaigns
    from consumer.records.stats import statistics

    if args.campaign_command == "list":
        rows = await campaigns.list_all(pool)
        if args.json:
            _print_json(rows)
            return 0
        for item in rows:
            print(f"{item['campaign_id']}  {item['name'] or ''}  max_attempts"
                  f" {item['max_attempts'] or '-'}  base {item['base_delay_s'] or '-'}  max"
                  f" {item['max_delay_s'] or '-'}  mode {item['retry_mode'] or '-'}")
        return 0
    if args.campaign_command == "create":
        quiet = args.quiet_hours or (None, None)
        created, saved = await campaigns.save(pool, campaigns.CampaignDefaults(
            args.campaign_id, args.name, args.max_attempts, args.base_delay,
            args.max_delay, args.retry_mode, args.priority, args.daily_limit, args.timezone,
            quiet[0], quiet[1]))
        await _audit(pool, "campaign.create" if created else "campaign.update",
                     {k: v for k, v in saved.items() if not k.endswith("_at")}, 1)
        if args.json:
            _print_json(saved | {"created": created})
        else:
            print(f"{'created' if created else 'updated'} campaign {saved['campaign_id']}")
        return 0
    row = await campaigns.get(pool, args.campaign_id)
    figures = await statistics(pool, settings, args.campaign_id)
    if args.json:
        _print_json({"campaign": row, "stats": figures})
        return 0
    if row is None:
        print(f"campaign {args.campaign_id} has no defaults of its own (no campaign row)")
    else:
        print(f"campaign {row['campaign_id']}" + (f" ({row['name']})" if row["name"] else "")
              + f", created {row['created_at']}")
    print_stats(figures)
    return 0


async def _prune(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records.retention import prune

    report = await prune(pool, args.older_than, batch_size=args.batch_size,
                         dry_run=args.dry_run)
    if not args.dry_run:
        await _audit(pool, "prune", {"older_than_s": args.older_than.total_seconds()},
                     report.messages)
    if args.json:
        _print_json(report.to_json())
    else:
        print(f"{'would prune' if args.dry_run else 'pruned'} {report.messages} message(s)"
              f" with {report.attempts} attempt(s)"
              + ("" if args.dry_run else f", {report.provider_events} provider event(s),"
                 f" {report.actions} operator action(s)")
              + f" and {report.parked_rows} resolved parking row(s)"
              + ("" if args.dry_run else f" in {report.batches} batch(es)"))
    return 0


_HANDLERS = {"parked": _parked, "stats": _stats, "campaign": _campaign, "prune": _prune}
