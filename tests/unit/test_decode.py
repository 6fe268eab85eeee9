"""The pipeline's decoder: ``decode_request`` (step 1 of DESIGN.md §5)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.delivery.pipeline import MAX_BODY_BYTES, decode_request

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


# -- what PostgreSQL and AMQP cannot carry -----------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("message_id", "m-\x00"),
    ("to", "+1555\x00"),
    ("campaign_id", "c\x00"),
    ("body", "hi\x00"),
])
def test_nul_in_a_field_is_refused(field: str, value: str) -> None:
    reason = rejected(body(**{field: value}))
    assert reason.startswith(f"{field}")
    assert "NUL" in reason


@pytest.mark.parametrize("raw", [
    body(channel="http", to="https://example.com/", body={"a": {"b": ["x\x00"]}}),
    body(channel="http", to="https://example.com/", body={"a\x00": 1}),
    body(metadata={"k": "v\x00"}),
    body(metadata={"\x00": "v"}),
    body(metadata={"deep": [[[{"k\x00": 1}]]]}),
])
def test_nul_inside_body_and_metadata_is_refused(raw: bytes) -> None:
    channel = json.loads(raw)["channel"]
    reason = rejected(raw, channel)
    assert "NUL" in reason
    assert "\x00" not in reason


def test_where_the_nul_is_is_named() -> None:
    raw = body(channel="http", to="https://example.com/", body={"a": {"b": ["ok", "x\x00"]}})
    assert rejected(raw, "http") == (
        "body.a.b[1] contains NUL (\\u0000), which PostgreSQL cannot store")


def test_an_odd_key_is_shown_escaped() -> None:
    raw = body(metadata={"line\nbreak\x1b[31m": "\x00"})
    reason = rejected(raw)
    assert "\x1b" not in reason and "\n" not in reason
    assert 'metadata["line\\nbreak\\u001b[31m"]' in reason


def test_message_id_of_200_characters_but_over_255_bytes() -> None:
    assert decode_request(body(message_id="é" * 127), "sms")[0] is not None  # 254 bytes
    reason = rejected(body(message_id="é" * 128))  # 128 characters, 256 bytes
    assert reason == ("message_id: is 256 bytes in UTF-8; at most 255 (it is the AMQP"
                      " message-id)")
    assert rejected(body(message_id="😀" * 64)).startswith("message_id: is 256 bytes")


def test_message_id_over_200_characters() -> None:
    assert rejected(body(message_id="m" * 201)).startswith("message_id: String should have")


def test_recipient_over_2048_bytes() -> None:
    to = "https://example.com/" + "é" * 1020
    reason = rejected(body(channel="http", to=to), "http")
    assert reason.startswith("to: is 2060 bytes in UTF-8; at most 2048")


@pytest.mark.parametrize("field", ["body", "metadata"])
def test_nesting_up_to_the_limit_is_accepted(field: str) -> None:
    value: Any = "leaf"
    for _ in range(32):
        value = {"k": value}
    raw = body(channel="http", to="https://example.com/", **{field: value})
    assert decode_request(raw, "http")[0] is not None


@pytest.mark.parametrize("field", ["body", "metadata"])
def test_nesting_past_the_limit_is_refused(field: str) -> None:
    value: Any = "leaf"
    for _ in range(33):
        value = [value]
    if field == "metadata":
        value = {"k": value[0]}
    raw = body(channel="http", to="https://example.com/", **{field: value})
    reason = rejected(raw, "http")
    assert "nested deeper than 32 levels" in reason
    assert reason.startswith(field)


@pytest.mark.parametrize("depth", [300, 100_000])
def test_very_deep_nesting_never_raises(depth: int) -> None:
    for where in ("body", "metadata"):
        inner = "[" * depth + "]" * depth
        value = inner if where == "body" else '{"k": ' + inner + "}"
        raw = ('{"message_id": "m", "channel": "http", "to": "https://example.com/",'
               f' "body": 1, "{where}": {value}}}').encode()
        if where == "body":
            raw = raw.replace(b'"body": 1, ', b"")
        reason = rejected(raw, "http")
        assert "nested deeper than 32 levels" in reason


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-2e308",
                                    "9" * 400])
def test_numbers_a_float_cannot_hold_are_refused(number: str) -> None:
    raw = ('{"message_id": "m", "channel": "http", "to": "https://example.com/",'
           f' "body": {{"n": {number}}}}}').encode()
    reason = rejected(raw, "http")
    assert reason.startswith("body.n ") or reason.startswith("body: body.n")
    assert "64-bit float" in reason or "finite" in reason


@pytest.mark.parametrize("number", ["1e-400", "-4e-99999", "0." + "0" * 400 + "1"])
def test_numbers_too_small_for_a_float_are_refused(number: str) -> None:
    raw = ('{"message_id": "m", "channel": "http", "to": "https://example.com/",'
           f' "body": [1, {number}]}}').encode()
    reason = rejected(raw, "http")
    assert "too small for a 64-bit float" in reason


@pytest.mark.parametrize("number", ["0", "0.0", "0e-500", "-0.0", "1e-300", "1.5e308",
                                    "123456789012345678901234567890"])
def test_numbers_a_float_holds_are_accepted(number: str) -> None:
    raw = ('{"message_id": "m", "channel": "http", "to": "https://example.com/",'
           f' "body": {{"n": {number}, "s": "1e-999 in a string is text"}}}}').encode()
    request, reason = decode_request(raw, "http")
    assert reason == "" and request is not None


def test_the_limit_is_a_parameter() -> None:
    raw = body(body="x" * 2000)
    assert decode_request(raw, "sms", max_bytes=len(raw))[0] is not None
    reason = decode_request(raw, "sms", max_bytes=len(raw) - 1)[1]
    assert reason == f"body of {len(raw)} bytes exceeds the {len(raw) - 1}-byte limit"


def test_many_odd_keys_keep_the_reason_short() -> None:
    raw = json.dumps({f"bad\x00{i}" * 50: i for i in range(200)}).encode()
    reason = rejected(raw)
    assert len(reason) <= 1000
