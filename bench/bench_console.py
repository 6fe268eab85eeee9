"""Benchmark: the console's parking lot page over a million parked messages.

In a fresh schema (dropped at the end) it inserts --rows parked copies with
generate_series (4 channels, 6 error types, 12 codes, 40 campaigns, a month of
parked_at), ANALYZEs, starts Herald's gateway in-process with the console,
signs in, and times GET /console/parked (a page of 50 and its badge counts)
for several filters over loopback: what the server takes to answer, HTTP
included. It also prints EXPLAIN ANALYZE of the queries behind the page.

Prints figures; asserts nothing. Usage:
python bench/bench_console.py [--rows 1000000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consumer.migrate import migrate  # noqa: E402
from consumer.parking.lot import Selection, count_parked_codes  # noqa: E402
from consumer.service import Service  # noqa: E402
from consumer.settings import Settings  # noqa: E402

AMQP_URL = os.environ.get("HERALD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5673/")
DATABASE_URL = os.environ.get("HERALD_DATABASE_URL",
                              "postgresql://herald:herald@127.0.0.1:5433/herald")
TOKEN = "bench-" + uuid.uuid4().hex

FILL = """
INSERT INTO parked_messages (parked_id, message_id, channel, recipient, campaign_id, attempts,
                             error_type, error_code, last_error, parked_at, body, headers)
SELECT gen_random_uuid(), 'bench-' || i,
       (ARRAY['sms', 'whatsapp', 'messenger', 'http'])[1 + i % 4],
       '+1555' || lpad((i % 9000000)::text, 7, '0'),
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'campaign-' || (i % 40) END,
       1 + i % 5,
       (ARRAY['provider_error', 'network', 'rate_limit', 'invalid_recipient', 'permission',
              'invalid_request'])[1 + (i * 7) % 6],
       -- two codes per error type, as providers have them
       (ARRAY[['500', '503'], ['timeout', NULL], ['429', '63018'], ['21211', '131026'],
              ['403', '30002'], ['400', '63016']])[1 + (i * 7) % 6][1 + (i / 6) % 2],
       'the provider said no (' || i || ')',
       now() - make_interval(secs => (i % 2592000)),
       convert_to('{"message_id": "bench-' || i || '", "channel": "sms", "to": "+15550000000",'
                  ' "body": "hello"}', 'UTF8'),
       '{}'
  FROM generate_series(1, $1) AS i
"""

CASES: list[tuple[str, dict[str, str]]] = [
    ("everything", {}),
    ("one error type", {"error_type": "network"}),
    ("one error type and code", {"error_type": "provider_error", "error_code": "503"}),
    ("one code", {"error_code": "21211"}),
    ("a type and a code never seen", {"error_type": "network", "error_code": "503"}),
    ("one channel", {"channel": "sms"}),
    ("one campaign", {"campaign": "campaign-7"}),
    ("one recipient", {"recipient": "+15550001234"}),
    ("parked in the last hour", {"since": "1h"}),
    ("parked in the last week", {"since": "7d"}),
    ("newest first, page 200", {"order": "newest", "page": "200"}),
]


async def sign_in(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(f"{base}/console/login") as r:
        found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
    assert found is not None
    async with session.post(f"{base}/console/login", allow_redirects=False,
                            data={"csrf": found.group(1), "token": TOKEN}) as r:
        assert r.status == 303, r.status


async def explain(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
    return "\n".join("    " + r[0] for r in rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    schema = f"bench_console_{uuid.uuid4().hex[:8]}"
    url = f"{DATABASE_URL}{'&' if '?' in DATABASE_URL else '?'}search_path={schema}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    conn = None
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        started = time.monotonic()
        await conn.execute(FILL, args.rows)
        await conn.execute("ANALYZE parked_messages; ANALYZE parked_counts")
        print(f"inserted {args.rows:,} parked rows in {time.monotonic() - started:.1f} s"
              f" ({await conn.fetchval('SELECT count(*) FROM parked_counts')} count rows)")

        print("\nplans (EXPLAIN ANALYZE):")
        print("  badge counts, no filter (parked_counts):")
        print(await explain(conn, """SELECT c.error_type, c.error_code, sum(c.parked) AS n
            FROM parked_counts c WHERE c.parked <> 0 GROUP BY c.error_type, c.error_code"""))
        for label, where, params in (
                ("page, no filter", "p.state = 'parked'", []),
                ("page, one code", "p.state = 'parked' AND p.error_code = $1", ["21211"]),
                ("page, one type and code",
                 "p.state = 'parked' AND p.error_type = $1 AND p.error_code = $2",
                 ["provider_error", "503"])):
            n = len(params)
            print(f"  {label}:")
            print(await explain(
                conn, f"""SELECT p.parked_id, p.parked_at FROM parked_messages p WHERE {where}
                          ORDER BY p.parked_at, p.parked_id LIMIT ${n + 1} OFFSET ${n + 2}""",
                *params, 50, 0))
        print("  badge counts, parked in the last week (counted from index rows):")
        print(await explain(conn, """SELECT p.error_type, COALESCE(p.error_code, ''), count(*)
            FROM parked_messages p WHERE p.state = 'parked' AND p.parked_at >= now() - $1::interval
            GROUP BY 1, 2""", timedelta(days=7)))
        started = time.monotonic()
        await count_parked_codes(conn, Selection())
        print(f"  count_parked_codes(everything) in Python: "
              f"{1000 * (time.monotonic() - started):.1f} ms")
        await conn.close()

        settings = Settings.from_env({
            "HERALD_AMQP_URL": AMQP_URL, "HERALD_DATABASE_URL": url,
            "HERALD_PREFIX": schema, "HERALD_HTTP_HOST": "127.0.0.1", "HERALD_HTTP_PORT": "0",
            "HERALD_ADMIN_HOST": "127.0.0.1", "HERALD_ADMIN_PORT": "0",
            "HERALD_ADMIN_TOKEN": f"bench:viewer:{TOKEN}", "HERALD_LOG_LEVEL": "warning"})
        service = Service(settings, roles=("gateway",))
        await service.start()
        try:
            assert service.admin_listener is not None
            base = f"http://127.0.0.1:{service.admin_listener.port}"
            async with aiohttp.ClientSession(
                    cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
                await sign_in(session, base)
                print(f"\nGET /console/parked, {args.repeat} times each (ms: median, p95, max;"
                      " the first request of each warms the cache and is not counted):")
                for label, params in CASES:
                    times = []
                    total = ""
                    for i in range(args.repeat + 1):
                        started = time.monotonic()
                        async with session.get(f"{base}/console/parked", params=params) as r:
                            page = await r.text()
                            assert r.status == 200, (label, r.status, page[-500:])
                        if i:
                            times.append(1000 * (time.monotonic() - started))
                        match = re.search(r'id="match-count">([^<]+)<', page)
                        total = match.group(1) if match else "?"
                    times.sort()
                    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                    print(f"  {label:<28} {statistics.median(times):7.1f} {p95:7.1f}"
                          f" {times[-1]:7.1f}   ({total} match)")
        finally:
            await service.stop()
    finally:
        if conn is not None and not conn.is_closed():
            conn.terminate()  # an error mid-statement would keep its locks
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
