"""Signatures on the http channel's POSTs (consumer/providers/signing.py) and
the verification recipe the README gives receivers."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consumer.errors import ConfigError
from consumer.providers.signing import sign, signed_bytes, verify
from consumer.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
NEW, OLD = "new-secret-0123456789", "old-secret-9876543210"
BODY = b'{"event":"order.paid","id":42}'
NOW = 1_767_225_600


def readme_recipe() -> Callable[..., bool]:
    """The README's ``verify_herald_signature``, run exactly as a receiver would copy it."""
    text = README.read_text()
    section = text[text.index("### Signed requests"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's signature section has no Python recipe"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    return namespace["verify_herald_signature"]  # type: ignore[no-any-return]


def test_header_carries_a_timestamp_and_one_signature_per_secret() -> None:
    header = sign([NEW, OLD], "m-1", BODY, NOW)
    assert header is not None
    t, v_new, v_old = header.split(",")
    assert t == f"t={NOW}"
    expected = hmac.new(NEW.encode(), f"{NOW}\nm-1\n".encode() + BODY, hashlib.sha256)
    assert v_new == f"v1={expected.hexdigest()}"
    assert v_old.startswith("v1=") and v_old != v_new


def test_no_secret_no_header() -> None:
    assert sign([], "m-1", BODY, NOW) is None


def test_verify_accepts_any_shared_secret_and_refuses_everything_else() -> None:
    header = sign([NEW, OLD], "m-1", BODY, NOW)
    assert header is not None
    assert verify(header, "m-1", BODY, [NEW], now=NOW)
    assert verify(header, "m-1", BODY, [OLD], now=NOW)  # receivers not yet rotated
    assert not verify(header, "m-1", BODY, ["other-secret-000000"], now=NOW)
    assert not verify(header, "m-1", BODY + b" ", [NEW], now=NOW)  # body changed
    assert not verify(header, "m-2", BODY, [NEW], now=NOW)  # replayed under another key
    assert not verify(header, "m-1", BODY, [NEW], now=NOW + 301)  # too old
    assert not verify(header, "m-1", BODY, [NEW], now=NOW - 301)  # from the future
    forged = header.replace(f"t={NOW}", f"t={NOW + 100}")
    assert not verify(forged, "m-1", BODY, [NEW], now=NOW + 100)  # timestamp is signed


@pytest.mark.parametrize("header", [
    "", "t=", "v1=abc", f"t={NOW}", f"t={NOW},v1=", "garbage", "t=١٢٣,v1=00",
    f"t={NOW},v1=\u00e9\u00e9", f"t=-{NOW},v1=00",
])
def test_malformed_headers_are_refused_without_raising(header: str) -> None:
    assert not verify(header, "m-1", BODY, [NEW], now=NOW)


def test_signed_bytes_cannot_be_shifted_between_key_and_body() -> None:
    # With "." as the separator, ("a.b", "c") and ("a", "b.c") would sign the same bytes.
    assert signed_bytes(NOW, "a.b", b"c") != signed_bytes(NOW, "a", b"b.c")


def test_readme_recipe_verifies_what_herald_signs() -> None:
    recipe = readme_recipe()
    import time

    now = int(time.time())
    header = sign([NEW, OLD], "order-42", BODY, now)
    assert header is not None
    assert recipe(header, "order-42", BODY, [NEW])
    assert recipe(header, "order-42", BODY, [OLD, "unrelated-secret-xyz"])
    assert not recipe(header, "order-42", BODY, ["unrelated-secret-xyz"])
    assert not recipe(header, "order-43", BODY, [NEW])
    assert not recipe(header, "order-42", BODY[:-1], [NEW])
    stale = sign([NEW], "order-42", BODY, now - 3600)
    assert stale is not None and not recipe(stale, "order-42", BODY, [NEW])
    assert not recipe("t=1,v1=00", "order-42", BODY, [NEW])


def test_signing_secrets_setting() -> None:
    s = Settings.from_env({"HERALD_HTTP_SIGNING_SECRETS": f" {NEW} , {OLD} "})
    assert s.http_signing_secrets == (NEW, OLD)
    assert Settings.from_env({}).http_signing_secrets == ()
    assert NEW not in repr(s) and OLD not in repr(s)


@pytest.mark.parametrize("value", ["short", f"{NEW},tiny", ",", " "])
def test_bad_signing_secrets_are_one_line_without_the_secret(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HERALD_HTTP_SIGNING_SECRETS": value})
    message = str(caught.value)
    assert message.startswith("HERALD_HTTP_SIGNING_SECRETS: ") and "\n" not in message
    assert "(got '***')" in message  # the value is a secret: never shown
    assert NEW not in message and "tiny" not in message and "short" not in message
