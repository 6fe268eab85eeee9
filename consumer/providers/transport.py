"""One POST to a provider API, with transport failures turned into :class:`DeliveryError`.

The adapters classify what the provider *answered*; this module covers the
cases where there is no answer to classify. Its error text never contains a
request URL (paths and queries may carry ids or tokens) and passes through
:func:`consumer.providers.classify.redact` in case a library echoes a secret.

Answers are read up to :data:`MAX_ANSWER_BYTES` (after decompression) and no
further: Herald keeps an id and an error text from them, and a provider or
endpoint that answers more, or a gzip bomb, must not cost it memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from consumer.delivery.backoff import parse_retry_after
from consumer.errors import DeliveryError, ErrorType
from consumer.providers.classify import redact, redact_urls, shorten

#: The most of an answer Herald reads, counted after decompression. A provider
#: API's answer (Twilio's message resource, a Graph API error) is a few KiB;
#: an http endpoint's answer matters only for an ``id`` and an error text.
#: 64 KiB leaves ample room for both and bounds the memory of a full prefetch
#: window of answers at a few tens of MiB.
MAX_ANSWER_BYTES = 64 * 1024


async def read_capped(response: aiohttp.ClientResponse, cap: int = MAX_ANSWER_BYTES
                      ) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the (decompressed) body, and whether it was longer.

    The body is read incrementally, so a longer one is never held whole; when
    it is cut the connection is closed instead of being drained for reuse.
    """
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await response.content.read(cap + 1 - size)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    response.close()
    return b"".join(chunks)[:cap], True


#: How long the body of a 2xx answer may take once its status arrived. The
#: provider has the message by then; its body only carries the id, and waiting
#: for a slow one until the send deadline would turn an accepted send into a
#: timeout, retried, so sent twice.
ACCEPTED_BODY_S = 2.0


async def read_accepted(response: aiohttp.ClientResponse, deadline_s: float = ACCEPTED_BODY_S
                        ) -> bytes | None:
    """The body of a 2xx answer, or None when it is slow, broken off,
    undecodable or longer than the cap: the send stands either way."""
    try:
        async with asyncio.timeout(deadline_s):
            body, cut = await read_capped(response)
    except (TimeoutError, aiohttp.ClientError, OSError):
        response.close()
        return None
    return None if cut else body


@dataclass(frozen=True)
class Answer:
    """What a provider answered: status, the body (parsed when it is JSON) and Retry-After."""

    status: int
    text: str
    retry_after: float | None
    # True when the body was not read whole (too long; or, for a 2xx, too slow or broken).
    cut: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (or was cut)."""
        if self.cut:
            return None
        try:
            return json.loads(self.text)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            return None


async def post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    data: bytes,
    headers: Mapping[str, str],
    secrets: Iterable[str | None],
    provider: str,
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
            url, data=data, headers=headers, allow_redirects=False
        ) as response:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if 200 <= response.status < 300:
                accepted = await read_accepted(response)
                return Answer(response.status, (accepted or b"").decode("utf-8", "replace"),
                              retry_after, cut=accepted is None)
            body, cut = await read_capped(response)
            return Answer(response.status, body.decode("utf-8", "replace"), retry_after, cut)
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
    text = f"{provider}: {type(exc).__name__}: {detail}".rstrip(": ")
    return shorten(redact(redact_urls(text), secrets))
