"""Recipient masking in logs (consumer/logs.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from consumer import logs
from consumer.logs import _mask_recipients, bound, mask_recipient

PHONE = "+15551234567"
PSID = "6543210987654321"


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """Each test may configure structlog; put the previous configuration back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)
    root.setLevel(level)
    root.handlers[:] = handlers


# -- mask_recipient ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+15551234567", "+15*******67"),
        ("15551234567", "15*******67"),
        ("+44 20 7946 0958", "+44********58"),
        ("+1-555-123-4567", "+15*******67"),
        ("+491701234567", "+49********67"),
        ("123456789012345", "12***********45"),
    ],
)
def test_phone_numbers_keep_only_a_few_digits(number: str, masked: str) -> None:
    assert mask_recipient(number) == masked


@pytest.mark.parametrize("number", ["+15551234567", "+44 20 7946 0958", "+8613800138000"])
def test_masked_phone_numbers_hide_most_digits(number: str) -> None:
    digits = [c for c in number if c.isdigit()]
    shown = [c for c in mask_recipient(number) or "" if c.isdigit()]
    assert len(shown) <= 4
    assert len(shown) < len(digits) / 2
    assert mask_recipient(number) != number


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("https://hooks.example.com/path/secret-token?sig=abc", "https://hooks.example.com/…"),
        ("http://user:pw@Example.COM:8443/x", "http://example.com/…"),
        ("https://127.0.0.1:9000/webhook", "https://127.0.0.1/…"),
        ("http:///nohost", "http://?/…"),
    ],
)
def test_urls_keep_scheme_and_host_only(url: str, masked: str) -> None:
    assert mask_recipient(url) == masked


def test_malformed_url_is_masked_without_raising() -> None:
    # `to` of an http message is whatever the publisher sent; logging it must not fail.
    masked = mask_recipient("http://[not-an-ipv6/secret-path")
    assert masked == "http://?/…"


@pytest.mark.parametrize(
    ("psid", "masked"),
    [
        (PSID, "************4321"),  # real PSIDs are 16+ digits: longer than any E.164 number
        ("24680135791113151", "*************3151"),
        ("page-scoped-id-abcd", "***************abcd"),
        ("whatsapp:+15551234567", "*****************4567"),
    ],
)
def test_other_identifiers_keep_their_last_four(psid: str, masked: str) -> None:
    assert mask_recipient(psid) == masked


@pytest.mark.parametrize("short", ["", "a", "abcd", "1234"])
def test_short_identifiers_are_masked_entirely(short: str) -> None:
    assert mask_recipient(short) == "*" * len(short)


def test_none_stays_none() -> None:
    assert mask_recipient(None) is None


# -- the processor -------------------------------------------------------------------


def test_processor_masks_recipient_keys_and_leaves_the_rest() -> None:
    event: dict[str, Any] = {
        "event": "delivery.sent", "to": PHONE, "recipient": "https://h.example/x",
        "recipient_id": PSID, "from_": "+15550001111", "message_id": "m-1",
        "attempt": 2, "campaign_id": "+15551234567",
    }
    out = _mask_recipients(None, "info", event)
    assert out["to"] == "+15*******67"
    assert out["recipient"] == "https://h.example/…"
    assert out["recipient_id"] == "************4321"
    assert out["from_"] == "+15*******11"
    assert out["message_id"] == "m-1"
    assert out["attempt"] == 2
    assert out["campaign_id"] == "+15551234567"  # not a recipient key


def test_processor_ignores_non_string_values() -> None:
    event: dict[str, Any] = {"event": "x", "to": None, "recipient": 5}
    assert _mask_recipients(None, "info", dict(event)) == event


def test_logs_through_a_processor_chain_are_masked(restore_structlog: None) -> None:
    capture = LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _mask_recipients, capture],
        cache_logger_on_first_use=False,
    )
    log = structlog.get_logger("test")
    with structlog.contextvars.bound_contextvars(message_id="m-9", to=PHONE):
        log.info("delivery.sent")
    log.info("delivery.parked", to="https://hooks.example.com/secret")
    first, second = capture.entries
    assert first["to"] == "+15*******67"  # masked even when bound as context
    assert first["message_id"] == "m-9"
    assert second["to"] == "https://hooks.example.com/…"
    assert all("secret" not in repr(e) and PHONE not in repr(e) for e in capture.entries)


