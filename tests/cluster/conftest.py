"""The local 3-node cluster (deploy/local/cluster.sh) for the cluster fault tests.

It runs the RabbitMQ version of the run (``HERALD_LOCAL_RABBITMQ``, which
``make test-broker`` exports) on the ports of ``HERALD_LOCAL_CLUSTER_*``. The
session starts it if it is not running and then stops it again; a cluster
that was already running is left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import REPO


async def cluster_sh(*args: str, check: bool = True) -> str:
    """Run deploy/local/cluster.sh; its output (an assertion error if it fails)."""
    proc = await asyncio.create_subprocess_exec(
        "bash", str(REPO / "deploy" / "local" / "cluster.sh"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if check:
        assert proc.returncode == 0, f"cluster.sh {' '.join(args)}: {text}"
    return text


@pytest.fixture(scope="session")
async def cluster() -> AsyncIterator[list[str]]:
    """The AMQP URLs of the three nodes, node 1 first."""
    proc = await asyncio.create_subprocess_exec(
        "bash", str(REPO / "deploy" / "local" / "cluster.sh"), "status",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    was_running = await proc.wait() == 0
    if not was_running:
        await cluster_sh("start")
    yield (await cluster_sh("urls")).strip().split(",")
    if not was_running:
        await cluster_sh("stop")
