"""The webhook receiver: provider status callbacks in, :class:`ProviderEvent` out.

``POST /webhooks/twilio``, ``GET``/``POST /webhooks/whatsapp`` and
``/webhooks/messenger`` (``GET`` answers Meta's verification challenge).
Each request is checked against the provider's signature over the exact
bytes received (Twilio's over ``HERALD_PUBLIC_URL`` + path and the form),
every status in it is normalized into a :class:`ProviderEvent`, and the
events are published to ``{prefix}.events`` with publisher confirms. Only
then does the provider get its 200: a 503 (broker unreachable) makes it send
again, so an event is never acknowledged before the broker holds it. The
events consumer (:mod:`consumer.status.events`) applies them to messages.

The normalizers are pure functions so that every provider's shapes are unit
tested without a server.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog
from aiohttp import web
from pydantic import ValidationError

from consumer import metrics
from consumer.publisher import Publisher
from consumer.settings import Settings
from consumer.status.signatures import (
    meta_signature_wellformed,
    twilio_signature_wellformed,
    verify_meta,
    verify_twilio,
)
from schemas import ProviderEvent, ProviderStatus

log = structlog.get_logger("herald.webhooks")

# Meta batches up to a thousand statuses per request, a few hundred bytes
# each; anything much larger is not a status callback.
MAX_WEBHOOK_BYTES = 1024 * 1024
# A Twilio status callback is about 1 KiB: some twenty short form fields (ids,
# numbers, a status, an error code and message). 16 KiB leaves room for
# fields Twilio may add and long error messages, and bounds what one request
# can make Herald decode, sort and HMAC (a 1 MiB form is hundreds of
# thousands of fields: about half a second of CPU each).
MAX_TWILIO_BYTES = 16 * 1024
# Twilio sends about twenty fields; a hundred is room to spare, and bounds the
# work before the signature is checked.
MAX_TWILIO_FIELDS = 100
# Meta's payloads nest about eight levels (entry, changes, value, statuses,
# errors, error_data); deeper documents are not status callbacks.
MAX_JSON_DEPTH = 32
# Meta's numbers are epoch seconds or milliseconds and numeric ids (≤ 20 digits).
MAX_JSON_NUMBER_CHARS = 32
# How long a request waits for the broker's confirms before answering 503.
PUBLISH_TIMEOUT_S = 5.0
# What each provider sends (parameters such as charset aside).
TWILIO_CONTENT_TYPE = "application/x-www-form-urlencoded"
META_CONTENT_TYPE = "application/json"

# Twilio's message statuses; those before delivery all mean "the provider has
# it", which is what Herald's ``sent`` says. Others (canceled, receiving,
# received, …) are not about an outbound message's delivery and are skipped.
TWILIO_STATUSES: dict[str, ProviderStatus] = {
    "accepted": "sent",
    "scheduled": "sent",
    "queued": "sent",
    "sending": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "undelivered": "failed",
    "failed": "failed",
}
WHATSAPP_STATUSES: dict[str, ProviderStatus] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "played": "read",  # voice messages: played is read
    "failed": "failed",
}

Now = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- normalizers (pure) ----------------------------------------------------------------


def twilio_events(fields: Sequence[tuple[str, str]], received_at: datetime) -> list[ProviderEvent]:
    """The event in a Twilio status callback (form fields), or none.

    Twilio's callbacks carry no time of their own, so the event happened when
    Herald received it.
    """
    form = dict(fields)
    sid = form.get("MessageSid") or form.get("SmsSid")
    raw_status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    status = TWILIO_STATUSES.get(raw_status)
    if not sid or status is None:
        return []
    return _valid([{
        "provider": "twilio",
        "provider_message_id": sid,
        "status": status,
        "occurred_at": received_at,
        "recipient": form.get("To") or None,
        "error_code": form.get("ErrorCode") or None,
        "error_text": form.get("ErrorMessage") or None,
        "raw": form,
    }])


def whatsapp_events(payload: Any, received_at: datetime) -> list[ProviderEvent]:
    """Every status in a WhatsApp Cloud API webhook (``entry[].changes[].value.statuses[]``)."""
    items: list[dict[str, Any]] = []
    for value in _change_values(payload):
        for status in _dicts(value.get("statuses")):
            normalized = WHATSAPP_STATUSES.get(str(status.get("status", "")).lower())
            wamid = status.get("id")
            if normalized is None or not isinstance(wamid, str) or not wamid:
                continue
            code, text = _first_error(status.get("errors"))
            recipient = status.get("recipient_id")
            items.append({
                "provider": "whatsapp",
                "provider_message_id": wamid,
                "status": normalized,
                "occurred_at": _epoch(status.get("timestamp"), 1) or received_at,
                "recipient": recipient if isinstance(recipient, str) and recipient else None,
                "error_code": code,
                "error_text": text,
                "raw": status,
            })
    return _valid(items)


def messenger_events(payload: Any, received_at: datetime) -> list[ProviderEvent]:
    """Delivery and read events in a Messenger webhook (``entry[].messaging[]``).

    A delivery gives one event per ``mids`` entry, each carrying the
    watermark too, or one watermark-only event when ``mids`` is absent; a
    read is always watermark-only. The recipient is the person (``sender``).
    """
    items: list[dict[str, Any]] = []
    if not isinstance(payload, dict):
        return []
    for entry in _dicts(payload.get("entry")):
        entry_time = _epoch(entry.get("time"), 1000)
        for event in _dicts(entry.get("messaging")):
            sender = event.get("sender")
            psid = sender.get("id") if isinstance(sender, dict) else None
            psid = str(psid) if isinstance(psid, str | int) and not isinstance(psid, bool) else None
            at = _epoch(event.get("timestamp"), 1000) or entry_time
            delivery, read = event.get("delivery"), event.get("read")
            if isinstance(delivery, dict):
                watermark = _epoch(delivery.get("watermark"), 1000)
                base = {"provider": "messenger", "status": "delivered", "recipient": psid,
                        "watermark": watermark, "raw": event,
                        "occurred_at": at or watermark or received_at}
                mids = [m for m in delivery.get("mids") or [] if isinstance(m, str) and m]
                if mids:
                    items.extend(base | {"provider_message_id": mid} for mid in mids)
                elif watermark is not None and psid is not None:
                    items.append(base)
            elif isinstance(read, dict):
                watermark = _epoch(read.get("watermark"), 1000)
                if watermark is not None and psid is not None:
                    items.append({"provider": "messenger", "status": "read", "recipient": psid,
                                  "watermark": watermark, "raw": event,
                                  "occurred_at": at or watermark})
    return _valid(items)


def verify_challenge(query: Any, verify_token: str | None) -> str | None:
    """The challenge to echo for Meta's ``GET ?hub.mode=subscribe&…``, or None to refuse."""
    challenge = query.get("hub.challenge")
    given = query.get("hub.verify_token") or ""
    if not verify_token or query.get("hub.mode") != "subscribe" or challenge is None:
        return None
    if not hmac.compare_digest(given.encode(), verify_token.encode()):
        return None
    return str(challenge)


