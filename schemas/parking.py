"""What Herald publishes when it parks a message.

Two things: the parked copy itself on ``{prefix}.parked`` (the original bytes,
with the reason in ``x-herald-*`` headers), and a notice on the topic exchange
``{prefix}.notifications`` with routing key ``parked.{channel}.{error_type}``,
for whoever routes escalations to chat or paging.

The broker also parks copies by itself: a message redelivered more often than
``HERALD_DELIVERY_LIMIT`` is dead-lettered to the parking queue with its
original headers and the broker's ``x-death`` record instead of Herald's.

Readers should ignore fields and headers they do not know: new ones may be
added.
"""

from __future__ import annotations

import uuid
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.send_request import CHANNELS, Channel

# The channel of a parked provider event: one the events consumer could not
# apply (not a provider event, or refused by the database). Its replay puts it
# back on {prefix}.events.
PARKED_EVENTS_CHANNEL: Final = "events"
ParkedChannel = Literal[Channel, "events"]
PARKED_CHANNELS: tuple[str, ...] = (*CHANNELS, PARKED_EVENTS_CHANNEL)
_CHANNEL = ("The send request's channel, or 'events' for a provider event the events"
            " consumer could not apply.")

# The campaign of the digests Herald's escalation sends to people: a parked
# message of this campaign (a digest that could not be delivered) is parked
# like any other but never escalated, so an escalation never escalates itself.
ESCALATION_CAMPAIGN = "herald-escalations"

# Why a message failed: the operators' vocabulary, the same for every provider.
ErrorTypeName = Literal[
    "access_token", "permission", "rate_limit", "network", "provider_error",
    "invalid_recipient", "invalid_request", "invalid_payload", "expired", "other",
]


class ParkingNotice(BaseModel):
    """Published on ``{prefix}.notifications`` as ``parked.{channel}.{error_type}``."""

    model_config = ConfigDict(frozen=True)

    parked_id: uuid.UUID = Field(description="The parked copy's id (herald parked show ID).")
    message_id: str | None = Field(
        description="The send request's message_id; for a body that did not parse, the AMQP "
                    "message-id property if it had one.")
    channel: ParkedChannel = Field(description=_CHANNEL)
    error_type: ErrorTypeName
    error_code: str | None = Field(description="The provider's own code, when it gave one.")
    campaign_id: str | None = Field(
        default=None, description="The message's campaign, if any ('herald-escalations': an "
                                  "escalation digest, never escalated itself).")
    last_error: str = Field(max_length=500, description="What went wrong, in words.")
    attempt: int = Field(ge=0, description="Attempts made (0 when the body never parsed).")
    parked_at: AwareDatetime


class ParkedHeaders(BaseModel):
    """AMQP headers of a copy Herald parked itself (every value a string or an integer)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    error_type: ErrorTypeName = Field(alias="x-herald-error-type")
    error_code: str = Field(alias="x-herald-error-code",
                            description="The provider's code; empty when there is none.")
    last_error: str = Field(alias="x-herald-last-error", max_length=1000)
    attempt: int = Field(alias="x-herald-attempt", ge=0)
    parked_at: AwareDatetime = Field(alias="x-herald-parked-at", description="ISO 8601.")
    channel: ParkedChannel = Field(alias="x-herald-channel", description=_CHANNEL)
    parked_id: uuid.UUID = Field(alias="x-herald-parked-id")
    message_id: str | None = Field(default=None, alias="x-herald-message-id",
                                   description="Absent when the body had no message id.")
    event_id: str | None = Field(
        default=None, alias="x-herald-event-id",
        description="On a parked provider event: the id it arrived with, which its replay"
                    " publishes again.")


class BrokerParkedHeaders(BaseModel):
    """AMQP headers RabbitMQ adds to a copy it dead-lettered to the parking queue after
    too many deliveries; the publisher's own headers are kept beside them."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    death: list[dict[str, Any]] | None = Field(
        default=None, alias="x-death",
        description="RabbitMQ's dead-lettering record, most recent first.")
    first_death_reason: str | None = Field(
        default=None, alias="x-first-death-reason",
        description="'delivery_limit' when the copy kept failing to be processed.")
    first_death_queue: str | None = Field(default=None, alias="x-first-death-queue")
    first_death_exchange: str | None = Field(default=None, alias="x-first-death-exchange")
