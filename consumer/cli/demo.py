"""``herald demo``: a sample campaign through a running Herald and the sandbox.

What ``make run`` shows a newcomer: a few hundred messages over SMS,
WhatsApp, Messenger and HTTP, some scripted to fail now and then, a few for
good; a live view of where they are (sent, retrying, parked, delivered,
read), and at the end the campaign's statistics, the parking lot's summary
and the commands to try next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
import asyncpg

from consumer.broker import connect_robust
from consumer.parking.lot import Selection, count_parked
from consumer.publisher import Publisher
from consumer.records.stats import statistics
from consumer.settings import Settings
from consumer.topology import Names

CAMPAIGN = "demo"
STATES = ("queued", "sending", "retrying", "sent", "delivered", "read", "failed", "expired")


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="send a sample campaign through a running Herald and "
                          "the sandbox, with a live view")
    demo.add_argument("--sandbox-url", help="default http://127.0.0.1:$HERALD_SANDBOX_PORT")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds to watch at most")
    demo.set_defaults(handler=_demo)


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    url = args.sandbox_url or f"http://127.0.0.1:{settings.sandbox_port}"
    return await run_demo(settings, sandbox_url=url.rstrip("/"), timeout_s=args.timeout)


def plan(run: str, sandbox_url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The demo's send requests and the sandbox scripts that make some of them fail."""
    requests: list[dict[str, Any]] = []
    scripts: list[dict[str, Any]] = []

    def add(channel: str, to: str, body: Any) -> None:
        requests.append({"message_id": f"{run}-{len(requests)}", "channel": channel, "to": to,
                         "body": body, "campaign_id": CAMPAIGN})

    for i in range(80):
        number = f"+1555{7000000 + i}"
        add("sms", number, f"Hi! Spring sale, code SPRING{i}")
        if i % 10 == 3:
            scripts.append({"provider": "twilio", "recipient": number,
                            "script": {"fail": 2, "code": 30008}})   # unknown error: retried
        elif i % 20 == 7:
            scripts.append({"provider": "twilio", "recipient": number,
                            "script": {"always": True, "code": 21610}})  # opted out: parked
        elif i % 25 == 11:
            scripts.append({"provider": "twilio", "recipient": number,
                            "script": {"callback_error": 30003}})  # undelivered after sending
    for i in range(60):
        number = f"+1555{8000000 + i}"
        add("whatsapp", number, f"Your order {i} is on its way")
        if i % 12 == 5:
            scripts.append({"provider": "whatsapp", "recipient": number.lstrip("+"),
                            "script": {"fail": 1, "code": 130429}})  # throughput: retried
        elif i % 15 == 9:
            scripts.append({"provider": "whatsapp", "recipient": number.lstrip("+"),
                            "script": {"always": True, "code": 131026}})  # undeliverable
    for i in range(40):
        add("messenger", f"{9000000000000000 + i}", f"Thanks for visiting, friend {i}")
    for i in range(40):
        query = "?fail=1&fail_status=503" if i % 8 == 2 else ("?status=400" if i % 20 == 13
                                                              else "")
        add("http", f"{sandbox_url}/http/demo-hook-{i % 4}{query}", {"event": "signup", "n": i})
    return requests, scripts


async def run_demo(settings: Settings, *, sandbox_url: str, timeout_s: float = 120.0) -> int:
    run = f"demo-{uuid.uuid4().hex[:6]}"
    requests, scripts = plan(run, sandbox_url)
    async with aiohttp.ClientSession() as http:
        for script in scripts:
            async with http.post(f"{sandbox_url}/_sandbox/script", json=script) as answer:
                answer.raise_for_status()
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute(
            """INSERT INTO campaigns (campaign_id, name, max_attempts, base_delay_s, max_delay_s)
               VALUES ($1, 'Herald demo', 4, 2, 8)
               ON CONFLICT (campaign_id) DO NOTHING""", CAMPAIGN)
        connection = await connect_robust(settings.amqp_urls)
        async with connection:
            publisher = Publisher(connection, Names(settings.prefix))
            await asyncio.gather(*(
                publisher.publish_send(r["channel"], json.dumps(r).encode(),
                                       message_id=r["message_id"], lane="bulk")
                for r in requests))
        print(f"published {len(requests)} messages of campaign '{CAMPAIGN}' "
              f"(run {run}) to the sandbox's Twilio, WhatsApp, Messenger and HTTP fakes\n")
        await _watch(pool, run, len(requests), timeout_s)
        stats = await statistics(pool, settings, CAMPAIGN)
        async with pool.acquire() as conn:
            parked = await count_parked(conn, Selection(campaign=CAMPAIGN))
    finally:
        await pool.close()
    from consumer.cli.stats import print_stats

    print()
    print_stats(stats)
    print()
    print("parking lot for this campaign: " + (", ".join(
        f"{kind} {n}" for kind, n in sorted(parked.items())) or "empty"))
    print("\nnext, try:")
    print(f"  herald parked list --campaign {CAMPAIGN}")
    print("  herald parked show <id from the list>")
    print(f"  herald parked replay --campaign {CAMPAIGN} --error-type provider_error --dry-run")
    print(f"  herald stats --campaign {CAMPAIGN}")
    print(f"  herald status {run}-0")
    print(f"  curl -s localhost:{settings.admin_port}/metrics | grep herald_messages")
    return 0


async def _watch(pool: asyncpg.Pool, run: str, total: int, timeout_s: float) -> None:
    """A live line per second until nothing is moving (or the deadline)."""
    deadline = time.monotonic() + timeout_s
    still_since: float | None = None
    last: Counter[str] = Counter()
    live = sys.stdout.isatty()
    while time.monotonic() < deadline:
        rows = await pool.fetch("SELECT status, count(*) AS n FROM messages "
                                "WHERE message_id LIKE $1 GROUP BY status", f"{run}-%")
        counts = Counter({r["status"]: r["n"] for r in rows})
        seen = sum(counts.values())
        line = f"{seen:4d}/{total} seen  " + "  ".join(
            f"{state} {counts[state]:3d}" for state in STATES if counts[state] or state in
            ("sent", "retrying", "failed", "delivered", "read"))
        line = line.replace("failed", "parked")
        print(("\r" + line) if live else line, end="" if live else "\n", flush=True)
        settled = seen == total and not (counts["queued"] or counts["sending"]
                                         or counts["retrying"])
        if settled and counts == last:
            still_since = still_since or time.monotonic()
            if time.monotonic() - still_since >= 3.0:  # callbacks have stopped arriving
                break
        else:
            still_since = None
        last = counts
        await asyncio.sleep(1.0)
    if live:
        print()
