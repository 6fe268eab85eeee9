"""Retry rules kept in the database: the operator's and campaigns' own
(``herald retry-rules``, ``GET /admin/retry-rules``).

What a rule means and which one applies: :mod:`consumer.delivery.rules`. A
row with the same selector (campaign, channel, error type, code) as another
replaces it; the shipped rules are not rows, and a row with a shipped rule's
selector wins over it. Running consumers see a change within
``Store.RULES_CACHE_S`` (30 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from consumer.delivery.rules import BUILTIN_RULES, RETRYABLE_TYPES, RetryRule
from consumer.errors import ConfigError
from consumer.text import printable
from schemas.send_request import CHANNELS

_FIELDS = ("id", "campaign_id", "channel", "error_type", "error_code", "max_attempts",
           "base_delay_s", "max_delay_s", "note", "updated_at", "updated_by")


@dataclass(frozen=True)
class RuleSpec:
    """One rule as an operator gives it (``herald retry-rules set``)."""

    max_attempts: int
    campaign_id: str | None = None
    channel: str | None = None
    error_type: str | None = None
    code: str | None = None
    base_delay_s: float | None = None
    max_delay_s: float | None = None
    note: str | None = None

    def check(self) -> None:
        """A one-line :class:`ConfigError` naming what is wrong."""
        if self.channel is None and self.error_type is None and self.code is None:
            raise ConfigError("a retry rule names a --channel, an --error-type or a --code"
                              " (the campaign's or the settings' fields cover the rest)")
        if self.channel is not None and self.channel not in CHANNELS:
            raise ConfigError(f"--channel: one of {', '.join(CHANNELS)}")
        if self.error_type is not None and self.error_type not in RETRYABLE_TYPES:
            raise ConfigError(f"--error-type: one of {', '.join(RETRYABLE_TYPES)} (other"
                              " errors are never retried, so a rule would change nothing)")
        for flag, text, limit in (("--code", self.code, 100), ("--campaign", self.campaign_id,
                                                                 200)):
            if text is not None and not (1 <= len(text) <= limit and text.isprintable()):
                raise ConfigError(f"{flag}: 1 to {limit} printable characters")
        if not 1 <= self.max_attempts <= 100:
            raise ConfigError("--max-attempts: between 1 and 100")
        for flag, value in (("--base-delay", self.base_delay_s),
                            ("--max-delay", self.max_delay_s)):
            if value is not None and not 1 <= value <= 262143:
                raise ConfigError(f"{flag}: between 1 and 262143 seconds")
        if (self.base_delay_s is not None and self.max_delay_s is not None
                and self.base_delay_s > self.max_delay_s):
            raise ConfigError("--base-delay: must not exceed --max-delay")
        if self.note is not None and len(self.note) > 500:
            raise ConfigError("--note: at most 500 characters")


def _row(r: asyncpg.Record) -> dict[str, Any]:
    return {k: (r[k].isoformat() if k == "updated_at" else r[k]) for k in _FIELDS}


async def save(pool: asyncpg.Pool, spec: RuleSpec, actor: str) -> tuple[bool, dict[str, Any]]:
    """Create the rule, or replace the one with the same selector; (created, row)."""
    spec.check()
    row = await pool.fetchrow(
        f"""INSERT INTO retry_rules AS r (campaign_id, channel, error_type, error_code,
                   max_attempts, base_delay_s, max_delay_s, note, updated_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (COALESCE(campaign_id, ''), COALESCE(channel, ''),
                         COALESCE(error_type, ''), COALESCE(error_code, ''))
            DO UPDATE SET max_attempts = EXCLUDED.max_attempts,
                          base_delay_s = EXCLUDED.base_delay_s,
                          max_delay_s = EXCLUDED.max_delay_s, note = EXCLUDED.note,
                          updated_by = EXCLUDED.updated_by, updated_at = now()
            RETURNING {", ".join(_FIELDS)}, (xmax = 0) AS created""",
        spec.campaign_id, spec.channel, spec.error_type, spec.code, spec.max_attempts,
        spec.base_delay_s, spec.max_delay_s, spec.note, actor)
    assert row is not None
    return bool(row["created"]), _row(row)


async def remove(pool: asyncpg.Pool, rule_id: int) -> dict[str, Any] | None:
    """Delete one rule; the row it was, or None when there is none."""
    row = await pool.fetchrow(
        f"DELETE FROM retry_rules WHERE id = $1 RETURNING {', '.join(_FIELDS)}", rule_id)
    return _row(row) if row is not None else None


async def listing(pool: asyncpg.Pool, *, campaign_id: str | None = None,
                  builtin: bool = True) -> dict[str, Any]:
    """The operator's rules, the campaign's (when named), and the shipped ones, each
    shipped rule marked when an operator's rule with its selector replaces it."""
    rows = [_row(r) for r in await pool.fetch(
        f"""SELECT {", ".join(_FIELDS)} FROM retry_rules
             WHERE campaign_id IS NULL OR campaign_id = $1
             ORDER BY campaign_id NULLS FIRST, channel NULLS FIRST, error_type NULLS FIRST,
                      error_code NULLS FIRST""", campaign_id)]
    general = [r for r in rows if r["campaign_id"] is None]
    taken = {(r["channel"], r["error_type"], r["error_code"]) for r in general}
    shipped = [_shipped(rule) | {"replaced": (rule.channel, rule.error_type, rule.code) in taken}
               for rule in BUILTIN_RULES] if builtin else []
    return {"operator": general, "campaign": [r for r in rows if r["campaign_id"] is not None],
            "builtin": shipped, "builtin_enabled": builtin}


def _shipped(rule: RetryRule) -> dict[str, Any]:
    return {"channel": rule.channel, "error_type": rule.error_type, "error_code": rule.code,
            "max_attempts": rule.max_attempts, "base_delay_s": rule.base_delay_s,
            "max_delay_s": rule.max_delay_s, "note": rule.note}


def describe(row: dict[str, Any]) -> str:
    """One line for a person: selector, budget, delays, note."""
    selector = " ".join(p for p in (
        f"campaign {printable(row['campaign_id'])}" if row.get("campaign_id") else "",
        row["channel"] or "", row["error_type"] or "",
        f"code {printable(row['error_code'])}" if row["error_code"] else "") if p)

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:g}s"

    return (f"{selector}: {row['max_attempts']} attempts, delay {seconds(row['base_delay_s'])}"
            f" to {seconds(row['max_delay_s'])}"
            + (f"  ({printable(row['note'])})" if row.get("note") else ""))
