"""``herald campaign create|show|list``: per-campaign retry defaults and limits."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from consumer.cli.common import add_json_flag, audit, count, positive, print_json, with_pool
from consumer.cli.stats import print_stats
from consumer.text import printable

if TYPE_CHECKING:
    import asyncpg

    from consumer.settings import Settings


def _quiet_hours(text: str) -> tuple[Any, Any]:
    from consumer.records.campaigns import quiet_hours

    try:
        return quiet_hours(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None




def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
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
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_create))
    p = csub.add_parser("show", help="a campaign's defaults, policy in force and statistics")
    p.add_argument("campaign_id")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_show))
    p = csub.add_parser("list", help="all campaigns")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_list))


async def _list(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import campaigns

    rows = await campaigns.list_all(pool)
    if args.json:
        print_json(rows)
        return 0
    for item in rows:
        print(f"{printable(item['campaign_id'])}  {printable(item['name'] or '')}  max_attempts"
              f" {item['max_attempts'] or '-'}  base {item['base_delay_s'] or '-'}  max"
              f" {item['max_delay_s'] or '-'}  mode {item['retry_mode'] or '-'}")
    return 0


async def _create(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import campaigns

    quiet = args.quiet_hours or (None, None)
    created, saved = await campaigns.save(pool, campaigns.CampaignDefaults(
        args.campaign_id, args.name, args.max_attempts, args.base_delay,
        args.max_delay, args.retry_mode, args.priority, args.daily_limit, args.timezone,
        quiet[0], quiet[1]))
    await audit(pool, "campaign.create" if created else "campaign.update",
                {k: v for k, v in saved.items() if not k.endswith("_at")}, 1)
    if args.json:
        print_json(saved | {"created": created})
    else:
        print(f"{'created' if created else 'updated'} campaign {printable(saved['campaign_id'])}")
    return 0


async def _show(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import campaigns
    from consumer.records.stats import statistics

    row = await campaigns.get(pool, args.campaign_id)
    figures = await statistics(pool, settings, args.campaign_id)
    if args.json:
        print_json({"campaign": row, "stats": figures})
        return 0
    if row is None:
        print(f"campaign {printable(args.campaign_id)} has no defaults of its own"
              " (no campaign row)")
    else:
        print(f"campaign {printable(row['campaign_id'])}"
              + (f" ({printable(row['name'])})" if row["name"] else "")
              + f", created {row['created_at']}")
    print_stats(figures)
    return 0
