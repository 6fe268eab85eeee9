"""The pipeline's pure helpers: ``decode_request`` (step 1 of DESIGN.md §5) and ``_int_header``."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from consumer.delivery.pipeline import MAX_BODY_BYTES, _int_header, decode_request

PHONE = "+15551234567"


def body(**changes: Any) -> bytes:
    data: dict[str, Any] = {"message_id": "m-1", "channel": "sms", "to": PHONE, "body": "hi"}
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def rejected(raw: bytes, channel: str = "sms") -> str:
    request, reason = decode_request(raw, channel)
    assert request is None
    assert reason, "a rejection needs a reason"
    assert "\n" not in reason
    assert len(reason) < 1000  # it travels in the x-herald-last-error header
    return reason


def test_a_valid_request_decodes() -> None:
    request, reason = decode_request(body(), "sms")
    assert reason == ""
    assert request is not None
    assert (request.message_id, request.channel, request.to, request.body) == (
        "m-1", "sms", PHONE, "hi"
    )


def test_non_ascii_utf8_is_fine() -> None:
    request, _ = decode_request(body(body="Grüße ✓ 你好"), "sms")
    assert request is not None and request.body == "Grüße ✓ 你好"


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", "{}".encode("utf-16"), b'{"a": "\xe9"}'])
def test_body_that_is_not_utf8(raw: bytes) -> None:
    reason = rejected(raw)
    assert reason.startswith("body is not UTF-8")
    assert "at byte" in reason


def test_not_utf8_reason_says_where() -> None:
    assert rejected(b'{"message_id": "\xff"}').endswith("at byte 16")


@pytest.mark.parametrize("raw", [b"", b"   ", b"{not json", b'{"message_id": "m-1",}',
                                 b"hello", b'{"message_id": "m-1"'])
def test_body_that_is_not_json(raw: bytes) -> None:
    assert rejected(raw).startswith("not JSON: ")


@pytest.mark.parametrize("raw", [b"[]", b"42", b'"text"', b"null"])
def test_json_that_is_not_an_object(raw: bytes) -> None:
    reason = rejected(raw)
    assert reason.startswith("request: ")
    assert "object" in reason


def test_missing_fields_are_each_named() -> None:
    reason = rejected(b"{}")
    for field in ("message_id", "channel", "to", "body"):
        assert f"{field}: Field required" in reason


def test_one_missing_field() -> None:
    assert rejected(body(to=...)) == "to: Field required"


def test_many_problems_are_summarised() -> None:
    raw = json.dumps({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}).encode()
    reason = rejected(raw)
    assert reason.count("; ") == 4  # five problems shown
    assert reason.endswith("(+5 more)")  # 4 missing fields + 6 extras = 10


def test_nested_field_is_named_with_its_path() -> None:
    assert rejected(body(retry={"max_attempts": 0})).startswith("retry.max_attempts: ")


def test_body_rule_of_the_channel_is_explained() -> None:
    reason = rejected(body(body=""))
    assert reason.startswith("request: ")
    assert "body must be non-empty text for channel 'sms'" in reason


def test_naive_datetime_is_explained() -> None:
    assert rejected(body(expires_at="2030-01-01T00:00:00")).startswith("expires_at: ")


def test_reason_does_not_echo_the_recipient() -> None:
    reason = rejected(body(body=["not", "text"], unknown="x"))
    assert PHONE not in reason


def test_huge_body_is_refused_without_parsing() -> None:
    raw = b"\xff" * (MAX_BODY_BYTES + 1)  # would also fail UTF-8: size is checked first
    reason = rejected(raw)
    assert reason == (
        f"body of {MAX_BODY_BYTES + 1} bytes exceeds the {MAX_BODY_BYTES}-byte limit"
    )


def test_body_of_exactly_the_limit_is_accepted() -> None:
    skeleton = body(channel="http", to="https://example.com/", body="")
    padding = MAX_BODY_BYTES - len(skeleton)
    raw = body(channel="http", to="https://example.com/", body="x" * padding)
    assert len(raw) == MAX_BODY_BYTES
    request, reason = decode_request(raw, "http")
    assert reason == "" and request is not None
    assert rejected(raw + b" ", "http").startswith("body of ")


@pytest.mark.parametrize(("in_body", "queue"), [("sms", "http"), ("whatsapp", "sms"),
                                                ("http", "messenger")])
def test_channel_that_does_not_match_the_queue(in_body: str, queue: str) -> None:
    raw = body(channel=in_body, to="https://example.com/" if in_body == "http" else PHONE)
    assert decode_request(raw, in_body)[0] is not None
    reason = rejected(raw, queue)
    assert reason == (
        f"channel {in_body!r} in the body does not match the queue's channel {queue!r}"
    )


# -- _int_header ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 1),
        (3, 3),
        (1, 1),
        (0, 1),
        (-4, 1),
        ("7", 7),
        (" 8 ", 8),
        (b"9", 9),
        ("0", 1),
        ("-2", 1),
        ("", 1),
        ("abc", 1),
        ("2.5", 1),
        (b"\xff", 1),
        (True, 1),
        (False, 1),
        (2.0, 1),
        (Decimal(3), 1),
        (["3"], 1),
        ("9" * 5000, 1),  # beyond int()'s digit limit: a ValueError, not a crash
    ],
)
def test_int_header(value: object, expected: int) -> None:
    assert _int_header(value, 1) == expected


def test_int_header_uses_the_given_default() -> None:
    assert _int_header(None, 5) == 5
    assert _int_header("junk", 5) == 5
    assert _int_header(True, 5) == 5
    assert _int_header(12, 5) == 12


def test_int_header_never_goes_below_one() -> None:
    assert all(_int_header(v, 1) >= 1 for v in (-(10**9), 0, "-1", b"-7"))
