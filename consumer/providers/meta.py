"""What WhatsApp Cloud API and Messenger share: the Graph API error shape.

``{"error": {"message", "type", "code", "error_subcode", "error_data",
"fbtrace_id", "is_transient"}}``. The outcome is decided by ``code`` (and
``error_subcode`` where a table has a row for the pair), never by wording;
the HTTP status only decides for codes the table does not know, because Meta
sends the same code with different statuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from consumer.errors import DeliveryError, ErrorType
from consumer.providers.classify import Rule, as_int, make_error, rule, scrubbed, status_rule
from consumer.providers.transport import post

# A row is keyed by code, or by (code, subcode) when the subcode changes the outcome.
GraphTable = Mapping[int | tuple[int, int], Rule]


@dataclass(frozen=True)
class GraphError:
    """The fields of a Graph API error that matter to Herald."""

    code: int | None
    subcode: int | None
    message: str
    type: str | None = None
    details: str | None = None
    is_transient: bool = False
    fbtrace_id: str | None = None


def parse_graph_error(body: Any) -> GraphError | None:
    """The ``error`` object of a Graph API answer, or None when there is none."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    data = error.get("error_data")
    details = data.get("details") if isinstance(data, dict) else None
    message = error.get("message")
    kind = error.get("type")
    trace = error.get("fbtrace_id")
    return GraphError(
        code=as_int(error.get("code")),
        subcode=as_int(error.get("error_subcode")),
        message=message if isinstance(message, str) else "",
        type=kind if isinstance(kind, str) else None,
        details=details if isinstance(details, str) and details else None,
        is_transient=error.get("is_transient") is True,
        fbtrace_id=trace if isinstance(trace, str) else None,
    )


def graph_rule(table: GraphTable, code: int | None, subcode: int | None = None) -> Rule | None:
    """The table's rule for a code and subcode: the (code, subcode) row first, then the code's."""
    if code is None:
        return None
    if subcode is not None and (code, subcode) in table:
        return table[(code, subcode)]
    return table.get(code)


def classify_graph(
    provider: str,
    table: GraphTable,
    status: int,
    body: Any,
    *,
    retry_after: float | None = None,
) -> DeliveryError:
    """The :class:`DeliveryError` for a non-2xx Graph API answer.

    Codes missing from ``table`` fall back on ``is_transient`` (Meta's own
    "try again" flag, so ``provider_error``) and then on the HTTP status.
    """
    error = parse_graph_error(body)
    if error is None:
        return make_error(status_rule(status), f"{provider} HTTP {status}: no Graph error object",
                          code=f"http_{status}", retry_after=retry_after)
    found = graph_rule(table, error.code, error.subcode)
    if found is None:
        found = rule(ErrorType.PROVIDER_ERROR) if error.is_transient else status_rule(status)
    label = provider if error.code is None else f"{provider} {error.code}"
    if error.subcode is not None:
        label += f"/{error.subcode}"
    message = f"{label} (HTTP {status}): {error.message or 'no error message'}"
    if error.details and error.details not in message:
        message += f" ({error.details})"
    return make_error(
        found,
        message,
        code=str(error.code) if error.code is not None else f"http_{status}",
        retry_after=retry_after,
    )


async def graph_send(
    session: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any],
    *,
    provider: str,
    table: GraphTable,
    recipient: str,
    secrets: Iterable[str],
    headers: Mapping[str, str] | None = None,
) -> Any:
    """POST ``payload`` as JSON; the parsed success answer, or the classified error raised."""
    secrets = tuple(secrets)
    answer = await post(
        session,
        url,
        data=json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        secrets=secrets,
        provider=provider,
    )
    body = answer.json()
    if answer.ok:
        return body
    raise scrubbed(
        classify_graph(provider, table, answer.status, body, retry_after=answer.retry_after),
        recipient,
        secrets,
    )
