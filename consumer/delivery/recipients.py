"""Recipient validation per channel: pure functions, no I/O.

The pipeline checks the recipient before it spends an attempt on the
provider, so a malformed number is parked as ``invalid_recipient`` at once
instead of costing a round trip (and, at Twilio, money) to learn the same.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# [0-9], not \d: \d also matches Arabic-Indic, full-width and other digits,
# which no provider takes and which would slip past the masking of logs.
E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
# A page-scoped id is a decimal number, 15-17 digits today; we accept a wider
# range so a change of length at Meta does not park good traffic.
PSID_RE = re.compile(r"^[0-9]{5,32}$")  # ASCII digits only, like E164_RE


def validate_recipient(channel: str, to: str) -> str | None:
    """None when ``to`` is a usable recipient for ``channel``, else the reason it is not.

    ``sms`` and ``whatsapp`` take an E.164 number (``+`` then 7 to 15 digits,
    no leading zero), ``messenger`` a page-scoped id (PSID, digits only) and
    ``http`` an absolute ``http``/``https`` URL with a host.
    """
    if channel in ("sms", "whatsapp"):
        if not E164_RE.fullmatch(to):
            return "not an E.164 phone number (+ and 7 to 15 digits, no leading zero)"
        return None
    if channel == "messenger":
        if not to:
            return "empty page-scoped id"
        if not PSID_RE.fullmatch(to):
            return "not a page-scoped id (5 to 32 digits)"
        return None
    if channel == "http":
        return _url_problem(to)
    return f"unknown channel {channel!r}"


def _url_problem(to: str) -> str | None:
    if any(c.isspace() for c in to):
        return "URL contains whitespace"
    try:
        parts = urlsplit(to)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return "not an absolute http(s) URL"
    if not parts.hostname:
        return "URL has no host"
    return None