def test_configured_json_logs_mask_recipients(
    restore_structlog: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info")
    log = logs.get_logger("herald.test")
    with structlog.contextvars.bound_contextvars(message_id="m-7", channel="sms"):
        log.info("delivery.sent", to=PHONE, recipient_id=PSID)
        log.debug("delivery.debug", to=PHONE)  # below the level: not written
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["event"] == "delivery.sent"
    assert record["message_id"] == "m-7"
    assert record["channel"] == "sms"
    assert record["level"] == "info"
    assert record["to"] == "+15*******67"
    assert record["recipient_id"] == "************4321"
    assert PHONE not in lines[0] and PSID not in lines[0]


def test_masking_comes_before_rendering_in_the_configured_chain(
    restore_structlog: None,
) -> None:
    logs.configure("debug")
    processors = structlog.get_config()["processors"]
    assert processors[0] is structlog.contextvars.merge_contextvars
    assert processors.index(_mask_recipients) < len(processors) - 1


# -- nested fields, headers, hostile shapes -------------------------------------------


def test_processor_masks_recipients_inside_nested_fields() -> None:
    raw = {"entry": [{"changes": [{"value": {"statuses": [
        {"id": "wamid.1", "recipient_id": "15551234567", "status": "failed"}]}}]}]}
    event: dict[str, Any] = {
        "event": "webhook.received", "payload": raw,
        "request": {"to": PHONE, "body": "hi", "metadata": {"from": "+15550001111"}},
        "recipients": [{"to": PHONE}, {"to": "+15559876543"}],
        "pair": [[{"recipient": PSID}]],
        "exc_info": (ValueError, ValueError("x"), None),
    }
    out = _mask_recipients(None, "info", event)
    rendered = json.dumps(out, default=repr)
    for secret in (PHONE, "15551234567", "+15550001111", "+15559876543", PSID):
        assert secret not in rendered, secret
    status = out["payload"]["entry"][0]["changes"][0]["value"]["statuses"][0]
    assert status["recipient_id"] == "15*******67"
    assert status["status"] == "failed"  # other fields stay as they were
    assert out["request"]["body"] == "hi"
    assert isinstance(out["exc_info"], tuple)  # structlog's own field, untouched
    assert raw["entry"][0]["changes"][0]["value"]["statuses"][0]["recipient_id"] == \
        "15551234567"  # the caller's object is not modified


def test_mask_tree_survives_hostile_nesting() -> None:
    deep: Any = {"to": PHONE}
    for _ in range(5000):
        deep = {"a": [deep]}
    masked = logs.mask_tree(deep)
    assert PHONE not in json.dumps(masked)
    depth, node = 0, masked
    while isinstance(node, dict):
        node = node["a"][0]
        depth += 2
    assert node == logs.TOO_DEEP
    assert depth <= logs.MAX_MASK_DEPTH


@pytest.mark.parametrize("name", [
    "Authorization", "authorization", "Proxy-Authorization", "X-Api-Key", "api_key",
    "X-Auth-Token", "access_token", "Cookie", "Set-Cookie", "X-Hub-Signature-256",
    "client_secret", "password", "X-Session-Id",
])
def test_credential_like_headers_are_masked(name: str) -> None:
    headers = {name: "s3cr3t-value", "x-herald-error-type": "network", "x-death": [{"count": 1}]}
    masked = logs.mask_headers(headers)
    assert masked[name] == "***"
    assert masked["x-herald-error-type"] == "network"
    assert masked["x-death"] == [{"count": 1}]


def test_herald_headers_are_never_taken_for_credentials() -> None:
    from consumer import wire

    names = [v for k, v in vars(wire).items() if k.startswith("HEADER_") and isinstance(v, str)]
    assert names
    headers = {name: "kept" for name in names}
    assert logs.mask_headers(headers) == headers


@pytest.mark.parametrize("number", ["+١٥٥٥١٢٣٤٥٦٧", "+１５５５１２３４５６７"])
def test_non_ascii_digits_are_not_taken_for_a_phone_number(number: str) -> None:
    # Not a phone number as Herald reads one (validation refuses it), so it is
    # masked as an identifier: no more than four characters show.
    assert mask_recipient(number) == "*" * (len(number) - 4) + number[-4:]


def test_a_parked_copy_is_indexed_with_its_credential_headers_masked() -> None:
    import uuid
    from types import SimpleNamespace

    from consumer.parking.passes import index_row
    from consumer.topology import Names

    message = SimpleNamespace(
        body=b'{"message_id": "m-1", "channel": "http", "to": "https://h.example/x",'
             b' "body": {}}',
        message_id="m-1",
        headers={"Authorization": "Bearer publisher-secret", "x-api-key": "k-123",
                 "x-first-death-queue": "t.send.http", "x-first-death-reason": "delivery_limit",
                 "trace": "abc"},
    )
    row = index_row(message, uuid.uuid4(), Names("t"))  # type: ignore[arg-type]
    assert row["headers"]["Authorization"] == "***"
    assert row["headers"]["x-api-key"] == "***"
    assert row["headers"]["trace"] == "abc"
    assert row["headers"]["x-first-death-reason"] == "delivery_limit"
    assert "publisher-secret" not in json.dumps(row["headers"])


def test_bound_fields_are_restored_as_they_were_after_the_block() -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(channel="sms")
    with bound(channel="http", message_id="m-1"):
        assert structlog.contextvars.get_contextvars() == {"channel": "http",
                                                           "message_id": "m-1"}
        with bound(message_id="m-2"):
            assert structlog.contextvars.get_contextvars()["message_id"] == "m-2"
        assert structlog.contextvars.get_contextvars()["message_id"] == "m-1"
    assert structlog.contextvars.get_contextvars() == {"channel": "sms"}
    try:
        with bound(attempt=2):
            raise ValueError("boom")
    except ValueError:
        pass
    assert structlog.contextvars.get_contextvars() == {"channel": "sms"}
    structlog.contextvars.clear_contextvars()
