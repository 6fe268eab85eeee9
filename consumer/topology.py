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

**Queues that hold messages for people.** The parking queue and the events
queue are taken from and handed back over and over: every operator pass over
the parking lot returns the messages it leaves parked, and the events
consumer returns what it holds when its connection drops. Each hand-back
counts as a delivery, and RabbitMQ 4.0 and later drops a quorum-queue message
past its delivery limit (20 by default) when the queue has no dead-letter
target. So both queues (and ``{prefix}.escalations``, the parking notices
escalation counts) carry an explicit limit that no hand-back pattern
reaches (:data:`HOLD_LIMIT`; ``-1`` would mean "none" on 4.x but "drop at
once" on 3.10) and dead-letter into ``{prefix}.overflow``, which routes each
to its own ``{queue}.overflow``: nothing is ever dropped silently.
(deploy/local/BROKERS.md has the measurements.)

Queues declared by an older Herald lack those arguments, and RabbitMQ refuses
to declare a queue again with other arguments (``PRECONDITION_FAILED``).
:meth:`Topology.declare` reports such queues as outdated instead of failing;
docs/operations.md ("Queues declared by an older Herald") says how to rebuild
them without losing a message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, ExchangeType

from consumer.errors import TopologyMismatch
from schemas.send_request import CHANNELS

DELAY_LEVELS = 18
# Each channel has two queues: "main" for transactional messages (no campaign, or
# priority "high") and "bulk" for campaign traffic, consumed side by side so a
# one-time code never waits behind a million-message campaign. (Quorum queues
# have no message priorities in RabbitMQ 3.10, hence two queues.)
LANES: tuple[str, ...] = ("main", "bulk")
MAX_DELAY_S = 2**DELAY_LEVELS - 1
# The delivery limit of the queues that hold messages for people (parked,
# events, overflow): the same on RabbitMQ 3.10, 4.0 and 4.3, and out of reach
# of any number of operator passes or reconnections.
HOLD_LIMIT = 1_000_000

log = structlog.get_logger("herald.topology")


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

    @property
    def overflow(self) -> str:
        """The dead-letter exchange of the parking and events queues."""
        return f"{self.prefix}.overflow"

    def overflow_of(self, queue: str) -> str:
        """Where ``queue`` (the parking or the events queue) dead-letters to."""
        return f"{queue}.overflow"

    @property
    def holding(self) -> tuple[str, str, str]:
        """The queues that hold messages for people (and the parking notices that
        escalation counts for them), never drained by a TTL."""
        return (self.parked, self.events, self.escalations)


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

        exchange(n.overflow, "direct")
        for held in n.holding:
            queue(n.overflow_of(held), **{"x-delivery-limit": HOLD_LIMIT})
            bind(n.overflow, n.overflow_of(held), n.overflow_of(held))

        def holding_queue(name: str) -> None:
            queue(name, **{"x-delivery-limit": HOLD_LIMIT, "x-dead-letter-exchange": n.overflow,
                           "x-dead-letter-routing-key": n.overflow_of(name), **safe_dlx})

        holding_queue(n.parked)
        bind(n.parked, n.parked, n.parked)

        exchange(n.events)
        holding_queue(n.events)
        bind(n.events, n.events, "#")

        exchange(n.notifications)
        holding_queue(n.escalations)
        bind(n.notifications, n.escalations, "parked.#")

    def arguments_of(self, queue: str) -> dict[str, Any]:
        return next(q["arguments"] for q in self.queues if q["name"] == queue)

    async def declare(self, connection: AbstractConnection) -> list[Outdated]:
        """Declare everything; safe to repeat (same arguments each time).

        A parking or events queue that an older Herald declared with other
        arguments is left as it is and returned as :class:`Outdated` (see the
        module's docstring); any other queue declared with other arguments
        raises :class:`TopologyMismatch`.
        """
        outdated: list[Outdated] = []
        channel = await connection.channel()
        try:
            exchanges = {}
            for ex in self.exchanges:
                exchanges[ex["name"]] = await channel.declare_exchange(
                    ex["name"], ExchangeType(ex["type"]), durable=True
                )
            for q in self.queues:
                try:
                    await channel.declare_queue(q["name"], durable=True,
                                                arguments=q["arguments"])
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    # The broker closed the channel: go on in a fresh one.
                    await _close_quietly(channel)
                    channel = await connection.channel()
                    exchanges = {name: await channel.get_exchange(name, ensure=False)
                                 for name in exchanges}
                    said = _reply_text(exc)
                    if q["name"] not in self.names.holding:
                        raise TopologyMismatch(
                            f"queue {q['name']!r} exists with other arguments than Herald"
                            f" declares ({said}); see docs/operations.md") from None
                    outdated.append(Outdated(q["name"], said))
                    log.warning("topology.queue_outdated", queue=q["name"], broker_said=said,
                                fix="docs/operations.md: Queues declared by an older Herald")
            for b in self.bindings:
                source = exchanges[b["source"]]
                if b["destination_type"] == "queue":
                    queue = await channel.get_queue(b["destination"], ensure=False)
                    await queue.bind(source, b["routing_key"])
                else:
                    await exchanges[b["destination"]].bind(source, b["routing_key"])
        finally:
            await _close_quietly(channel)
        return outdated

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


@dataclass(frozen=True)
class Outdated:
    """A queue that exists with the arguments of an older Herald."""

    queue: str
    broker_said: str


def _reply_text(exc: aiormq.exceptions.ChannelPreconditionFailed) -> str:
    frame = exc.args[0] if exc.args else None
    return str(getattr(frame, "reply_text", None) or exc)[:300]


async def _close_quietly(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        try:
            await channel.close()
        except Exception as exc:
            log.debug("topology.channel_close_failed", error=repr(exc))


async def declare_all(amqp_urls: str | Sequence[str], topology: Topology) -> list[Outdated]:
    """Declare ``topology`` through the first node of ``amqp_urls`` that answers."""
    from consumer.broker import connect

    connection = await connect(amqp_urls)
    async with connection:
        return await topology.declare(connection)
