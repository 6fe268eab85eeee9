from __future__ import annotations

import pytest

from consumer.delivery.recipients import validate_recipient


@pytest.mark.parametrize("channel", ["sms", "whatsapp"])
@pytest.mark.parametrize(
    "to", ["+15551234567", "+447911123456", "+1555123", "+123456789012345"]
)
def test_e164_numbers_are_accepted(channel: str, to: str) -> None:
    assert validate_recipient(channel, to) is None


@pytest.mark.parametrize("channel", ["sms", "whatsapp"])
@pytest.mark.parametrize(
    "to",
    [
        "",
        "15551234567",  # no +
        "+05551234567",  # leading zero
        "+123456",  # 6 digits
        "+1234567890123456",  # 16 digits
        "+1 555 123 4567",
        "+1-555-123-4567",
        "+1555123456a",
        " +15551234567",
        "+15551234567\n",
    ],
)
def test_non_e164_numbers_are_refused(channel: str, to: str) -> None:
    reason = validate_recipient(channel, to)
    assert reason is not None and "E.164" in reason


@pytest.mark.parametrize("to", ["1234567890123456", "24011234567890123", "12345"])
def test_psids_are_accepted(to: str) -> None:
    assert validate_recipient("messenger", to) is None


@pytest.mark.parametrize(
    "to", ["", "1234", "abc123456", "+1234567890", "12345678901234567890123456789012345",
           "123 456", "1234567890123456\n"]
)
def test_bad_psids_are_refused(to: str) -> None:
    assert validate_recipient("messenger", to) is not None


@pytest.mark.parametrize(
    "to",
    ["http://example.com", "https://example.com/hook?x=1", "http://127.0.0.1:8090/http/a",
     "https://[::1]:8443/path"],
)
def test_absolute_http_urls_are_accepted(to: str) -> None:
    assert validate_recipient("http", to) is None


@pytest.mark.parametrize(
    "to",
    ["", "example.com/hook", "/relative/path", "ftp://example.com/x", "http://", "https:///x",
     "http://exa mple.com", "http://example.com:notaport/", "mailto:someone@example.com"],
)
def test_other_urls_are_refused(to: str) -> None:
    assert validate_recipient("http", to) is not None


def test_unknown_channel() -> None:
    assert validate_recipient("fax", "+15551234567") == "unknown channel 'fax'"


@pytest.mark.parametrize("channel", ["sms", "whatsapp"])
@pytest.mark.parametrize("to", [
    "+١٥٥٥١٢٣٤٥٦٧",  # Arabic-Indic digits
    "+۱۵۵۵۱۲۳۴۵۶۷",  # Extended Arabic-Indic (Persian) digits
    "+１５５５１２３４５６７",  # full-width digits
    "+1555१२३४५६७",  # Devanagari digits after ASCII ones
    "+1555123456\u0967",  # one non-ASCII digit at the end
])
def test_phone_numbers_take_ascii_digits_only(channel: str, to: str) -> None:
    reason = validate_recipient(channel, to)
    assert reason is not None and "E.164" in reason


@pytest.mark.parametrize("to", ["１２３４５６７８９０１２３４５６", "٢٤٠١١٢٣٤٥٦٧٨٩٠١٢"])
def test_psids_take_ascii_digits_only(to: str) -> None:
    assert validate_recipient("messenger", to) is not None