def _valid(items: Iterable[dict[str, Any]]) -> list[ProviderEvent]:
    events = []
    for item in items:
        try:
            events.append(ProviderEvent.model_validate(item))
        except ValidationError as exc:
            log.warning("webhook.event_invalid", provider=item.get("provider"),
                        error=str(exc.errors()[:2])[:300])
    return events


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _change_values(payload: Any) -> Iterable[dict[str, Any]]:
    if not isinstance(payload, dict):
        return
    for entry in _dicts(payload.get("entry")):
        for change in _dicts(entry.get("changes")):
            value = change.get("value")
            if isinstance(value, dict):
                yield value


def _epoch(value: Any, per_second: int) -> datetime | None:
    """A Unix time in seconds (``per_second=1``) or milliseconds (1000), as text or number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / per_second, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _first_error(errors: Any) -> tuple[str | None, str | None]:
    for error in _dicts(errors):
        code = error.get("code")
        known = isinstance(code, int | str) and not isinstance(code, bool)
        code_text = str(code) if known else None
        text = error.get("title") or error.get("message")
        data = error.get("error_data")
        details = data.get("details") if isinstance(data, dict) else None
        parts = [p for p in (text, details) if isinstance(p, str) and p]
        if len(parts) == 2 and parts[1] == parts[0]:
            parts = parts[:1]
        return code_text, ": ".join(parts) or None
    return None, None


def callback_problem(public_url: str, provider_url: str) -> str | None:
    """Why a provider at ``provider_url`` could not call ``public_url`` back, or None.

    A loopback, unspecified, private or link-local ``HERALD_PUBLIC_URL``
    (or ``localhost``) cannot be reached from a provider on the internet, so
    every status callback would fail. A provider on such an address itself
    (the sandbox) is on the same side and can. Names other than
    ``localhost`` are not resolved: no lookups at start-up.
    """
    if _local_kind(urlsplit(provider_url).hostname) is not None:
        return None
    kind = _local_kind(urlsplit(public_url).hostname)
    if kind is None:
        return None
    return (f"HERALD_PUBLIC_URL ({public_url}) is a {kind} address: the provider at"
            f" {provider_url} cannot reach it, so every status callback would fail;"
            " set it to the URL the internet reaches Herald's public listener at")


def _local_kind(host: str | None) -> str | None:
    """What makes ``host`` unreachable from the internet ('loopback', …), or None."""
    if not host:
        return None
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, test in (("loopback", address.is_loopback), ("unspecified", address.is_unspecified),
                       ("link-local", address.is_link_local), ("private", address.is_private)):
        if test:
            return kind
    return None


# -- bounded parsing (pure) ----------------------------------------------------------------

# Characters PostgreSQL's text and jsonb cannot hold (NUL) or UTF-8 cannot
# encode (lone surrogates, which JSON's \u escapes can produce).
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD, so that it can be stored."""
    return _UNSTORABLE_RE.sub("\ufffd", text)


