"""The one small interface every provider adapter implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from consumer.text import storable
from schemas import SendRequest

# Provider ids are short (SM + 32 hex, wamid.… ~60); a longer one is cut, and
# one nothing useful is left of is dropped, so a sent message is always recordable.
MAX_PROVIDER_MESSAGE_ID = 200


@dataclass(frozen=True)
class SendResult:
    """An accepted send: the provider's id for it, when it gives one.

    The id is made storable (no NUL, no lone surrogate, at most
    :data:`MAX_PROVIDER_MESSAGE_ID` characters) whatever the provider sent:
    a message the provider accepted is recorded as sent in any case.
    """

    provider_message_id: str | None

    def __post_init__(self) -> None:
        if self.provider_message_id is not None:
            cleaned = storable(self.provider_message_id.strip(), MAX_PROVIDER_MESSAGE_ID)
            object.__setattr__(self, "provider_message_id", cleaned or None)


class Provider(Protocol):
    """Sends one message or raises :class:`consumer.errors.DeliveryError`.

    Adapters raise nothing else: the pipeline maps timeouts itself (it owns
    the deadline) and treats any other exception as a bug of the adapter.
    """

    name: str

    def domain(self, request: SendRequest | None) -> str:
        """The failure domain of a message: what fails together with it (see
        :mod:`consumer.delivery.outage`)."""
        ...

    async def send(self, request: SendRequest, attempt: int) -> SendResult: ...

    async def close(self) -> None: ...
