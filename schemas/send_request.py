"""A send request: what applications publish to ``{prefix}`` as ``send.{channel}``.

Besides the field types, a request is refused when it holds what PostgreSQL
or AMQP cannot carry (the limits are documented in the README, "Publishing a
message"):

- NUL (``\\u0000``) anywhere: in ids, the recipient, and in every string and
  object key inside ``body`` and ``metadata`` (PostgreSQL's ``text`` and
  ``jsonb`` cannot store it);
- a ``message_id`` over 255 bytes in UTF-8 (it is the AMQP message-id, a
  shortstr), a ``to`` over 2048 bytes (it is indexed, and a btree index row
  holds about 2.7 kB);
- ``body`` or ``metadata`` nested deeper than :data:`MAX_NESTING` arrays and
  objects (every reader of a request, Herald's and the publisher's, recurses
  over it);
- a number that a 64-bit float cannot hold (NaN, infinities, beyond ±1.8e308).
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

Channel = Literal["http", "sms", "whatsapp", "messenger"]
RetryMode = Literal["auto", "manual"]
Priority = Literal["high", "normal"]

CHANNELS: tuple[Channel, ...] = ("http", "sms", "whatsapp", "messenger")
# The error types a retry rule may name (the others are never retried).
RetryableErrorType = Literal["rate_limit", "network", "provider_error"]


class RetryRuleSpec(BaseModel):
    """A retry budget for one kind of failure of this message: an error type, a
    provider code, or both. It wins over every other rule for that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_type: RetryableErrorType | None = Field(
        default=None, description="Failures of this error type.")
    code: str | None = Field(default=None, min_length=1, max_length=100,
                             description="Failures with this provider code, e.g. '30003'.")
    max_attempts: int = Field(ge=1, le=100,
                              description="Attempts that may end in this failure (3: two "
                                          "retries).")
    base_delay_s: float | None = Field(default=None, ge=1, le=262143)
    max_delay_s: float | None = Field(default=None, ge=1, le=262143)

    @model_validator(mode="after")
    def _names_a_failure(self) -> RetryRuleSpec:
        if self.error_type is None and self.code is None:
            raise ValueError("a retry rule names an error_type, a code, or both")
        return self

# Arrays and objects inside ``body`` or ``metadata``: ``{"a": [1]}`` is 2 deep.
MAX_NESTING = 32
# AMQP's message-id property is a shortstr.
MAX_MESSAGE_ID_BYTES = 255
# A btree index row holds about 2.7 kB; the recipient is indexed with a timestamp.
MAX_RECIPIENT_BYTES = 2048
_PATH_SHOWN = 80
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    if "\x00" in value:
        return "contains NUL (\\u0000), which PostgreSQL cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def _where(path: str) -> str:
    return path if len(path) <= _PATH_SHOWN else path[: _PATH_SHOWN - 3] + "..."


def _child(path: str, key: str) -> str:
    # A key with odd characters (a newline, an escape) is shown JSON-escaped:
    # the path ends up in one-line reasons, headers and logs.
    if _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key[:40])}]"


