"""Structured JSON logs (structlog) with per-message context and masked recipients."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import structlog

# E.164 numbers have at most 15 digits; longer all-digit ids are Messenger PSIDs.
_PHONE_RE = re.compile(r"\+?[0-9]{6,15}")


def mask_recipient(value: str | None) -> str | None:
    """A recipient as it may appear in logs and listings.

    Phone numbers keep their first three and last two digits
    (``+1555…67`` → ``+15*******67``); URLs keep scheme and host; other
    identifiers (PSIDs) keep their last four characters.
    """
    if value is None:
        return None
    compact = value.replace(" ", "").replace("-", "")
    if _PHONE_RE.fullmatch(compact):
        plus = "+" if compact.startswith("+") else ""
        digits = compact.lstrip("+")
        return plus + digits[:2] + "*" * (len(digits) - 4) + digits[-2:]
    if "://" in value:
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. a broken IPv6 host; logging must not fail on it
            scheme = value.split("://", 1)[0]
            return f"{scheme if scheme.isalnum() else '?'}://?/…"
        return f"{parts.scheme}://{parts.hostname or '?'}/…"
    if len(value) <= 4:
        return "*" * len(value)
    return "*" * (len(value) - 4) + value[-4:]


# Keys whose string values are recipients (in log events, provider payloads, requests).
_MASKED_KEYS = frozenset({"to", "recipient", "recipient_id", "from", "from_", "To", "From"})


# Deeper than this a value is replaced, not walked: recursion must not fail on
# hostile nesting, and what cannot be walked cannot be shown unmasked.
MAX_MASK_DEPTH = 64
TOO_DEEP = f"… (nested deeper than {MAX_MASK_DEPTH} levels)"


def mask_tree(value: Any, _depth: int = 0) -> Any:
    """A JSON-like value with every recipient-like field masked, at any depth."""
    if isinstance(value, dict | list) and _depth >= MAX_MASK_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {k: mask_recipient(v) if k in _MASKED_KEYS and isinstance(v, str)
                else mask_tree(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_tree(v, _depth + 1) for v in value]
    return value


# Header names whose values are credentials, whoever set them (a publisher's
# AMQP headers are stored with a copy the broker parked).
_SECRET_HEADER_RE = re.compile(
    r"auth|token|secret|passw|cookie|api[-_]?key|signature|credential|session", re.IGNORECASE)


def mask_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` with the values of credential-like headers (Authorization,
    ``*token*``, ``*secret*``, API keys, cookies, signatures) replaced by ``***``."""
    return {k: "***" if _SECRET_HEADER_RE.search(str(k)) and v not in (None, "") else v
            for k, v in headers.items()}


def _mask_recipients(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask recipients in an event's fields, and inside nested ones (a
    provider's raw payload, a request logged whole) at any depth."""
    for key, value in event.items():
        if key in _MASKED_KEYS and isinstance(value, str):
            event[key] = mask_recipient(value)
        elif isinstance(value, dict | list):
            # Tuples are left alone: structlog's own exc_info is one.
            event[key] = mask_tree(value)
    return event


def configure(level: str = "info", *, json_output: bool = True) -> None:
    """Configure structlog once per process: JSON lines on stderr."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_recipients,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line in this block, then restore what they were.

    Like ``structlog.contextvars.bound_contextvars`` without its snapshot of
    the whole context on entry (a tenth of a delivery's logging cost): each
    variable is put back with its own token.
    """
    tokens = structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
