"""Parking a message: the one way the pipeline and the events consumer do it.

The original bytes go to ``{prefix}.parked`` with the reason in ``x-herald-*``
headers (confirmed by the broker), then the copy is indexed in
``parked_messages`` for operators, then a notice goes to
``{prefix}.notifications`` as ``parked.{channel}.{error_type}`` for whoever
routes escalations to chat or paging (Herald's own: :mod:`consumer.parking.escalation`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import structlog

from consumer import metrics
from consumer.delivery.decision import error_headers
from consumer.errors import DeliveryError, Unstorable
from consumer.publisher import Publisher
from consumer.store import Store, is_data_error
from consumer.wire import (
    HEADER_ATTEMPT,
    HEADER_CHANNEL,
    HEADER_MESSAGE_ID,
    HEADER_PARKED_AT,
    HEADER_PARKED_ID,
)

log = structlog.get_logger("herald.parking")

# Runs one broker or database step; the pipeline's retries outages, by default
# a step simply runs. Either raises Unstorable when the step's data is refused.
Runner = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def _once(component: str, step: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await step()
    except Exception as exc:
        if component == "database" and is_data_error(exc):
            raise Unstorable(component, exc) from exc
        raise


async def park(
    publisher: Publisher,
    store: Store,
    *,
    body: bytes,
    channel: str,
    message_id: str | None,
    attempt: int,
    error: DeliveryError,
    recipient: str | None,
    campaign_id: str | None,
    parked_at: datetime,
    parked_id: uuid.UUID | None = None,
    content_type: str | None = "application/json",
    headers: Mapping[str, str | int] | None = None,
    run: Runner = _once,
    body_limit: int | None = None,
) -> uuid.UUID:
    """Park ``body`` with the reason (and ``headers`` of the caller's own);
    returns the parked copy's id.

    The copy in the parking queue is the original, byte for byte; the index
    row keeps what PostgreSQL can (at most ``body_limit`` bytes of the body,
    see :func:`consumer.store.parked_row`). An index row the database still
    refuses is logged and left out: the copy is parked all the same, and
    ``herald parked sync`` indexes what the queue holds.
    """
    parked_id = parked_id or uuid.uuid4()
    headers = dict(headers or {}) | error_headers(error) | {
        HEADER_ATTEMPT: attempt,
        HEADER_PARKED_AT: parked_at.isoformat(),
        HEADER_CHANNEL: channel,
        HEADER_PARKED_ID: str(parked_id),
    }
    if message_id:
        headers[HEADER_MESSAGE_ID] = message_id
    names = publisher.names
    await run("broker", lambda: publisher.publish(
        names.parked, names.parked, body, headers=headers, message_id=message_id,
        content_type=content_type))
    try:
        await run("database", lambda: store.record_parked(
            parked_id=parked_id, message_id=message_id, channel=channel, recipient=recipient,
            campaign_id=campaign_id, attempts=attempt, error_type=error.error_type.value,
            error_code=error.code, last_error=error.message, parked_at=parked_at, body=body,
            headers={k: v for k, v in headers.items() if isinstance(v, str | int)},
            body_limit=body_limit))
    except Unstorable as exc:
        log.error("parked.index_refused", parked_id=str(parked_id), error=exc.reason,
                  note="parked in the queue; `herald parked sync` indexes it")
    notice = json.dumps({
        "parked_id": str(parked_id), "message_id": message_id, "channel": channel,
        "error_type": error.error_type.value, "error_code": error.code,
        "campaign_id": campaign_id, "last_error": error.message[:500], "attempt": attempt,
        "parked_at": parked_at.isoformat(),
    }).encode()
    # Nobody may be listening for notices yet: an unroutable notice is fine.
    await run("broker", lambda: publisher.publish(
        names.notifications, f"parked.{channel}.{error.error_type.value}", notice,
        mandatory=False))
    metrics.PARKED.labels(channel, error.error_type.value).inc()
    return parked_id
