"""The generic ``http`` channel: POST the body as JSON to the URL in ``to``.

2xx is sent (a JSON ``id`` in the answer becomes the provider message id);
408, 425, 429, 5xx and connection errors are retryable (``Retry-After`` is
honoured); 401 is ``access_token``, 403 ``permission``, other 4xx
``invalid_request``.

The channel has its own HTTP session: it connects only to addresses
:mod:`consumer.providers.destinations` allows (a refused destination is
``invalid_recipient`` with code ``destination_not_allowed``, and no request
is made), keeps no cookies, reads answers up to
:data:`consumer.providers.transport.MAX_ANSWER_BYTES` and signs its POSTs
(:mod:`consumer.providers.signing`) when secrets are configured.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from consumer.delivery.backoff import parse_retry_after
from consumer.errors import DeliveryError, ErrorType
from consumer.providers.base import SendResult
from consumer.providers.classify import redact_urls, shorten
from consumer.providers.destinations import (
    DESTINATION_NOT_ALLOWED,
    DestinationNotAllowed,
    open_session,
    url_problem,
)
from consumer.providers.signing import SIGNATURE_HEADER, sign
from consumer.providers.transport import ACCEPTED_BODY_S, read_accepted, read_capped
from consumer.settings import Settings
from schemas import SendRequest

_RETRYABLE_4XX = frozenset({408, 425, 429})


def classify_http_status(status: int) -> tuple[ErrorType, bool]:
    """error_type and retryability of a non-2xx answer of a generic HTTP endpoint."""
    if status == 401:
        return ErrorType.ACCESS_TOKEN, False
    if status == 403:
        return ErrorType.PERMISSION, False
    if status == 429:
        return ErrorType.RATE_LIMIT, True
    if status in _RETRYABLE_4XX or status >= 500:
        return ErrorType.PROVIDER_ERROR, True
    if 400 <= status < 500:
        return ErrorType.INVALID_REQUEST, False
    # 1xx/3xx: we do not follow redirects for a POST; the endpoint is misconfigured.
    return ErrorType.OTHER, False


def destination(url: str) -> str:
    """``scheme://host:port`` of a URL, the failure domain of the ``http`` channel
    (lower-case, default port written out); the URL itself when it has no host."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return "http:invalid"
    if not parts.hostname:
        return "http:invalid"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"


class HttpProvider:
    """POSTs to the publisher's URL through the channel's own guarded session."""

    name = "http"

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.allow = settings.http_allow_networks
        self.secrets = settings.http_signing_secrets
        self.clock = clock
        self._limit = max(100, settings.prefetch * 2)
        self._connect_timeout_s = min(10.0, settings.send_timeout_s)
        # See transport.ACCEPTED_BODY_S; shorter when the send deadline is short.
        self._accepted_body_s = min(ACCEPTED_BODY_S, settings.send_timeout_s / 4)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Opened on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = open_session(allow=self.allow, limit=self._limit,
                                         connect_timeout_s=self._connect_timeout_s)
        return self._session

    def domain(self, request: SendRequest | None) -> str:
        """The destination's ``scheme://host:port``: one host's outage is its own."""
        return destination(request.to) if request is not None else "http"

    async def send(self, request: SendRequest, attempt: int) -> SendResult:
        problem = url_problem(request.to)
        if problem is not None:
            raise DeliveryError(ErrorType.INVALID_RECIPIENT, problem,
                                code=DESTINATION_NOT_ALLOWED, retryable=False)
        if not request.message_id.isprintable():
            # It travels as a header value, where CR/LF would split the request.
            raise DeliveryError(ErrorType.INVALID_REQUEST,
                                "message_id has control characters; it cannot be a header",
                                code="message_id", retryable=False)
        data = json.dumps(request.body, separators=(",", ":")).encode()
        headers = {
            "Idempotency-Key": request.message_id,
            "X-Herald-Attempt": str(attempt),
            "Content-Type": "application/json",
        }
        signature = sign(self.secrets, request.message_id, data, int(self.clock()))
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        try:
            async with self.session.post(
                request.to, data=data, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return SendResult(await self._accepted_id(response))
                body, _ = await read_capped(response)
                text = body.decode("utf-8", "replace")
                error_type, retryable = classify_http_status(response.status)
                raise DeliveryError(
                    error_type,
                    shorten(redact_urls(f"HTTP {response.status}: {text}".strip())),
                    code=str(response.status),
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    retryable=retryable,
                )
        except DestinationNotAllowed as exc:
            raise DeliveryError(ErrorType.INVALID_RECIPIENT, shorten(str(exc)),
                                code=DESTINATION_NOT_ALLOWED, retryable=False) from None
        except aiohttp.InvalidURL as exc:
            # Its text is the URL itself; the reason is enough.
            reason = str(exc).rpartition(" - ")[2] if " - " in str(exc) else "unusable URL"
            raise DeliveryError(
                ErrorType.INVALID_RECIPIENT, shorten(f"not a usable URL: {redact_urls(reason)}"),
                retryable=False,
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise DeliveryError(
                ErrorType.NETWORK, shorten(redact_urls(f"{type(exc).__name__}: {exc}")),
                retryable=True,
            ) from None

    async def _accepted_id(self, response: aiohttp.ClientResponse) -> str | None:
        """The id in a 2xx answer, if it comes whole and in time; the send stands either way."""
        body = await read_accepted(response, self._accepted_body_s)
        return None if body is None else _answer_id(body.decode("utf-8", "replace"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _answer_id(text: str) -> str | None:
    try:
        answer: Any = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(answer, dict):
        value = answer.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None
