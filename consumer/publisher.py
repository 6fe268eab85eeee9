"""Publishing with publisher confirms: a publish returns only once the broker
has taken responsibility for the message (written it to its quorum queues).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from consumer.topology import MAX_DELAY_S, Names, delay_routing_key
from consumer.wire import HEADER_DUE_AT, amqp_shortstr


class Unroutable(Exception):
    """The broker confirmed a mandatory message but could not route it anywhere."""


class Publisher:
    """Publishes to Herald's exchanges on one confirm-mode channel."""

    def __init__(self, connection: AbstractRobustConnection, names: Names) -> None:
        self.connection = connection
        self.names = names
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is not None and self._channel is not None and not self._channel.is_closed:
            return exchange
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self.connection.channel(publisher_confirms=True)
                self._exchanges.clear()
            exchange = self._exchanges.get(name)
            if exchange is None:
                exchange = await self._channel.get_exchange(name, ensure=False)
                self._exchanges[name] = exchange
            return exchange

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = "application/json",
        mandatory: bool = True,
        confirm_timeout_s: float = 30.0,
    ) -> None:
        """Publish persistently and wait for the broker's confirm.

        Raises on a nack, on an unroutable mandatory message, or on a
        connection problem; the caller decides whether to try again. A
        ``message_id`` or ``content_type`` that cannot be an AMQP short string
        (over 255 bytes) is left out rather than making the publish fail for
        good.
        """
        target = await self._exchange(exchange)
        message = aio_pika.Message(
            body,
            headers=dict(headers or {}),
            content_type=amqp_shortstr(content_type),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=amqp_shortstr(message_id),
            timestamp=datetime.now(UTC),
        )
        result = await target.publish(
            message, routing_key, mandatory=mandatory, timeout=confirm_timeout_s
        )
        if mandatory and not _is_ack(result):
            raise Unroutable(f"{exchange!r} could not route {routing_key!r}")

    async def publish_send(
        self,
        channel: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        lane: str = "main",
    ) -> None:
        await self.publish(
            self.names.exchange,
            self.names.send_key(channel, lane),
            body,
            headers=headers,
            message_id=message_id,
        )

    async def publish_delayed(
        self,
        channel: str,
        body: bytes,
        delay_s: int,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = "application/json",
        lane: str = "main",
    ) -> None:
        """Publish to the channel's queue after ``delay_s`` seconds, via the delay levels.

        Delays past one trip's maximum carry ``x-herald-due-at`` so the consumer
        sends the message round again instead of early.
        """
        all_headers = dict(headers or {})
        if delay_s > MAX_DELAY_S:
            all_headers[HEADER_DUE_AT] = int(time.time()) + delay_s
            delay_s = MAX_DELAY_S
        await self.publish(
            self.names.delay_entry,
            delay_routing_key(max(0, delay_s), self.names.send_key(channel, lane)),
            body,
            headers=all_headers,
            message_id=message_id,
            content_type=content_type,
        )

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


def _is_ack(result: object) -> bool:
    # aio-pika returns the Basic.Ack frame when confirmed and routed, and the
    # returned message itself when a mandatory publish was unroutable.
    return result is None or type(result).__name__ == "Ack"
