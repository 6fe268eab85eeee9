"""The generic ``http`` channel: POST the body as JSON to the URL in ``to``.

2xx is sent (a JSON ``id`` in the answer becomes the provider message id);
408, 425, 429, 5xx and connection errors are retryable (``Retry-After`` is
honoured); 401 is ``access_token``, 403 ``permission``, other 4xx
``invalid_request``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from consumer.delivery.backoff import parse_retry_after
from consumer.errors import DeliveryError, ErrorType
from consumer.providers.base import SendResult
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
    name = "http"

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def domain(self, request: SendRequest | None) -> str:
        """The destination's ``scheme://host:port``: one host's outage is its own."""
        return destination(request.to) if request is not None else "http"

    async def send(self, request: SendRequest, attempt: int) -> SendResult:
        headers = {
            "Idempotency-Key": request.message_id,
            "X-Herald-Attempt": str(attempt),
            "Content-Type": "application/json",
        }
        data = json.dumps(request.body, separators=(",", ":")).encode()
        try:
            async with self.session.post(
                request.to, data=data, headers=headers, allow_redirects=False
            ) as response:
                text = await response.text(errors="replace")
                if 200 <= response.status < 300:
                    return SendResult(_answer_id(text))
                error_type, retryable = classify_http_status(response.status)
                raise DeliveryError(
                    error_type,
                    f"HTTP {response.status}: {text[:300]}".strip(),
                    code=str(response.status),
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    retryable=retryable,
                )
        except aiohttp.InvalidURL as exc:
            raise DeliveryError(
                ErrorType.INVALID_RECIPIENT, f"not a usable URL: {exc}", retryable=False
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise DeliveryError(
                ErrorType.NETWORK, f"{type(exc).__name__}: {exc}", retryable=True
            ) from None

    async def close(self) -> None:
        return None


def _answer_id(text: str) -> str | None:
    try:
        answer: Any = json.loads(text)
    except ValueError:
        return None
    if isinstance(answer, dict):
        value = answer.get("id")
        if isinstance(value, str | int) and str(value):
            return str(value)[:200]
    return None
