"""Exchanges and queues (DESIGN.md §4): names, declaration, export.

Why binary delay levels: RabbitMQ expires per-message TTLs only at the head
of a queue, so a single delay queue holding a 60 s message in front of a 5 s
one delays both by 60 s. Instead level L (0…17) has a queue whose every
message waits exactly 2**L seconds. A delay d is written as its 18 bits in
the routing key (most significant first), followed by the destination key;
each level's exchange sends a ``1`` bit through its queue and a ``0`` bit
straight on to the next level down. Level 0 ends at the deliver exchange,
which routes ``#.send.{channel}`` back to the channel's queue (and
``#.send.{channel}.bulk`` to its bulk queue).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType

from schemas.send_request import CHANNELS

DELAY_LEVELS = 18
# Each channel has two queues: "main" for transactional messages (no campaign, or
# priority "high") and "bulk" for campaign traffic, consumed side by side so a
# one-time code never waits behind a million-message campaign. (Quorum queues
# have no message priorities in RabbitMQ 3.10, hence two queues.)
LANES: tuple[str, ...] = ("main", "bulk")
MAX_DELAY_S = 2**DELAY_LEVELS - 1


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def exchange(self) -> str:
        return self.prefix

    def send_queue(self, channel: str, lane: str = "main") -> str:
        """The channel's queue: ``main`` (transactional) or ``bulk`` (campaigns)."""
        return f"{self.prefix}.send.{channel}" + ("" if lane == "main" else f".{lane}")

    @staticmethod
    def send_key(channel: str, lane: str = "main") -> str:
        return f"send.{channel}" + ("" if lane == "main" else f".{lane}")

    def delay(self, level: int) -> str:
        return f"{self.prefix}.delay.{level}"

    @property
    def delay_entry(self) -> str:
        return self.delay(DELAY_LEVELS - 1)

    @property
    def deliver(self) -> str:
        return f"{self.prefix}.delay.deliver"

    @property
    def parked(self) -> str:
        return f"{self.prefix}.parked"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def notifications(self) -> str:
        return f"{self.prefix}.notifications"

    @property
    def escalations(self) -> str:
        """The parking notices Herald's escalation counts (consumer.parking.escalation)."""
        return f"{self.prefix}.escalations"


def delay_routing_key(delay_s: int, destination: str) -> str:
    """``b17.b16.….b0.{destination}`` for a delay of ``delay_s`` whole seconds."""
    if not 0 <= delay_s <= MAX_DELAY_S:
        raise ValueError(f"delay must be 0..{MAX_DELAY_S} s, got {delay_s}")
    bits = format(delay_s, f"0{DELAY_LEVELS}b")
    return ".".join(bits) + "." + destination


def _level_pattern(level: int, bit: str) -> str:
    # The bit of level L is word number 17 - L (counting from 0) of the key.
    return "*." * (DELAY_LEVELS - 1 - level) + bit + ".#"


@dataclass
class Topology:
    """Everything Herald declares, as data: declared at start-up or exported."""

    names: Names
    delivery_limit: int = 20
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    queues: list[dict[str, Any]] = field(default_factory=list)
    bindings: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.names

        def exchange(name: str, kind: str = "topic") -> None:
            self.exchanges.append({"name": name, "type": kind})

        def queue(name: str, **arguments: Any) -> None:
            args: dict[str, Any] = {"x-queue-type": "quorum"}
            args.update(arguments)
            self.queues.append({"name": name, "arguments": args})

        def bind(source: str, destination: str, key: str, kind: str = "queue") -> None:
            self.bindings.append(
                {"source": source, "destination": destination, "routing_key": key,
                 "destination_type": kind}
            )

        # Dead-lettering at-least-once (RabbitMQ >= 3.10) needs reject-publish.
        safe_dlx = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}

        exchange(n.exchange)
        exchange(n.parked, "direct")
        for channel in CHANNELS:
            for lane in LANES:
                queue(
                    n.send_queue(channel, lane),
                    **{"x-delivery-limit": self.delivery_limit,
                       "x-dead-letter-exchange": n.parked,
                       "x-dead-letter-routing-key": n.parked, **safe_dlx},
                )
                bind(n.exchange, n.send_queue(channel, lane), n.send_key(channel, lane))

        exchange(n.deliver)
        for channel in CHANNELS:
            for lane in LANES:
                bind(n.deliver, n.send_queue(channel, lane), f"#.{n.send_key(channel, lane)}")

        for level in range(DELAY_LEVELS):
            below = n.delay(level - 1) if level > 0 else n.deliver
            exchange(n.delay(level))
            queue(
                n.delay(level),
                **{"x-message-ttl": (2**level) * 1000, "x-dead-letter-exchange": below,
                   **safe_dlx},
            )
            bind(n.delay(level), n.delay(level), _level_pattern(level, "1"))
            bind(n.delay(level), below, _level_pattern(level, "0"), "exchange")

        queue(n.parked)
        bind(n.parked, n.parked, n.parked)

        exchange(n.events)
        queue(n.events)
        bind(n.events, n.events, "#")

        exchange(n.notifications)
        queue(n.escalations)
        bind(n.notifications, n.escalations, "parked.#")

    async def declare(self, channel: AbstractChannel) -> None:
        """Declare everything; safe to repeat (same arguments each time)."""
        exchanges = {}
        for ex in self.exchanges:
            exchanges[ex["name"]] = await channel.declare_exchange(
                ex["name"], ExchangeType(ex["type"]), durable=True
            )
        for q in self.queues:
            await channel.declare_queue(q["name"], durable=True, arguments=q["arguments"])
        for b in self.bindings:
            source = exchanges[b["source"]]
            if b["destination_type"] == "queue":
                queue = await channel.get_queue(b["destination"], ensure=False)
                await queue.bind(source, b["routing_key"])
            else:
                await exchanges[b["destination"]].bind(source, b["routing_key"])

    def definitions(self, vhost: str = "/") -> dict[str, Any]:
        """RabbitMQ definitions JSON (importable with ``rabbitmqctl import_definitions``)."""
        return {
            "exchanges": [
                {"name": e["name"], "vhost": vhost, "type": e["type"], "durable": True,
                 "auto_delete": False, "internal": False, "arguments": {}}
                for e in self.exchanges
            ],
            "queues": [
                {"name": q["name"], "vhost": vhost, "durable": True, "auto_delete": False,
                 "arguments": q["arguments"]}
                for q in self.queues
            ],
            "bindings": [
                {"source": b["source"], "vhost": vhost, "destination": b["destination"],
                 "destination_type": b["destination_type"], "routing_key": b["routing_key"],
                 "arguments": {}}
                for b in self.bindings
            ],
        }


def export_json(topology: Topology) -> str:
    return json.dumps(topology.definitions(), indent=2) + "\n"


async def declare_all(amqp_url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel)
