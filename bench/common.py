"""Pieces the benchmarks share: Herald's fixture, processes and their CPU, the endpoint.

Used by bench_pipeline.py (`make bench`), bench_events.py (`make bench-events`)
and bench_peers.py (`make bench-peers`). CPU is read from /proc, so the
benchmarks run on Linux with the services on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg
import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
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


def send_request(i: int, to: str) -> dict[str, object]:
    """The i-th send request of a run, the same for Herald and every peer."""
    return {"message_id": f"b-{i}", "channel": "http", "to": to, "body": {"n": i}}


class Fixture:
    """A fresh prefix (declared) and schema (migrated), removed afterwards."""

    def __init__(self) -> None:
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.schema = f"bench_{uuid.uuid4().hex[:8]}"
        self.names = Names(self.prefix)
        self.db_url = f"{DATABASE_URL}?search_path={self.schema}"

    async def __aenter__(self) -> Fixture:
        self.connection = await aio_pika.connect_robust(AMQP_URL)
        await Topology(self.names).declare(self.connection)
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

    async def publish(self, n: int, to: str, *, first: int = 0) -> None:
        """Publish send requests first … first+n-1 to the http channel, confirmed."""
        channel = await self.connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.names.exchange, ensure=False)
        window = 1000
        for start in range(first, first + n, window):
            await asyncio.gather(*(
                exchange.publish(
                    aio_pika.Message(
                        json.dumps(send_request(i, to)).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    "send.http",
                )
                for i in range(start, min(first + n, start + window))
            ))
        await channel.close()

    async def depth(self) -> int:
        channel = await self.connection.channel()
        queue = await channel.declare_queue(self.names.send_queue("http"), passive=True)
        await channel.close()
        return int(queue.declaration_result.message_count or 0)


def report_cpu(n: int, elapsed: float, **used: float) -> float:
    """Print each process's share of a core and the CPU per delivery; return µs/delivery."""
    per_delivery = 1e6 * sum(used.values()) / n
    print("    cpu share of one core: " + ", ".join(
        f"{name} {cpu / elapsed:.0%}" for name, cpu in used.items())
        + f"; all processes {per_delivery:.0f} µs CPU per delivery", flush=True)
    return per_delivery


class MinimalResponder(asyncio.Protocol):
    """The cheapest HTTP/1.1 keep-alive endpoint: answers every request 200 "ok".

    It parses just enough (end of headers, Content-Length) to find where each
    request ends. With a latency it answers that long after the request ended;
    clients send one request at a time per connection, so answers stay in order.
    """

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s

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
            if self.latency_s:
                asyncio.get_running_loop().call_later(self.latency_s, self.answer)
            else:
                self.transport.write(self.RESPONSE)

    def answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.RESPONSE)


def serve_minimal(port: int, latency_ms: float = 0.0) -> None:
    """Run a MinimalResponder on 127.0.0.1:port until killed (a process's target)."""
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: MinimalResponder(latency_ms / 1000), "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


async def start_process(
    args: list[str], env: dict[str, str], log: Path
) -> asyncio.subprocess.Process:
    """`python -m consumer ARGS` (Herald) with its output appended to log."""
    return await spawn([sys.executable, "-m", "consumer", *args], env, log, cwd=REPO)


async def spawn(
    argv: list[str], env: dict[str, str], log: Path, *, cwd: Path
) -> asyncio.subprocess.Process:
    """Start argv in its own session (so that its whole group can be stopped)
    with env added to ours and its output appended to log."""
    handle = log.open("ab")
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **env}, stdout=handle, stderr=handle, cwd=str(cwd),
        start_new_session=True,
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


async def stop(proc: asyncio.subprocess.Process, grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL to its process group (workers it forked) after grace_s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes() -> dict[int, tuple[int, float]]:
    """Every visible process: pid → (parent pid, CPU seconds used so far)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    # Read many times a second while a run is measured: raw reads cost half of open().
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
                try:
                    data = os.read(fd, 4096)
                finally:
                    os.close(fd)
            except OSError:
                continue
            fields = data.rsplit(b")", 1)[1].split()
            found[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return found


def descendants(roots: Iterable[int], table: dict[int, tuple[int, float]]) -> set[int]:
    """roots and every process below them in table."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def listening_pid(port: int) -> int | None:
    """The process listening on TCP port (any local address), if visible to us."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{entry.name}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) in inodes:
                            return int(entry.name)
    return None


def service_pids() -> dict[str, int]:
    """The RabbitMQ and PostgreSQL server processes behind HERALD_AMQP_URL and
    HERALD_DATABASE_URL, found by their listening port.

    Only these (and their children, such as PostgreSQL's backends) are counted:
    other brokers and databases on a shared machine are not ours.
    """
    found = {}
    for name, url in (("rabbitmq", AMQP_URL), ("postgres", DATABASE_URL)):
        parts = urlsplit(url)
        port = parts.port or (5672 if name == "rabbitmq" else 5432)
        pid = listening_pid(port)
        if pid is None:
            raise RuntimeError(f"no process of ours listens on port {port} ({name}); "
                               "the benchmarks count CPU of local services only")
        found[name] = pid
    return found


class CpuMeter:
    """CPU used by the process trees under some root pids, counting processes
    that start during the run (PostgreSQL starts a backend per new connection)."""

    def __init__(self, *roots: int) -> None:
        self.roots = roots
        table = processes()
        self.start = {pid: table[pid][1] for pid in descendants(roots, table)}

    def used(self) -> float:
        table = processes()
        return sum(table[pid][1] - self.start.get(pid, 0.0)
                   for pid in descendants(self.roots, table))


def service_meters() -> tuple[CpuMeter, CpuMeter]:
    """CPU meters of our broker and our database, started now."""
    pids = service_pids()
    return CpuMeter(pids["rabbitmq"]), CpuMeter(pids["postgres"])


class CpuSampler:
    """Cumulative CPU seconds of named groups of process trees, sampled in the
    background, so that the CPU a group spent between two instants (wall-clock
    time, as PostgreSQL's now()) can be read afterwards by interpolation.

    A process that exits keeps the CPU it had at its last sample; one that
    appears counts all it has used since it started.
    """

    def __init__(self, groups: dict[str, list[int]], interval_s: float = 0.25) -> None:
        self.groups = groups
        self.interval_s = interval_s
        self.seen: dict[str, dict[int, float]] = {name: {} for name in groups}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        table = processes()
        now = time.time()
        totals = {}
        for name, roots in self.groups.items():
            seen = self.seen[name]
            for pid in descendants(roots, table):
                seen[pid] = max(seen.get(pid, 0.0), table[pid][1])
            totals[name] = sum(seen.values())
        self.samples.append((now, totals))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> CpuSampler:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        self.sample()

    def at(self, t: float) -> dict[str, float]:
        """Each group's cumulative CPU at time t, linear between samples."""
        samples = self.samples
        if t <= samples[0][0]:
            return samples[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t <= t1:
                f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return {name: c0[name] + f * (c1[name] - c0[name]) for name in c0}
        return samples[-1][1]

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds each group used from t0 to t1."""
        start, end = self.at(t0), self.at(t1)
        return {name: end[name] - start[name] for name in start}


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
