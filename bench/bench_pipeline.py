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
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import cast

import aio_pika
import aiohttp
import asyncpg
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consumer.migrate import migrate  # noqa: E402
from consumer.topology import Names, Topology  # noqa: E402

AMQP_URL = os.environ.get("HERALD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5673/")
DATABASE_URL = os.environ.get(
    "HERALD_DATABASE_URL", "postgresql://herald:herald@127.0.0.1:5433/herald"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fixture:
    """A fresh prefix (declared) and schema (migrated), removed afterwards."""

    def __init__(self) -> None:
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.schema = f"bench_{uuid.uuid4().hex[:8]}"
        self.names = Names(self.prefix)
        self.db_url = f"{DATABASE_URL}?search_path={self.schema}"

    async def __aenter__(self) -> Fixture:
        self.connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await self.connection.channel()
        await Topology(self.names).declare(channel)
        await channel.close()
        admin = await asyncpg.connect(DATABASE_URL)
        await admin.execute(f"CREATE SCHEMA {self.schema}")
        await admin.close()
        conn = await asyncpg.connect(self.db_url)
        await migrate(conn)
        await conn.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        channel = await self.connection.channel()
        topology = Topology(self.names)
        for q in topology.queues:
            await channel.queue_delete(q["name"])
        for e in topology.exchanges:
            await channel.exchange_delete(e["name"])
        await self.connection.close()
        admin = await asyncpg.connect(DATABASE_URL)
        await admin.execute(f"DROP SCHEMA {self.schema} CASCADE")
        await admin.close()

    async def publish(self, n: int, to: str) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.names.exchange, ensure=False)
        window = 1000
        for start in range(0, n, window):
            await asyncio.gather(*(
                exchange.publish(
                    aio_pika.Message(
                        json.dumps({"message_id": f"b-{i}", "channel": "http", "to": to,
                                    "body": {"n": i}}).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    "send.http",
                )
                for i in range(start, min(n, start + window))
            ))
        await channel.close()

    async def depth(self) -> int:
        channel = await self.connection.channel()
        queue = await channel.declare_queue(self.names.send_queue("http"), passive=True)
        await channel.close()
        return int(queue.declaration_result.message_count or 0)


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

        processes = {"rabbitmq": pids_named("beam.smp")}
        if endpoint_pid is not None:
            processes["endpoint"] = [endpoint_pid]
        t0, c0 = time.perf_counter(), time.process_time()
        start = {name: cpu_of(pids) for name, pids in processes.items()}
        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - t0
        per_delivery = report_cpu(n, elapsed, consumer=time.process_time() - c0, **{
            name: cpu_of(pids) - start[name] for name, pids in processes.items()})
        await session.close()
        await connection.close()
        return n / elapsed, per_delivery


def report_cpu(n: int, elapsed: float, **used: float) -> float:
    """Print each process's share of a core and the CPU per delivery; return µs/delivery."""
    per_delivery = 1e6 * sum(used.values()) / n
    print("    cpu share of one core: " + ", ".join(
        f"{name} {cpu / elapsed:.0%}" for name, cpu in used.items())
        + f"; all processes {per_delivery:.0f} µs CPU per delivery", flush=True)
    return per_delivery


class MinimalResponder(asyncio.Protocol):
    """The cheapest HTTP/1.1 keep-alive endpoint: answers every request 200 "ok".

    Only for the floor measurement: it parses just enough (end of headers,
    Content-Length) to find where each request ends.
    """

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(self.RESPONSE)


def serve_minimal(port: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            MinimalResponder, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


async def start_process(
    args: list[str], env: dict[str, str], log: Path
) -> asyncio.subprocess.Process:
    handle = log.open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *args, env={**os.environ, **env},
        stdout=handle, stderr=handle, cwd=str(REPO),
    )
    handle.close()
    return proc


async def wait_http(url: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {within_s} s")
            await asyncio.sleep(0.1)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                found.append(int(entry.name))
    return found


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


class CpuMeter:
    """CPU used by named processes, counting ones that start during the run
    (PostgreSQL starts a backend per new connection)."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.start = {pid: cpu_of([pid]) for pid in pids_named(*names)}

    def used(self) -> float:
        now = {pid: cpu_of([pid]) for pid in pids_named(*self.names)}
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in now.items())


def batch_summary(exposition: str) -> str:
    """Mean group-commit batch size and time, from Herald's own metrics."""
    values: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith(("herald_db_batch_size_", "herald_db_batch_seconds_")) and (
                "_sum{" in line or "_count{" in line):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    parts = []
    for kind in ("claims", "records"):
        count = values.get(f'herald_db_batch_size_count{{kind="{kind}"}}', 0.0)
        if count:
            size = values[f'herald_db_batch_size_sum{{kind="{kind}"}}'] / count
            secs = values[f'herald_db_batch_seconds_sum{{kind="{kind}"}}'] / count
            parts.append(f"{kind}: {count:.0f} batches, mean {size:.1f} items, "
                         f"{secs * 1000:.1f} ms")
    return "db batches: " + "; ".join(parts)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
            broker_meter, database_meter = CpuMeter("beam.smp"), CpuMeter("postgres")

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
