"""A normalized provider status event, as published on ``{prefix}.events``."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

ProviderStatus = Literal["sent", "delivered", "read", "failed"]


class ProviderEvent(BaseModel):
    """What a provider told us about a message it had accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["twilio", "whatsapp", "messenger", "http"]
    provider_message_id: str | None = Field(
        default=None, description="Absent for Messenger watermarks without mids."
    )
    status: ProviderStatus
    occurred_at: AwareDatetime
    recipient: str | None = None
    error_code: str | None = None
    error_text: str | None = None
    watermark: AwareDatetime | None = Field(
        default=None,
        description="Messenger: everything sent to the recipient before this was delivered/read.",
    )
    raw: JsonValue = None
