"""A send request: what applications publish to ``{prefix}`` as ``send.{channel}``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, model_validator

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


class SendRequest(BaseModel):
    """One message to deliver. ``message_id`` is the idempotency key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message_id: str = Field(min_length=1, max_length=200)
    channel: Channel
    to: str = Field(
        min_length=1,
        max_length=2048,
        description="E.164 number (sms, whatsapp), page-scoped id (messenger) or URL (http).",
    )
    body: JsonValue = Field(
        description="Text; for whatsapp text or {'template': {...}}; for http any JSON value."
    )
    campaign_id: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec | None = None
    priority: Priority | None = Field(
        default=None, description="'high' marks transactional traffic; default by campaign."
    )
    send_at: AwareDatetime | None = Field(default=None, description="Defer the first attempt.")
    expires_at: AwareDatetime | None = Field(
        default=None, description="Not sent after this instant (status 'expired')."
    )

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
