"""Topology (consumer/topology.py) as data, checked by simulating RabbitMQ routing.

The simulation follows what the broker does with the declared exchanges,
bindings and queue arguments: topic/direct routing (exchange-to-exchange
bindings included), a queue with ``x-message-ttl`` and no consumer expiring
every message after its TTL, and dead-lettering to ``x-dead-letter-exchange``
with the original routing key unless ``x-dead-letter-routing-key`` is set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest

from consumer.topology import (
    DELAY_LEVELS,
    HOLD_LIMIT,
    MAX_DELAY_S,
    Names,
    Topology,
    delay_routing_key,
    export_json,
)
from schemas.send_request import CHANNELS

PREFIX = "herald"


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more words."""
    p, k = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
        if j == len(k):
            return False
        return p[i] in ("*", k[j]) and match(i + 1, j + 1)

    return match(0, 0)


@dataclass
class Hop:
    queue: str
    ttl_ms: int | None


class Broker:
    """Just enough of RabbitMQ to follow one message through a Topology."""

    def __init__(self, topology: Topology) -> None:
        self.exchange_types = {e["name"]: e["type"] for e in topology.exchanges}
        self.queue_args = {q["name"]: q["arguments"] for q in topology.queues}
        self.bindings = topology.bindings

    def route(self, exchange: str, key: str, depth: int = 0) -> list[str]:
        """Queues a message published to ``exchange`` with ``key`` lands in (with repeats)."""
        assert depth < 50, f"exchange-to-exchange loop through {exchange}"
        kind = self.exchange_types[exchange]
        assert kind in ("topic", "direct"), kind
        found: list[str] = []
        for b in self.bindings:
            if b["source"] != exchange:
                continue
            matched = (
                topic_match(b["routing_key"], key) if kind == "topic" else b["routing_key"] == key
            )
            if not matched:
                continue
            if b["destination_type"] == "queue":
                found.append(b["destination"])
            else:
                found.extend(self.route(b["destination"], key, depth + 1))
        return found

    def follow(self, exchange: str, key: str) -> list[Hop]:
        """Every queue the message passes through until it rests in one without a TTL."""
        hops: list[Hop] = []
        queues = self.route(exchange, key)
        while True:
            assert len(queues) == 1, f"{key!r} from {exchange!r} routed to {queues}"
            name = queues[0]
            args = self.queue_args[name]
            ttl = args.get("x-message-ttl")
            hops.append(Hop(name, ttl))
            if ttl is None:
                return hops
            assert len(hops) <= 2 * DELAY_LEVELS, f"no end in sight: {hops}"
            dlx = args["x-dead-letter-exchange"]
            key = args.get("x-dead-letter-routing-key", key)
            queues = self.route(dlx, key)

    def dead_letter(self, queue: str, key: str) -> list[str]:
        args = self.queue_args[queue]
        return self.route(args["x-dead-letter-exchange"],
                          args.get("x-dead-letter-routing-key", key))


@pytest.fixture(scope="module")
def topology() -> Topology:
    return Topology(Names(PREFIX))


@pytest.fixture(scope="module")
def broker(topology: Topology) -> Broker:
    return Broker(topology)


# -- the matcher itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("send.sms", "send.sms", True),
        ("send.sms", "send.http", False),
        ("*.sms", "send.sms", True),
        ("*.sms", "sms", False),
        ("*.sms", "a.send.sms", False),
        ("#", "anything.at.all", True),
        ("#.send.sms", "send.sms", True),
        ("#.send.sms", "0.1.0.send.sms", True),
        ("#.send.sms", "0.1.0.send.sms.x", False),
        ("1.#", "1", True),
        ("1.#", "1.0.send.sms", True),
        ("1.#", "0.1.send.sms", False),
        ("*.*.1.#", "0.0.1.send.sms", True),
        ("*.*.1.#", "0.1.1.send.sms", True),
        ("*.*.1.#", "0.0.0.send.sms", False),
    ],
)
def test_topic_matcher(pattern: str, key: str, expected: bool) -> None:
    assert topic_match(pattern, key) is expected


# -- delay_routing_key ------------------------------------------------------------


