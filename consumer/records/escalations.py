"""Escalation rules: who is told about parked messages, and through which channel
(``herald escalation``, ``/admin/escalations``, the console's escalation page).

A rule selects parked messages by channel, error type and campaign (none:
any) and names a target reached through Herald's own channels: an ``http``
URL (a chat's incoming webhook), an SMS or WhatsApp number, a Messenger PSID.
Matching parked messages are counted per window of ``window_s`` seconds and
each window becomes one digest (:mod:`consumer.parking.escalation`).

Targets are kept in clear (Herald must reach them) but never shown so: a chat
webhook's URL is its key, and a number is a person's.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import asyncpg

from consumer.delivery.recipients import validate_recipient
from consumer.errors import ConfigError
from consumer.logs import mask_recipient
from consumer.providers.classify import redact_urls
from consumer.providers.destinations import url_problem
from consumer.text import printable
from schemas.parking import ESCALATION_CAMPAIGN, ErrorTypeName
from schemas.send_request import CHANNELS

ERROR_TYPES: tuple[str, ...] = typing.get_args(ErrorTypeName)
# Windows from a second (tests) to a day.
MIN_WINDOW_S, MAX_WINDOW_S = 1, 86400
_FIELDS = ("id", "name", "channel", "error_type", "campaign_id", "target_channel", "target",
           "window_s", "created_at", "created_by")


class EscalationNotFound(Exception):
    pass


@dataclass(frozen=True)
class EscalationSpec:
    """One rule as an operator gives it."""

    name: str
    target_channel: str
    target: str
    window_s: int = 300
    channel: str | None = None
    error_type: str | None = None
    campaign_id: str | None = None

    def check(self) -> None:
        """A one-line :class:`ConfigError` naming what is wrong."""
        if not (1 <= len(self.name) <= 100 and self.name.isprintable()):
            raise ConfigError("name: 1 to 100 printable characters")
        if self.target_channel not in CHANNELS:
            raise ConfigError(f"--to-channel: one of {', '.join(CHANNELS)}")
        problem = validate_recipient(self.target_channel, self.target)
        if problem is None and self.target_channel == "http":
            problem = url_problem(self.target)
        if problem is not None:
            raise ConfigError(f"--to: {problem}")
        if not MIN_WINDOW_S <= self.window_s <= MAX_WINDOW_S:
            raise ConfigError(f"--window: between {MIN_WINDOW_S} s and {MAX_WINDOW_S} s")
        if self.channel is not None and self.channel not in CHANNELS:
            raise ConfigError(f"--channel: one of {', '.join(CHANNELS)}")
        if self.error_type is not None and self.error_type not in ERROR_TYPES:
            raise ConfigError(f"--error-type: one of {', '.join(ERROR_TYPES)}")
        if self.campaign_id is not None:
            if not 1 <= len(self.campaign_id) <= 200:
                raise ConfigError("--campaign: 1 to 200 characters")
            if self.campaign_id == ESCALATION_CAMPAIGN:
                raise ConfigError(f"--campaign: {ESCALATION_CAMPAIGN} is the digests' own"
                                  " campaign, never escalated")


def shown_target(channel: str, target: str) -> str:
    """A target as people see it: a URL cut to its host, a number masked."""
    if channel == "http":
        return redact_urls(target)
    return mask_recipient(target) or ""


def _row(r: asyncpg.Record) -> dict[str, Any]:
    row = {k: r[k] for k in _FIELDS}
    row["target"] = shown_target(r["target_channel"], r["target"])
    row["created_at"] = r["created_at"].isoformat()
    return row


def describe(row: dict[str, Any]) -> str:
    """One line: what is escalated, to whom, how often."""
    what = " ".join(p for p in (
        row["channel"] or "", row["error_type"] or "",
        f"campaign {printable(row['campaign_id'])}" if row["campaign_id"] else "") if p)
    return (f"{printable(row['name'])}: parked {what or 'messages'} -> {row['target_channel']}"
            f" {printable(row['target'])}, one digest per {row['window_s']} s")


async def add(pool: asyncpg.Pool, spec: EscalationSpec, actor: str) -> dict[str, Any]:
    """Create a rule; a :class:`ConfigError` when its name is taken."""
    spec.check()
    try:
        row = await pool.fetchrow(
            f"""INSERT INTO escalation_rules (name, channel, error_type, campaign_id,
                       target_channel, target, window_s, created_by)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {", ".join(_FIELDS)}""",
            spec.name, spec.channel, spec.error_type, spec.campaign_id, spec.target_channel,
            spec.target, spec.window_s, actor)
    except asyncpg.UniqueViolationError:
        raise ConfigError(f"name: an escalation named {spec.name!r} exists") from None
    assert row is not None
    return _row(row)


async def remove(pool: asyncpg.Pool, ref: str) -> dict[str, Any]:
    """Delete a rule by id or name (its open windows go with it)."""
    rule_id = int(ref) if ref.isdigit() and len(ref) < 18 else None
    row = await pool.fetchrow(
        f"""DELETE FROM escalation_rules WHERE id = $1 OR (name = $2 AND $1::bigint IS NULL)
            RETURNING {", ".join(_FIELDS)}""", rule_id, ref)
    if row is None:
        raise EscalationNotFound(f"no escalation {ref!r}")
    return _row(row)


async def listing(pool: asyncpg.Pool, *, recent: int = 20) -> dict[str, Any]:
    """The rules, each with its digests sent, and the most recent digests."""
    async with pool.acquire() as conn:
        rules = await conn.fetch(
            f"""SELECT {", ".join("r." + f for f in _FIELDS)},
                       (SELECT count(*) FROM escalation_digests d
                         WHERE d.rule_id = r.id AND d.state = 'sent') AS digests_sent,
                       (SELECT max(d.sent_at) FROM escalation_digests d
                         WHERE d.rule_id = r.id) AS last_sent_at
                  FROM escalation_rules r ORDER BY r.id""")
        digests = await conn.fetch(
            """SELECT r.name, d.window_start, d.window_end, d.state, d.parked, d.message_id,
                      d.sent_at
                 FROM escalation_digests d JOIN escalation_rules r ON r.id = d.rule_id
                ORDER BY d.window_start DESC, r.id LIMIT $1""", recent)
    return {
        "rules": [_row(r) | {"digests_sent": int(r["digests_sent"]),
                             "last_sent_at": r["last_sent_at"].isoformat()
                             if r["last_sent_at"] else None} for r in rules],
        "digests": [{"rule": d["name"], "window_start": d["window_start"].isoformat(),
                     "window_end": d["window_end"].isoformat(), "state": d["state"],
                     "parked": int(d["parked"]), "message_id": d["message_id"],
                     "sent_at": d["sent_at"].isoformat() if d["sent_at"] else None}
                    for d in digests],
    }
