"""Benchmark: provider status webhooks accepted by the receiver, applied by the events consumer.

On one broker and database, with a fresh prefix and schema per run:

1. receiver — `herald run --roles gateway` in its own process; N messages are
              recorded as sent (a third each Twilio, WhatsApp, Messenger), then
              2·N signed webhooks (delivered and read for each) are POSTed with
              --concurrency requests in flight. Each answer is a 200 only after
              the broker confirmed the event. Figure: events accepted per second.
2. consumer — the 2·N events now queued in {prefix}.events are applied by
              `herald run --roles events` (another process). Figure: events
              applied per second, timed by the database from the first event
              stored to the last, so start-up does not count.

Prints each run, then the medians. Usage:
python bench/bench_events.py [--n 10000] [--concurrency 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import (  # noqa: E402
    AMQP_URL,
    Fixture,
    cpu_seconds,
    free_port,
    service_meters,
    start_process,
    stop,
    wait_http,
)

from consumer.sandbox.env import SandboxCredentials, sandbox_env  # noqa: E402
from consumer.status.signatures import meta_signature, twilio_signature  # noqa: E402

CREDS = SandboxCredentials()
PROVIDERS = ("twilio", "whatsapp", "messenger")

Request = tuple[str, bytes, dict[str, str]]  # path, body, headers


def herald_env(fx: Fixture, port: int) -> dict[str, str]:
    public_url = f"http://127.0.0.1:{port}"
    return sandbox_env(1, public_url=public_url) | {
        "HERALD_PREFIX": fx.prefix, "HERALD_DATABASE_URL": fx.db_url,
        "HERALD_AMQP_URL": AMQP_URL, "HERALD_HTTP_PORT": str(port),
        "HERALD_HTTP_HOST": "127.0.0.1", "HERALD_LOG_LEVEL": "warning",
        "HERALD_ADMIN_PORT": str(free_port()),
    }


async def record_sent(db: asyncpg.Connection, n: int) -> None:
    """N messages as the pipeline leaves them once the provider accepted them."""
    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, payload, attempts,
                                 provider, provider_message_id, queued_at, sending_at, sent_at)
           SELECT 'b-' || i, 'sent', c.channel,
                  CASE WHEN c.channel = 'messenger' THEN (7000000000000000 + i)::text
                       ELSE '+1555' || lpad(i::text, 7, '0') END,
                  '{}', 1, c.provider, c.provider || '-' || i, now(), now(), now()
             FROM generate_series(0, $1 - 1) AS i,
                  LATERAL (SELECT (ARRAY['sms', 'whatsapp', 'messenger'])[i % 3 + 1] AS channel,
                                  (ARRAY['twilio', 'whatsapp', 'messenger'])[i % 3 + 1]
                                      AS provider) AS c""", n)


def signed_requests(n: int, public_url: str) -> list[Request]:
    """Every webhook of the run, signed as the provider would, in sending order."""
    requests: list[Request] = []
    # After the messages were recorded: Messenger's watermarks must cover their sends.
    now_ms = int(time.time() * 1000) + 1
    now = now_ms // 1000 + 1
    twilio_url = public_url + "/webhooks/twilio"
    for status in ("delivered", "read"):
        for i in range(n):
            provider = PROVIDERS[i % 3]
            pmid = f"{provider}-{i}"
            if provider == "twilio":
                params = [("MessageSid", pmid), ("MessageStatus", status),
                          ("AccountSid", CREDS.twilio_account_sid), ("To", f"+1555{i:07d}"),
                          ("From", CREDS.twilio_from), ("ApiVersion", "2010-04-01")]
                requests.append(("/webhooks/twilio", urlencode(params).encode(), {
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Twilio-Signature": twilio_signature(CREDS.twilio_auth_token,
                                                           twilio_url, params)}))
                continue
            if provider == "whatsapp":
                body = {"object": "whatsapp_business_account", "entry": [{
                    "id": CREDS.waba_id, "changes": [{"field": "messages", "value": {
                        "messaging_product": "whatsapp", "statuses": [{
                            "id": pmid, "status": status, "timestamp": str(now),
                            "recipient_id": f"1555{i:07d}"}]}}]}]}
            else:
                psid = str(7000000000000000 + i)
                event: dict[str, object] = {"sender": {"id": psid},
                                            "recipient": {"id": CREDS.page_id}}
                if status == "delivered":
                    event["delivery"] = {"mids": [pmid], "watermark": now_ms}
                else:
                    event["read"] = {"watermark": now_ms}
                    event["timestamp"] = now_ms
                body = {"object": "page", "entry": [{"id": CREDS.page_id, "time": now_ms,
                                                     "messaging": [event]}]}
            raw = json.dumps(body, separators=(",", ":")).encode()
            requests.append((f"/webhooks/{provider}", raw, {
                "Content-Type": "application/json",
                "X-Hub-Signature-256": meta_signature(CREDS.meta_app_secret, raw)}))
    return requests