def test_delay_routing_key_for_60_seconds_matches_the_design() -> None:
    key = delay_routing_key(60, "send.sms")
    assert key == "0." * 12 + "1.1.1.1.0.0.send.sms"


@pytest.mark.parametrize("delay", [0, 1, 2, 5, 60, 3600, 2**17, MAX_DELAY_S])
def test_delay_routing_key_is_18_bits_most_significant_first(delay: int) -> None:
    words = delay_routing_key(delay, "send.http").split(".")
    bits, destination = words[:DELAY_LEVELS], words[DELAY_LEVELS:]
    assert destination == ["send", "http"]
    assert set(bits) <= {"0", "1"}
    assert int("".join(bits), 2) == delay


def test_longest_delay_is_just_under_73_hours() -> None:
    assert MAX_DELAY_S == 2**18 - 1
    assert 72 * 3600 <= MAX_DELAY_S < 73 * 3600


@pytest.mark.parametrize("delay", [-1, MAX_DELAY_S + 1, 10**9])
def test_delay_routing_key_rejects_delays_out_of_range(delay: int) -> None:
    with pytest.raises(ValueError, match="delay must be"):
        delay_routing_key(delay, "send.sms")


# -- routing simulation -------------------------------------------------------------

FIXED_DELAYS = [0, 1, 2, 3, 5, 60, 3600, 2**17, 2**17 + 1, MAX_DELAY_S - 1, MAX_DELAY_S]
RANDOM_DELAYS = random.Random(20240301).sample(range(MAX_DELAY_S + 1), 200)


@pytest.mark.parametrize("delay", FIXED_DELAYS + RANDOM_DELAYS)
def test_delayed_message_waits_exactly_its_delay_and_lands_in_its_channel_queue(
    broker: Broker, delay: int
) -> None:
    names = Names(PREFIX)
    hops = broker.follow(names.delay_entry, delay_routing_key(delay, "send.sms"))
    *waits, final = hops
    assert final == Hop(f"{PREFIX}.send.sms", None)
    assert sum(h.ttl_ms for h in waits if h.ttl_ms is not None) == delay * 1000
    # Each set bit is one level's queue, highest first, each visited once.
    expected_levels = [lv for lv in reversed(range(DELAY_LEVELS)) if delay >> lv & 1]
    assert [h.queue for h in waits] == [names.delay(lv) for lv in expected_levels]


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("delay", [0, 1, 60, 4097, MAX_DELAY_S])
def test_every_channel_gets_its_delayed_messages_back(
    broker: Broker, channel: str, delay: int
) -> None:
    names = Names(PREFIX)
    hops = broker.follow(names.delay_entry, delay_routing_key(delay, names.send_key(channel)))
    assert hops[-1].queue == names.send_queue(channel)
    assert sum(h.ttl_ms or 0 for h in hops) == delay * 1000


def test_delays_work_with_a_dotted_prefix() -> None:
    names = Names("tenant-a.test_1")
    broker = Broker(Topology(names))
    hops = broker.follow(names.delay_entry, delay_routing_key(61, "send.whatsapp"))
    assert [h.queue for h in hops] == [
        names.delay(5), names.delay(4), names.delay(3), names.delay(2), names.delay(0),
        "tenant-a.test_1.send.whatsapp",
    ]
    assert sum(h.ttl_ms or 0 for h in hops) == 61_000


@pytest.mark.parametrize("channel", CHANNELS)
def test_publishing_send_channel_reaches_only_that_channels_queue(
    broker: Broker, channel: str
) -> None:
    assert broker.route(PREFIX, f"send.{channel}") == [f"{PREFIX}.send.{channel}"]


@pytest.mark.parametrize("key", ["send.pigeon", "sms", "send", "x.send.sms", "send.sms.x"])
def test_unknown_keys_on_the_main_exchange_reach_no_queue(broker: Broker, key: str) -> None:
    assert broker.route(PREFIX, key) == []


