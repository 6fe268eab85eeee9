"""``herald prune``: delete old finished messages (retention)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from consumer.cli.common import add_json_flag, audit, count, duration, print_json, with_pool

if TYPE_CHECKING:
    import asyncpg

    from consumer.settings import Settings


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("prune", help="delete old finished messages (retention)")
    p.add_argument("--older-than", type=duration, required=True, help="e.g. 90d")
    p.add_argument("--batch-size", type=count, default=5000)
    p.add_argument("--dry-run", action="store_true", help="count only")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_prune))


async def _prune(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records.retention import prune

    report = await prune(pool, args.older_than, batch_size=args.batch_size,
                         dry_run=args.dry_run)
    if not args.dry_run:
        await audit(pool, "prune", {"older_than_s": args.older_than.total_seconds()},
                     report.messages)
    if args.json:
        print_json(report.to_json())
    else:
        print(f"{'would prune' if args.dry_run else 'pruned'} {report.messages} message(s)"
              f" with {report.attempts} attempt(s)"
              + ("" if args.dry_run else f", {report.provider_events} provider event(s),"
                 f" {report.actions} operator action(s)")
              + f" and {report.parked_rows} resolved parking row(s)"
              + ("" if args.dry_run else f" in {report.batches} batch(es)"))
    return 0

