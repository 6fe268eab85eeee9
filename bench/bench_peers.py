"""Benchmark: Herald against its peers on the same work, side by side.

Every system does, per message: consume a JSON send request from RabbitMQ,
POST its body to the same HTTP endpoint (its own process), record the message
as sent in PostgreSQL (committed), then ack. One after the other, on the same
broker, database and endpoint:

- herald      `herald run --channels http` with its defaults, one process;
- faststream  a plain FastStream consumer: aiohttp POST, asyncpg upsert,
              prefetch 256, classic queue (bench/peers/faststream);
- dramatiq    a Dramatiq actor: requests POST, psycopg upsert, 2 processes ×
              16 threads (× 64 against the slow endpoint) (bench/peers/dramatiq);
- celery      a Celery task, acks_late: requests POST, psycopg upsert,
              prefork × 8 (threads × 128 against the slow endpoint)
              (bench/peers/celery).

Each peer runs from its own venv, .local/bench-venvs/NAME, made from its
requirements.txt on first use. Two scenarios: the endpoint answering at once
(10,000 messages) and after 200 ms (15,000 messages: at 3,000/s a run of
3,000 would last one second, and measure start-up). Messages are queued
before the consumer starts; a run is timed by the database, from the first
message recorded to the last, and the CPU of every process involved
(consumer processes summed, the broker, the endpoint, PostgreSQL with its
backends) is counted over that same window. Each configuration runs --repeat
times, systems interleaved; the tables show medians.

The endpoint is a minimal HTTP/1.1 responder (bench/common.py) rather than
`herald sandbox`: it costs a fraction of the sandbox's CPU per request, so
that the endpoint does not bound any system.

Finally Herald's RSS is sampled while --rss-messages flow through it (fed as
it drains, so the backlog stays small).

Usage: python bench/bench_peers.py [--repeat 3] [--messages-0ms 10000]
       [--messages-200ms 15000] [--systems herald,faststream,...] [--rss-messages N]
Each option also reads an environment variable (see --help).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    AMQP_URL,
    DATABASE_URL,
    REPO,
    CpuSampler,
    Fixture,
    batch_summary,
    free_port,
    rss_mib,
    serve_minimal,
    service_pids,
    spawn,
    start_process,
    stop,
    wait_http,
)

PEERS_DIR = REPO / "bench" / "peers"
VENVS = REPO / ".local" / "bench-venvs"
LOG_DIR = REPO / ".local" / "bench-peers"
GROUPS = ("consumer", "rabbitmq", "endpoint", "postgres")

# The peers' table: what a user of a task queue would keep per message.
PEER_TABLE = """
    DROP TABLE IF EXISTS bench_peer_messages;
    CREATE TABLE bench_peer_messages (
        message_id text PRIMARY KEY,
        recipient  text NOT NULL,
        status     text NOT NULL,
        attempts   integer NOT NULL,
        sent_at    timestamptz NOT NULL
    )
