"""``herald retry-rules list|set|remove``: retry budgets per kind of failure.

What a rule is and which one applies: :mod:`consumer.delivery.rules`
(docs/retry-rules.md).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from consumer.cli.common import add_json_flag, audit, count, fail, positive, print_json, with_pool
from consumer.text import printable

if TYPE_CHECKING:
    import asyncpg

    from consumer.settings import Settings

RETRYABLE = ("rate_limit", "network", "provider_error")
CHANNELS = ("http", "sms", "whatsapp", "messenger")


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    rules = sub.add_parser("retry-rules", help="retry budgets per error type or code")
    rsub = rules.add_subparsers(dest="rules_command", required=True, parser_class=parser_class)
    p = rsub.add_parser("list", help="the operator's, a campaign's and the shipped rules")
    p.add_argument("--campaign", help="also this campaign's rules")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_list))
    p = rsub.add_parser("set", help="add a rule, or replace the one with the same selector")
    p.add_argument("--campaign", help="only this campaign's messages (default: every message)")
    p.add_argument("--channel", choices=CHANNELS)
    p.add_argument("--error-type", choices=RETRYABLE)
    p.add_argument("--code", help="the provider's error code, e.g. 30003 or 429")
    p.add_argument("--max-attempts", type=count, required=True,
                   help="attempts that may end in this failure (3: two retries)")
    p.add_argument("--base-delay", type=positive, help="first delay, seconds")
    p.add_argument("--max-delay", type=positive, help="longest delay, seconds")
    p.add_argument("--note", help="why (shown with the rule)")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_set))
    p = rsub.add_parser("remove", help="delete a rule by its id")
    p.add_argument("rule_id", type=count)
    p.set_defaults(handler=with_pool(_remove))


async def _list(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import retry_rules

    found = await retry_rules.listing(pool, campaign_id=args.campaign,
                                      builtin=settings.retry_rules == "builtin")
    if args.json:
        print_json(found)
        return 0
    for title, rows in (("operator's rules (every message)", found["operator"]),
                        (f"campaign {printable(args.campaign or '')}", found["campaign"])):
        if rows or title.startswith("operator"):
            print(f"{title}:")
            for row in rows:
                print(f"  #{row['id']:<5} {retry_rules.describe(row)}")
            if not rows:
                print("  none")
    if found["builtin_enabled"]:
        print("shipped rules (HERALD_RETRY_RULES=builtin):")
        for row in found["builtin"]:
            print(f"  {'replaced' if row['replaced'] else 'in force':<9}"
                  f" {retry_rules.describe(row)}")
    else:
        print("shipped rules: off (HERALD_RETRY_RULES=off)")
    print(f"everything else: the message's or campaign's retry fields, else"
          f" HERALD_MAX_ATTEMPTS={settings.max_attempts}, base {settings.base_delay_s:g}s,"
          f" max {settings.max_delay_s:g}s")
    return 0


async def _set(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.records import retry_rules

    spec = retry_rules.RuleSpec(args.max_attempts, args.campaign, args.channel,
                                args.error_type, args.code, args.base_delay, args.max_delay,
                                args.note)
    created, row = await retry_rules.save(pool, spec, cli_actor())
    await audit(pool, "retry_rule.create" if created else "retry_rule.update",
                {k: v for k, v in row.items() if k != "updated_at"}, 1)
    if args.json:
        print_json(row | {"created": created})
    else:
        print(f"{'created' if created else 'replaced'} retry rule #{row['id']}:"
              f" {retry_rules.describe(row)}")
    return 0


async def _remove(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import retry_rules

    row = await retry_rules.remove(pool, args.rule_id)
    if row is None:
        return fail(f"no retry rule #{args.rule_id}")
    await audit(pool, "retry_rule.remove", {"id": args.rule_id}, 1)
    print(f"removed retry rule #{args.rule_id}: {retry_rules.describe(row)}")
    return 0
