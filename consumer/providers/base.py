"""The one small interface every provider adapter implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas import SendRequest


@dataclass(frozen=True)
class SendResult:
    """An accepted send: the provider's id for it, when it gives one."""

    provider_message_id: str | None


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
