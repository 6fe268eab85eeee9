"""Connecting to RabbitMQ: one node, or any node of a cluster.

``HERALD_AMQP_URL`` names one node, or several nodes of one cluster separated
by commas. Quorum queues are replicated to every node and any node serves
any queue, so Herald needs a connection to *some* live node:

- :func:`connect_robust` (the service, ``herald publish``) connects to the
  first node that answers and, whenever that connection is lost, to the next
  node of the list, round and round until one answers. aio-pika's robust
  connection then restores every channel, queue and consumer on the new
  node, so the consumers, the publishers and the roles' components follow
  without knowing. (aio-pika takes one URL; :class:`ClusterConnection`
  changes the URL between its attempts.)
- :func:`connect` (``herald topology declare``, the parking-queue tools)
  opens a plain connection to the first node that answers. An ordered pass
  over the parking lot must not be resumed by a reconnection (it would take
  the messages in another order), so a tool whose connection is lost stops
  with an error and is simply run again: the broker has returned what it held.

Passwords never appear in what this module logs (:func:`node_name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustChannel, UnderlayConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from consumer import metrics
from consumer.errors import BrokerUnreachable
from consumer.settings import split_urls

log = structlog.get_logger("herald.broker")

# Seconds between two attempts to reach a node after the connection was lost
# (the first attempt, on the next node, is made at once).
RECONNECT_INTERVAL_S = 2.0
# How long one node may take to accept a connection before the next is tried.
CONNECT_TIMEOUT_S = 10.0


def node_name(url: str | URL) -> str:
    """``host:port`` of a node: how logs, metrics and errors name it (never the password)."""
    parsed = URL(str(url))
    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    host = parsed.host or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClusterConnection(RobustConnection):
    """A robust connection that tries the next node each time it connects again.

    aio-pika's robust connection reconnects to ``self.url``, and clears
    ``self.transport`` just before each attempt; here ``url`` is the current
    node, and clearing the transport after the first successful connection
    moves on to the next node. So a lost connection is followed at once by
    an attempt on another node, and a node that refuses by one on the next.
    """

    def __init__(self, urls: Sequence[str], first: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self.nodes = tuple(URL(u) for u in urls)
        self._node = first % len(self.nodes)
        self._connected_once = False
        self._transport: UnderlayConnection | None = None
        kwargs.setdefault("reconnect_interval", RECONNECT_INTERVAL_S)
        super().__init__(self.nodes[self._node], **kwargs)

    @property
    def url(self) -> URL:
        return self.nodes[self._node]

    @url.setter
    def url(self, value: URL) -> None:
        # Only aio-pika's constructor sets it, to the first node given.
        assert value == self.nodes[self._node], "ClusterConnection chooses its own node"

    @property
    def transport(self) -> UnderlayConnection | None:
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        if value is None and self._connected_once and not self._close_called:
            self._node = (self._node + 1) % len(self.nodes)
        self._transport = value

    @property
    def node(self) -> str:
        """The node this connection uses (or tries) now, as ``host:port``."""
        return node_name(self.url)

    async def _on_connected(self) -> None:
        again = self._connected_once
        self._connected_once = True
        await super()._on_connected()
        if again:
            metrics.BROKER_RECONNECTS.labels(self.node).inc()
            log.warning("broker.reconnected", node=self.node)

    def __str__(self) -> str:
        return self.node


Nodes = str | Sequence[str]  # "url1,url2" as in HERALD_AMQP_URL, or the URLs


def _ordered(urls: Nodes) -> list[str]:
    nodes = list(split_urls(urls) if isinstance(urls, str) else urls)
    if not nodes:
        raise BrokerUnreachable("no broker URL given")
    return nodes


async def connect_robust(urls: Nodes, *, name: str | None = None,
                         timeout_s: float = CONNECT_TIMEOUT_S) -> ClusterConnection:
    """A robust connection to the first node of ``urls`` that answers (see the
    module's docstring); raises :class:`BrokerUnreachable` when none does."""
    nodes = _ordered(urls)
    failures: list[str] = []
    properties = {"connection_name": name} if name else None
    for index in range(len(nodes)):
        connection = ClusterConnection(nodes, first=index, client_properties=properties)
        try:
            await connection.connect(timeout=timeout_s)
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            failures.append(f"{node_name(nodes[index])}: {_reason(exc)}")
            await _close_quietly(connection)
            continue
        log.info("broker.connected", node=connection.node, nodes=len(nodes))
        return connection
    raise BrokerUnreachable("cannot reach RabbitMQ at " + "; ".join(failures))


async def connect(urls: Nodes, *,
                  timeout_s: float = CONNECT_TIMEOUT_S) -> AbstractConnection:
    """A plain connection to the first node of ``urls`` that answers; raises
    :class:`BrokerUnreachable` when none does."""
    failures: list[str] = []
    for url in _ordered(urls):
        try:
            return await aio_pika.connect(url, timeout=timeout_s)
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            failures.append(f"{node_name(url)}: {_reason(exc)}")
    raise BrokerUnreachable("cannot reach RabbitMQ at " + "; ".join(failures))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def _close_quietly(connection: AbstractConnection) -> None:
    try:
        await connection.close()
    except Exception as exc:
        log.debug("broker.close_failed", error=repr(exc))


async def watch_cancellations(channel: AbstractRobustChannel, queue: str) -> None:
    """Log and count every consumer the broker cancels on ``channel`` (which
    consumes ``queue``), on this AMQP channel and on each one that replaces it."""

    def cancelled(frame: aiormq.spec.Basic.Cancel) -> None:
        metrics.CONSUMER_CANCELLED.labels(queue).inc()
        log.warning("consumer.cancelled_by_broker", queue=queue,
                    consumer_tag=frame.consumer_tag,
                    note="consuming again once the queue is there")

    async def attach(*_: object) -> None:
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(cancelled)

    await attach()
    channel.reopen_callbacks.add(attach)