def json_problem(value: Any, root: str) -> str | None:
    """Why a JSON value (``body``, ``metadata``) cannot be stored, or None.

    Walks the value without recursion, so any depth is answered, not only
    those Python's stack survives.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, root)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                return f"{_where(path)} {problem}"
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_where(path)} is {item!r}: numbers must be finite"
        elif isinstance(item, int):
            if abs(item) > sys.float_info.max:
                return f"{_where(path)} is a number too large for a 64-bit float"
        elif isinstance(item, dict | list):
            if depth >= MAX_NESTING:
                return (f"{_where(path)} is nested deeper than {MAX_NESTING} levels of"
                        " arrays and objects")
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str):
                        problem = text_problem(key)
                        if problem is not None:
                            return f"a key in {_where(path)} {problem}"
                    stack.append((child, depth + 1, _child(path, str(key))))
            else:
                for number, child in enumerate(item):
                    stack.append((child, depth + 1, f"{path}[{number}]"))
    return None


class RetrySpec(BaseModel):
    """Per-message retry overrides; any field left out comes from the campaign, then settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int | None = Field(
        default=None, ge=1, le=100, description="Attempts in all, counting the first."
    )
    base_delay_s: float | None = Field(
        default=None, ge=1, le=262143, description="Delay after the first failure, seconds."
    )
    max_delay_s: float | None = Field(
        default=None, ge=1, le=262143, description="Upper bound of the exponential delay."
    )
    mode: RetryMode | None = Field(
        default=None, description="'manual' parks on the first failure for a person to replay."
    )
    rules: tuple[RetryRuleSpec, ...] | None = Field(
        default=None, max_length=20,
        description="Budgets per kind of failure, winning over the campaign's and the "
                    "shipped rules; max_attempts above is the budget of the other kinds.")


def _storable_within(value: str, max_bytes: int, why: str = "") -> str:
    """``value`` if PostgreSQL and AMQP can carry it and it is at most ``max_bytes``
    in UTF-8; else ValueError saying what is wrong."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(f"is {size} bytes in UTF-8; at most {max_bytes}{why}")
    return value


class SendRequest(BaseModel):
    """One message to deliver. ``message_id`` is the idempotency key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message_id: str = Field(
        min_length=1, max_length=200,
        description="The idempotency key: 1-200 characters and at most 255 bytes in UTF-8,"
                    " no NUL.",
    )
    channel: Channel
    to: str = Field(
        min_length=1,
        max_length=2048,
        description="E.164 number (sms, whatsapp), page-scoped id (messenger) or URL (http);"
                    " at most 2048 bytes in UTF-8, no NUL.",
    )
    body: JsonValue = Field(
        description="Text; for whatsapp text or {'template': {...}}; for http any JSON value."
                    f" No NUL in any string or key, at most {MAX_NESTING} levels of arrays and"
                    " objects, numbers within a 64-bit float's range."
    )
    campaign_id: str | None = Field(default=None, min_length=1, max_length=200,
                                    description="No NUL.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="The publisher's own data, stored with the message; the same rules as"
                    " body.",
    )
    retry: RetrySpec | None = None
    priority: Priority | None = Field(
        default=None, description="'high' marks transactional traffic; default by campaign."
    )
    send_at: AwareDatetime | None = Field(default=None, description="Defer the first attempt.")
    expires_at: AwareDatetime | None = Field(
        default=None, description="Not sent after this instant (status 'expired')."
    )

    @field_validator("message_id")
    @classmethod
    def _message_id_fits(cls, value: str) -> str:
        return _storable_within(value, MAX_MESSAGE_ID_BYTES, " (it is the AMQP message-id)")

    @field_validator("to")
    @classmethod
    def _recipient_fits(cls, value: str) -> str:
        return _storable_within(value, MAX_RECIPIENT_BYTES)

    @field_validator("campaign_id")
    @classmethod
    def _campaign_fits(cls, value: str | None) -> str | None:
        problem = None if value is None else text_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    # Before pydantic's own validation: a value nested too deep gets this
    # module's message rather than a recursion error with a path a mile long.
    @field_validator("body", "metadata", mode="before")
    @classmethod
    def _json_fits(cls, value: Any, info: Any) -> Any:
        problem = json_problem(value, info.field_name)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _body_fits_channel(self) -> SendRequest:
        body = self.body
        if self.channel in ("sms", "messenger"):
            if not isinstance(body, str) or not body:
                raise ValueError(f"body must be non-empty text for channel {self.channel!r}")
        elif self.channel == "whatsapp":
            if isinstance(body, str):
                if not body:
                    raise ValueError("body must not be empty")
            elif not (isinstance(body, dict) and isinstance(body.get("template"), dict)):
                raise ValueError("whatsapp body must be text or an object with a 'template' object")
        return self

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now
