"""The small error vocabulary Herald speaks.

Provider adapters raise :class:`DeliveryError` and nothing else; the pipeline
only ever looks at its ``error_type`` (the operator's vocabulary from
DESIGN.md §5), ``code``, ``message`` and ``retry_after``.
"""

from __future__ import annotations

import math
from enum import StrEnum

from consumer.text import storable

# What is kept of an error's text and code; both are stored and shown.
MAX_MESSAGE = 2000
MAX_CODE = 100
# The longest Retry-After believed: one trip through the delay levels (2^18 - 1 s,
# about three days). A provider, or any endpoint a publisher names, could
# otherwise ask for a delay no timestamp or AMQP header can carry.
MAX_RETRY_AFTER_S = 262143.0


class ErrorType(StrEnum):
    ACCESS_TOKEN = "access_token"
    PERMISSION = "permission"
    RATE_LIMIT = "rate_limit"
    NETWORK = "network"
    PROVIDER_ERROR = "provider_error"
    INVALID_RECIPIENT = "invalid_recipient"
    INVALID_REQUEST = "invalid_request"
    INVALID_PAYLOAD = "invalid_payload"
    EXPIRED = "expired"
    OTHER = "other"


RETRYABLE_BY_DEFAULT: frozenset[ErrorType] = frozenset(
    {ErrorType.RATE_LIMIT, ErrorType.NETWORK, ErrorType.PROVIDER_ERROR}
)


class DeliveryError(Exception):
    """A send did not succeed.

    ``retryable`` defaults to the error type's default (DESIGN.md §5) but an
    adapter may override it per code (e.g. a permanent ``provider_error``).
    ``provider_wide`` marks errors that say nothing about this message but
    about the whole channel (an expired token): they must not burn attempts.
    ``about_recipient`` marks a transient failure the provider pins on the
    recipient (Twilio 30003, handset unreachable): retried, but no sign of an
    outage. ``message`` and ``code`` are made storable
    (:func:`consumer.text.storable`) whatever text a provider or a library put
    into them; ``retry_after`` is capped at :data:`MAX_RETRY_AFTER_S` (and
    dropped when it is not a finite number).
    """

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        provider_wide: bool = False,
        about_recipient: bool = False,
    ) -> None:
        message = storable(message, MAX_MESSAGE)
        code = None if code is None else storable(code, MAX_CODE)
        if retry_after is not None:
            retry_after = (min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_S)
                           if math.isfinite(retry_after) else None)
        super().__init__(message)
        self.error_type = error_type
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.retryable = error_type in RETRYABLE_BY_DEFAULT if retryable is None else retryable
        self.provider_wide = provider_wide
        self.about_recipient = about_recipient

    @property
    def outage_signal(self) -> bool:
        """Whether this failure may mean the provider is down for everyone (it feeds
        outage detection): a network error or the provider's own fault, not a rate
        limit, not a fault the provider pins on the recipient, not already provider-wide."""
        return (self.error_type in (ErrorType.NETWORK, ErrorType.PROVIDER_ERROR)
                and not self.about_recipient and not self.provider_wide)

    def __repr__(self) -> str:
        parts = [f"{self.error_type.value}", repr(self.message)]
        if self.code is not None:
            parts.append(f"code={self.code}")
        if self.retry_after is not None:
            parts.append(f"retry_after={self.retry_after:g}s")
        parts.append("retryable" if self.retryable else "permanent")
        if self.provider_wide:
            parts.append("provider_wide")
        if self.about_recipient:
            parts.append("about_recipient")
        return f"DeliveryError({', '.join(parts)})"


class ConfigError(Exception):
    """Invalid configuration: the message is one line naming the variable."""


class Unstorable(Exception):
    """The database or the broker refused a message's data (a value PostgreSQL
    cannot store, a header AMQP cannot encode). Unlike an outage, trying the
    same write again cannot help: the caller deals with that one message."""

    def __init__(self, component: str, cause: BaseException) -> None:
        self.component = component
        self.cause = cause
        self.reason = storable(f"{type(cause).__name__}: {cause}", 500).replace("\n", " ")
        super().__init__(f"{component} refused it: {self.reason}")


class BrokerUnreachable(Exception):
    """No node of ``HERALD_AMQP_URL`` accepted a connection (the message names each
    node as ``host:port`` and says why, never with a password)."""


class TopologyMismatch(Exception):
    """A queue exists on the broker with arguments Herald cannot work with."""
