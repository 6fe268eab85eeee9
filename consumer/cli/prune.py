"""``herald prune``: delete old finished messages (retention), leaving tombstones."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from consumer.cli.common import (
    add_json_flag,
    audit,
    count,
    duration,
    fail,
    print_json,
    with_pool,
)
from consumer.errors import ConfigError
from consumer.records.retention import (
    DEFAULT_FORGET_AFTER,
    MIN_OLDER_THAN,
    describe,
    window_problem,
)

if TYPE_CHECKING:
    import asyncpg

    from consumer.settings import Settings


def _older_than(text: str) -> timedelta:
    window = duration(text)
    problem = window_problem(window)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem.removeprefix("--older-than "))
    return window


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prune", help="delete old finished messages (retention), leaving tombstones",
        description="Delete sent, delivered, read, cancelled and expired messages unchanged"
        " for longer than --older-than, with their history. Each leaves a tombstone, so its"
        " message_id is still never sent again; tombstones go once their message finished"
        " longer ago than --forget-after.")
    p.add_argument("--older-than", type=_older_than, required=True,
                   help=f"e.g. 90d; at least {describe(MIN_OLDER_THAN)}")
    p.add_argument("--forget-after", type=duration, default=DEFAULT_FORGET_AFTER,
                   help="how long a pruned message_id is remembered after its message"
                        f" finished (default {describe(DEFAULT_FORGET_AFTER)})")
    p.add_argument("--batch-size", type=count, default=1000)
    p.add_argument("--dry-run", action="store_true", help="count only")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_prune))


async def _prune(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records.retention import RetentionError, prune

    problem = window_problem(args.older_than, args.forget_after)
    if problem is not None:
        raise ConfigError(f"prune: {problem}")
    try:
        if not args.dry_run and not args.yes:
            plan = await prune(pool, args.older_than, forget_after=args.forget_after,
                               batch_size=args.batch_size, dry_run=True)
            if not plan.messages and not plan.parked_rows and not plan.tombstones_forgotten:
                print(f"nothing finished more than {describe(args.older_than)} ago")
                return 0
            if not sys.stdin.isatty():
                raise ConfigError("prune: confirm with --yes (not run interactively)")
            answer = await asyncio.to_thread(
                input, f"delete {plan.messages} message(s) finished more than"
                       f" {describe(args.older_than)} ago with their history (keeping a"
                       f" tombstone of each for {describe(args.forget_after)}), and forget"
                       f" {plan.tombstones_forgotten} older tombstone(s)? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing pruned")
                return 1
        report = await prune(pool, args.older_than, forget_after=args.forget_after,
                             batch_size=args.batch_size, dry_run=args.dry_run)
    except RetentionError as exc:
        return fail(f"prune: {exc}")
    if not args.dry_run:
        await audit(pool, "prune", {"older_than_s": args.older_than.total_seconds(),
                                    "forget_after_s": args.forget_after.total_seconds()},
                    report.messages)
    if args.json:
        print_json(report.to_json())
    else:
        print(f"{'would prune' if args.dry_run else 'pruned'} {report.messages} message(s)"
              f" with {report.attempts} attempt(s)"
              + ("" if args.dry_run else f", {report.provider_events} provider event(s),"
                 f" {report.actions} operator action(s)")
              + f" and {report.parked_rows} resolved parking row(s)"
              + ("" if args.dry_run else f" in {report.batches} batch(es)")
              + f"; {'would forget' if args.dry_run else 'forgot'}"
              f" {report.tombstones_forgotten} tombstone(s)")
        if report.kept_parked:
            print(f"kept {report.kept_parked} finished message(s) that still have a parked"
                  " copy: replay, reject or purge it first")
    return 0
