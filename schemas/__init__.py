"""Herald's wire contracts (pydantic v2).

Publishers in other languages use the JSON Schemas exported from these
models into ``schemas/json/`` (``python -m schemas.export``).
"""

from schemas.events import ProviderEvent, ProviderStatus
from schemas.parking import BrokerParkedHeaders, ErrorTypeName, ParkedHeaders, ParkingNotice
from schemas.send_request import (
    Channel,
    Priority,
    RetryMode,
    RetryRuleSpec,
    RetrySpec,
    SendRequest,
)

__all__ = [
    "BrokerParkedHeaders",
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
