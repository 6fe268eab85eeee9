"""The ``messenger`` channel through the Messenger Send API.

``POST {base}/{version}/me/messages`` with ``{"recipient": {"id": PSID},
"messaging_type": "UPDATE", "message": {"text": ...}}``; the answer's
``message_id`` (``m_…``) is the provider message id. The page token goes in
an ``Authorization: Bearer`` header, which the Graph API accepts as it does
the ``access_token`` query parameter its documentation shows: a query string
ends up in proxies' and servers' access logs, a header does not.
"""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import structlog

from consumer.errors import ConfigError, DeliveryError, ErrorType
from consumer.logs import mask_recipient
from consumer.providers.base import SendResult
from consumer.providers.classify import Rule, rule
from consumer.providers.meta import GraphTable, classify_graph, graph_rule, graph_send
from consumer.settings import Settings
from schemas import SendRequest

log = structlog.get_logger("herald.providers.messenger")

_R = ErrorType

# PROVIDERS.md, Messenger error codes; (code, subcode) rows win over the code's row.
MESSENGER_ERRORS: GraphTable = {
    190: rule(_R.ACCESS_TOKEN, provider_wide=True),  # invalid OAuth access token
    4: rule(_R.RATE_LIMIT),
    613: rule(_R.RATE_LIMIT),
    2: rule(_R.PROVIDER_ERROR),  # temporary send failure
    1200: rule(_R.PROVIDER_ERROR),  # temporary send failure
    551: rule(_R.INVALID_RECIPIENT),  # person not available
    (100, 2018001): rule(_R.INVALID_RECIPIENT),  # no matching user (subcode unconfirmed)
    100: rule(_R.INVALID_REQUEST),  # invalid parameter
    10: rule(_R.PERMISSION),  # e.g. outside the allowed window: this message only
    (200, 1545041): rule(_R.INVALID_RECIPIENT),  # user unavailable
    # Any other 200 is a permission the page lacks, true of every message, so
    # it pauses the channel instead of parking the whole queue one by one
    # (PROVIDERS.md marks this unconfirmed; a wrong pause costs a cooldown, a
    # wrong park costs the traffic).
    200: rule(_R.PERMISSION, provider_wide=True),
}


def messenger_rule(code: int | None, subcode: int | None = None) -> Rule | None:
    """The table's rule for a Messenger code and subcode."""
    return graph_rule(MESSENGER_ERRORS, code, subcode)


def classify_messenger(
    status: int, body: Any, *, retry_after: float | None = None
) -> DeliveryError:
    """The :class:`DeliveryError` for a non-2xx Messenger Send API answer."""
    return classify_graph("Messenger", MESSENGER_ERRORS, status, body, retry_after=retry_after)


def messenger_payload(request: SendRequest) -> dict[str, Any]:
    """The JSON body of a send: a text message to a PSID, tagged as an UPDATE."""
    if not isinstance(request.body, str) or not request.body:
        raise DeliveryError(ErrorType.INVALID_REQUEST, "messenger body must be non-empty text",
                            code="body", retryable=False)
    return {
        "recipient": {"id": request.to},
        "messaging_type": "UPDATE",
        "message": {"text": request.body},
    }


class MessengerProvider:
    """Sends Messenger messages as the page; ``send`` returns the ``m_…`` id."""

    name = "messenger"

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        missing = self.missing(settings)
        if missing:
            raise ConfigError(f"{missing[0]}: must be set for the messenger channel")
        self.session = session
        self.url = f"{settings.meta_base_url}/{settings.meta_api_version}/me/messages"
        self._token = settings.messenger_page_token or ""
        # The page is known by its token only; a digest names it without revealing it.
        self._domain = "messenger:page-" + hashlib.sha256(self._token.encode()).hexdigest()[:8]

    def domain(self, request: SendRequest | None) -> str:
        """The page: every message of this process shares it."""
        return self._domain

    @staticmethod
    def missing(settings: Settings) -> list[str]:
        """The variables the channel needs and lacks (empty when it can run)."""
        return [] if settings.messenger_page_token else ["HERALD_MESSENGER_PAGE_TOKEN"]

    async def send(self, request: SendRequest, attempt: int) -> SendResult:
        try:
            answer = await graph_send(
                self.session, self.url, messenger_payload(request),
                provider="Messenger", table=MESSENGER_ERRORS, recipient=request.to,
                secrets=(self._token,),
                headers={"Authorization": f"Bearer {self._token}"},
            )
        except DeliveryError as error:
            log.info("messenger.rejected", code=error.code, error_type=error.error_type.value,
                     to=mask_recipient(request.to))
            raise
        mid = answer.get("message_id") if isinstance(answer, dict) else None
        if not isinstance(mid, str) or not mid:
            log.warning("messenger.accepted_without_id", to=mask_recipient(request.to))
            return SendResult(None)
        return SendResult(mid)

    async def close(self) -> None:
        return None
