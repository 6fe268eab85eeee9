"""Wire contracts (schemas/): SendRequest validation and the exported JSON Schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import ProviderEvent, RetrySpec, SendRequest
from schemas.export import JSON_DIR, MODELS, export, render

# The example of DESIGN.md §3, verbatim.
DESIGN_EXAMPLE = """
{
  "message_id": "c0a8012e-7f1b-4e0e-9a51-1b9e0f2f6a11",
  "channel": "sms",
  "to": "+15551234567",
  "body": "Your code is 123456",
  "campaign_id": "spring-sale",
  "metadata": {"user_id": 42},
  "retry": {"max_attempts": 5, "base_delay_s": 30, "max_delay_s": 3600, "mode": "auto"},
  "send_at": null,
  "expires_at": "2026-11-23T10:00:00Z"
}
"""


def req(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"message_id": "m-1", "channel": "sms", "to": "+15551234567",
                            "body": "hello"}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def errors_of(data: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        SendRequest.model_validate(data)
    return [dict(e) for e in info.value.errors()]


def assert_rejected(data: Any, field: str) -> str:
    """The request is invalid and the error names ``field`` (in its loc or its text)."""
    with pytest.raises(ValidationError) as info:
        SendRequest.model_validate(data)
    text = str(info.value)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert field in locs or field in text, (field, locs, text)
    return text


def test_the_design_example_is_valid() -> None:
    request = SendRequest.model_validate_json(DESIGN_EXAMPLE)
    assert request.message_id == "c0a8012e-7f1b-4e0e-9a51-1b9e0f2f6a11"
    assert request.retry == RetrySpec(max_attempts=5, base_delay_s=30, max_delay_s=3600,
                                      mode="auto")
    assert request.expires_at == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert request.send_at is None
    assert request.metadata == {"user_id": 42}


def test_minimal_request_has_the_documented_defaults() -> None:
    request = SendRequest.model_validate(req())
    assert request.retry is None
    assert request.campaign_id is None
    assert request.metadata == {}
    assert request.send_at is None and request.expires_at is None


# -- message_id --------------------------------------------------------------------


@pytest.mark.parametrize("message_id", ["x", "x" * 200, "c0a8012e-7f1b", "ü" * 127])
def test_message_id_of_1_to_200_characters_is_accepted(message_id: str) -> None:
    # "ü" * 127: 254 bytes in UTF-8 (the AMQP message-id holds 255).
    assert SendRequest.model_validate(req(message_id=message_id)).message_id == message_id


@pytest.mark.parametrize("message_id", ["", "x" * 201])
def test_message_id_outside_1_to_200_characters_is_rejected(message_id: str) -> None:
    [error] = errors_of(req(message_id=message_id))
    assert error["loc"] == ("message_id",)


@pytest.mark.parametrize("message_id", [..., None, 42])
def test_message_id_is_a_required_string(message_id: Any) -> None:
    [error] = errors_of(req(message_id=message_id))
    assert error["loc"] == ("message_id",)


# -- channel -----------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["pigeon", "SMS", "", None])
def test_unknown_channel_is_rejected(channel: Any) -> None:
    [error] = errors_of(req(channel=channel))
    assert error["loc"] == ("channel",)


def test_unknown_channel_message_lists_the_known_ones() -> None:
    text = assert_rejected(req(channel="pigeon"), "channel")
    for channel in ("http", "sms", "whatsapp", "messenger"):
        assert channel in text


@pytest.mark.parametrize("missing", ["channel", "to", "body"])
def test_required_fields(missing: str) -> None:
    [error] = errors_of(req(**{missing: ...}))
    assert error["loc"] == (missing,)
    assert error["type"] == "missing"


# -- datetimes -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["send_at", "expires_at"])
@pytest.mark.parametrize("value", ["2030-01-01T10:00:00", "2030-01-01 10:00:00",
                                   datetime(2030, 1, 1, 10)])
def test_naive_datetimes_are_rejected(field: str, value: Any) -> None:
    [error] = errors_of(req(**{field: value}))
    assert error["loc"] == (field,)
    assert error["type"] == "timezone_aware"


@pytest.mark.parametrize("field", ["send_at", "expires_at"])
def test_aware_datetimes_are_accepted(field: str) -> None:
    request = SendRequest.model_validate(req(**{field: "2030-01-01T12:00:00+02:00"}))
    assert getattr(request, field) == datetime(2030, 1, 1, 10, tzinfo=UTC)


def test_is_expired() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert SendRequest.model_validate(req(expires_at=now)).is_expired(now)
    assert SendRequest.model_validate(req(expires_at=now - timedelta(seconds=1))).is_expired(now)
    assert not SendRequest.model_validate(req(expires_at=now + timedelta(seconds=1))).is_expired(
        now
    )
    assert not SendRequest.model_validate(req()).is_expired(now)


# -- body per channel ----------------------------------------------------------------


@pytest.mark.parametrize("channel", ["sms", "messenger"])
@pytest.mark.parametrize("body", ["", None, 42, ["hi"], {"text": "hi"}, {"template": {}}])
def test_sms_and_messenger_bodies_must_be_non_empty_text(channel: str, body: Any) -> None:
    text = assert_rejected(req(channel=channel, body=body), "body")
    assert "body" in text


@pytest.mark.parametrize("channel", ["sms", "messenger", "whatsapp"])
def test_text_bodies_are_accepted(channel: str) -> None:
    assert SendRequest.model_validate(req(channel=channel, body="hi ✓")).body == "hi ✓"


def test_whatsapp_template_body_is_accepted() -> None:
    template = {"template": {"name": "otp", "language": {"code": "en"},
                             "components": [{"type": "body", "parameters": []}]}}
    request = SendRequest.model_validate(req(channel="whatsapp", body=template))
    assert request.body == template


@pytest.mark.parametrize(
    "body",
    ["", None, 7, [], ["hi"], {}, {"text": "hi"}, {"template": "otp"}, {"template": None},
     {"template": ["otp"]}],
)
def test_whatsapp_body_must_be_text_or_a_template_object(body: Any) -> None:
    text = assert_rejected(req(channel="whatsapp", body=body), "body")
    assert "body" in text


@pytest.mark.parametrize(
    "body", ["text", "", 0, 1.5, True, None, [], [1, "two"], {}, {"nested": {"a": [None]}}]
)
def test_http_body_is_any_json_value(body: Any) -> None:
    request = SendRequest.model_validate(req(channel="http", to="https://example.com/hook",
                                             body=body))
    assert request.body == body


def test_http_body_must_be_json() -> None:
    assert_rejected(req(channel="http", to="https://example.com/", body={1, 2}), "body")


# -- extra fields, retry, sizes -------------------------------------------------------


def test_extra_fields_are_forbidden_and_named() -> None:
    [error] = errors_of(req(priorty="high"))
    assert error["loc"] == ("priorty",)
    assert error["type"] == "extra_forbidden"


def test_extra_fields_in_retry_are_forbidden_and_named() -> None:
    [error] = errors_of(req(retry={"max_attempt": 3}))
    assert error["loc"] == ("retry", "max_attempt")


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("max_attempts", 101), ("max_attempts", 2.5),
     ("base_delay_s", 0), ("base_delay_s", 0.5), ("base_delay_s", 262144),
     ("max_delay_s", 0), ("max_delay_s", 262144), ("max_delay_s", "soon"),
     ("mode", "sometimes"), ("mode", "AUTO")],
)
def test_retry_field_bounds(field: str, value: Any) -> None:
    [error] = errors_of(req(retry={field: value}))
    assert error["loc"] == ("retry", field)


@pytest.mark.parametrize(
    "retry",
    [{}, {"max_attempts": 1}, {"max_attempts": 100}, {"base_delay_s": 1},
     {"base_delay_s": 262143}, {"max_delay_s": 1.5}, {"mode": "manual"}],
)
def test_retry_values_within_bounds_are_accepted(retry: dict[str, Any]) -> None:
    request = SendRequest.model_validate(req(retry=retry))
    assert request.retry is not None
    for key, value in retry.items():
        assert getattr(request.retry, key) == value


@pytest.mark.parametrize("priority", ["urgent", "HIGH"])
def test_priority_is_high_or_normal(priority: str) -> None:
    [error] = errors_of(req(priority=priority))
    assert error["loc"] == ("priority",)


@pytest.mark.parametrize(("field", "value"), [("to", ""), ("to", "x" * 2049),
                                              ("campaign_id", ""), ("campaign_id", "c" * 201)])
def test_string_lengths(field: str, value: str) -> None:
    [error] = errors_of(req(**{field: value}))
    assert error["loc"] == (field,)


def test_a_request_is_immutable() -> None:
    request = SendRequest.model_validate(req())
    with pytest.raises(ValidationError):
        request.message_id = "other"


def test_json_round_trip_as_the_publisher_sends_it() -> None:
    request = SendRequest.model_validate_json(DESIGN_EXAMPLE)
    wire = request.model_dump_json(exclude_none=True)
    assert SendRequest.model_validate_json(wire) == request


# -- exported JSON Schemas -----------------------------------------------------------

DRIFT_HINT = (
    "schemas/json/{name}.schema.json differs from the model: run `python -m schemas.export` "
    "and commit the result"
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_committed_json_schema_matches_the_model(name: str) -> None:
    path = JSON_DIR / f"{name}.schema.json"
    assert path.exists(), DRIFT_HINT.format(name=name)
    assert path.read_text(encoding="utf-8") == render(MODELS[name]), DRIFT_HINT.format(name=name)


def test_no_stale_schema_files() -> None:
    committed = {p.name for p in JSON_DIR.glob("*.schema.json")}
    assert committed == {f"{name}.schema.json" for name in MODELS}, (
        "schemas/json/ holds files no model renders; run `python -m schemas.export` and "
        "delete the stale ones"
    )


def test_drift_check_notices_a_changed_model() -> None:
    """The comparison above is sensitive to a model change, not just to the file."""

    class Changed(SendRequest):
        surprise: int = 0

    assert render(Changed) != (JSON_DIR / "send_request.schema.json").read_text(encoding="utf-8")


def test_export_writes_what_render_returns(tmp_path: Any) -> None:
    written = export(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.schema.json" for n in MODELS)
    for name, model in MODELS.items():
        assert (tmp_path / f"{name}.schema.json").read_text(encoding="utf-8") == render(model)


def test_send_request_json_schema_states_the_contract() -> None:
    schema = json.loads((JSON_DIR / "send_request.schema.json").read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"message_id", "channel", "to", "body"}
    props = schema["properties"]
    assert props["channel"]["enum"] == ["http", "sms", "whatsapp", "messenger"]
    assert (props["message_id"]["minLength"], props["message_id"]["maxLength"]) == (1, 200)
    send_at = next(s for s in props["send_at"]["anyOf"] if s.get("type") == "string")
    assert send_at["format"] == "date-time"
    retry = schema["$defs"]["RetrySpec"]
    assert retry["additionalProperties"] is False


def test_provider_event_requires_an_aware_time() -> None:
    with pytest.raises(ValidationError) as info:
        ProviderEvent.model_validate({"provider": "twilio", "status": "delivered",
                                      "occurred_at": "2030-01-01T00:00:00"})
    assert info.value.errors()[0]["loc"] == ("occurred_at",)
