"""Signatures against the providers' published test vectors (PROVIDERS.md)."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from consumer.status.signatures import (
    meta_signature,
    twilio_signature,
    url_port_variants,
    verify_meta,
    verify_twilio,
)

TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
URL_443 = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675309"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
]
SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
SIGNATURE_443 = "kvajT1Ptam85bY51eRf/AJRuM3w="


def test_twilio_vector() -> None:
    assert twilio_signature(TOKEN, URL, PARAMS) == SIGNATURE


def test_twilio_vector_with_default_port() -> None:
    assert twilio_signature(TOKEN, URL_443, PARAMS) == SIGNATURE_443


@pytest.mark.parametrize("params", [PARAMS, list(reversed(PARAMS)), dict(PARAMS),
                                    MultiDict(PARAMS)])
def test_twilio_parameter_order_and_container_do_not_matter(params: object) -> None:
    assert twilio_signature(TOKEN, URL, params) == SIGNATURE  # type: ignore[arg-type]


@pytest.mark.parametrize("url", [URL, URL_443])
@pytest.mark.parametrize("signature", [SIGNATURE, SIGNATURE_443])
def test_verify_twilio_accepts_the_url_with_or_without_the_default_port(
    url: str, signature: str
) -> None:
    assert verify_twilio(TOKEN, url, PARAMS, signature)


@pytest.mark.parametrize(
    "token, url, params, signature",
    [
        ("54321", URL, PARAMS, SIGNATURE),
        (TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=3", PARAMS, SIGNATURE),
        (TOKEN, "https://mycompany.com:8443/myapp.php?foo=1&bar=2", PARAMS, SIGNATURE),
        (TOKEN, URL, [*PARAMS, ("Extra", "1")], SIGNATURE),
        (TOKEN, URL, PARAMS[:-1], SIGNATURE),
        (TOKEN, URL, PARAMS, SIGNATURE.lower()),
        (TOKEN, URL, PARAMS, ""),
        (TOKEN, URL, PARAMS, None),
        (TOKEN, URL, PARAMS, "ünïcode"),
    ],
)
def test_verify_twilio_refuses(token: str, url: str, params: list[tuple[str, str]],
                               signature: str | None) -> None:
    assert not verify_twilio(token, url, params, signature)


def test_repeated_names_are_sorted_by_value() -> None:
    one = twilio_signature(TOKEN, URL, [("A", "2"), ("A", "1"), ("B", "x")])
    other = twilio_signature(TOKEN, URL, MultiDict([("B", "x"), ("A", "1"), ("A", "2")]))
    assert one == other
    assert one == twilio_signature(TOKEN, URL + "A1A2Bx", [])


@pytest.mark.parametrize(
    "url, variants",
    [
        ("https://a.com/x", ["https://a.com/x", "https://a.com:443/x"]),
        ("https://a.com:443/x", ["https://a.com:443/x", "https://a.com/x"]),
        ("http://a.com/x?y=1", ["http://a.com/x?y=1", "http://a.com:80/x?y=1"]),
        ("http://a.com:80/x", ["http://a.com:80/x", "http://a.com/x"]),
        ("http://u:p@a.com/x", ["http://u:p@a.com/x", "http://u:p@a.com:80/x"]),
        ("http://[::1]/x", ["http://[::1]/x", "http://[::1]:80/x"]),
        ("http://a.com:8080/x", ["http://a.com:8080/x"]),
        ("https://a.com:80/x", ["https://a.com:80/x"]),
    ],
)
def test_url_port_variants(url: str, variants: list[str]) -> None:
    assert url_port_variants(url) == variants


META = "0329a06b62cd16b33eb6792be8c60b158d89a2ee3a876fce9a881ebb488c0914"


def test_meta_vector() -> None:
    assert meta_signature("secret", b"test") == f"sha256={META}"


def test_verify_meta() -> None:
    assert verify_meta("secret", b"test", f"sha256={META}")
    assert verify_meta("secret", b"test", f" sha256={META} ")


@pytest.mark.parametrize(
    "secret, body, header",
    [
        ("secret", b"test ", f"sha256={META}"),
        ("Secret", b"test", f"sha256={META}"),
        ("secret", b"test", META),
        ("secret", b"test", f"sha1={META}"),
        ("secret", b"test", f"sha256={META.upper()}"),
        ("secret", b"test", ""),
        ("secret", b"test", None),
        ("secret", b"test", "sha256=ü"),
    ],
)
def test_verify_meta_refuses(secret: str, body: bytes, header: str | None) -> None:
    assert not verify_meta(secret, body, header)
