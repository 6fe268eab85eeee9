"""What the provider adapters share: a classification rule, the HTTP-status
fallback for codes no table knows, and keeping secrets out of error text.

Each adapter keeps its own table (code → :class:`Rule`) as data next to it;
the functions that apply a table are pure so every row is unit-tested.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from consumer.errors import RETRYABLE_BY_DEFAULT, DeliveryError, ErrorType
from consumer.logs import mask_recipient
from consumer.text import storable

# Error text is stored and shown to operators; keep it to a readable size.
MAX_ERROR_TEXT = 300


class Rule(NamedTuple):
    """How one provider error code is handled.

    ``provider_wide`` errors say nothing about the message but about the
    channel (an expired token, a suspended account): the pipeline pauses the
    message instead of charging it an attempt. ``min_retry_after`` is a floor
    on the delay the provider documents for the code.
    """

    error_type: ErrorType
    retryable: bool
    provider_wide: bool = False
    min_retry_after: float | None = None
    about_recipient: bool = False


def rule(error_type: ErrorType, *, provider_wide: bool = False,
         min_retry_after: float | None = None, retryable: bool | None = None,
         about_recipient: bool = False) -> Rule:
    """A :class:`Rule` whose retryability defaults to the error type's.

    ``about_recipient``: a transient failure of this one recipient (it never
    feeds outage detection, see :mod:`consumer.delivery.outage`).
    """
    default = error_type in RETRYABLE_BY_DEFAULT
    return Rule(error_type, default if retryable is None else retryable, provider_wide,
                min_retry_after, about_recipient)


def status_rule(status: int) -> Rule:
    """The fallback for an answer whose code no table knows: judge by HTTP status.

    A bare 401 means the credentials were refused, which holds for every
    message of the channel, so it is provider-wide like the known token codes;
    a bare 403 may concern one recipient or one content, so it is not.
    """
    if status == 401:
        return rule(ErrorType.ACCESS_TOKEN, provider_wide=True)
    if status == 403:
        return rule(ErrorType.PERMISSION)
    if status == 429:
        return rule(ErrorType.RATE_LIMIT)
    if status in (408, 425) or status >= 500:
        return rule(ErrorType.PROVIDER_ERROR)
    if 400 <= status < 500:
        return rule(ErrorType.INVALID_REQUEST)
    # A 1xx/3xx answer to an API POST: the base URL points somewhere wrong.
    return rule(ErrorType.OTHER, retryable=False)


def make_error(rule_: Rule, message: str, *, code: str, retry_after: float | None) -> DeliveryError:
    """The :class:`DeliveryError` a rule gives, with the provider's Retry-After honoured."""
    if rule_.min_retry_after is not None:
        retry_after = max(retry_after or 0.0, rule_.min_retry_after)
    return DeliveryError(
        rule_.error_type,
        shorten(message),
        code=code,
        retry_after=retry_after,
        retryable=rule_.retryable,
        provider_wide=rule_.provider_wide,
        about_recipient=rule_.about_recipient,
    )


def shorten(text: str) -> str:
    """Error text as it is stored: one line, storable in PostgreSQL, at most
    :data:`MAX_ERROR_TEXT` characters."""
    return storable(" ".join(text.split()), MAX_ERROR_TEXT)


_URL_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#\s'\"<>]*)[^\s'\"<>]*")


def redact_urls(text: str) -> str:
    """``text`` with every URL cut to its scheme and host (``https://host/…``).

    Paths and query strings carry ids and tokens (a webhook URL with its
    key, an API URL with an account); error text is stored and shown.
    Credentials before the host go too.
    """
    def short(match: re.Match[str]) -> str:
        host = match.group(2).rpartition("@")[2]
        rest = match.group(0)[len(match.group(1)) + len(match.group(2)):]
        return f"{match.group(1)}{host}" + ("/…" if rest else "")

    return _URL_RE.sub(short, text)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret replaced by ``***``, however it was URL-encoded.

    Belt and braces: adapters never put credentials into error text on
    purpose, but a provider or a library may echo them back, and URL
    libraries differ in which characters they escape (``/``, ``+``, ``=``).
    """
    for secret in secrets:
        if secret:
            text = _secret_pattern(secret).sub("***", text)
    return text


def _secret_pattern(secret: str) -> re.Pattern[str]:
    # Each character either as itself or as its %XX escapes (either case);
    # a space also as "+", as form encoding writes it.
    parts = []
    for char in secret:
        escaped = "".join(f"%{byte:02x}" for byte in char.encode())
        options = [re.escape(char), re.escape(escaped), re.escape(escaped.upper())]
        if char == " ":
            options.append(r"\+")
        parts.append(f"(?:{'|'.join(options)})")
    return re.compile("".join(parts))


def mask_recipient_in(text: str, recipient: str) -> str:
    """``text`` with the recipient (with or without its ``+``) masked as in logs.

    Providers quote the number in some messages (Twilio 21211); error text
    goes to logs, parking headers and notifications, where recipients are masked.
    """
    masked = mask_recipient(recipient) or ""
    for form in sorted({recipient, recipient.lstrip("+")}, key=len, reverse=True):
        if len(form) >= 5:
            text = text.replace(form, masked)
    return text


def scrubbed(error: DeliveryError, recipient: str, secrets: Iterable[str | None]) -> DeliveryError:
    """A copy of ``error`` whose text has the recipient masked and secrets removed."""
    return DeliveryError(
        error.error_type,
        redact(redact_urls(mask_recipient_in(error.message, recipient)), secrets),
        code=error.code,
        retry_after=error.retry_after,
        retryable=error.retryable,
        provider_wide=error.provider_wide,
        about_recipient=error.about_recipient,
    )


def as_int(value: Any) -> int | None:
    """A provider's numeric code given as a number or as decimal text; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None
