"""Herald's contracts for teams in other languages, generated and committed.

- ``schemas/asyncapi.json``: an AsyncAPI 3.0 document of what goes over
  RabbitMQ — the exchanges and queues, their routing keys and the message
  schemas — built from the pydantic models in :mod:`schemas` and from
  :class:`~consumer.topology.Topology`, so it cannot say anything the code
  does not do.
- ``docs/admin-api.openapi.json``: the admin API's OpenAPI document
  (:mod:`consumer.admin.openapi`), the same one the API serves at
  ``/admin/openapi.json``, readable here without a token.

Regenerate both with ``python -m consumer.contracts``; tests fail while a
committed copy differs from what this module renders.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from consumer import __version__
from consumer.admin.openapi import document as admin_openapi
from consumer.topology import LANES, Names, Topology
from schemas.campaigns import CampaignCompleted
from schemas.events import ProviderEvent, ProviderStatus
from schemas.parking import BrokerParkedHeaders, ErrorTypeName, ParkedHeaders, ParkingNotice
from schemas.send_request import CHANNELS, SendRequest

ROOT = Path(__file__).resolve().parent.parent
ASYNCAPI_PATH = ROOT / "schemas" / "asyncapi.json"
OPENAPI_PATH = ROOT / "docs" / "admin-api.openapi.json"
# The document shows the names for the default prefix.
PREFIX = "herald"
_AMQP = "0.3.0"  # version of the AMQP bindings of AsyncAPI used below

_DESCRIPTION = """\
How applications talk to Herald over RabbitMQ (AMQP 0-9-1).

Names are shown for the default prefix `herald`; a deployment with another
`HERALD_PREFIX` replaces `herald` at the start of every exchange and queue name
(routing keys stay the same).

Publish send requests persistent (delivery mode 2), as JSON
(`content_type: application/json`), with publisher confirms, to the topic
exchange `herald`. `message_id` is the idempotency key: a request published
twice is delivered at most once. Set no `x-herald-*` header: Herald adds its
own when it retries, parks or replays a message.

Campaign traffic belongs on the bulk routing key (`send.{channel}.bulk`):
transactional messages on the plain key are consumed beside it and never wait
behind a campaign.

The delay levels (`herald.delay.0` … `herald.delay.17`, `herald.delay.deliver`)
are internal: publish nothing there.
"""


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    """Add a model's JSON Schema (and the models it uses) to ``components``; a reference."""
    schema = model.model_json_schema(by_alias=True,
                                     ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        if components.setdefault(name, definition) != definition:
            raise ValueError(f"two different schemas named {name}")
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _exchange(topology: Topology, name: str) -> dict[str, Any]:
    (found,) = [e for e in topology.exchanges if e["name"] == name]
    return {"name": name, "type": found["type"], "durable": True, "autoDelete": False,
            "vhost": "/"}


def _queue(topology: Topology, name: str) -> dict[str, Any]:
    (_,) = [q for q in topology.queues if q["name"] == name]
    return {"name": name, "durable": True, "exclusive": False, "autoDelete": False,
            "vhost": "/"}


def _routing_key_channel(address: str, exchange: dict[str, Any], description: str,
                         messages: dict[str, str], parameters: dict[str, Any]
                         ) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "parameters": parameters,
        "messages": {name: {"$ref": f"#/components/messages/{ref}"}
                     for name, ref in messages.items()},
        "bindings": {"amqp": {"is": "routingKey", "exchange": exchange,
                              "bindingVersion": _AMQP}},
    }


def _enum(values: tuple[str, ...] | list[str], description: str) -> dict[str, Any]:
    return {"enum": list(values), "description": description}


def _operation(action: str, channel: str, messages: list[str], summary: str,
               binding: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
        "bindings": {"amqp": {**binding, "bindingVersion": _AMQP}},
    }


