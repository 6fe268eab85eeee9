"""Herald's wire contracts (pydantic v2).

Publishers in other languages use the JSON Schemas exported from these
models into ``schemas/json/`` (``python -m schemas.export``).
"""

from schemas.campaigns import CampaignCompleted, CampaignCounters
from schemas.events import ProviderEvent, ProviderStatus
from schemas.parking import (
    ESCALATION_CAMPAIGN,
    BrokerParkedHeaders,
    ErrorTypeName,
    ParkedHeaders,
    ParkingNotice,
)
from schemas.send_request import (
    Channel,
    Priority,
    RetryMode,
    RetryRuleSpec,
    RetrySpec,
    SendRequest,
)

__all__ = [
    "ESCALATION_CAMPAIGN",
    "BrokerParkedHeaders",
    "CampaignCompleted",
    "CampaignCounters",
    "Channel",
    "ErrorTypeName",
    "ParkedHeaders",
    "ParkingNotice",
    "Priority",
    "ProviderEvent",
    "ProviderStatus",
    "RetryMode",
    "RetryRuleSpec",
    "RetrySpec",
    "SendRequest",
]