@pytest.mark.parametrize("channel", CHANNELS)
def test_channel_queues_have_a_delivery_limit_and_dead_letter_to_parked(channel: str) -> None:
    topology = Topology(Names(PREFIX), delivery_limit=7)
    queue = next(q for q in topology.queues if q["name"] == f"{PREFIX}.send.{channel}")
    args = queue["arguments"]
    assert args["x-queue-type"] == "quorum"
    assert args["x-delivery-limit"] == 7
    assert args["x-dead-letter-exchange"] == f"{PREFIX}.parked"
    assert args["x-dead-letter-strategy"] == "at-least-once"
    # at-least-once dead-lettering is only accepted together with reject-publish.
    assert args["x-overflow"] == "reject-publish"
    assert "x-message-ttl" not in args
    # Whatever key the message had, the dead letter ends in the parking queue.
    assert Broker(topology).dead_letter(queue["name"], f"send.{channel}") == [f"{PREFIX}.parked"]


def test_delay_queues_are_quorum_with_binary_ttls_and_safe_dead_lettering(
    topology: Topology,
) -> None:
    args_by_name = {q["name"]: q["arguments"] for q in topology.queues}
    names = Names(PREFIX)
    for level in range(DELAY_LEVELS):
        args = args_by_name[names.delay(level)]
        assert args["x-queue-type"] == "quorum"
        assert args["x-message-ttl"] == 2**level * 1000
        below = names.delay(level - 1) if level else names.deliver
        assert args["x-dead-letter-exchange"] == below
        assert "x-dead-letter-routing-key" not in args  # the key carries the remaining bits
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"


@pytest.mark.parametrize("held", ["parked", "events"])
def test_parked_and_events_queues_keep_their_messages(
    topology: Topology, broker: Broker, held: str,
) -> None:
    """No broker version may drop what they hold (issue #13): an explicit limit
    that means the same on 3.10, 4.0 and 4.3, and a dead-letter target."""
    name = f"{PREFIX}.{held}"
    args = topology.arguments_of(name)
    assert args["x-queue-type"] == "quorum"
    assert args["x-delivery-limit"] == HOLD_LIMIT >= 1_000_000  # never -1: 3.10 drops at once
    assert args["x-dead-letter-strategy"] == "at-least-once"
    assert args["x-overflow"] == "reject-publish"
    assert "x-message-ttl" not in args
    # Past the limit a message rests in the queue's own overflow queue, nowhere else.
    assert broker.dead_letter(name, "anything") == [f"{name}.overflow"]
    overflow = topology.arguments_of(f"{name}.overflow")
    assert overflow == {"x-queue-type": "quorum", "x-delivery-limit": HOLD_LIMIT}


def test_parked_and_events_exchanges_route_to_their_queues(broker: Broker) -> None:
    assert broker.route(f"{PREFIX}.parked", f"{PREFIX}.parked") == [f"{PREFIX}.parked"]
    assert broker.route(f"{PREFIX}.events", "twilio.delivered") == [f"{PREFIX}.events"]
    assert broker.route(f"{PREFIX}.overflow", "anything") == []


def test_everything_in_design_section_4_is_declared(topology: Topology) -> None:
    exchanges = {e["name"]: e["type"] for e in topology.exchanges}
    queues = {q["name"] for q in topology.queues}
    assert exchanges[PREFIX] == "topic"
    assert exchanges[f"{PREFIX}.events"] == "topic"
    assert exchanges[f"{PREFIX}.notifications"] == "topic"
    assert exchanges[f"{PREFIX}.delay.deliver"] == "topic"
    for level in range(DELAY_LEVELS):
        assert exchanges[f"{PREFIX}.delay.{level}"] == "topic"
        assert f"{PREFIX}.delay.{level}" in queues
    for channel in ("http", "sms", "whatsapp", "messenger"):
        assert f"{PREFIX}.send.{channel}" in queues
        assert f"{PREFIX}.send.{channel}.bulk" in queues  # campaign lane (issue #6)
    assert {f"{PREFIX}.parked", f"{PREFIX}.events"} <= queues
    assert {f"{PREFIX}.parked.overflow", f"{PREFIX}.events.overflow"} <= queues
    assert exchanges[f"{PREFIX}.overflow"] == "direct"
    assert all(q["arguments"]["x-queue-type"] == "quorum" for q in topology.queues)
    assert len(queues) == len(topology.queues) == 2 * len(CHANNELS) + DELAY_LEVELS + 6
    assert len(exchanges) == len(topology.exchanges)
    assert all(name == PREFIX or name.startswith(f"{PREFIX}.") for name in exchanges)
    assert all(name.startswith(f"{PREFIX}.") for name in queues)


