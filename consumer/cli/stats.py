"""``herald stats``: delivery and retry statistics, for all messages or one campaign."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from consumer.cli.common import add_json_flag, count, counts, cut, print_json, with_pool
from consumer.text import printable

if TYPE_CHECKING:
    import asyncpg

    from consumer.settings import Settings


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stats", help="delivery and retry statistics")
    p.add_argument("--campaign", help="one campaign (default: all messages)")
    p.add_argument("--recent", type=count, default=10, help="recent errors shown")
    add_json_flag(p)
    p.set_defaults(handler=with_pool(_stats))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def print_stats(s: dict[str, Any]) -> None:
    print(f"campaign {printable(s['campaign'])}" if s["campaign"] else "all messages")
    totals = s["totals"]
    print(f"  messages {totals['all']}: "
          + ", ".join(f"{k} {v}" for k, v in totals.items() if k != "all" and v))
    print(f"  attempted {s['attempted']}; sent on first attempt {s['sent_first_attempt']}"
          f" ({_percent(s['first_attempt_success_rate'])}); needed retries"
          f" {s['needed_retries']} (retry rate {_percent(s['retry_rate'])}), of which"
          f" {s['recovered_by_retries']} succeeded")
    print(f"  average attempts per message {s['average_attempts'] or '-'}; success rate"
          f" {_percent(s['success_rate'])} ({s['succeeded']} of {s['finished']} finished)")
    done = s.get("completion")
    if done is not None:
        print("  " + completion_line(done))
    if s["failures_by_error_type"]:
        print("  failures by error_type:")
        for name, f in s["failures_by_error_type"].items():
            print(f"    {printable(name):<18} attempts {f['failed_attempts']:<6} messages"
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
    if c.get("retry_rules") == "off":
        print("  shipped retry rules: off (HERALD_RETRY_RULES=off)")
    if s.get("rules_applied"):
        print("  retry rules that applied (to failed attempts):")
        for r in s["rules_applied"]:
            print(f"    retried {r['retried']:<6} parked {r['parked']:<6} {cut(r['rule'], 160)}")
    if s["parked_by_error_type"]:
        print(f"  parked now: {counts(s['parked_by_error_type'])}")
    if s["recent_errors"]:
        print("  most recent errors:")
        for e in s["recent_errors"]:
            print(f"    {e['at']}  {cut(e['message_id'], 200)} #{e['attempt']}"
                  f" {cut(e['error_type'], 20)} {cut(e['error_code'] or '-', 20)}"
                  f" {cut(e['recipient'], 200)}: {cut(e['error'], 80)}")


def completion_line(done: dict[str, Any]) -> str:
    """Where a campaign stands: completed (when, how often, its final counters) or open."""
    if done["state"] == "completed":
        c = done["counters"] or {}
        failed = ", ".join(f"{printable(k)} {v}" for k, v in
                           (c.get("failed_by_error_type") or {}).items())
        return (f"completed at {done['completed_at']}"
                + (f" (completion #{done['completions']})" if done["completions"] > 1 else "")
                + f": {c.get('total', 0)} messages, sent {c.get('sent', 0)}, delivered"
                  f" {c.get('delivered', 0)}, read {c.get('read', 0)}, failed"
                  f" {c.get('failed', 0)}" + (f" ({failed})" if failed else "")
                + f", expired {c.get('expired', 0)}, cancelled {c.get('cancelled', 0)}")
    if done["reopened_at"]:
        return (f"open again since {done['reopened_at']} (completed before at"
                f" {done['completed_at']})")
    return (f"not complete: last pipeline activity {done['last_activity_at']}"
            " (complete once none is queued, sending or retrying and it has been quiet)")


async def _stats(args: argparse.Namespace, settings: Settings, pool: asyncpg.Pool) -> int:
    from consumer.records.stats import statistics

    found = await statistics(pool, settings, args.campaign, recent=args.recent)
    if args.json:
        print_json(found)
    else:
        print_stats(found)
    return 0

