"""The ``whatsapp`` channel through the WhatsApp Business Cloud API.

``POST {base}/{version}/{phone_number_id}/messages`` with a Bearer token and
a JSON text or template message; the answer's ``messages[0].id`` (``wamid.…``)
is the provider message id. ``to`` is the E.164 number without its ``+``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from consumer.errors import ConfigError, DeliveryError, ErrorType
from consumer.logs import mask_recipient
from consumer.providers.base import SendResult
from consumer.providers.classify import Rule, rule
from consumer.providers.meta import GraphTable, classify_graph, graph_rule, graph_send
from consumer.settings import Settings
from schemas import SendRequest

log = structlog.get_logger("herald.providers.whatsapp")

_R = ErrorType

# PROVIDERS.md, WhatsApp error codes.
WHATSAPP_ERRORS: GraphTable = {
    190: rule(_R.ACCESS_TOKEN, provider_wide=True),  # token expired or invalid
    4: rule(_R.RATE_LIMIT),  # app call rate limit
    80007: rule(_R.RATE_LIMIT),  # account call rate limit
    130429: rule(_R.RATE_LIMIT),  # throughput limit
    131056: rule(_R.RATE_LIMIT),  # same sender→recipient pair too fast
    # Spam rate limit: the whole number is slowed down, but it clears by
    # itself, so it backs off like any rate limit rather than pausing the
    # channel; operators see it by its code.
    131048: rule(_R.RATE_LIMIT),
    131047: rule(_R.INVALID_REQUEST),  # 24 h window closed: re-send as a template
    131026: rule(_R.INVALID_RECIPIENT),  # undeliverable
    131000: rule(_R.PROVIDER_ERROR),  # unknown error, try again
    133010: rule(_R.PERMISSION, provider_wide=True),  # business number not registered
    100: rule(_R.INVALID_REQUEST),  # invalid parameter
    131051: rule(_R.INVALID_REQUEST),  # unsupported message type
    368: rule(_R.PERMISSION, provider_wide=True),  # temporarily blocked for policy violations
}


def whatsapp_rule(code: int | None, subcode: int | None = None) -> Rule | None:
    """The table's rule for a WhatsApp code (also used for ``failed`` status webhooks)."""
    return graph_rule(WHATSAPP_ERRORS, code, subcode)


def classify_whatsapp(
    status: int, body: Any, *, retry_after: float | None = None
) -> DeliveryError:
    """The :class:`DeliveryError` for a non-2xx WhatsApp Cloud API answer."""
    return classify_graph("WhatsApp", WHATSAPP_ERRORS, status, body, retry_after=retry_after)


def whatsapp_payload(request: SendRequest) -> dict[str, Any]:
    """The JSON body of a send: a text message, or a template for ``{"template": {...}}``."""
    message: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": request.to.removeprefix("+"),
    }
    body = request.body
    if isinstance(body, str) and body:
        message["type"] = "text"
        message["text"] = {"preview_url": False, "body": body}
    elif isinstance(body, dict) and isinstance(body.get("template"), dict):
        message["type"] = "template"
        message["template"] = body["template"]
    else:
        raise DeliveryError(ErrorType.INVALID_REQUEST,
                            "whatsapp body must be text or {'template': {...}}",
                            code="body", retryable=False)
    return message


class WhatsAppProvider:
    """Sends WhatsApp messages; ``send`` returns the ``wamid.…`` id."""

    name = "whatsapp"

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        missing = self.missing(settings)
        if missing:
            raise ConfigError(f"{missing[0]}: must be set for the whatsapp channel")
        self.session = session
        phone_number_id = quote(settings.whatsapp_phone_number_id or "", safe="")
        self.url = (f"{settings.meta_base_url}/{settings.meta_api_version}/"
                    f"{phone_number_id}/messages")
        self._token = settings.whatsapp_token or ""
        self._domain = f"whatsapp:{settings.whatsapp_phone_number_id}"

    def domain(self, request: SendRequest | None) -> str:
        """The business phone number: every message of this process shares it."""
        return self._domain

    @staticmethod
    def missing(settings: Settings) -> list[str]:
        """The variables the channel needs and lacks (empty when it can run)."""
        wanted = []
        if not settings.whatsapp_token:
            wanted.append("HERALD_WHATSAPP_TOKEN")
        if not settings.whatsapp_phone_number_id:
            wanted.append("HERALD_WHATSAPP_PHONE_NUMBER_ID")
        return wanted

    async def send(self, request: SendRequest, attempt: int) -> SendResult:
        try:
            answer = await graph_send(
                self.session, self.url, whatsapp_payload(request),
                provider="WhatsApp", table=WHATSAPP_ERRORS, recipient=request.to,
                secrets=(self._token,),
                headers={"Authorization": f"Bearer {self._token}"},
            )
        except DeliveryError as error:
            log.info("whatsapp.rejected", code=error.code, error_type=error.error_type.value,
                     to=mask_recipient(request.to))
            raise
        wamid = _first_message_id(answer)
        if wamid is None:
            log.warning("whatsapp.accepted_without_id", to=mask_recipient(request.to))
        return SendResult(wamid)

    async def close(self) -> None:
        return None


def _first_message_id(answer: Any) -> str | None:
    messages = answer.get("messages") if isinstance(answer, dict) else None
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        wamid = messages[0].get("id")
        if isinstance(wamid, str) and wamid:
            return wamid
    return None
