"""Webhook normalization (consumer.status.webhooks) and the decision on a failure a
provider reports after acceptance (consumer.status.events): pure functions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from multidict import MultiDict

from consumer.delivery.backoff import RetryPolicy
from consumer.delivery.decision import Park, Pause, Retry, decide
from consumer.status.events import event_id_of, reported_error
from consumer.status.webhooks import (
    messenger_events,
    twilio_events,
    verify_challenge,
    whatsapp_events,
)

NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
SID = "SM" + "0" * 32


def twilio_form(status: str, **extra: str) -> list[tuple[str, str]]:
    return [("SmsSid", SID), ("SmsStatus", status), ("MessageStatus", status),
            ("To", "+15551234567"), ("MessageSid", SID), ("AccountSid", "AC" + "1" * 32),
            ("From", "+15005550006"), ("ApiVersion", "2010-04-01"), *extra.items()]


@pytest.mark.parametrize(("twilio_status", "status"), [
    ("accepted", "sent"), ("queued", "sent"), ("sending", "sent"), ("sent", "sent"),
    ("delivered", "delivered"), ("read", "read"), ("undelivered", "failed"),
    ("failed", "failed"), ("DELIVERED", "delivered"),
])
def test_twilio_statuses(twilio_status: str, status: str) -> None:
    (event,) = twilio_events(twilio_form(twilio_status), NOW)
    assert (event.provider, event.provider_message_id, event.status) == ("twilio", SID, status)
    assert event.occurred_at == NOW  # Twilio sends no time: when Herald received it
    assert event.recipient == "+15551234567"
    assert isinstance(event.raw, dict) and event.raw["MessageStatus"] == twilio_status


@pytest.mark.parametrize("twilio_status", ["canceled", "receiving", "received", "", "bogus"])
def test_twilio_statuses_that_are_not_about_delivery_are_skipped(twilio_status: str) -> None:
    assert twilio_events(twilio_form(twilio_status), NOW) == []


def test_twilio_error_code_and_message() -> None:
    (event,) = twilio_events(
        twilio_form("undelivered", ErrorCode="30003",
                    ErrorMessage="Unreachable destination handset"), NOW)
    assert (event.status, event.error_code, event.error_text) == (
        "failed", "30003", "Unreachable destination handset")


def test_twilio_without_sid_is_skipped() -> None:
    assert twilio_events([("MessageStatus", "delivered")], NOW) == []


def test_twilio_takes_smssid_when_messagesid_is_absent() -> None:
    (event,) = twilio_events([("SmsSid", SID), ("SmsStatus", "sent")], NOW)
    assert event.provider_message_id == SID and event.recipient is None


def whatsapp_body(*statuses: dict[str, Any]) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": {}, "statuses": list(statuses)},
    }]}]}


def test_whatsapp_every_status_of_every_change() -> None:
    body = whatsapp_body(
        {"id": "wamid.A", "status": "sent", "timestamp": "1700000000", "recipient_id": "1555"},
        {"id": "wamid.A", "status": "delivered", "timestamp": "1700000001",
         "recipient_id": "1555"},
    )
    body["entry"].append({"id": "2", "changes": [{"field": "messages", "value": {
        "statuses": [{"id": "wamid.B", "status": "read", "timestamp": 1700000002}]}}]})
    events = whatsapp_events(body, NOW)
    assert [(e.provider_message_id, e.status) for e in events] == [
        ("wamid.A", "sent"), ("wamid.A", "delivered"), ("wamid.B", "read")]
    assert events[1].occurred_at == datetime.fromtimestamp(1700000001, UTC)
    assert events[2].occurred_at == datetime.fromtimestamp(1700000002, UTC)
    assert events[0].recipient == "1555"


def test_whatsapp_failed_with_errors() -> None:
    (event,) = whatsapp_events(whatsapp_body({
        "id": "wamid.F", "status": "failed", "timestamp": "1700000000", "recipient_id": "1555",
        "errors": [{"code": 131026, "title": "Message undeliverable",
                    "error_data": {"details": "Message Undeliverable."}}],
    }), NOW)
    assert event.status == "failed" and event.error_code == "131026"
    assert event.error_text == "Message undeliverable: Message Undeliverable."


@pytest.mark.parametrize("payload", [
    None, [], "text", {"entry": "x"}, {"entry": [{"changes": [{"value": {"statuses": [
        {"status": "delivered"},                    # no id
        {"id": "wamid.X", "status": "deleted"},     # not a delivery status
        {"id": "", "status": "read"},
        "not a dict",
    ]}}]}]},
    # inbound messages, no statuses
    {"entry": [{"changes": [{"value": {"messages": [{"id": "wamid.in", "text": {}}]}}]}]},
])
def test_whatsapp_shapes_without_statuses(payload: Any) -> None:
    assert whatsapp_events(payload, NOW) == []


def test_whatsapp_missing_or_bad_timestamp_is_receipt_time() -> None:
    events = whatsapp_events(whatsapp_body(
        {"id": "wamid.A", "status": "sent"},
        {"id": "wamid.B", "status": "sent", "timestamp": "soon"},
    ), NOW)
    assert [e.occurred_at for e in events] == [NOW, NOW]


def messenger_body(*messaging: dict[str, Any], time_ms: int = 1458668856463) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": "PAGE", "time": time_ms,
                                         "messaging": list(messaging)}]}


def test_messenger_delivery_with_mids() -> None:
    events = messenger_events(messenger_body({
        "sender": {"id": "2401"}, "recipient": {"id": "PAGE"},
        "delivery": {"mids": ["m_1", "m_2"], "watermark": 1458668856253},
    }), NOW)
    watermark = datetime.fromtimestamp(1458668856.253, UTC)
    assert [(e.provider_message_id, e.status, e.recipient, e.watermark) for e in events] == [
        ("m_1", "delivered", "2401", watermark), ("m_2", "delivered", "2401", watermark)]
    assert events[0].occurred_at == datetime.fromtimestamp(1458668856.463, UTC)  # entry time


def test_messenger_delivery_without_mids_is_one_watermark_event() -> None:
    (event,) = messenger_events(messenger_body({
        "sender": {"id": 2401}, "recipient": {"id": "PAGE"},
        "delivery": {"watermark": 1458668856253},
    }), NOW)
    assert event.provider_message_id is None and event.recipient == "2401"
    assert event.watermark == datetime.fromtimestamp(1458668856.253, UTC)


def test_messenger_read() -> None:
    (event,) = messenger_events(messenger_body({
        "sender": {"id": "2401"}, "recipient": {"id": "PAGE"}, "timestamp": 1458668856463,
        "read": {"watermark": 1458668856253},
    }), NOW)
    assert (event.status, event.provider_message_id, event.recipient) == ("read", None, "2401")
    assert event.occurred_at == datetime.fromtimestamp(1458668856.463, UTC)
    assert event.watermark == datetime.fromtimestamp(1458668856.253, UTC)


@pytest.mark.parametrize("messaging", [
    {"sender": {"id": "2401"}, "message": {"mid": "m_in", "text": "hi"}},  # inbound
    {"sender": {"id": "2401"}, "read": {}},                                # no watermark
    {"read": {"watermark": 1458668856253}},                                # no person
    {"sender": {"id": True}, "delivery": {"watermark": 1458668856253}},
])
def test_messenger_events_that_say_nothing_are_skipped(messaging: dict[str, Any]) -> None:
    assert messenger_events(messenger_body(messaging), NOW) == []


def test_meta_verification_challenge() -> None:
    query = MultiDict({"hub.mode": "subscribe", "hub.verify_token": "tok",
                       "hub.challenge": "1158201444"})
    assert verify_challenge(query, "tok") == "1158201444"
    assert verify_challenge(query, "other") is None
    assert verify_challenge(query, None) is None
    unsubscribe = MultiDict({**query, "hub.mode": "unsubscribe"})
    assert verify_challenge(unsubscribe, "tok") is None
    without = MultiDict({"hub.mode": "subscribe", "hub.verify_token": "tok"})
    assert verify_challenge(without, "tok") is None


# -- failures reported after acceptance ---------------------------------------------------

POLICY = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=60, jitter=0)


@pytest.mark.parametrize(("provider", "code", "error_type", "retryable"), [
    ("twilio", "30003", "provider_error", True),
    ("twilio", "30006", "invalid_recipient", False),
    ("twilio", "30007", "invalid_request", False),
    ("twilio", "30001", "rate_limit", True),
    ("whatsapp", "131026", "invalid_recipient", False),
    ("whatsapp", "131000", "provider_error", True),
    ("whatsapp", "131047", "invalid_request", False),
    ("twilio", "99999", "other", False),      # not in the table: parked for a person
    ("whatsapp", None, "other", False),
])
def test_reported_error_uses_the_providers_table(
    provider: str, code: str | None, error_type: str, retryable: bool
) -> None:
    error = reported_error(provider, code, "text")
    assert (error.error_type.value, error.retryable) == (error_type, retryable)
    assert error.code == (code or "unknown")


def test_reported_error_masks_the_recipient() -> None:
    error = reported_error("twilio", "30006", "+15551234567 is a landline", "+15551234567")
    assert "+15551234567" not in error.message and "67" in error.message


def test_retryable_with_attempts_left_is_retried_as_a_new_attempt() -> None:
    decision = decide(reported_error("twilio", "30003", None), attempt=1, base=0, policy=POLICY)
    assert decision == Retry(10, 2)
    assert decide(reported_error("twilio", "30003", None), attempt=2, base=0,
                  policy=POLICY) == Retry(20, 3)


def test_retryable_without_attempts_left_is_parked() -> None:
    assert decide(reported_error("twilio", "30003", None), attempt=3, base=0,
                  policy=POLICY) == Park()


def test_permanent_is_parked_and_manual_mode_parks() -> None:
    assert decide(reported_error("twilio", "30006", None), attempt=1, base=0,
                  policy=POLICY) == Park()
    manual = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=60, mode="manual")
    assert decide(reported_error("twilio", "30003", None), attempt=1, base=0,
                  policy=manual) == Park()


def test_loop_protection_waits_its_minimum() -> None:
    decision = decide(reported_error("twilio", "14107", None), attempt=1, base=0, policy=POLICY)
    assert decision == Retry(30, 2)


def test_provider_wide_is_resent_without_charging_an_attempt() -> None:
    decision = decide(reported_error("twilio", "30002", None), attempt=2, base=0,
                      policy=POLICY, pause_s=45.5)
    assert decision == Pause(46, 2)


def test_handset_unreachable_is_about_the_recipient_not_an_outage() -> None:
    error = reported_error("twilio", "30003", None)
    assert error.retryable and error.about_recipient and not error.outage_signal


class _Message:
    def __init__(self, message_id: str | None, body: bytes = b"{}") -> None:
        self.message_id = message_id
        self.body = body


def test_event_id_is_the_amqp_message_id_or_derived_stably() -> None:
    uid = "0b0d6d1e-5f55-4c77-9e1e-3f2d7f3c1a10"
    assert event_id_of(_Message(uid)) == uid  # type: ignore[arg-type]
    assert event_id_of(_Message("abc")) == event_id_of(_Message("abc"))  # type: ignore[arg-type]
    assert (event_id_of(_Message(None, b"x"))  # type: ignore[arg-type]
            == event_id_of(_Message(None, b"x")))  # type: ignore[arg-type]
    assert (event_id_of(_Message(None, b"x"))  # type: ignore[arg-type]
            != event_id_of(_Message(None, b"y")))  # type: ignore[arg-type]