def parse_twilio_form(raw: bytes, max_fields: int = MAX_TWILIO_FIELDS) -> list[tuple[str, str]]:
    """The fields of a form body, in order (the signature is over them as sent).

    Raises :class:`ValueError` when the body holds more than ``max_fields``
    fields (counted before anything is split or decoded).
    """
    return parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True,
                     max_num_fields=max_fields)


def parse_json_bounded(
    raw: bytes, *, max_depth: int = MAX_JSON_DEPTH, max_number_chars: int = MAX_JSON_NUMBER_CHARS,
) -> Any:
    """A JSON document read with bounds, its strings made storable.

    Refuses (:class:`ValueError`, saying why) text that is not UTF-8,
    nesting deeper than ``max_depth``, numbers longer than
    ``max_number_chars`` characters, ``NaN`` and the infinities (also as
    overflowing exponents such as ``1e999``). Strings, keys included, come
    back with NUL and lone surrogates replaced by U+FFFD.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8") from None

    def number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
        def parse(literal: str) -> Any:
            if len(literal) > max_number_chars:
                raise ValueError(f"a number is longer than {max_number_chars} characters")
            value = kind(literal)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("a number is out of range")
            return value
        return parse

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        document = json.loads(text, parse_int=number(int), parse_float=number(float),
                              parse_constant=constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON ({exc.msg} at {exc.pos})") from None
    return _storable(document, max_depth)


def _storable(value: Any, max_depth: int, depth: int = 0) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if not isinstance(value, dict | list):
        return value
    if depth >= max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    if isinstance(value, list):
        return [_storable(item, max_depth, depth + 1) for item in value]
    return {storable_text(key): _storable(item, max_depth, depth + 1)
            for key, item in value.items()}


# -- the receiver ------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


class WebhookReceiver:
    """The ``/webhooks/*`` routes of Herald's public listener (role ``gateway``).

    Every refusal that needs no body comes before the body is read: a content
    type the provider never sends (415), no secret configured or a signature
    header that is missing or malformed (403); then the size (413), the
    signature over the exact bytes (403), and only then is anything parsed.
    """

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        *,
        max_body_bytes: int = MAX_WEBHOOK_BYTES,
        max_twilio_bytes: int = MAX_TWILIO_BYTES,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
        now: Now = _utcnow,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.max_body_bytes = max_body_bytes
        self.max_twilio_bytes = max_twilio_bytes
        self.publish_timeout_s = publish_timeout_s
        self.now = now
        self.twilio_url = settings.public_url + "/webhooks/twilio"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/webhooks/twilio", self.twilio)
        app.router.add_get("/webhooks/whatsapp", self.verify)
        app.router.add_post("/webhooks/whatsapp", self.whatsapp)
        app.router.add_get("/webhooks/messenger", self.verify)
        app.router.add_post("/webhooks/messenger", self.messenger)
        app.on_cleanup.append(self._on_cleanup)

    async def _on_cleanup(self, _: web.Application) -> None:
        await self.publisher.close()

    # -- handlers ------------------------------------------------------------------------

    async def twilio(self, request: web.Request) -> web.Response:
        if request.content_type.lower() != TWILIO_CONTENT_TYPE:
            return _unsupported(request, "twilio", TWILIO_CONTENT_TYPE)
        token = self.settings.twilio_auth_token
        signature = request.headers.get("X-Twilio-Signature")
        if not token or not twilio_signature_wellformed(signature):
            return _refused(request, "twilio", token, signature)
        try:
            raw = await self._read(request, self.max_twilio_bytes)
        except BodyTooLarge:
            return _too_large("twilio", self.max_twilio_bytes)
        try:
            fields = parse_twilio_form(raw)
        except ValueError:
            log.warning("webhook.too_many_fields", provider="twilio", limit=MAX_TWILIO_FIELDS)
            return web.json_response(
                {"error": f"more than {MAX_TWILIO_FIELDS} form fields"}, status=400)
        query = request.rel_url.raw_query_string
        url = self.twilio_url + (f"?{query}" if query else "")
        if not verify_twilio(token, url, fields, signature):
            return _refused(request, "twilio", token, signature)
        fields = [(storable_text(name), storable_text(value)) for name, value in fields]
        return await self._publish("twilio", twilio_events(fields, self.now()))

    async def whatsapp(self, request: web.Request) -> web.Response:
        return await self._meta(request, "whatsapp", whatsapp_events)

    async def messenger(self, request: web.Request) -> web.Response:
        return await self._meta(request, "messenger", messenger_events)

    async def verify(self, request: web.Request) -> web.Response:
        """Meta's subscription check: echo ``hub.challenge`` when the verify token matches."""
        provider = request.path.rsplit("/", 1)[-1]
        challenge = verify_challenge(request.query, self.settings.webhook_verify_token)
        if challenge is None:
            log.warning("webhook.verification_refused", provider=provider,
                        configured=bool(self.settings.webhook_verify_token),
                        mode=request.query.get("hub.mode"))
            return web.Response(status=403, text="verification refused\n")
        log.info("webhook.verified", provider=provider)
        return web.Response(text=challenge, content_type="text/plain")

    async def _meta(
        self,
        request: web.Request,
        provider: str,
        normalize: Callable[[Any, datetime], list[ProviderEvent]],
    ) -> web.Response:
        if request.content_type.lower() != META_CONTENT_TYPE:
            return _unsupported(request, provider, META_CONTENT_TYPE)
        secret = self.settings.meta_app_secret
        signature = request.headers.get("X-Hub-Signature-256")
        if not secret or not meta_signature_wellformed(signature):
            return _refused(request, provider, secret, signature)
        try:
            raw = await self._read(request, self.max_body_bytes)
        except BodyTooLarge:
            return _too_large(provider, self.max_body_bytes)
        if not verify_meta(secret, raw, signature):
            return _refused(request, provider, secret, signature)
        try:
            payload = parse_json_bounded(raw)
        except ValueError as exc:
            log.warning("webhook.not_json", provider=provider, bytes=len(raw), reason=str(exc))
            return web.json_response({"error": str(exc)}, status=400)
        return await self._publish(provider, normalize(payload, self.now()))

    # -- steps -------------------------------------------------------------------------------

    async def _read(self, request: web.Request, limit: int) -> bytes:
        """The exact body bytes, refusing more than ``limit`` without reading them all."""
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge()
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(min(64 * 1024, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge()
            chunks.append(chunk)

    async def _publish(self, provider: str, events: list[ProviderEvent]) -> web.Response:
        """Publish every event with confirms; 200 only when the broker holds them all."""
        if not events:
            log.debug("webhook.nothing_to_publish", provider=provider)
            return web.Response(text="ok\n")
        names = self.publisher.names
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                results = await asyncio.gather(*(
                    self.publisher.publish(
                        names.events, f"{event.provider}.{event.status}",
                        event.model_dump_json(exclude_none=True).encode(),
                        message_id=str(uuid.uuid4()), confirm_timeout_s=self.publish_timeout_s,
                    )
                    for event in events
                ), return_exceptions=True)
        except TimeoutError:
            results = [TimeoutError(f"no confirm within {self.publish_timeout_s:g} s")]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.warning("webhook.publish_failed", provider=provider, events=len(events),
                        failed=len(failures), error=repr(failures[0])[:300])
            return web.json_response({"error": "events could not be queued; send again"},
                                     status=503, headers={"Retry-After": "5"})
        for event in events:
            metrics.WEBHOOK_EVENTS.labels(provider, event.status).inc()
        return web.Response(text="ok\n")


def _refused(
    request: web.Request, provider: str, secret: str | None, signature: str | None
) -> web.Response:
    wellformed = (twilio_signature_wellformed if provider == "twilio"
                  else meta_signature_wellformed)
    reason = ("not_configured" if not secret else "missing" if not signature
              else "malformed" if not wellformed(signature) else "mismatch")
    metrics.WEBHOOK_SIGNATURE_FAILURES.labels(provider).inc()
    log.warning("webhook.signature_refused", provider=provider, reason=reason,
                remote=request.remote)
    return web.Response(status=403, text="signature refused\n")


def _unsupported(request: web.Request, provider: str, expected: str) -> web.Response:
    log.warning("webhook.unsupported_media_type", provider=provider,
                content_type=storable_text(request.content_type)[:100], remote=request.remote)
    return web.json_response({"error": f"content type must be {expected}"}, status=415)


def _too_large(provider: str, limit: int) -> web.Response:
    log.warning("webhook.body_too_large", provider=provider, limit=limit)
    return web.json_response({"error": f"body exceeds {limit} bytes"}, status=413)