def test_bindings_refer_only_to_declared_things(topology: Topology) -> None:
    exchanges = {e["name"] for e in topology.exchanges}
    queues = {q["name"] for q in topology.queues}
    for b in topology.bindings:
        assert b["source"] in exchanges, b
        target = queues if b["destination_type"] == "queue" else exchanges
        assert b["destination_type"] in ("queue", "exchange"), b
        assert b["destination"] in target, b
    for q in topology.queues:
        dlx = q["arguments"].get("x-dead-letter-exchange")
        assert dlx is None or dlx in exchanges, q


# -- definitions export ---------------------------------------------------------------


def _binding_tuple(b: dict[str, Any]) -> tuple[str, str, str, str]:
    return (b["source"], b["destination"], b["destination_type"], b["routing_key"])


def test_definitions_json_contains_everything(topology: Topology) -> None:
    exported = json.loads(export_json(topology))
    assert exported == topology.definitions()
    assert set(exported) >= {"exchanges", "queues", "bindings"}

    ex = {e["name"]: e for e in exported["exchanges"]}
    assert len(ex) == len(exported["exchanges"]) == len(topology.exchanges)
    for e in topology.exchanges:
        assert ex[e["name"]]["type"] == e["type"]
        assert ex[e["name"]]["durable"] is True
        assert ex[e["name"]]["auto_delete"] is False
        assert ex[e["name"]]["vhost"] == "/"

    qs = {q["name"]: q for q in exported["queues"]}
    assert len(qs) == len(exported["queues"]) == len(topology.queues)
    for q in topology.queues:
        assert qs[q["name"]]["arguments"] == q["arguments"]
        assert qs[q["name"]]["durable"] is True
        assert qs[q["name"]]["vhost"] == "/"

    assert sorted(map(_binding_tuple, exported["bindings"])) == sorted(
        map(_binding_tuple, topology.bindings)
    )
    assert len(exported["bindings"]) == len(topology.bindings)
    assert all(b["vhost"] == "/" for b in exported["bindings"])


def test_definitions_routing_matches_the_live_topology() -> None:
    """A broker built from the exported JSON routes delays the same way."""
    topology = Topology(Names(PREFIX), delivery_limit=3)
    exported = json.loads(export_json(topology))
    rebuilt = Topology(Names(PREFIX))
    rebuilt.exchanges[:] = [{"name": e["name"], "type": e["type"]} for e in exported["exchanges"]]
    rebuilt.queues[:] = [{"name": q["name"], "arguments": q["arguments"]}
                         for q in exported["queues"]]
    rebuilt.bindings[:] = [
        {"source": b["source"], "destination": b["destination"],
         "destination_type": b["destination_type"], "routing_key": b["routing_key"]}
        for b in exported["bindings"]
    ]
    hops = Broker(rebuilt).follow(f"{PREFIX}.delay.17", delay_routing_key(300, "send.sms"))
    assert hops[-1].queue == f"{PREFIX}.send.sms"
    assert sum(h.ttl_ms or 0 for h in hops) == 300_000
    send_sms = next(q for q in exported["queues"] if q["name"] == f"{PREFIX}.send.sms")
    assert send_sms["arguments"]["x-delivery-limit"] == 3


def test_definitions_use_the_given_vhost(topology: Topology) -> None:
    defs = topology.definitions(vhost="tenant")
    assert {item["vhost"] for part in ("exchanges", "queues", "bindings")
            for item in defs[part]} == {"tenant"}


def test_topology_is_the_same_every_time() -> None:
    """Declaring is idempotent only if the arguments never change between runs."""
    assert Topology(Names(PREFIX)).definitions() == Topology(Names(PREFIX)).definitions()


def test_parking_notices_reach_the_escalation_queue_and_completions_do_not(
    broker: Broker,
) -> None:
    notices = f"{PREFIX}.notifications"
    assert broker.route(notices, "parked.sms.invalid_recipient") == [f"{PREFIX}.escalations"]
    assert broker.route(notices, "campaign.completed") == []
