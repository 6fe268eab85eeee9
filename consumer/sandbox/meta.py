"""Fake Graph API endpoints: WhatsApp Cloud API and the Messenger Send API.

- ``POST /{version}/{phone_number_id}/messages`` (WhatsApp): Bearer token,
  text or template messages; answers ``{"messaging_product": "whatsapp",
  "contacts": [...], "messages": [{"id": "wamid.…"}]}``.
- ``POST /{version}/me/messages`` (Messenger): the page token as a Bearer
  token (Herald's way) or an ``access_token`` query parameter (the way
  Meta's documentation shows; the real API takes both); answers
  ``{"recipient_id": PSID, "message_id": "m_…"}``.

Errors use Graph's ``{"error": {"message", "type", "code", "error_subcode",
"fbtrace_id", …}}``. Accepted sends get webhooks signed with
``X-Hub-Signature-256``: WhatsApp ``statuses`` entries and Messenger
delivery/read watermarks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from consumer.sandbox.callbacks import Callback
from consumer.sandbox.scripts import Script
from consumer.status.signatures import meta_signature

if TYPE_CHECKING:
    from consumer.sandbox.record import ProviderState

# Messages Graph gives with each code (and subcode) the sandbox can answer.
MESSAGES: dict[int | tuple[int, int], str] = {
    2: "Service temporarily unavailable",
    4: "(#4) Application request limit reached",
    10: "(#10) This message is sent outside of allowed window.",
    100: "(#100) Invalid parameter",
    (100, 2018001): "(#100) No matching user found",
    (100, 33): ("Unsupported post request. Object with ID '{id}' does not exist, cannot be "
                "loaded due to missing permissions, or does not support this operation."),
    190: "Invalid OAuth access token - Cannot parse access token",
    (190, 463): "Error validating access token: Session has expired.",
    200: "(#200) Permissions error",
    (200, 1545041): "(#200) This person isn't available right now.",
    368: "(#368) Temporarily blocked for policies violations",
    551: "(#551) This person isn't available right now.",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    1200: "(#1200) Temporary send message failure. Please try again later",
    80007: "(#80007) Rate limit issues",
    130429: "(#130429) Rate limit hit",
    131000: "(#131000) Something went wrong",
    131026: "(#131026) Message undeliverable",
    131047: "(#131047) Re-engagement message",
    131048: "(#131048) Spam rate limit hit",
    131051: "(#131051) Unsupported message type",
    131056: "(#131056) (Business Account, Consumer Account) pair rate limit hit",
    133010: "(#133010) Account not registered",
}
# The HTTP status the sandbox answers a code with; 400 for the rest. Meta is
# not consistent here (PROVIDERS.md), which is why Herald classifies by code.
STATUSES: dict[int, int] = {
    190: 401, 2: 503, 1200: 500, 131000: 500,
    4: 429, 613: 429, 80007: 429, 130429: 429, 131056: 429, 131048: 429,
    10: 403, 200: 403, 368: 403, 133010: 403,
}
TRANSIENT = frozenset({2, 1200, 131000})
DEFAULT_FAILURE = {"whatsapp": 131000, "messenger": 1200}


def graph_error(
    code: int,
    subcode: int | None = None,
    *,
    whatsapp: bool,
    status: int | None = None,
    message: str | None = None,
    details: str | None = None,
    **fmt: str,
) -> tuple[int, dict[str, Any]]:
    """Graph's error object for ``code``/``subcode``, and its HTTP status."""
    if message is None:
        known = MESSAGES.get((code, subcode)) if subcode is not None else None
        message = (known or MESSAGES.get(code, f"(#{code}) Sandbox error")).format(**fmt)
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    if code in TRANSIENT:
        error["is_transient"] = True
    if whatsapp:
        error["error_data"] = {"messaging_product": "whatsapp",
                               "details": details or message.split(") ", 1)[-1]}
    error["fbtrace_id"] = "A" + base64.urlsafe_b64encode(os.urandom(16)).decode()[:22]
    return status or STATUSES.get(code, 400), {"error": error}


def _wamid() -> str:
    return "wamid." + base64.b64encode(b"\x15\x02\x00\x11\x18\x12" + os.urandom(24)).decode()


def _mid() -> str:
    return "m_" + base64.urlsafe_b64encode(os.urandom(63)).decode().rstrip("=")


