"""Webhook signatures of Twilio and Meta: pure functions, no I/O.

Both the webhook receiver (which verifies) and the sandbox (which signs its
status callbacks) use these, so one implementation is tested against the
providers' published test vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

TwilioParams = Mapping[str, str] | Iterable[tuple[str, str]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# What each provider's header can look like: base64 of a 20-byte HMAC-SHA1
# (28 characters, one "=" of padding), and "sha256=" with 64 lowercase hex
# digits. Anything else is refused before the body is read, and before any
# text that is not ASCII reaches an ``encode()``.
_TWILIO_SIGNATURE_RE = re.compile(r"[A-Za-z0-9+/]{27}=")
_META_SIGNATURE_RE = re.compile(r"sha256=[0-9a-f]{64}")


def _pairs(params: TwilioParams) -> list[tuple[str, str]]:
    # A MultiDict's items() yields every value of a repeated name, a dict's
    # its one value, so both and plain pair lists reduce to the same thing.
    items = params.items() if isinstance(params, Mapping) else params
    return [(str(name), str(value)) for name, value in items]


def twilio_signature(auth_token: str, url: str, params: TwilioParams) -> str:
    """``X-Twilio-Signature`` of a POST to ``url`` with form ``params``.

    The URL exactly as configured (query string included), then every
    parameter sorted by name (a repeated name's values sorted) appended as
    name + value with no separators; HMAC-SHA1 keyed with the auth token;
    base64.
    """
    data = url + "".join(name + value for name, value in sorted(_pairs(params)))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def url_port_variants(url: str) -> list[str]:
    """``url`` as given, and with its scheme's default port added or stripped.

    Twilio signs the URL as it was configured; a proxy in front of Herald may
    have rewritten the port, so both forms are accepted.
    """
    variants = [url]
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or not parts.netloc:
        return variants
    userinfo, at, hostport = parts.netloc.rpartition("@")
    try:
        port = parts.port
    except ValueError:
        return variants
    if port is None:
        hostport = f"{hostport}:{default}"
    elif port == default:
        hostport = hostport[: hostport.rindex(":")]
    else:
        return variants
    variants.append(urlunsplit(parts._replace(netloc=userinfo + at + hostport)))
    return variants


def twilio_signature_wellformed(signature: str | None) -> bool:
    """True when ``signature`` looks like an ``X-Twilio-Signature`` (whatever its value)."""
    return signature is not None and _TWILIO_SIGNATURE_RE.fullmatch(signature) is not None


def meta_signature_wellformed(header: str | None) -> bool:
    """True when ``header`` looks like an ``X-Hub-Signature-256`` (blanks around allowed)."""
    return header is not None and _META_SIGNATURE_RE.fullmatch(header.strip()) is not None


def verify_twilio(auth_token: str, url: str, params: TwilioParams, signature: str | None) -> bool:
    """True when ``signature`` is Twilio's for this URL (default port either way) and params."""
    if not twilio_signature_wellformed(signature):
        return False
    assert signature is not None
    given = signature.encode()
    pairs = _pairs(params)
    ok = False
    for candidate in url_port_variants(url):
        # Every candidate is compared so the time taken does not say which matched.
        expected = twilio_signature(auth_token, candidate, pairs).encode()
        ok |= hmac.compare_digest(expected, given)
    return ok


def meta_signature(app_secret: str, raw_body: bytes) -> str:
    """``X-Hub-Signature-256`` value: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    digest = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_meta(app_secret: str, raw_body: bytes, header: str | None) -> bool:
    """True when ``header`` is the ``X-Hub-Signature-256`` of ``raw_body`` (constant time)."""
    if not meta_signature_wellformed(header):
        return False
    assert header is not None
    expected = meta_signature(app_secret, raw_body).encode()
    return hmac.compare_digest(expected, header.strip().encode("ascii"))
