"""``herald escalation add|list|remove``: who is told about parked messages.

See :mod:`consumer.records.escalations` (the rules) and
:mod:`consumer.parking.escalation` (the digests, sent by the ``events`` role).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from consumer.cli.common import add_json_flag, audit, duration, fail, print_json, with_pool
from consumer.text import printable

if TYPE_CHECKING:
    import asyncpg

    from consumer.settings import Settings

CHANNELS = ("http", "sms", "whatsapp", "messenger")


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    esc = sub.add_parser("escalation", help="tell people about parked messages, in digests")
    esub = esc.add_subparsers(dest="escalation_command", required=True,
                              parser_class=parser_class)
    p = esub.add_parser("add", help="a rule: which parked messages, to whom, how often")
    p.add_argument("name", help="a name for the rule, e.g. oncall-chat")
    p.add_argument("--to-channel", required=True, choices=CHANNELS,
                   help="how to reach the person: http (e.g. a chat's incoming webhook),"
                        " sms, whatsapp, messenger")
    p.add_argument("--to", required=True,
                   help="the URL, E.164 number or PSID (kept in the database, shown masked)")
    p.add_argument("--window", type=duration, default=None, metavar="DURATION",
                   help="one digest per window, e.g. 5m (default), 1h, 30s")
    p.add_argument("--channel", choices=CHANNELS, help="only messages of this channel")
    p.add_argument("--error-type", help="only messages parked with this error_type")
    p.add_argument("--campaign", help="only this campaign's messages")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_add))
    p = esub.add_parser("list", help="the rules and the latest digests")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_list))
    p = esub.add_parser("remove", help="delete a rule, by id or name")
    p.add_argument("rule", help="the rule's id or name")
    p.set_defaults(handler=with_pool(_remove))


async def _add(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.admin.audit import cli_actor
    from consumer.records import escalations

    window = args.window.total_seconds() if args.window is not None else 300
    if window != int(window):
        window = int(window) + 1
    spec = escalations.EscalationSpec(args.name, args.to_channel, args.to, int(window),
                                      args.channel, args.error_type, args.campaign)
    row = await escalations.add(pool, spec, cli_actor())
    await audit(pool, "escalation.create", {k: v for k, v in row.items() if k != "created_at"},
                1)
    if args.json:
        print_json(row)
    else:
        print(f"added escalation #{row['id']} {escalations.describe(row)}")
    return 0


async def _list(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import escalations

    found = await escalations.listing(pool)
    if args.json:
        print_json(found)
        return 0
    if not found["rules"]:
        print("no escalation rules: parked messages are told to nobody"
              " (herald escalation add NAME --to-channel http --to URL)")
    for row in found["rules"]:
        print(f"#{row['id']:<4} {escalations.describe(row)}; digests sent"
              f" {row['digests_sent']}, last {row['last_sent_at'] or '-'}")
    if found["digests"]:
        print("latest digests:")
        for d in found["digests"]:
            print(f"  {d['window_start']}  {printable(d['rule']):<20} {d['state']:<6}"
                  f" parked {d['parked']}")
    return 0


async def _remove(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records import escalations

    try:
        row = await escalations.remove(pool, args.rule)
    except escalations.EscalationNotFound as exc:
        return fail(str(exc))
    await audit(pool, "escalation.remove", {"id": row["id"], "name": row["name"]}, 1)
    print(f"removed escalation #{row['id']} {escalations.describe(row)}")
    return 0