def asyncapi(prefix: str = PREFIX) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of Herald's messaging for ``prefix``."""
    names = Names(prefix)
    topology = Topology(names)
    schemas: dict[str, Any] = {}
    channels_param = _enum(CHANNELS, "The delivery channel.")
    lanes = {lane: names.send_key("{channel}", lane) for lane in LANES}

    messages = {
        "sendRequest": {
            "name": "SendRequest",
            "title": "Send request",
            "summary": "One message for Herald to deliver.",
            "contentType": "application/json",
            "payload": _schema(SendRequest, schemas),
            "correlationId": {"description": "The idempotency key.",
                              "location": "$message.payload#/message_id"},
            "bindings": {"amqp": {"bindingVersion": _AMQP}},
        },
        "providerEvent": {
            "name": "ProviderEvent",
            "title": "Provider status event",
            "summary": "A provider's report about a message it accepted, normalized.",
            "contentType": "application/json",
            "payload": _schema(ProviderEvent, schemas),
            "bindings": {"amqp": {"bindingVersion": _AMQP}},
        },
        "parkingNotice": {
            "name": "ParkingNotice",
            "title": "Parking notice",
            "summary": "A message was parked: nobody will try it again until a person "
                       "replays it.",
            "contentType": "application/json",
            "payload": _schema(ParkingNotice, schemas),
            "bindings": {"amqp": {"bindingVersion": _AMQP}},
        },
        "campaignCompleted": {
            "name": "CampaignCompleted",
            "title": "Campaign completed",
            "summary": "None of a campaign's messages is queued, sending or retrying any more, "
                       "and it has been quiet for HERALD_CAMPAIGN_QUIET_S; its final counters. "
                       "The AMQP message id, campaign.completed/{campaign_id}/{completion}, "
                       "is the same for every copy of one completion.",
            "contentType": "application/json",
            "payload": _schema(CampaignCompleted, schemas),
            "bindings": {"amqp": {"bindingVersion": _AMQP}},
        },
        "parkedCopy": {
            "name": "ParkedCopy",
            "title": "Parked copy (parked by Herald)",
            "summary": "The original bytes of a message Herald gave up on, unchanged (they "
                       "may not be JSON when the request did not parse), with the reason "
                       "in headers. Content type: the original's.",
            "headers": _schema(ParkedHeaders, schemas),
            "payload": {"description": "The original message body, byte for byte."},
            "bindings": {"amqp": {"bindingVersion": _AMQP}},
        },
        "brokerParkedCopy": {
            "name": "BrokerParkedCopy",
            "title": "Parked copy (dead-lettered by the broker)",
            "summary": "A message the broker moved to the parking queue because it was "
                       "delivered more than HERALD_DELIVERY_LIMIT times without an "
                       "outcome; original body and headers, plus the broker's record.",
            "headers": _schema(BrokerParkedHeaders, schemas),
            "payload": {"description": "The original message body, byte for byte."},
            "bindings": {"amqp": {"bindingVersion": _AMQP}},
        },
    }

    exchange = _exchange(topology, names.exchange)
    channels = {
        "sendRequests": _routing_key_channel(
            lanes["main"], exchange,
            "Transactional messages (no campaign, or priority 'high'), consumed from "
            f"queue {names.send_queue('{channel}')}.",
            {"sendRequest": "sendRequest"}, {"channel": channels_param}),
        "bulkSendRequests": _routing_key_channel(
            lanes["bulk"], exchange,
            "Campaign traffic, consumed from queue "
            f"{names.send_queue('{channel}', 'bulk')} beside the transactional one.",
            {"sendRequest": "sendRequest"}, {"channel": channels_param}),
        "providerEvents": _routing_key_channel(
            "{provider}.{status}", _exchange(topology, names.events),
            f"Status events from the providers' webhooks, queued in {names.events} for "
            "the events role, which applies them to the messages' status.",
            {"providerEvent": "providerEvent"},
            {"provider": _enum(list(typing.get_args(ProviderEvent.model_fields["provider"]
                                                    .annotation)), "The provider."),
             "status": _enum(list(typing.get_args(ProviderStatus)), "The reported status.")}),
        "parkingNotices": _routing_key_channel(
            "parked.{channel}.{error_type}", _exchange(topology, names.notifications),
            "One notice per parked message. Herald's own escalation reads them from the "
            f"queue {names.escalations} (bound with 'parked.#') and sends people one digest "
            "per rule and window; bind a queue of your own (e.g. 'parked.sms.#' or "
            "'parked.*.access_token') to route them elsewhere too.",
            {"parkingNotice": "parkingNotice"},
            {"channel": channels_param,
             "error_type": _enum(list(typing.get_args(ErrorTypeName)), "Why it failed.")}),
        "campaignNotices": _routing_key_channel(
            "campaign.completed", _exchange(topology, names.notifications),
            "One notice each time a campaign completes (again after a reopening). Nothing is "
            "bound here by Herald: bind a queue to 'campaign.completed' to hear of them.",
            {"campaignCompleted": "campaignCompleted"}, {}),
        "parked": {
            "address": names.parked,
            "description": "The parking lot, a quorum queue read by `herald parked` and the "
                           "admin API. Operators replay or reject from here; do not consume "
                           "it yourself.",
            "messages": {"parkedCopy": {"$ref": "#/components/messages/parkedCopy"},
                         "brokerParkedCopy": {
                             "$ref": "#/components/messages/brokerParkedCopy"}},
            "bindings": {"amqp": {"is": "queue", "queue": _queue(topology, names.parked),
                                  "bindingVersion": _AMQP}},
        },
    }

    publish = {"deliveryMode": 2, "mandatory": True}
    operations = {
        "receiveSendRequest": _operation(
            "receive", "sendRequests", ["sendRequest"],
            "Herald delivers each send request, retries or parks it, and acknowledges it "
            "only once its outcome is stored.", {"ack": True}),
        "receiveBulkSendRequest": _operation(
            "receive", "bulkSendRequests", ["sendRequest"],
            "The same for campaign traffic.", {"ack": True}),
        "sendProviderEvent": _operation(
            "send", "providerEvents", ["providerEvent"],
            "The webhook receiver publishes each status event it accepted.", publish),
        "receiveProviderEvent": _operation(
            "receive", "providerEvents", ["providerEvent"],
            "The events role applies status events in batches; statuses only move "
            "forward.", {"ack": True}),
        "sendParkingNotice": _operation(
            "send", "parkingNotices", ["parkingNotice"],
            "Published after a message is parked and indexed (unroutable notices are "
            "dropped: listening is optional).", {"deliveryMode": 2, "mandatory": False}),
        "sendCampaignCompleted": _operation(
            "send", "campaignNotices", ["campaignCompleted"],
            "Published once per completion by the events role (unroutable notices are "
            "dropped: listening is optional).", {"deliveryMode": 2, "mandatory": False}),
        "sendParkedCopy": _operation(
            "send", "parked", ["parkedCopy"],
            "Herald parks a message it will not try again.", publish),
    }

    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Herald", "version": __version__, "description": _DESCRIPTION,
                 "license": {"name": "See the project's repository"}},
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "{host}:{port}",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "Your RabbitMQ (3.10 or later: quorum queues with "
                               "at-least-once dead-lettering).",
                "variables": {"host": {"default": "localhost"},
                              "port": {"default": "5672"}},
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": dict(sorted(schemas.items())), "messages": messages},
    }


def render_asyncapi() -> str:
    return json.dumps(asyncapi(), indent=2) + "\n"


def render_openapi() -> str:
    return json.dumps(admin_openapi(), indent=2) + "\n"


def write() -> list[Path]:
    """Write both committed documents; returns their paths."""
    ASYNCAPI_PATH.write_text(render_asyncapi())
    OPENAPI_PATH.write_text(render_openapi())
    return [ASYNCAPI_PATH, OPENAPI_PATH]


if __name__ == "__main__":
    for path in write():
        print(path, file=sys.stderr)