"""


@dataclass(frozen=True)
class Peer:
    """A peer implementation: its folder, its venv, and its worker's command line."""

    name: str
    worker: Callable[[Path, float], list[str]]  # (venv bin, endpoint latency ms) → argv

    @property
    def folder(self) -> Path:
        return PEERS_DIR / self.name

    @property
    def bin(self) -> Path:
        return VENVS / self.name / "bin"

    def ensure_venv(self) -> None:
        """Create the venv and install requirements.txt, unless already done for this text."""
        requirements = (self.folder / "requirements.txt").read_text()
        stamp = VENVS / self.name / ".bench-requirements"
        if stamp.exists() and stamp.read_text() == requirements:
            return
        print(f"installing the {self.name} peer into {VENVS / self.name}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / self.name)], check=True)
        subprocess.run([str(self.bin / "pip"), "install", "--disable-pip-version-check", "-q",
                        "-r", str(self.folder / "requirements.txt")], check=True)
        stamp.write_text(requirements)


PEERS = {
    "faststream": Peer("faststream", lambda b, _: [str(b / "faststream"), "run", "app:app"]),
    "dramatiq": Peer("dramatiq", lambda b, latency: [
        str(b / "dramatiq"), "tasks", "--path", ".", "--processes", "2",
        "--threads", "64" if latency else "16"]),
    "celery": Peer("celery", lambda b, latency: [
        str(b / "celery"), "-A", "tasks", "worker",
        *(["--pool", "threads", "--concurrency", "128"] if latency
          else ["--pool", "prefork", "--concurrency", "8"])]),
}
SYSTEMS = ("herald", *PEERS)


@dataclass(frozen=True)
class Scenario:
    latency_ms: float
    n: int

    @property
    def label(self) -> str:
        return f"{self.latency_ms:g} ms endpoint, {self.n:,} messages"


@dataclass(frozen=True)
class Run:
    rate: float  # deliveries per second
    cpu_us: dict[str, float]  # process group → CPU µs per delivery
    resent: int  # messages recorded with more than one attempt
    left: int  # messages still queued once the consumer stopped


class Services:
    """The processes whose CPU is counted besides the consumer's."""

    def __init__(self, endpoint_pid: int) -> None:
        pids = service_pids()
        self.roots = {"rabbitmq": [pids["rabbitmq"]], "endpoint": [endpoint_pid],
                      "postgres": [pids["postgres"]]}

    def sampler(self, consumer_pid: int) -> CpuSampler:
        return CpuSampler({"consumer": [consumer_pid], **self.roots})


async def drain(
    proc: asyncio.subprocess.Process, db: asyncpg.Connection, table: str, n: int,
    sampler: CpuSampler, log: Path,
) -> tuple[float, dict[str, float], int]:
    """Wait until n messages of table are sent; their rate, CPU µs per delivery
    of each group, and how many were recorded more than once."""
    last_count, last_progress = -1, time.monotonic()
    with sampler:
        while True:
            # Poll rarely: counting rows costs the database CPU, and the same for everyone.
            count = await db.fetchval(f"SELECT count(*) FROM {table} WHERE status = 'sent'")
            if count >= n:
                break
            if proc.returncode is not None:
                raise RuntimeError(f"the consumer exited ({proc.returncode}); see {log}")
            if count != last_count:
                last_count, last_progress = count, time.monotonic()
            elif time.monotonic() - last_progress > 60:
                raise RuntimeError(f"no progress for 60 s at {count}/{n}; see {log}")
            await asyncio.sleep(0.5)
    # Timed by the records themselves: from the first commit to the last, so
    # start-up (imports, connections, forks) and polling do not count. What the
    # first commit recorded was done before the window opened.
    row = await db.fetchrow(f"""
        SELECT extract(epoch FROM min(sent_at))::float8 AS first,
               extract(epoch FROM max(sent_at))::float8 AS last,
               count(*) FILTER (WHERE attempts > 1) AS resent
          FROM {table} WHERE status = 'sent'""")
    at_first = await db.fetchval(
        f"SELECT count(*) FROM {table} WHERE sent_at = (SELECT min(sent_at) FROM {table})")
    elapsed = row["last"] - row["first"]
    delivered = n - at_first
    if elapsed < 0.05 or delivered <= 0:
        raise RuntimeError(f"too few messages ({n}) to time a run")
    cpu = sampler.between(row["first"], row["last"])
    return delivered / elapsed, {g: 1e6 * cpu[g] / delivered for g in GROUPS}, row["resent"]


async def run_herald(sc: Scenario, url: str, services: Services) -> Run:
    log = LOG_DIR / "herald.log"
    async with Fixture() as fx:
        await fx.publish(sc.n, url)
        port = free_port()
        env = {"HERALD_PREFIX": fx.prefix, "HERALD_DATABASE_URL": fx.db_url,
               "HERALD_AMQP_URL": AMQP_URL, "HERALD_HTTP_HOST": "127.0.0.1",
               "HERALD_HTTP_PORT": str(free_port()), "HERALD_ADMIN_PORT": str(port),
               # the endpoint is on loopback, which the http channel refuses by default
               "HERALD_HTTP_ALLOW_NETWORKS": "127.0.0.0/8"}
        db = await asyncpg.connect(fx.db_url)
        proc = await start_process(["run", "--channels", "http"], env, log)
        try:
            rate, cpu, resent = await drain(proc, db, "messages", sc.n,
                                            services.sampler(proc.pid), log)
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{port}/metrics") as r:
                print("      herald " + batch_summary(await r.text()), flush=True)
        finally:
            await stop(proc)
            await db.close()
        return Run(rate, cpu, resent, await fx.depth())


async def queue_depth(connection: aio_pika.abc.AbstractConnection, name: str) -> int:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def run_peer(peer: Peer, sc: Scenario, url: str, services: Services) -> Run:
    log = LOG_DIR / f"{peer.name}.log"
    queue = f"bench-peers-{uuid.uuid4().hex[:8]}"
    env = {"BENCH_AMQP_URL": AMQP_URL, "BENCH_DATABASE_URL": DATABASE_URL, "BENCH_QUEUE": queue}
    db = await asyncpg.connect(DATABASE_URL)
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        await db.execute(PEER_TABLE)
        publisher = await spawn([str(peer.bin / "python"), "publish.py", str(sc.n), url],
                                env, log, cwd=peer.folder)
        if await publisher.wait():
            raise RuntimeError(f"{peer.name}'s publisher failed; see {log}")
        proc = await spawn(peer.worker(peer.bin, sc.latency_ms), env, log, cwd=peer.folder)
        try:
            rate, cpu, resent = await drain(proc, db, "bench_peer_messages", sc.n,
                                            services.sampler(proc.pid), log)
        finally:
            await stop(proc)
        # Unacked messages return to the queue when the worker's connection closes.
        return Run(rate, cpu, resent, await queue_depth(connection, queue))
    finally:
        channel = await connection.channel()
        # The peer's queue, Dramatiq's delay and dead-letter queues, Celery's exchange.
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            await channel.queue_delete(name)
        await channel.exchange_delete(queue)
        await connection.close()
        await db.execute("DROP TABLE IF EXISTS bench_peer_messages")
        await db.close()


def fmt_run(run: Run) -> str:
    parts = ", ".join(f"{g} {run.cpu_us[g]:.0f}" for g in GROUPS)
    extra = "".join([f"; {run.resent} RESENT" if run.resent else "",
                     f"; {run.left} LEFT IN THE QUEUE" if run.left else ""])
    return (f"{run.rate:7,.0f}/s   CPU µs/delivery: {parts} "
            f"(total {sum(run.cpu_us.values()):.0f}){extra}")


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def summarize(sc: Scenario, runs: dict[str, list[Run]], repeat: int) -> list[str]:
    """The scenario's table of medians and its targets, as lines."""
    def median_rate(system: str) -> float:
        return statistics.median(r.rate for r in runs[system])

    def median_cpu(system: str, group: str) -> float:
        return statistics.median(r.cpu_us[group] for r in runs[system])

    lines = [f"{sc.label}: medians of {repeat} run(s)",
             f"{'system':12} {'deliv./s':>9} {'herald ×':>9}   CPU µs per delivery: "
             + " ".join(f"{g:>9}" for g in GROUPS) + f" {'total':>7}"]
    herald = median_rate("herald") if "herald" in runs else None
    for system, system_runs in runs.items():
        rate = median_rate(system)
        ratio = f"{herald / rate:8.2f}×" if herald is not None else f"{'':9}"
        total = statistics.median(sum(r.cpu_us.values()) for r in system_runs)
        lines.append(f"{system:12} {rate:9,.0f} {ratio}   {'':21}"
                     + " ".join(f"{median_cpu(system, g):9.0f}" for g in GROUPS)
                     + f" {total:7.0f}")
    busiest = max((r for rs in runs.values() for r in rs),
                  key=lambda r: r.cpu_us["endpoint"] * r.rate)
    lines.append(f"endpoint (minimal responder, one process): at most "
                 f"{busiest.cpu_us['endpoint'] * busiest.rate / 1e6:.0%} of one core in any run")
    if herald is None:
        return lines
    targets: list[tuple[str, float, float]] = []  # (what, value, bound)
    ratio_targets = {"faststream": 2.0 if sc.latency_ms else 1.5}
    if not sc.latency_ms:
        ratio_targets["dramatiq"] = 3.0
    for peer, bound in ratio_targets.items():
        if peer in runs:
            targets.append((f"herald ≥ {bound:g}× {peer}", herald / median_rate(peer), bound))
    if sc.latency_ms:
        targets.append(("herald ≥ 3,000 deliveries/s", herald, 3000))
    lines.append("targets: " + "; ".join(
        f"{mark(value >= bound)} {what} ({value:,.2f})" for what, value, bound in targets))
    lines.append("         " + "; ".join(
        f"{mark(value <= bound)} {what} ≤ {bound:g} µs ({value:.0f})" for what, value, bound in (
            ("herald's CPU per delivery", median_cpu("herald", "consumer"), 250),
            ("PostgreSQL's", median_cpu("herald", "postgres"), 100))))
    return lines


async def herald_sent(session: aiohttp.ClientSession, port: int) -> float:
    """herald_messages_sent_total summed over its labels."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("herald_messages_sent_total"))


async def measure_rss(m: int, url: str) -> list[str]:
    """Herald's RSS while m messages flow through it, fed as it drains."""
    log = LOG_DIR / "herald-rss.log"
    async with Fixture() as fx:
        port = free_port()
        env = {"HERALD_PREFIX": fx.prefix, "HERALD_DATABASE_URL": fx.db_url,
               "HERALD_AMQP_URL": AMQP_URL, "HERALD_HTTP_HOST": "127.0.0.1",
               "HERALD_HTTP_PORT": str(free_port()), "HERALD_ADMIN_PORT": str(port),
               # the endpoint is on loopback, which the http channel refuses by default
               "HERALD_HTTP_ALLOW_NETWORKS": "127.0.0.0/8"}
        proc = await start_process(["run", "--channels", "http"], env, log)

        async def feed() -> None:
            published = 0
            while published < m:
                # A backlog of a few seconds' work: the curve is Herald's, not the queue's.
                if await fx.depth() > 20000:
                    await asyncio.sleep(0.5)
                    continue
                chunk = min(5000, m - published)
                await fx.publish(chunk, url, first=published)
                published += chunk

        samples: list[tuple[float, float, float]] = []  # (seconds, sent, RSS MiB)
        feeder: asyncio.Task[None] | None = None
        try:
            # Fed once Herald answers, so that the curve starts at its idle RSS.
            await wait_http(f"http://127.0.0.1:{port}/readyz")
            feeder = asyncio.create_task(feed())
            t0 = time.monotonic()
            async with aiohttp.ClientSession() as session:
                while True:
                    sent = await herald_sent(session, port)
                    samples.append((time.monotonic() - t0, sent, rss_mib(proc.pid)))
                    if sent >= m:
                        break
                    if proc.returncode is not None:
                        raise RuntimeError(f"herald exited; see {log}")
                    if feeder.done():
                        feeder.result()  # its error, if it failed
                    await asyncio.sleep(0.5)
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
            await stop(proc)
    seconds = samples[-1][0] - samples[0][0]
    rate = (samples[-1][1] - samples[0][1]) / seconds if seconds else float("nan")
    lines = [f"herald RSS while {m:,} messages flow ({rate:,.0f}/s over {seconds:.0f} s):"]
    marks = [samples[0]] + [next(s for s in samples if s[1] >= m * f / 10) for f in range(1, 11)]
    lines += [f"  {sent:>10,.0f} sent  {rss:7.1f} MiB" for _, sent, rss in marks]
    marks = marks[1:]
    rss_values = [rss for _, _, rss in samples]
    lines.append(f"  growth from 10 % to 100 %: {marks[-1][2] - marks[0][2]:+.1f} MiB; "
                 f"min {min(rss_values):.1f}, max {max(rss_values):.1f} MiB "
                 f"over {len(samples)} samples")
    return lines


async def versions(systems: list[str]) -> str:
    """Server and peer package versions, for the record."""
    connection = await aio_pika.connect(AMQP_URL)
    properties = connection.transport.connection.server_properties
    rabbitmq = properties.get("version", b"?")
    await connection.close()
    db = await asyncpg.connect(DATABASE_URL)
    postgres = await db.fetchval("SHOW server_version")
    await db.close()
    parts = [f"RabbitMQ {rabbitmq.decode() if isinstance(rabbitmq, bytes) else rabbitmq}",
             f"PostgreSQL {postgres}", f"Python {sys.version.split()[0]}"]
    for name in systems:
        if name in PEERS:
            for line in (PEERS[name].folder / "requirements.txt").read_text().splitlines():
                if line.lower().startswith(name):
                    parts.append(line.replace("[rabbit,cli]", "").replace("[rabbitmq]", ""))
    return ", ".join(parts)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def env_default(name: str, default: str) -> str:
    return os.environ.get(name) or default


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int,
                        default=int(env_default("BENCH_REPEAT", "3")),
                        help="runs per configuration, the median reported (BENCH_REPEAT)")
    parser.add_argument("--messages-0ms", type=int,
                        default=int(env_default("BENCH_MESSAGES_0MS", "10000")),
                        help="messages against the 0 ms endpoint, 0 to skip (BENCH_MESSAGES_0MS)")
    parser.add_argument("--messages-200ms", type=int,
                        default=int(env_default("BENCH_MESSAGES_200MS", "15000")),
                        help="messages against the 200 ms endpoint, 0 to skip "
                             "(BENCH_MESSAGES_200MS)")
    parser.add_argument("--systems", default=env_default("BENCH_SYSTEMS", ",".join(SYSTEMS)),
                        help="comma-separated, from " + ", ".join(SYSTEMS) + " (BENCH_SYSTEMS)")
    parser.add_argument("--rss-messages", type=int,
                        default=int(env_default("BENCH_RSS_MESSAGES", "100000")),
                        help="messages for Herald's RSS curve, 0 to skip; 1000000 for the "
                             "full figure (BENCH_RSS_MESSAGES)")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for name in systems:
        if name in PEERS:
            PEERS[name].ensure_venv()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old_log in LOG_DIR.glob("*.log"):  # each run's logs, not every run's
        old_log.unlink()
    print(f"start: {load()}; {os.cpu_count()} cores; logs in {LOG_DIR}", flush=True)
    report: list[str] = [await versions(systems)]

    scenarios = [Scenario(latency, n) for latency, n in
                 ((0, args.messages_0ms), (200, args.messages_200ms)) if n > 0]
    spawner = multiprocessing.get_context("spawn")
    for sc in scenarios:
        port = free_port()
        endpoint = spawner.Process(target=serve_minimal, args=(port, sc.latency_ms), daemon=True)
        endpoint.start()
        assert endpoint.pid is not None
        url = f"http://127.0.0.1:{port}/send"
        try:
            await wait_http(url)
            services = Services(endpoint.pid)
            runs: dict[str, list[Run]] = {s: [] for s in systems}
            print(f"\n{sc.label} ({load()})", flush=True)
            for i in range(args.repeat):
                for system in systems:
                    run = await (run_herald(sc, url, services) if system == "herald"
                                 else run_peer(PEERS[system], sc, url, services))
                    runs[system].append(run)
                    print(f"  run {i + 1} {system:10} {fmt_run(run)}", flush=True)
        finally:
            endpoint.kill()
            endpoint.join()
        report += ["", *summarize(sc, runs, args.repeat), f"(after it: {load()})"]

    if args.rss_messages and "herald" in systems:
        port = free_port()
        endpoint = spawner.Process(target=serve_minimal, args=(port, 0), daemon=True)
        endpoint.start()
        try:
            url = f"http://127.0.0.1:{port}/send"
            await wait_http(url)
            print(f"\nherald RSS while {args.rss_messages:,} messages flow ({load()})", flush=True)
            report += ["", *await measure_rss(args.rss_messages, url), f"(after it: {load()})"]
        finally:
            endpoint.kill()
            endpoint.join()

    print("\n".join(report))


if __name__ == "__main__":
    uvloop.run(main())
