"""Benchmark: end-to-end deliveries per second against the raw broker ceiling.

Runs, in one go and on the same broker and database:

1. ceiling   — a bare aio-pika consumer that only acks, draining N pre-published
               messages (same prefetch as Herald);
2. floor     — the least any consumer of this design must do per message, with
               no database and no validation: consume → aiohttp POST → ack, once
               against a minimal hand-written HTTP responder and once against
               the sandbox endpoint Herald uses. It bounds what Herald can reach
               on this machine;
3. herald    — `herald run` in its own process draining N pre-published send
               requests to a zero-latency sandbox endpoint (sandbox in its own
               process): published → claimed → sent → recorded → acked;
4. latency   — the same with the sandbox answering after 200 ms;
5. memory    — RSS of the Herald process sampled while M messages flow.

Everything runs on uvloop, the event loop `herald run` uses. For each run it
prints the CPU used per delivery by every process involved (consumer, broker,
HTTP endpoint, database) and how many cores that would take at half the
ceiling's rate. Each figure is the median of --repeat runs.
Usage: python bench/bench_pipeline.py [--n 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    AMQP_URL,
    REPO,
    CpuMeter,
    Fixture,
    batch_summary,
    cpu_seconds,
    free_port,
    report_cpu,
    rss_mib,
    serve_minimal,
    service_meters,
    service_pids,
    start_process,
    stop,
    wait_http,
)


async def measure_consumer(
    n: int, prefetch: int, *, url: str | None = None, endpoint_pid: int | None = None,
) -> tuple[float, float]:
    """Deliveries/s and CPU µs per delivery of a bare aio-pika consumer.

    Without ``url`` it does nothing but ack (the ceiling); with one it first
    POSTs each body there (the floor), counting the endpoint's CPU too.
    """
    async with Fixture() as fx:
        await fx.publish(n, url or "http://127.0.0.1:1/unused")
        connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(fx.names.send_queue("http"), ensure=False)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=prefetch))
        done = asyncio.Event()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            if url is not None:
                async with session.post(url, data=message.body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    r.raise_for_status()
            await message.ack()
            count += 1
            if count >= n:
                done.set()

        meters = {"rabbitmq": CpuMeter(service_pids()["rabbitmq"])}
        if endpoint_pid is not None:
            meters["endpoint"] = CpuMeter(endpoint_pid)
        t0, c0 = time.perf_counter(), time.process_time()
        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - t0
        per_delivery = report_cpu(n, elapsed, consumer=time.process_time() - c0, **{
            name: meter.used() for name, meter in meters.items()})
        await session.close()
        await connection.close()
        return n / elapsed, per_delivery


async def measure_herald(
    n: int, prefetch: int, latency_ms: float, log_dir: Path, *, processes: int = 1,
) -> tuple[float, float, list[tuple[int, float]]]:
    """Deliveries/s of `herald run` draining n pre-published requests, CPU µs per
    delivery over all processes, and RSS samples."""
    async with Fixture() as fx:
        sandbox_port = free_port()
        sandbox = await start_process(["sandbox", "--port", str(sandbox_port)], {},
                                      log_dir / "sandbox.log")
        await wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/counts")
        query = f"?latency_ms={latency_ms:g}" if latency_ms else ""
        await fx.publish(n, f"http://127.0.0.1:{sandbox_port}/http/bench{query}")
        db = await asyncpg.connect(fx.db_url)
        samples: list[tuple[int, float]] = []
        heralds: list[asyncio.subprocess.Process] = []
        try:
            ports, admin_ports = [], []
            for _ in range(processes):
                ports.append(free_port())
                admin_ports.append(free_port())
                env = {
                    "HERALD_PREFIX": fx.prefix, "HERALD_DATABASE_URL": fx.db_url,
                    "HERALD_AMQP_URL": AMQP_URL, "HERALD_HTTP_PORT": str(ports[-1]),
                    "HERALD_HTTP_HOST": "127.0.0.1", "HERALD_PREFETCH": str(prefetch),
                    "HERALD_LOG_LEVEL": "warning", "HERALD_ADMIN_PORT": str(admin_ports[-1]),
                    "HERALD_HTTP_ALLOW_NETWORKS": "127.0.0.0/8",  # the sandbox is on loopback
                }
                heralds.append(await start_process(["run", "--channels", "http"], env,
                                                   log_dir / "herald.log"))
            broker_meter, database_meter = service_meters()

            def usage() -> list[float]:
                return [sum(cpu_seconds(h.pid) for h in heralds), cpu_seconds(sandbox.pid),
                        broker_meter.used(), database_meter.used(), time.perf_counter()]

            # Herald starts consuming before its HTTP server answers: count from now.
            cpu0 = usage()
            for port in ports:
                await wait_http(f"http://127.0.0.1:{port}/readyz")
            while True:
                # Poll rarely: counting rows costs the database CPU it would
                # otherwise spend on Herald.
                sent = await db.fetchval("SELECT count(*) FROM messages WHERE status='sent'")
                samples.append((sent, rss_mib(heralds[0].pid)))
                if sent >= n and await fx.depth() == 0:
                    break
                if any(h.returncode is not None for h in heralds):
                    raise RuntimeError(f"herald exited; see {log_dir / 'herald.log'}")
                await asyncio.sleep(0.5)
            # The run is timed by the database's own record: from the first claim
            # to the last `sent`, so start-up and polling granularity do not count.
            elapsed = float(await db.fetchval(
                "SELECT extract(epoch FROM max(sent_at) - min(sending_at)) FROM messages"))
            cpu1 = usage()
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{admin_ports[0]}/metrics") as r:
                exposition = await r.text()
            print("    " + batch_summary(exposition), flush=True)
            # Shares over the wall time since Herald started (its start-up included).
            per_delivery = report_cpu(n, cpu1[4] - cpu0[4], **{
                name: b - a for name, a, b in
                zip(("herald", "sandbox", "rabbitmq", "postgres"), cpu0, cpu1, strict=False)})
        finally:
            await db.close()
            for h in heralds:
                await stop(h)
            await stop(sandbox)
        return n / elapsed, per_delivery, samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="messages per throughput run")
    parser.add_argument("--latency-n", type=int, default=10000,
                        help="messages for the 200 ms latency run")
    parser.add_argument("--memory-n", type=int, default=100000,
                        help="messages for the memory run (0 to skip)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--latency-prefetch", type=int, default=1024)
    args = parser.parse_args()
    log_dir = REPO / ".local" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)

    minimal_port = free_port()
    minimal = multiprocessing.get_context("spawn").Process(
        target=serve_minimal, args=(minimal_port,), daemon=True)
    minimal.start()
    assert minimal.pid is not None
    sandbox_port = free_port()
    sandbox = await start_process(["sandbox", "--port", str(sandbox_port)], {},
                                  log_dir / "sandbox.log")
    await wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/counts")
    await wait_http(f"http://127.0.0.1:{minimal_port}/")

    rows: dict[str, list[tuple[float, float]]] = {
        "ceiling": [], "floor_minimal": [], "floor_sandbox": [], "herald": []}
    try:
        for i in range(args.repeat):
            rows["ceiling"].append(await measure_consumer(args.n, args.prefetch))
            rows["floor_minimal"].append(await measure_consumer(
                args.n, args.prefetch, url=f"http://127.0.0.1:{minimal_port}/floor",
                endpoint_pid=minimal.pid))
            rows["floor_sandbox"].append(await measure_consumer(
                args.n, args.prefetch, url=f"http://127.0.0.1:{sandbox_port}/http/floor",
                endpoint_pid=sandbox.pid))
            rate, cpu, _ = await measure_herald(args.n, args.prefetch, 0, log_dir)
            rows["herald"].append((rate, cpu))
            print(f"run {i + 1}: " + "   ".join(
                f"{name} {values[-1][0]:.0f}/s" for name, values in rows.items()), flush=True)
    finally:
        await stop(sandbox)
        minimal.kill()
    slow = []
    for i in range(args.repeat):
        rate, _, _ = await measure_herald(args.latency_n, args.latency_prefetch, 200, log_dir)
        slow.append(rate)
        print(f"run {i + 1}: herald with 200 ms provider latency {rate:8.0f}/s", flush=True)

    ceiling = statistics.median(rate for rate, _ in rows["ceiling"])
    print()
    print(f"medians of {args.repeat} runs, {args.n} messages each, prefetch {args.prefetch}")
    labels = {
        "ceiling": "bare aio-pika ack-only ceiling",
        "floor_minimal": "floor: consume, POST, ack; minimal HTTP responder",
        "floor_sandbox": "floor: consume, POST, ack; sandbox endpoint",
        "herald": "herald end to end, 0 ms sandbox",
    }
    for key, label in labels.items():
        rate = statistics.median(r for r, _ in rows[key])
        cpu = statistics.median(c for _, c in rows[key])
        print(f"{label:52}: {rate:6.0f}/s  ratio {rate / ceiling:4.2f}  "
              f"{cpu:4.0f} µs CPU/delivery → {cpu * ceiling / 2 / 1e6:.1f} cores at "
              f"half the ceiling ({os.cpu_count()} here)")
    herald = statistics.median(r for r, _ in rows["herald"])
    print(f"ratio herald / ceiling         : {herald / ceiling:8.2f}   (target >= 0.50)")
    print(f"herald, 200 ms sandbox latency : {statistics.median(slow):8.0f} deliveries/s "
          f"(prefetch {args.latency_prefetch}; target >= 1000)")

    if args.memory_n:
        rate, _, samples = await measure_herald(args.memory_n, args.prefetch, 0, log_dir)
        marks = [samples[int(len(samples) * f)] for f in (0.1, 0.25, 0.5, 0.75)] + [samples[-1]]
        print(f"memory while {args.memory_n} messages flow ({rate:.0f}/s): "
              + ", ".join(f"{sent} sent → {rss:.0f} MiB" for sent, rss in marks))
        growth = marks[-1][1] - marks[0][1]
        print(f"RSS growth from 10 % to 100 % of the run: {growth:+.1f} MiB")


if __name__ == "__main__":
    # The event loop `herald run` uses, so that the ceiling compares like with like.
    uvloop.run(main())
