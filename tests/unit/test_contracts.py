"""Contracts for other languages (consumer/contracts.py): the AsyncAPI document and the
admin API's OpenAPI document are committed as generated, the AsyncAPI parser accepts
the former, and both say what the code does."""

from __future__ import annotations

import json
import shutil
import subprocess
import typing
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer import contracts, wire
from consumer.errors import DeliveryError, ErrorType
from consumer.parking.park import park
from consumer.topology import DELAY_LEVELS, LANES, Names, Topology
from schemas import BrokerParkedHeaders, ErrorTypeName, ParkedHeaders, ParkingNotice
from schemas.events import ProviderEvent
from schemas.send_request import CHANNELS

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = REPO / "tests" / "contracts" / "validate_asyncapi.mjs"
PARSER_DIR = REPO / ".local" / "asyncapi"
INSTALL = "deploy/local/asyncapi.sh install (make services runs it)"


def aliases(model: type[Any]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


# -- committed as generated -------------------------------------------------------------------


def test_the_committed_asyncapi_document_is_the_generated_one() -> None:
    assert contracts.ASYNCAPI_PATH.read_text() == contracts.render_asyncapi(), (
        "schemas/asyncapi.json is stale: python -m consumer.contracts")


def test_the_committed_openapi_document_is_the_generated_one() -> None:
    assert contracts.OPENAPI_PATH.read_text() == contracts.render_openapi(), (
        "docs/admin-api.openapi.json is stale: python -m consumer.contracts")


# -- the AsyncAPI project's own parser ------------------------------------------------------


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, f"node is not installed: {INSTALL}"
    assert (PARSER_DIR / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        f"@asyncapi/parser is not installed in {PARSER_DIR}: {INSTALL}")
    return subprocess.run([node, str(VALIDATOR), str(PARSER_DIR), str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_asyncapi_parser_accepts_the_document() -> None:
    result = validate(contracts.ASYNCAPI_PATH)
    assert result.returncode == 0, result.stdout + result.stderr
    severities = {json.loads(line)["severity"] for line in result.stdout.splitlines()}
    assert severities <= {"information", "hint"}, result.stdout


def test_the_asyncapi_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    broken = contracts.asyncapi()
    broken["channels"]["parked"]["bindings"]["amqp"]["queue"]["durable"] = "yes"
    broken["components"]["schemas"]["SendRequest"]["type"] = "objekt"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = validate(path)
    assert result.returncode == 1
    errors = [json.loads(line) for line in result.stdout.splitlines()]
    paths = {tuple(e["path"]) for e in errors if e["severity"] == "error"}
    assert ("channels", "parked", "bindings", "amqp", "queue", "durable") in paths
    assert ("components", "schemas", "SendRequest", "type") in paths


# -- what the AsyncAPI document says --------------------------------------------------------


def test_the_send_channels_are_the_topology_s_routing_keys() -> None:
    doc = contracts.asyncapi()
    names = Names("herald")
    topology = Topology(names)
    send = doc["channels"]["sendRequests"]
    bulk = doc["channels"]["bulkSendRequests"]
    assert send["address"] == "send.{channel}" and bulk["address"] == "send.{channel}.bulk"
    for channel in (send, bulk):
        assert channel["parameters"]["channel"]["enum"] == list(CHANNELS)
        assert channel["bindings"]["amqp"]["exchange"]["name"] == "herald"
        assert channel["bindings"]["amqp"]["exchange"]["type"] == "topic"
    bound = {b["routing_key"] for b in topology.bindings if b["source"] == names.exchange}
    documented = {ch["address"].replace("{channel}", c) for ch in (send, bulk) for c in CHANNELS}
    assert bound == documented
    assert len(LANES) == 2


def test_every_exchange_publishers_or_listeners_use_is_documented() -> None:
    doc = contracts.asyncapi()
    documented = {ch["bindings"]["amqp"].get("exchange", {}).get("name")
                  for ch in doc["channels"].values()} - {None}
    internal = {f"herald.delay.{level}" for level in range(DELAY_LEVELS)} | {
        "herald.delay.deliver", "herald.parked", "herald.overflow"}
    exchanges = {e["name"] for e in Topology(Names("herald")).exchanges}
    assert exchanges - internal == documented
    assert doc["channels"]["parked"]["address"] == "herald.parked"


def test_event_and_notice_parameters_come_from_the_models() -> None:
    channels = contracts.asyncapi()["channels"]
    events = channels["providerEvents"]["parameters"]
    assert events["provider"]["enum"] == list(
        typing.get_args(ProviderEvent.model_fields["provider"].annotation))
    assert events["status"]["enum"] == ["sent", "delivered", "read", "failed"]
    notices = channels["parkingNotices"]
    assert notices["address"] == "parked.{channel}.{error_type}"
    assert notices["parameters"]["error_type"]["enum"] == [e.value for e in ErrorType]


def test_schemas_are_self_contained_components() -> None:
    doc = contracts.asyncapi()
    text = json.dumps(doc)
    assert "#/$defs/" not in text
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref  # resolves (JsonValue is {}: any value)
    assert {"SendRequest", "RetrySpec", "ProviderEvent", "ParkingNotice", "ParkedHeaders",
            "BrokerParkedHeaders"} <= set(doc["components"]["schemas"])


def test_error_type_names_are_the_pipeline_s() -> None:
    assert list(typing.get_args(ErrorTypeName)) == [e.value for e in ErrorType]


def test_header_models_name_the_headers_of_wire_py() -> None:
    assert aliases(ParkedHeaders) == {
        wire.HEADER_ERROR_TYPE, wire.HEADER_ERROR_CODE, wire.HEADER_LAST_ERROR,
        wire.HEADER_ATTEMPT, wire.HEADER_PARKED_AT, wire.HEADER_CHANNEL,
        wire.HEADER_PARKED_ID, wire.HEADER_MESSAGE_ID, wire.HEADER_EVENT_ID}
    assert aliases(BrokerParkedHeaders) <= wire.BROKER_HEADERS


# -- what park() publishes matches the models ---------------------------------------------


class _Publisher:
    def __init__(self) -> None:
        self.names = Names("herald")
        self.published: list[tuple[str, str, bytes, dict[str, Any]]] = []

    async def publish(self, exchange: str, routing_key: str, body: bytes, *,
                      headers: dict[str, Any] | None = None, **_: Any) -> None:
        self.published.append((exchange, routing_key, body, dict(headers or {})))


class _Store:
    async def record_parked(self, **_: Any) -> None:
        return None


@pytest.mark.parametrize(("message_id", "code", "attempt"), [
    ("m-1", "21211", 3), (None, None, 0)])
async def test_what_park_publishes_matches_the_contract(
    message_id: str | None, code: str | None, attempt: int,
) -> None:
    publisher = _Publisher()
    error = DeliveryError(ErrorType.INVALID_RECIPIENT, "x" * 2000, code=code)
    parked_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    parked_id = await park(publisher, _Store(), body=b"\xff not json", channel="sms",  # type: ignore[arg-type]
                           message_id=message_id, attempt=attempt, error=error,
                           recipient=None, campaign_id=None, parked_at=parked_at)
    (copy_exchange, copy_key, body, headers), (exchange, key, notice, _) = publisher.published
    assert (copy_exchange, copy_key, body) == ("herald.parked", "herald.parked", b"\xff not json")
    parsed = ParkedHeaders.model_validate(headers)
    assert parsed.parked_id == parked_id and parsed.error_type == "invalid_recipient"
    assert set(headers) <= aliases(ParkedHeaders)
    assert (exchange, key) == ("herald.notifications", "parked.sms.invalid_recipient")
    model = ParkingNotice.model_validate_json(notice)
    assert model.parked_id == parked_id and model.message_id == message_id
    assert model.error_code == code and model.attempt == attempt
    assert model.parked_at == parked_at
    assert set(json.loads(notice)) == set(ParkingNotice.model_fields)


def test_parking_notice_ids_are_uuids() -> None:
    notice = {"parked_id": str(uuid.uuid4()), "message_id": None, "channel": "http",
              "error_type": "other", "error_code": None, "last_error": "", "attempt": 1,
              "parked_at": "2026-01-02T03:04:05+00:00"}
    ParkingNotice.model_validate(notice)
    with pytest.raises(ValueError, match="parked_id"):
        ParkingNotice.model_validate(notice | {"parked_id": "nope"})
