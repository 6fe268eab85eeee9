"""A fake Twilio Programmable Messaging API.

``POST /2010-04-01/Accounts/{sid}/Messages.json`` checks HTTP Basic auth
against the sandbox's account sid and auth token and the form's ``To``,
``From``/``MessagingServiceSid`` and ``Body`` as Twilio does, then answers
201 with a message resource (``sid`` ``SM`` + 32 hex) or Twilio's flat error
object. Accepted sends get status callbacks, form-encoded and signed with
``X-Twilio-Signature``, POSTed to the send's ``StatusCallback``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from consumer.sandbox.callbacks import Callback
from consumer.sandbox.scripts import Script
from consumer.status.signatures import twilio_signature

if TYPE_CHECKING:
    from consumer.sandbox.record import ProviderState

API_VERSION = "2010-04-01"
MAX_BODY = 1600
# Twilio normalises many number formats; the sandbox insists on E.164, as
# Herald always sends it.
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")

# The message Twilio gives with each code the sandbox can answer.
MESSAGES: dict[int, str] = {
    14107: "Message rate limit exceeded for this phone number pair",
    20003: "Authentication Error - invalid username",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21211: "The 'To' number {to} is not a valid phone number.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    30001: "Queue overflow",
    30002: "Account suspended",
    30003: "Unreachable destination handset",
    30004: "Message blocked",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30007: "Message filtered",
    30008: "Unknown error",
}
# HTTP status Twilio answers a code with; 400 for the rest.
STATUSES: dict[int, int] = {20003: 401, 20429: 429, 20500: 500, 20503: 503}
# What a script failing without a code answers: Twilio's own transient fault.
DEFAULT_FAILURE = 20500


def error_body(code: int, status: int | None = None, **fmt: str) -> tuple[int, dict[str, Any]]:
    """Twilio's flat error object for ``code``, and the HTTP status that goes with it."""
    status = status or STATUSES.get(code, 400)
    message = MESSAGES.get(code, f"Error {code}")
    with contextlib.suppress(KeyError):  # {to} is only known for some answers
        message = message.format(**fmt)
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    if code == 20003:
        body["detail"] = "Your AccountSid or AuthToken was incorrect."
    return status, body


class FakeTwilio:
    def __init__(self, fakes: ProviderState) -> None:
        self.fakes = fakes

    async def messages(self, request: web.Request) -> web.Response:
        raw = await request.read()
        form = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        fields = dict(form)
        to = fields.get("To")
        script = self.fakes.scripts.get("twilio", to)
        if script.latency_ms:
            await asyncio.sleep(script.latency_ms / 1000.0)
        status, body, headers = self._answer(request, fields, script)
        sid = body.get("sid") if status < 300 else None
        self.fakes.record("twilio", request, raw=raw, status=status, body=fields,
                          recipient=to, provider_message_id=sid)
        if sid:
            self.fakes.callbacks.schedule(self._callbacks(sid, fields, script))
        return web.json_response(body, status=status, headers=headers)

    def _answer(
        self, request: web.Request, fields: dict[str, str], script: Script
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        creds = self.fakes.credentials
        mode = self.fakes.modes.current("twilio")
        if mode == "outage":
            return (*error_body(20503), {})
        if mode == "token_expired" or not self._authorized(request):
            return (*error_body(20003), {"WWW-Authenticate": 'Basic realm="Twilio API"'})
        to = fields.get("To", "")
        if not to:
            return (*error_body(21604), {})
        if not _E164.fullmatch(to):
            return (*error_body(21211, to=to), {})
        if not (fields.get("From") or fields.get("MessagingServiceSid")):
            return (*error_body(21603), {})
        text = fields.get("Body", "")
        if not text:
            return (*error_body(21602), {})
        if len(text) > MAX_BODY:
            return (*error_body(21617), {})
        failing = self.fakes.scripts.failure("twilio", to)
        if failing is not None:
            status, body = error_body(failing.code or DEFAULT_FAILURE, failing.status, to=to)
            headers = {"Retry-After": failing.retry_after} if failing.retry_after else {}
            return status, body, headers
        return 201, self._resource(creds.twilio_account_sid, fields), {}

    def _authorized(self, request: web.Request) -> bool:
        creds = self.fakes.credentials
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        login, _, password = decoded.partition(":")
        return (scheme.lower() == "basic"
                and login == creds.twilio_account_sid
                and password == creds.twilio_auth_token
                and request.match_info["sid"] == creds.twilio_account_sid)

    @staticmethod
    def _resource(account_sid: str, fields: dict[str, str]) -> dict[str, Any]:
        sid = f"SM{uuid.uuid4().hex}"
        now = format_datetime(datetime.now(UTC))
        service = fields.get("MessagingServiceSid")
        uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}"
        return {
            "account_sid": account_sid,
            "api_version": API_VERSION,
            "body": fields["Body"],
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": fields.get("From"),
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": str(max(1, -(-len(fields["Body"]) // 153))),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": fields["To"],
            "uri": f"{uri}.json",
        }

    def _callbacks(self, sid: str, fields: dict[str, str], script: Script) -> list[Callback]:
        url = fields.get("StatusCallback")
        if not url:
            return []
        wanted = self.fakes.callbacks.config.statuses
        if script.callback_error is None:
            statuses: list[str] = [s for s in ("sending", "sent", "delivered") if s in wanted]
        elif (script.callback_status or "undelivered") == "undelivered":
            statuses = [s for s in ("sending", "sent") if s in wanted] + ["undelivered"]
        else:
            statuses = ["failed"]  # failed happens before the message left Twilio
        return [self._callback(url, sid, fields, status, script) for status in statuses]

    def _callback(
        self, url: str, sid: str, fields: dict[str, str], status: str, script: Script
    ) -> Callback:
        creds = self.fakes.credentials
        params = [
            ("SmsSid", sid),
            ("SmsStatus", status),
            ("MessageStatus", status),
            ("To", fields.get("To", "")),
            ("MessageSid", sid),
            ("AccountSid", creds.twilio_account_sid),
            ("From", fields.get("From") or creds.twilio_from),
            ("ApiVersion", API_VERSION),
        ]
        if fields.get("MessagingServiceSid"):
            params.append(("MessagingServiceSid", fields["MessagingServiceSid"]))
        if status in ("undelivered", "failed") and script.callback_error is not None:
            params.append(("ErrorCode", str(script.callback_error)))
            params.append(("ErrorMessage", MESSAGES.get(script.callback_error,
                                                        f"Error {script.callback_error}")))
        # Twilio keeps the idempotency token of a callback when it sends it again.
        token = f"{sid}-{uuid.uuid4().hex[:12]}"

        def render() -> tuple[bytes, dict[str, str]]:
            return urlencode(params).encode(), {
                "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
                "User-Agent": "TwilioProxy/1.1",
                "I-Twilio-Idempotency-Token": token,
                "X-Twilio-Signature": twilio_signature(creds.twilio_auth_token, url, params),
            }

        return Callback("twilio", url, status, sid, render)


def add_routes(app: web.Application, fakes: ProviderState) -> None:
    fake = FakeTwilio(fakes)
    app.router.add_post(f"/{API_VERSION}/Accounts/{{sid}}/Messages.json", fake.messages)
