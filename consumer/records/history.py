"""A message's history, read in one place for ``herald status``, ``herald parked
show``, the admin API and the console.

The history of a message is, in time order: every attempt
(``delivery_attempts``, at the time it began), every provider
event about it (``provider_events``, including the Messenger watermarks that
covered it), every parked copy (``parked_messages``) and every operator action
(``message_actions``: indexed, edited, replayed, resolved, rejected, purged).
A parked copy without a message id (an undecodable request) has a history
too: its own copy and the actions on it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from consumer.logs import mask_recipient, mask_tree

STATUS_TIMES = ("queued", "sending", "sent", "delivered", "read", "retrying", "failed",
                "expired", "cancelled")

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Entry:
    """One line of a message's history.

    ``kind`` is ``attempt``, ``event``, ``parked``, or the operator action
    (``indexed``, ``edited``, ``replayed``, ``resolved``, ``rejected``,
    ``purged``); ``what`` is the line a person reads; ``detail`` the fields.
    """

    at: datetime
    kind: str
    what: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, reveal: bool = True) -> dict[str, Any]:
        detail = {k: jsonable(v) for k, v in self.detail.items()}
        return {"at": iso(self.at), "kind": self.kind, "what": self.what,
                **(detail if reveal else mask_tree(detail))}


@dataclass(frozen=True)
class MessageStatus:
    message: dict[str, Any]
    history: list[Entry]

    def to_json(self, *, reveal: bool = False) -> dict[str, Any]:
        message = {k: jsonable(v) for k, v in self.message.items()}
        if not reveal:
            message["recipient"] = mask_recipient(message.get("recipient"))
        return {"message": message,
                "history": [e.to_json(reveal=reveal) for e in self.history]}


async def load_status(conn: Conn, message_id: str) -> MessageStatus | None:
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
    return MessageStatus(dict(row), await load_history(conn, message_id=message_id))


async def load_history(conn: Conn, *, message_id: str | None,
                       parked_id: uuid.UUID | None = None) -> list[Entry]:
    """The history of ``message_id``; with ``parked_id``, also what happened to that
    parked copy (the whole history when the copy has no message id)."""
    history: list[Entry] = []
    if message_id is not None:
        history += await _attempts(conn, message_id)
        history += await _events(conn, message_id)
    history += await _parked(conn, message_id, parked_id)
    history += await _actions(conn, message_id, parked_id)
    history.sort(key=lambda entry: entry.at)
    return history


async def _attempts(conn: Conn, message_id: str) -> list[Entry]:
    entries = []
    for a in await conn.fetch(
            """SELECT attempt, started_at, finished_at, outcome, error_type, error_code,
                      error_text, latency_ms, provider_message_id, retry_rule
                 FROM delivery_attempts WHERE message_id = $1 ORDER BY id""", message_id):
        what = f"attempt {a['attempt']} {a['outcome']}"
        if a["error_type"]:
            what += f": {a['error_type']}" + (f" {a['error_code']}" if a["error_code"] else "")
        elif a["provider_message_id"]:
            what += f" as {a['provider_message_id']}"
        if a["latency_ms"] is not None:
            what += f" ({a['latency_ms']:.0f} ms)"
        if a["retry_rule"]:
            what += f" [{a['retry_rule']}]"
        # At its start: the outcome (and a parking) is recorded after the attempt began.
        entries.append(Entry(a["started_at"], "attempt", what, {
            "attempt": a["attempt"], "outcome": a["outcome"], "finished_at": a["finished_at"],
            "error_type": a["error_type"], "error_code": a["error_code"],
            "error_text": a["error_text"], "latency_ms": a["latency_ms"],
            "provider_message_id": a["provider_message_id"], "retry_rule": a["retry_rule"]}))
    return entries


async def _events(conn: Conn, message_id: str) -> list[Entry]:
    """Events tied to the message, and the Messenger watermarks that covered it."""
    entries = []
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
        entries.append(Entry(e["occurred_at"], "event", what, {
            "provider": e["provider"], "status": e["status"],
            "provider_message_id": e["provider_message_id"], "outcome": e["outcome"],
            "error_code": e["error_code"], "error_text": e["error_text"],
            "received_at": e["stored_at"]}))
    return entries


async def _parked(conn: Conn, message_id: str | None,
                  parked_id: uuid.UUID | None) -> list[Entry]:
    entries = []
    for p in await conn.fetch(
            """SELECT parked_id, parked_at, error_type, error_code, attempts, state, resolution
                 FROM parked_messages WHERE message_id = $1 OR parked_id = $2""",
            message_id, parked_id):
        what = f"parked after attempt {p['attempts']}: {p['error_type']}"
        if p["error_code"]:
            what += f" {p['error_code']}"
        what += f" ({p['state']})"
        entries.append(Entry(p["parked_at"], "parked", what, {
            "parked_id": p["parked_id"], "error_type": p["error_type"],
            "error_code": p["error_code"], "attempts": p["attempts"], "state": p["state"],
            "resolution": p["resolution"]}))
    return entries


async def _actions(conn: Conn, message_id: str | None,
                   parked_id: uuid.UUID | None) -> list[Entry]:
    entries = []
    for a in await conn.fetch(
            """SELECT at, parked_id, action, actor, detail FROM message_actions
                WHERE message_id = $1 OR parked_id = $2 ORDER BY at, id""",
            message_id, parked_id):
        detail = a["detail"] if isinstance(a["detail"], dict) else {}
        entries.append(Entry(a["at"], a["action"], f"{a['action']} by {a['actor']}",
                             {"actor": a["actor"], "parked_id": a["parked_id"], **detail}))
    return entries


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """Database values (times, ids, nested JSON) as JSON values."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
