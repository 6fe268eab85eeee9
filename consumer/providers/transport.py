"""One POST to a provider API, with transport failures turned into :class:`DeliveryError`.

The adapters classify what the provider *answered*; this module covers the
cases where there is no answer to classify. Its error text never contains the
request URL (Messenger carries its token in the query string) and passes
through :func:`consumer.providers.classify.redact` in case a library echoes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from consumer.delivery.backoff import parse_retry_after
from consumer.errors import DeliveryError, ErrorType
from consumer.providers.classify import redact, shorten


@dataclass(frozen=True)
class Answer:
    """What a provider answered: status, the body (parsed when it is JSON) and Retry-After."""

    status: int
    text: str
    retry_after: float | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.text)
        except ValueError:
            return None


async def post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    data: bytes,
    headers: Mapping[str, str],
    secrets: Iterable[str | None],
    provider: str,
    params: Mapping[str, str] | None = None,
) -> Answer:
    """POST ``data`` and return the answer, or raise ``network``/``provider_error``.

    Read timeouts of the session are ``provider_error`` (the provider got the
    request and did not answer); connect timeouts and refused or reset
    connections are ``network``. Both are retryable. Cancellation (the
    pipeline's own deadline) passes through untouched.
    """
    secrets = tuple(secrets)
    try:
        async with session.post(
            url, data=data, headers=headers, params=params, allow_redirects=False
        ) as response:
            text = await response.text(errors="replace")
            return Answer(
                response.status, text, parse_retry_after(response.headers.get("Retry-After"))
            )
    except aiohttp.InvalidURL:
        raise DeliveryError(
            ErrorType.OTHER, f"{provider}: the configured base URL is not usable", retryable=False
        ) from None
    except aiohttp.ConnectionTimeoutError as exc:
        raise DeliveryError(
            ErrorType.NETWORK, _text(provider, exc, secrets), code="connect_timeout",
            retryable=True,
        ) from None
    except aiohttp.ServerTimeoutError as exc:
        raise DeliveryError(
            ErrorType.PROVIDER_ERROR, _text(provider, exc, secrets), code="timeout",
            retryable=True,
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise DeliveryError(
            ErrorType.NETWORK, _text(provider, exc, secrets), retryable=True
        ) from None


def _text(provider: str, exc: BaseException, secrets: tuple[str | None, ...]) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        # Its str() names the URL; status and reason are all that matter here.
        detail = f"{exc.status} {exc.message}"
    else:
        detail = str(exc)
    return shorten(redact(f"{provider}: {type(exc).__name__}: {detail}".rstrip(": "), secrets))
