"""A message's history: its row and, in time order, every attempt
(``delivery_attempts``), every provider event about it (``provider_events``,
including the Messenger watermarks that covered it) and every parked copy.
``herald status`` and ``herald parked show`` both read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

STATUS_TIMES = ("queued", "sending", "sent", "delivered", "read", "retrying", "failed",
                "expired", "cancelled")


@dataclass(frozen=True)
class Entry:
    """One line of a message's history."""

    at: datetime
    kind: str  # attempt | event | parked
    what: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MessageStatus:
    message: dict[str, Any]
    history: list[Entry]

    def to_json(self) -> dict[str, Any]:
        return {
            "message": {k: _jsonable(v) for k, v in self.message.items()},
            "history": [{"at": iso(e.at), "kind": e.kind, "what": e.what,
                         **{k: _jsonable(v) for k, v in e.detail.items()}}
                        for e in self.history],
        }


async def load_status(conn: asyncpg.Connection, message_id: str) -> MessageStatus | None:
    """The message and its history, or None when Herald does not know it."""
    row = await conn.fetchrow(
        f"""SELECT message_id, status, channel, recipient, campaign_id, attempts, provider,
                   provider_message_id, last_error_type, last_error_code, last_error,
                   next_attempt_at, {", ".join(f"{s}_at" for s in STATUS_TIMES)}
              FROM messages WHERE message_id = $1""",
        message_id,
    )
    if row is None:
        return None
    message = dict(row)
    history: list[Entry] = []
    for a in await conn.fetch(
            """SELECT attempt, started_at, finished_at, outcome, error_type, error_code,
                      error_text, latency_ms, provider_message_id
                 FROM delivery_attempts WHERE message_id = $1 ORDER BY id""", message_id):
        what = f"attempt {a['attempt']} {a['outcome']}"
        if a["error_type"]:
            what += f": {a['error_type']}" + (f" {a['error_code']}" if a["error_code"] else "")
        elif a["provider_message_id"]:
            what += f" as {a['provider_message_id']}"
        if a["latency_ms"] is not None:
            what += f" ({a['latency_ms']:.0f} ms)"
        history.append(Entry(a["finished_at"], "attempt", what, {
            "attempt": a["attempt"], "outcome": a["outcome"], "started_at": a["started_at"],
            "error_type": a["error_type"], "error_code": a["error_code"],
            "error_text": a["error_text"], "provider_message_id": a["provider_message_id"]}))
    # Events tied to it, and the Messenger watermarks that covered it.
    for e in await conn.fetch(
            """SELECT provider, provider_message_id, status, occurred_at, stored_at, error_code,
                      error_text, watermark, outcome
                 FROM provider_events WHERE message_id = $1
               UNION ALL
               SELECT p.provider, p.provider_message_id, p.status, p.occurred_at, p.stored_at,
                      p.error_code, p.error_text, p.watermark, p.outcome
                 FROM provider_events p, messages m
                WHERE m.message_id = $1 AND m.channel = 'messenger'
                  AND p.provider = 'messenger' AND p.message_id IS NULL
                  AND p.recipient = m.recipient AND p.watermark IS NOT NULL
                  AND p.watermark >= m.sending_at""", message_id):
        what = f"{e['provider']} reported {e['status']}"
        if e["error_code"]:
            what += f" {e['error_code']}"
        if e["provider_message_id"] is None and e["watermark"] is not None:
            what += f" (watermark {iso(e['watermark'])})"
        what += f" → {e['outcome'] or 'pending'}"
        history.append(Entry(e["occurred_at"], "event", what, {
            "provider": e["provider"], "status": e["status"],
            "provider_message_id": e["provider_message_id"], "outcome": e["outcome"],
            "error_code": e["error_code"], "error_text": e["error_text"],
            "received_at": e["stored_at"]}))
    for p in await conn.fetch(
            """SELECT parked_id, parked_at, error_type, error_code, attempts, state, resolution
                 FROM parked_messages WHERE message_id = $1""", message_id):
        what = f"parked after attempt {p['attempts']}: {p['error_type']}"
        if p["error_code"]:
            what += f" {p['error_code']}"
        what += f" ({p['state']})"
        history.append(Entry(p["parked_at"], "parked", what, {
            "parked_id": p["parked_id"], "state": p["state"], "resolution": p["resolution"]}))
    history.sort(key=lambda entry: entry.at)
    return MessageStatus(message, history)



def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
