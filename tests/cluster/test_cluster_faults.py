"""Herald on a 3-node cluster while nodes crash (issue #13).

Each test runs a few hundred messages, a third of which fail once and so
wait in a delay queue for their retry, and SIGKILLs a node mid-run: the one
that leads the send queue, or the one Herald is connected to. The node is
started again while the run goes on. Nothing may be lost; a provider may see
a message twice only in the documented window (an ``abandoned`` attempt),
and every copy the broker gave again is counted as a suppressed duplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest
from prometheus_client import REGISTRY

from consumer.broker import ClusterConnection, node_name
from consumer.service import Service
from consumer.settings import Settings
from consumer.topology import Names, Topology
from tests.cluster.conftest import cluster_sh
from tests.conftest import RunningSandbox, herald_env
from tests.helpers import publish_all, request, wait_for
from tests.integration.test_faults import _duplicates_within_window

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.cluster]

TOTAL = 300
# 10 sends at a time of 200 ms each: about 50 a second, so the run lasts
# long enough (6 s and the retries) for the kill to land in its middle.
PREFETCH = 10
LATENCY_MS = 200


@pytest.fixture
async def cluster_prefix(cluster: list[str]) -> AsyncIterator[str]:
    """A fresh prefix whose topology is declared through node 1; deleted afterwards
    through whichever node answers."""
    name = f"c{uuid.uuid4().hex[:10]}"
    topology = Topology(Names(name))
    connection = await aio_pika.connect(cluster[0])
    async with connection:
        assert await topology.declare(connection) == []
    yield name
    for url in cluster:
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception:
            continue
        async with connection:
            channel = await connection.channel()
            for q in topology.queues:
                await channel.queue_delete(q["name"])
            for e in topology.exchanges:
                await channel.exchange_delete(e["name"])
        break


def _node_of(urls: list[str], name: str) -> int:
    """Which node (1-3) ``name`` (``host:port``) is."""
    return [node_name(u) for u in urls].index(name) + 1


async def _leader(queue: str) -> int:
    return int((await cluster_sh("leader", queue)).strip())


async def _sent(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'"))


def _duplicates() -> float:
    return REGISTRY.get_sample_value("herald_duplicates_suppressed_total",
                                     {"channel": "http"}) or 0.0


async def _run_with_a_node_killed(
    cluster: list[str], prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, victim: str,
) -> None:
    names = Names(prefix)
    leader = await _leader(names.send_queue("http"))
    # Herald connects to a node that does not lead the send queue, so the two
    # faults are apart: the leader's node, or the node Herald is connected to.
    first = next(n for n in (1, 2, 3) if n != leader)
    urls = cluster[first - 1:] + cluster[:first - 1]
    settings = Settings.from_env(herald_env(
        prefix, db_url, HERALD_AMQP_URL=",".join(urls), HERALD_PREFETCH=str(PREFETCH)))
    service = Service(settings, serve_http=False)
    await service.start()
    killed: int | None = None
    try:
        assert isinstance(service.connection, ClusterConnection)
        connected = _node_of(cluster, service.connection.node)
        assert connected == first != leader
        kill = leader if victim == "leader" else connected
        duplicates = _duplicates()

        ok = sandbox.url("ok", latency_ms=LATENCY_MS)
        retry = sandbox.url("retry", fail=1, latency_ms=LATENCY_MS)
        requests = [request(f"m-{i}", retry if i % 3 == 0 else ok) for i in range(TOTAL)]
        connection = await aio_pika.connect(cluster[kill % 3])  # a node that stays up
        async with connection:
            await publish_all(connection, prefix, requests)  # type: ignore[arg-type]

        retried = TOTAL // 3 + (TOTAL % 3 > 0)
        await wait_for(lambda: _progress(db, 60), timeout=60, what="60 sent before the kill")
        sent_at_kill = await _sent(db)
        retries_done = await _retries_sent(db)
        await cluster_sh("kill", str(kill))
        killed = kill
        assert sent_at_kill + 30 <= TOTAL and retries_done < retried, \
            "the kill should land mid-run, with retries still waiting"

        await wait_for(lambda: _progress(db, sent_at_kill + 30), timeout=60, interval=0.5,
                       what="30 more sent with the node down")
        await cluster_sh("start-node", str(kill))
        killed = None
        await wait_for(lambda: _progress(db, TOTAL), timeout=120, interval=0.5,
                       what=f"all {TOTAL} sent")
        status = await cluster_sh("status")
        assert status.count(": running (") == 3, status
    finally:
        await service.stop()
        if killed is not None:  # the test failed with the node down: the next needs it
            await cluster_sh("start-node", str(killed), check=False)

    accepted = sandbox.sandbox.accepted_counts()
    assert set(accepted) == {f"m-{i}" for i in range(TOTAL)}  # nothing lost
    extras = await _duplicates_within_window(db, sandbox)
    abandoned = await db.fetchval(
        "SELECT count(*) FROM delivery_attempts WHERE outcome = 'abandoned'")
    suppressed = _duplicates() - duplicates
    # The process never died: every claim it made was resolved by itself.
    assert extras == 0 and abandoned == 0, (extras, abandoned)
    # A copy given again is one whose ack was lost with the node: at most what
    # was in flight (prefetch) when it died, plus what its delay queue re-sent.
    assert suppressed <= 2 * PREFETCH, suppressed
    print(f"killed node {kill} ({victim}); sent at kill {sent_at_kill}; "
          f"duplicates suppressed {suppressed:.0f}; provider duplicates {extras}")


async def _progress(db: asyncpg.Connection, n: int) -> bool:
    return await _sent(db) >= n


async def _retries_sent(db: asyncpg.Connection) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM messages WHERE status = 'sent' AND attempts > 1"))


async def test_sigkill_of_the_node_leading_the_send_queue_loses_nothing(
    cluster: list[str], cluster_prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox,
) -> None:
    await _run_with_a_node_killed(cluster, cluster_prefix, db_url, db, sandbox, "leader")


async def test_sigkill_of_the_node_herald_is_connected_to_loses_nothing(
    cluster: list[str], cluster_prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox,
) -> None:
    await _run_with_a_node_killed(cluster, cluster_prefix, db_url, db, sandbox, "connected")
