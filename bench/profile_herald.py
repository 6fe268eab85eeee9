"""Where Herald's time goes: `herald run` under py-spy while it drains N requests.

Usage: python bench/profile_herald.py [--n 20000] [--latency-ms 0] [--out DIR]

Publishes N send requests for the http channel, starts the minimal responder
(bench/common.py) and `herald run --channels http` with its defaults, samples
it with py-spy (`pip install py-spy`) until the queue is drained, and prints
the functions that hold the most samples, by own time and including callees,
with the share of all samples. The raw profile (collapsed stacks) stays in
DIR for flame graphs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import sys
from collections import Counter
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    AMQP_URL,
    Fixture,
    free_port,
    serve_minimal,
    start_process,
    wait_http,
)

REPO = Path(__file__).resolve().parent.parent


def summarise(raw: Path, top: int = 40) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
    print(f"\n{total} samples. Own time:")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f} %  {frame}")
    print("\nIncluding callees (Herald's and its libraries' functions):")
    shown = 0
    for frame, n in inclusive.most_common():
        if any(k in frame for k in ("consumer/", "aio_pika", "aiormq", "asyncpg", "aiohttp",
                                    "structlog", "pydantic", "prometheus")):
            print(f"  {100 * n / total:5.1f} %  {frame}")
            shown += 1
            if shown >= top:
                break


def _short(frame: str) -> str:
    # "function (path/to/file.py:line)" → "function (file path from the package)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=REPO / ".local" / "profile")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "herald.collapsed"
    port = free_port()
    responder = multiprocessing.Process(target=serve_minimal, args=(port, args.latency_ms),
                                        daemon=True)
    responder.start()
    async with Fixture() as fx:
        await fx.publish(args.n, f"http://127.0.0.1:{port}/hook")
        env = {"HERALD_PREFIX": fx.prefix, "HERALD_DATABASE_URL": fx.db_url,
               "HERALD_AMQP_URL": AMQP_URL, "HERALD_HTTP_HOST": "127.0.0.1",
               "HERALD_HTTP_PORT": str(free_port()), "HERALD_ADMIN_PORT": str(free_port()),
               "HERALD_HTTP_ALLOW_NETWORKS": "127.0.0.0/8"}
        herald = await start_process(["run", "--channels", "http"], env,
                                     args.out / "herald.log")
        spy = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(herald.pid), "--format", "raw", "--rate", "200",
            "--output", str(raw), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        db = await asyncpg.connect(fx.db_url)
        try:
            await wait_http(f"http://127.0.0.1:{env['HERALD_HTTP_PORT']}/healthz")
            while True:
                sent = await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'")
                if sent >= args.n:
                    break
                await asyncio.sleep(0.5)
            elapsed = await db.fetchval(
                "SELECT extract(epoch FROM max(sent_at) - min(sending_at)) FROM messages")
            print(f"{args.n} sent in {elapsed:.1f} s ({args.n / float(elapsed):.0f}/s, "
                  "under py-spy)")
        finally:
            await db.close()
            spy.send_signal(2)
            await spy.wait()
            herald.terminate()
            await herald.wait()
    responder.terminate()
    summarise(raw)


if __name__ == "__main__":
    asyncio.run(main())