async def fire(base_url: str, requests: list[Request], concurrency: int
               ) -> tuple[float, list[float]]:
    """POST everything with ``concurrency`` in flight; wall time and per-request latencies."""
    latencies: list[float] = []
    queue = iter(requests)
    refused: list[int] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for path, body, headers in queue:
                t0 = time.perf_counter()
                async with session.post(base_url + path, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        refused.append(r.status)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if refused:
        raise RuntimeError(f"{len(refused)} webhooks refused, e.g. HTTP {refused[0]}")
    return elapsed, latencies


async def one_run(n: int, concurrency: int, log_dir: Path) -> tuple[float, float]:
    """(events accepted/s by the receiver, events applied/s by the consumer)."""
    async with Fixture() as fx:
        db = await asyncpg.connect(fx.db_url)
        try:
            await record_sent(db, n)
            port = free_port()
            gateway = await start_process(["run", "--roles", "gateway"], herald_env(fx, port),
                                          log_dir / "herald-gateway.log")
            try:
                await wait_http(f"http://127.0.0.1:{port}/readyz")
                requests = signed_requests(n, f"http://127.0.0.1:{port}")
                broker, database = service_meters()
                cpu0 = cpu_seconds(gateway.pid)
                elapsed, latencies = await fire(f"http://127.0.0.1:{port}", requests,
                                                concurrency)
                herald_cpu = cpu_seconds(gateway.pid) - cpu0
                quantiles = statistics.quantiles(latencies, n=100)
                print(f"    receiver: {len(requests)} webhooks in {elapsed:.2f} s; latency p50 "
                      f"{quantiles[49] * 1000:.1f} ms, p99 {quantiles[98] * 1000:.1f} ms; cpu "
                      f"share of one core: herald {herald_cpu / elapsed:.0%}, rabbitmq "
                      f"{broker.used() / elapsed:.0%}, postgres {database.used() / elapsed:.0%}",
                      flush=True)
            finally:
                await stop(gateway)
            accepted = len(requests) / elapsed

            port = free_port()
            events = await start_process(["run", "--roles", "events"], herald_env(fx, port),
                                         log_dir / "herald-events.log")
            try:
                broker, database = service_meters()
                cpu0, t0 = cpu_seconds(events.pid), time.perf_counter()
                while True:
                    done = await db.fetchval(
                        "SELECT count(*) FROM provider_events WHERE outcome IS NOT NULL")
                    if done >= len(requests):
                        break
                    if events.returncode is not None:
                        raise RuntimeError(f"herald exited; see {log_dir}/herald-events.log")
                    await asyncio.sleep(0.25)
                wall = time.perf_counter() - t0
                herald_cpu = cpu_seconds(events.pid) - cpu0
                print(f"    consumer: cpu share of one core: herald {herald_cpu / wall:.0%}, "
                      f"rabbitmq {broker.used() / wall:.0%}, postgres "
                      f"{database.used() / wall:.0%} ({1e6 * herald_cpu / len(requests):.0f} "
                      "µs herald CPU per event)", flush=True)
            finally:
                await stop(events)
            # Timed by the database: from the first event stored to the last.
            span = await db.fetchval(
                "SELECT extract(epoch FROM max(stored_at) - min(stored_at)) FROM provider_events")
            unread = await db.fetchval("SELECT count(*) FROM messages WHERE status <> 'read'")
            if unread:
                raise RuntimeError(f"{unread} messages not read after all events were applied")
            # stored_at is a transaction's start: add one batch's worth, at most.
            applied = len(requests) / max(float(span), 1e-3)
            return accepted, applied
        finally:
            await db.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000,
                        help="messages per run (two webhooks each: delivered, read)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="webhook requests in flight at once")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    log_dir = REPO / ".local" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start", flush=True)

    accepted, applied = [], []
    for i in range(args.repeat):
        a, b = await one_run(args.n, args.concurrency, log_dir)
        accepted.append(a)
        applied.append(b)
        print(f"run {i + 1}: receiver {a:8.0f} events/s accepted   consumer {b:8.0f} "
              "events/s applied", flush=True)
    print()
    print(f"webhook events accepted by the receiver : {statistics.median(accepted):8.0f}/s "
          f"(median of {args.repeat}; {2 * args.n} webhooks, {args.concurrency} in flight, "
          "each answered after the broker's confirm)")
    print(f"events applied by the events consumer   : {statistics.median(applied):8.0f}/s "
          f"(median of {args.repeat}; a burst of {2 * args.n} queued events)")


if __name__ == "__main__":
    asyncio.run(main())
