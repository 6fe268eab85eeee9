"""The webhook edge's pure checks: signature header shapes, the bounded JSON and
form parsers, storable text, and the start-up check of HERALD_PUBLIC_URL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.status.signatures import (
    meta_signature,
    meta_signature_wellformed,
    twilio_signature,
    twilio_signature_wellformed,
    verify_meta,
    verify_twilio,
)
from consumer.status.webhooks import (
    MAX_JSON_DEPTH,
    MAX_TWILIO_FIELDS,
    callback_problem,
    parse_json_bounded,
    parse_twilio_form,
    storable_text,
)

# aiohttp decodes header bytes that are not UTF-8 into lone surrogates.
NOT_UTF8 = b"\xff\xfe".decode("utf-8", "surrogateescape") * 14


def test_real_signatures_are_wellformed() -> None:
    assert twilio_signature_wellformed(twilio_signature("token", "https://h/x", {"a": "b"}))
    assert meta_signature_wellformed(meta_signature("secret", b"{}"))
    assert meta_signature_wellformed(" " + meta_signature("secret", b"{}") + "\t")


@pytest.mark.parametrize("header", [
    None, "", "A" * 28, "A" * 27 + "=" + "=", "A" * 26 + "==", "é" * 27 + "=",
    NOT_UTF8, "A" * 27 + "=\n", "A" * 13 + " " + "A" * 13 + "=",
])
def test_misshapen_twilio_signatures(header: str | None) -> None:
    assert not twilio_signature_wellformed(header)
    # …and verifying one never raises, whatever its characters.
    assert not verify_twilio("token", "https://h/x", [], header)


@pytest.mark.parametrize("header", [
    None, "", "sha256=", "sha256=" + "a" * 63, "sha256=" + "A" * 64, "sha1=" + "a" * 40,
    "SHA256=" + "a" * 64, "a" * 64, "sha256=" + "é" * 64, "sha256=" + NOT_UTF8,
])
def test_misshapen_meta_signatures(header: str | None) -> None:
    assert not meta_signature_wellformed(header)
    assert not verify_meta("secret", b"{}", header)


def nest(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def test_json_up_to_the_depth_limit_is_read() -> None:
    document = nest(MAX_JSON_DEPTH)
    assert parse_json_bounded(json.dumps(document).encode()) == document


@pytest.mark.parametrize("raw, reason", [
    (json.dumps(nest(MAX_JSON_DEPTH + 1)).encode(), "nested deeper"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"a": ' * 50_000, "nested deeper"),
    (b"[" + b"7" * 33 + b"]", "longer than"),
    (b"[-" + b"1" * 32 + b"]", "longer than"),
    (b"[1e999]", "out of range"),
    (b"[-1e999]", "out of range"),
    (b"[NaN]", "NaN"),
    (b"[Infinity]", "Infinity"),
    (b'{"a": -Infinity}', "-Infinity"),
    (b'"\xff"', "not UTF-8"),
    (b"", "not JSON"),
    (b'{"a": 1', "not JSON"),
    (b"\x00", "not JSON"),
])
def test_hostile_json_is_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_json_bounded(raw)


def test_json_numbers_within_bounds() -> None:
    raw = b'{"t": 1458668856463, "f": 1.5e3, "n": -12, "i": 12345678901234567890}'
    assert parse_json_bounded(raw) == {"t": 1458668856463, "f": 1500.0, "n": -12,
                                       "i": 12345678901234567890}


def test_unstorable_characters_become_replacement_characters() -> None:
    raw = b'{"a\\u0000b": ["x\\u0000", "\\ud800y", "\\udc00", "\\ud83d\\ude00"]}'
    assert parse_json_bounded(raw) == {"a\ufffdb": ["x\ufffd", "\ufffdy", "\ufffd", "😀"]}
    assert storable_text("plain é") == "plain é"
    assert storable_text("\x00\ud800\udfff") == "\ufffd" * 3


def test_twilio_form_fields_are_counted_before_they_are_split() -> None:
    fields = "&".join(f"f{i}=v" for i in range(MAX_TWILIO_FIELDS)).encode()
    assert len(parse_twilio_form(fields)) == MAX_TWILIO_FIELDS
    with pytest.raises(ValueError):
        parse_twilio_form(fields + b"&one=more")
    assert parse_twilio_form(b"A=%00&B=%FF&C=") == [("A", "\x00"), ("B", "\ufffd"), ("C", "")]


@pytest.mark.parametrize("public_url, kind", [
    ("http://127.0.0.1:8080", "loopback"),
    ("http://127.1.2.3", "loopback"),
    ("http://localhost:8080", "loopback"),
    ("http://LOCALHOST.", "loopback"),
    ("http://herald.localhost", "loopback"),
    ("http://[::1]:8080", "loopback"),
    ("http://[::ffff:127.0.0.1]", "loopback"),
    ("http://0.0.0.0:8080", "unspecified"),
    ("http://10.1.2.3", "private"),
    ("https://192.168.1.20", "private"),
    ("http://[fd00::1]", "private"),
    ("http://169.254.1.1", "link-local"),
    ("http://[fe80::1]", "link-local"),
])
def test_a_local_public_url_is_a_problem_for_a_remote_provider(public_url: str,
                                                               kind: str) -> None:
    problem = callback_problem(public_url, "https://api.twilio.com")
    assert problem is not None
    assert f"is a {kind} address" in problem and "HERALD_PUBLIC_URL" in problem


@pytest.mark.parametrize("public_url", [
    "https://herald.example.com", "https://93.184.215.14:8443", "http://[2606:4700::1]",
    "https://localhost.example.com",
])
def test_a_public_url_that_may_be_reachable_is_no_problem(public_url: str) -> None:
    assert callback_problem(public_url, "https://api.twilio.com") is None


@pytest.mark.parametrize("provider_url", ["http://127.0.0.1:8090", "http://localhost:8090"])
def test_a_provider_on_loopback_can_call_back_loopback(provider_url: str) -> None:
    # The sandbox (make run, the tests) runs beside Herald.
    assert callback_problem("http://127.0.0.1:8080", provider_url) is None