class FakeMeta:
    def __init__(self, fakes: ProviderState) -> None:
        self.fakes = fakes

    # -- WhatsApp -------------------------------------------------------------------

    async def whatsapp(self, request: web.Request) -> web.Response:
        raw = await request.read()
        payload = _json(raw)
        to = payload.get("to") if isinstance(payload, dict) else None
        to = to if isinstance(to, str) else None
        script = self.fakes.scripts.get("whatsapp", to)
        if script.latency_ms:
            await asyncio.sleep(script.latency_ms / 1000.0)
        status, body, headers = self._whatsapp_answer(request, payload, to)
        wamid = body["messages"][0]["id"] if status < 300 else None
        self.fakes.record("whatsapp", request, raw=raw, status=status, body=payload,
                          recipient=to, provider_message_id=wamid)
        if wamid is not None and to is not None:
            self.fakes.callbacks.schedule(self._whatsapp_callbacks(wamid, to, script))
        return web.json_response(body, status=status, headers=headers)

    def _whatsapp_answer(
        self, request: web.Request, payload: Any, to: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        creds = self.fakes.credentials
        early = self._mode_or_auth("whatsapp", _bearer(request) == creds.whatsapp_token)
        if early is not None:
            return early
        number_id = request.match_info["phone_number_id"]
        if number_id != creds.whatsapp_phone_number_id:
            return (*graph_error(100, 33, whatsapp=True, id=number_id), {})
        problem = _whatsapp_problem(payload)
        if problem is not None:
            return (*graph_error(problem[0], whatsapp=True, details=problem[1]), {})
        assert to is not None
        failing = self.fakes.scripts.failure("whatsapp", to)
        if failing is not None:
            return self._failure("whatsapp", failing)
        return 200, {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": to.removeprefix("+")}],
            "messages": [{"id": _wamid()}],
        }, {}

    def _whatsapp_callbacks(self, wamid: str, to: str, script: Script) -> list[Callback]:
        url = self.fakes.callbacks.config.whatsapp_url
        if url is None:
            return []
        wanted = self.fakes.callbacks.config.statuses
        if script.callback_error is None:
            statuses: list[str] = [s for s in ("sent", "delivered", "read") if s in wanted]
        else:
            statuses = [s for s in ("sent",) if s in wanted] + ["failed"]
        return [self._whatsapp_callback(url, wamid, to.removeprefix("+"), status, script)
                for status in statuses]

    def _whatsapp_callback(
        self, url: str, wamid: str, wa_id: str, status: str, script: Script
    ) -> Callback:
        creds = self.fakes.credentials
        conversation = uuid.uuid4().hex

        def render() -> tuple[bytes, dict[str, str]]:
            entry: dict[str, Any] = {
                "id": wamid,
                "status": status,
                "timestamp": str(int(time.time())),
                "recipient_id": wa_id,
            }
            if status == "failed":
                code = script.callback_error or 131026
                title = MESSAGES.get(code, f"(#{code}) Error").split(") ", 1)[-1]
                entry["errors"] = [{
                    "code": code,
                    "title": title,
                    "message": title,
                    "error_data": {"details": title},
                    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
                }]
            elif status in ("sent", "delivered"):
                entry["conversation"] = {"id": conversation, "origin": {"type": "service"}}
                entry["pricing"] = {"billable": True, "pricing_model": "CBP",
                                    "category": "service"}
            body = {
                "object": "whatsapp_business_account",
                "entry": [{
                    "id": creds.waba_id,
                    "changes": [{
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": creds.display_phone_number,
                                "phone_number_id": creds.whatsapp_phone_number_id,
                            },
                            "statuses": [entry],
                        },
                        "field": "messages",
                    }],
                }],
            }
            return self._signed(body)

        return Callback("whatsapp", url, status, wamid, render)

    # -- Messenger ------------------------------------------------------------------

    async def messenger(self, request: web.Request) -> web.Response:
        raw = await request.read()
        payload = _json(raw)
        recipient = payload.get("recipient") if isinstance(payload, dict) else None
        psid = recipient.get("id") if isinstance(recipient, dict) else None
        psid = str(psid) if isinstance(psid, str | int) and not isinstance(psid, bool) else None
        script = self.fakes.scripts.get("messenger", psid)
        if script.latency_ms:
            await asyncio.sleep(script.latency_ms / 1000.0)
        status, body, headers = self._messenger_answer(request, payload, psid)
        mid = body.get("message_id") if status < 300 else None
        self.fakes.record("messenger", request, raw=raw, status=status, body=payload,
                          recipient=psid, provider_message_id=mid)
        if mid is not None and psid is not None:
            self.fakes.callbacks.schedule(self._messenger_callbacks(mid, psid, script))
        return web.json_response(body, status=status, headers=headers)

    def _messenger_answer(
        self, request: web.Request, payload: Any, psid: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        creds = self.fakes.credentials
        token = request.query.get("access_token") or _bearer(request)
        early = self._mode_or_auth("messenger", token == creds.messenger_page_token)
        if early is not None:
            return early
        problem = _messenger_problem(payload)
        if problem is not None:
            return (*graph_error(100, whatsapp=False, message=problem), {})
        assert psid is not None
        failing = self.fakes.scripts.failure("messenger", psid)
        if failing is not None:
            return self._failure("messenger", failing)
        return 200, {"recipient_id": psid, "message_id": _mid()}, {}

    def _messenger_callbacks(self, mid: str, psid: str, script: Script) -> list[Callback]:
        config = self.fakes.callbacks.config
        if config.messenger_url is None or script.callback_error is not None:
            # Messenger reports no failures: an undelivered message just never
            # gets a delivery watermark.
            return []
        statuses = [s for s in ("delivered", "read") if s in config.statuses]
        return [self._messenger_callback(config.messenger_url, mid, psid, status)
                for status in statuses]

    def _messenger_callback(self, url: str, mid: str, psid: str, status: str) -> Callback:
        creds = self.fakes.credentials
        config = self.fakes.callbacks.config

        def render() -> tuple[bytes, dict[str, str]]:
            # A watermark is "everything sent before this instant", so it is
            # taken when the event is sent, after the message was accepted.
            now_ms = int(time.time() * 1000)
            event: dict[str, Any] = {"sender": {"id": psid}, "recipient": {"id": creds.page_id}}
            if status == "delivered":
                delivery: dict[str, Any] = {"watermark": now_ms}
                if config.messenger_mids:
                    delivery = {"mids": [mid], "watermark": now_ms}
                event["delivery"] = delivery
            else:
                event["timestamp"] = now_ms
                event["read"] = {"watermark": now_ms}
            body = {"object": "page",
                    "entry": [{"id": creds.page_id, "time": now_ms, "messaging": [event]}]}
            return self._signed(body)

        return Callback("messenger", url, status, mid, render)

    # -- shared -----------------------------------------------------------------------

    def _mode_or_auth(
        self, provider: str, authorized: bool
    ) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        whatsapp = provider == "whatsapp"
        mode = self.fakes.modes.current(provider)
        if mode == "outage":
            return (*graph_error(2, whatsapp=whatsapp), {})
        if mode == "token_expired":
            return (*graph_error(190, 463, whatsapp=whatsapp), {})
        if not authorized:
            return (*graph_error(190, whatsapp=whatsapp), {})
        return None

    @staticmethod
    def _failure(provider: str, script: Script) -> tuple[int, dict[str, Any], dict[str, str]]:
        code = script.code or DEFAULT_FAILURE[provider]
        status, body = graph_error(code, script.subcode, whatsapp=provider == "whatsapp",
                                   status=script.status)
        headers = {"Retry-After": script.retry_after} if script.retry_after else {}
        return status, body, headers

    def _signed(self, body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        raw = json.dumps(body, separators=(",", ":")).encode()
        return raw, {
            "Content-Type": "application/json",
            "User-Agent": "facebookexternalua",
            "X-Hub-Signature-256": meta_signature(self.fakes.credentials.meta_app_secret, raw),
        }


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _whatsapp_problem(payload: Any) -> tuple[int, str] | None:
    """What Graph would reject in a WhatsApp send, as (code, details), or None."""
    if not isinstance(payload, dict):
        return 100, "The request body must be a JSON object."
    if payload.get("messaging_product") != "whatsapp":
        return 100, "The parameter messaging_product is required."
    to = payload.get("to")
    if not isinstance(to, str) or not to.removeprefix("+").isdigit():
        return 100, "The parameter to is required."
    kind = payload.get("type", "text")
    if kind == "text":
        text = payload.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("body"), str) or not text["body"]:
            return 100, "The parameter text['body'] is required."
        return None
    if kind == "template":
        template = payload.get("template")
        if not isinstance(template, dict) or not isinstance(template.get("name"), str):
            return 100, "The parameter template['name'] is required."
        language = template.get("language")
        if not isinstance(language, dict) or not isinstance(language.get("code"), str):
            return 100, "The parameter template['language']['code'] is required."
        return None
    return 131051, f"Message type {kind!r} is not supported by the sandbox."


def _messenger_problem(payload: Any) -> str | None:
    """Graph's (#100) message for what it would reject in a Messenger send, or None."""
    if not isinstance(payload, dict):
        return "(#100) The request body must be a JSON object"
    recipient = payload.get("recipient")
    if not isinstance(recipient, dict) or not recipient.get("id"):
        return "(#100) The parameter recipient is required"
    if payload.get("messaging_type") not in ("RESPONSE", "UPDATE", "MESSAGE_TAG"):
        return "(#100) The parameter messaging_type is required"
    message = payload.get("message")
    if not isinstance(message, dict) or not (message.get("text") or message.get("attachment")):
        return "(#100) param message must be non-empty"
    return None


def add_routes(app: web.Application, fakes: ProviderState) -> None:
    fake = FakeMeta(fakes)
    version = r"{version:v[0-9]+\.[0-9]+}"
    # Registered first: the WhatsApp route would take "me" for a phone number id.
    app.router.add_post(f"/{version}/me/messages", fake.messenger)
    app.router.add_post(f"/{version}/{{phone_number_id}}/messages", fake.whatsapp)
