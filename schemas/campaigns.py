"""What Herald publishes when a campaign finishes.

A notice on the topic exchange ``{prefix}.notifications`` with routing key
``campaign.completed``, once none of the campaign's messages is queued,
sending or retrying and nothing has happened to it for a quiet period. A
campaign whose messages are sent again later (a replay, a failure reported
after acceptance, more messages published) is reopened and, once it finishes
again, completes again with the next ``completion`` number. The AMQP message
id ``campaign.completed/{campaign_id}/{completion}`` is the same for every
copy of one completion.

Readers should ignore fields they do not know: new ones may be added.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class CampaignCounters(BaseModel):
    """The campaign's messages by status when it completed."""

    model_config = ConfigDict(frozen=True)

    total: int = Field(ge=0, description="Every message of the campaign Herald has a row for.")
    accepted: int = Field(ge=0, description="Accepted by the provider: sent + delivered + read.")
    sent: int = Field(ge=0, description="Accepted, no delivery report (yet).")
    delivered: int = Field(ge=0)
    read: int = Field(ge=0)
    failed: int = Field(ge=0, description="Parked, waiting for a person.")
    failed_by_error_type: dict[str, int] = Field(
        description="The failed ones by the error_type of their last attempt.")
    expired: int = Field(ge=0, description="Not sent before their expires_at.")
    cancelled: int = Field(ge=0, description="Rejected by an operator.")


class CampaignCompleted(BaseModel):
    """Published on ``{prefix}.notifications`` as ``campaign.completed``."""

    model_config = ConfigDict(frozen=True)

    campaign_id: str
    completion: int = Field(ge=1, description="1 the first time; a reopened campaign that "
                                              "finishes again counts on.")
    first_seen_at: AwareDatetime = Field(description="When Herald first saw the campaign.")
    completed_at: AwareDatetime
    counters: CampaignCounters
