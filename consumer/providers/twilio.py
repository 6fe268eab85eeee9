"""The ``sms`` channel through Twilio Programmable Messaging.

``POST {base}/2010-04-01/Accounts/{sid}/Messages.json``, HTTP Basic auth,
form-encoded ``To``, ``From`` (or ``MessagingServiceSid``), ``Body`` and
``StatusCallback``. Errors are a flat JSON object whose ``code`` decides the
outcome (:data:`TWILIO_ERRORS`); the HTTP status only decides for codes the
table does not know.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import structlog

from consumer.errors import ConfigError, DeliveryError, ErrorType
from consumer.logs import mask_recipient
from consumer.providers.base import SendResult
from consumer.providers.classify import Rule, as_int, make_error, rule, scrubbed, status_rule
from consumer.providers.transport import post
from consumer.settings import Settings
from schemas import SendRequest

log = structlog.get_logger("herald.providers.twilio")

_R = ErrorType

# PROVIDERS.md, Twilio error codes. Codes 300xx mostly arrive in status
# callbacks (ErrorCode) after the send was accepted; the webhook side looks
# them up here too through :func:`twilio_rule`.
TWILIO_ERRORS: dict[int, Rule] = {
    20429: rule(_R.RATE_LIMIT),  # too many concurrent requests; never processed
    14107: rule(_R.RATE_LIMIT, min_retry_after=30.0),  # loop protection on a number pair
    30001: rule(_R.RATE_LIMIT),  # queue overflow
    30002: rule(_R.ACCESS_TOKEN, provider_wide=True),  # account suspended
    30003: rule(_R.PROVIDER_ERROR, about_recipient=True),  # handset unreachable
    30004: rule(_R.INVALID_RECIPIENT),  # message blocked
    30005: rule(_R.INVALID_RECIPIENT),  # unknown destination handset
    30006: rule(_R.INVALID_RECIPIENT),  # landline or unreachable carrier
    30007: rule(_R.INVALID_REQUEST),  # carrier filtering: review the content
    30008: rule(_R.PROVIDER_ERROR),  # unknown error
    21211: rule(_R.INVALID_RECIPIENT),  # invalid To
    21610: rule(_R.INVALID_RECIPIENT),  # recipient opted out (STOP)
    21614: rule(_R.INVALID_RECIPIENT),  # To is not SMS-capable
    21602: rule(_R.INVALID_REQUEST),  # no Body or MediaUrl
    20003: rule(_R.ACCESS_TOKEN, provider_wide=True),  # authentication failed
}


def twilio_rule(code: int | str | None) -> Rule | None:
    """The table's rule for a Twilio error code (int or its decimal text), if any."""
    number = as_int(code)
    return None if number is None else TWILIO_ERRORS.get(number)


def classify_twilio(
    status: int, body: Any, *, retry_after: float | None = None
) -> DeliveryError:
    """The :class:`DeliveryError` for a non-2xx Twilio answer.

    ``body`` is the parsed JSON answer (``{"code", "message", "more_info",
    "status"}``) or None when it was not JSON. A known ``code`` decides;
    otherwise the HTTP status does, and the error code is ``http_<status>``.
    """
    fields = body if isinstance(body, dict) else {}
    code = as_int(fields.get("code"))
    found = None if code is None else TWILIO_ERRORS.get(code)
    text = fields.get("message")
    detail = text if isinstance(text, str) and text else "no error message"
    label = f"Twilio {code}" if code is not None else "Twilio"
    message = f"{label} (HTTP {status}): {detail}"
    return make_error(
        found or status_rule(status),
        message,
        code=str(code) if code is not None else f"http_{status}",
        retry_after=retry_after,
    )


def twilio_form(request: SendRequest, sender: tuple[str, str], status_callback: str) -> bytes:
    """The form-encoded body of a send, fields in Twilio's documented order."""
    if not isinstance(request.body, str) or not request.body:
        raise DeliveryError(ErrorType.INVALID_REQUEST, "sms body must be non-empty text",
                            code="body", retryable=False)
    fields = [("To", request.to), sender, ("Body", request.body),
              ("StatusCallback", status_callback)]
    return urlencode(fields).encode()


class TwilioProvider:
    """Sends SMS through Twilio; ``send`` returns the message ``sid`` (``SM…``)."""

    name = "twilio"

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        missing = self.missing(settings)
        if missing:
            raise ConfigError(f"{missing[0]}: must be set for the sms channel")
        sid = settings.twilio_account_sid or ""
        token = settings.twilio_auth_token or ""
        self.session = session
        self.url = (f"{settings.twilio_base_url}/2010-04-01/Accounts/"
                    f"{quote(sid, safe='')}/Messages.json")
        self.status_callback = settings.public_url + "/webhooks/twilio"
        # A Messaging Service picks the sender itself and is the deliberate
        # choice when both are configured.
        self.sender: tuple[str, str] = (
            ("MessagingServiceSid", settings.twilio_messaging_service_sid)
            if settings.twilio_messaging_service_sid
            else ("From", settings.twilio_from or "")
        )
        basic = base64.b64encode(f"{sid}:{token}".encode()).decode()
        self._authorization = f"Basic {basic}"
        self._secrets: tuple[str, ...] = (token, basic)
        self._domain = f"twilio:{sid}"

    def domain(self, request: SendRequest | None) -> str:
        """The account: every message of this process shares it."""
        return self._domain

    @staticmethod
    def missing(settings: Settings) -> list[str]:
        """The variables the channel needs and lacks (empty when it can run)."""
        wanted = []
        if not settings.twilio_account_sid:
            wanted.append("HERALD_TWILIO_ACCOUNT_SID")
        if not settings.twilio_auth_token:
            wanted.append("HERALD_TWILIO_AUTH_TOKEN")
        if not (settings.twilio_from or settings.twilio_messaging_service_sid):
            wanted.append("HERALD_TWILIO_FROM")
        return wanted

    async def send(self, request: SendRequest, attempt: int) -> SendResult:
        data = twilio_form(request, self.sender, self.status_callback)
        answer = await post(
            self.session, self.url, data=data, secrets=self._secrets, provider="Twilio",
            headers={"Authorization": self._authorization,
                     "Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"},
        )
        body = answer.json()
        if answer.ok:
            sid = body.get("sid") if isinstance(body, dict) else None
            if not isinstance(sid, str) or not sid:
                log.warning("twilio.accepted_without_sid", http_status=answer.status,
                            to=mask_recipient(request.to))
                return SendResult(None)
            return SendResult(sid)
        error = scrubbed(classify_twilio(answer.status, body, retry_after=answer.retry_after),
                         request.to, self._secrets)
        log.info("twilio.rejected", http_status=answer.status, code=error.code,
                 error_type=error.error_type.value, to=mask_recipient(request.to))
        raise error

    async def close(self) -> None:
        return None
