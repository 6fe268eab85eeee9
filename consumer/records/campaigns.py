"""Campaigns: per-campaign retry defaults, and fanning a campaign out from CSV.

A campaign's ``max_attempts``, ``base_delay_s``, ``max_delay_s`` and
``retry_mode`` apply to its messages that do not carry their own ``retry``
fields (``consumer.store.resolve_policy``; the pipeline caches a campaign
for 30 s, so a change reaches running consumers within that).

``herald publish --campaign ID --csv FILE --body-template "Hi {name}"``
makes one send request per CSV row. Its ``message_id`` is the row's
``message_id`` column when there is one, else derived from the campaign and
the recipient: publishing the same file again (after an interruption, say)
sends nobody a second message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import time as dt_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from consumer.errors import ConfigError

RETRY_MODES = ("auto", "manual")


@dataclass(frozen=True)
class CampaignDefaults:
    """Fields of ``herald campaign create``; None leaves a field as it is."""

    campaign_id: str
    name: str | None = None
    max_attempts: int | None = None
    base_delay_s: float | None = None
    max_delay_s: float | None = None
    retry_mode: str | None = None
    priority: str | None = None
    daily_limit: int | None = None
    timezone: str | None = None
    quiet_start: dt_time | None = None
    quiet_end: dt_time | None = None

    def check(self) -> None:
        if not 1 <= len(self.campaign_id) <= 200:
            raise ConfigError("campaign id: 1 to 200 characters")
        if self.max_attempts is not None and not 1 <= self.max_attempts <= 100:
            raise ConfigError("--max-attempts: must be between 1 and 100")
        for flag, value in (("--base-delay", self.base_delay_s),
                            ("--max-delay", self.max_delay_s)):
            if value is not None and not 1 <= value <= 262143:
                raise ConfigError(f"{flag}: must be between 1 and 262143 seconds")
        if self.retry_mode is not None and self.retry_mode not in RETRY_MODES:
            raise ConfigError(f"--retry-mode: must be one of {', '.join(RETRY_MODES)}")
        if self.priority is not None and self.priority not in ("high", "normal"):
            raise ConfigError("--priority: must be high or normal")
        if self.daily_limit is not None and self.daily_limit < 1:
            raise ConfigError("--daily-limit: must be at least 1")
        if self.timezone is not None:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"--timezone: unknown time zone {self.timezone!r}") from None
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise ConfigError("--quiet-hours: give both ends, e.g. 22:00-07:00")


def quiet_hours(text: str) -> tuple[dt_time, dt_time]:
    """``22:00-07:00`` → (22:00, 07:00); ValueError with a readable reason."""
    try:
        start, end = (dt_time.fromisoformat(part.strip()) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}") from None
    return start, end


_FIELDS = ("campaign_id", "name", "max_attempts", "base_delay_s", "max_delay_s", "retry_mode",
           "priority", "daily_limit", "timezone", "quiet_start", "quiet_end",
           "created_at", "updated_at")


async def save(pool: asyncpg.Pool, spec: CampaignDefaults) -> tuple[bool, dict[str, Any]]:
    """Create the campaign, or change the fields given; returns (created, row)."""
    spec.check()
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO campaigns AS c (campaign_id, name, max_attempts, base_delay_s,
                       max_delay_s, retry_mode, priority, daily_limit, timezone,
                       quiet_start, quiet_end)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, 'UTC'), $10, $11)
                ON CONFLICT (campaign_id) DO UPDATE SET
                    name = COALESCE(EXCLUDED.name, c.name),
                    max_attempts = COALESCE(EXCLUDED.max_attempts, c.max_attempts),
                    base_delay_s = COALESCE(EXCLUDED.base_delay_s, c.base_delay_s),
                    max_delay_s = COALESCE(EXCLUDED.max_delay_s, c.max_delay_s),
                    retry_mode = COALESCE(EXCLUDED.retry_mode, c.retry_mode),
                    priority = COALESCE(EXCLUDED.priority, c.priority),
                    daily_limit = COALESCE(EXCLUDED.daily_limit, c.daily_limit),
                    timezone = COALESCE($9, c.timezone),
                    quiet_start = COALESCE(EXCLUDED.quiet_start, c.quiet_start),
                    quiet_end = COALESCE(EXCLUDED.quiet_end, c.quiet_end),
                    updated_at = now()
                RETURNING {", ".join(_FIELDS)}, (xmax = 0) AS created""",
            spec.campaign_id, spec.name, spec.max_attempts, spec.base_delay_s,
            spec.max_delay_s, spec.retry_mode, spec.priority, spec.daily_limit, spec.timezone,
            spec.quiet_start, spec.quiet_end)
        assert row is not None
        base, cap = row["base_delay_s"], row["max_delay_s"]
        if base is not None and cap is not None and base > cap:
            raise ConfigError(f"--base-delay: must not exceed the max delay ({base:g} > {cap:g})")
    return bool(row["created"]), _jsonable(row)


def _jsonable(row: asyncpg.Record) -> dict[str, Any]:
    return {k: (row[k].isoformat(timespec="minutes") if isinstance(row[k], dt_time)
                else row[k].isoformat() if k.endswith("_at") else row[k]) for k in _FIELDS}


async def get(pool: asyncpg.Pool, campaign_id: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        f"SELECT {', '.join(_FIELDS)} FROM campaigns WHERE campaign_id = $1", campaign_id)
    return _jsonable(row) if row is not None else None


async def list_all(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [_jsonable(r) for r in await pool.fetch(
        f"SELECT {', '.join(_FIELDS)} FROM campaigns ORDER BY campaign_id")]


def message_id_for(campaign_id: str, recipient: str) -> str:
    """A stable idempotency key for the campaign's message to one recipient."""
    digest = hashlib.sha256(f"{campaign_id}\n{recipient}".encode()).hexdigest()[:24]
    return f"{campaign_id[:150]}-{digest}"


def requests_from_csv(
    path: str, *, channel: str | None, campaign_id: str | None, template: str | None,
    extra: dict[str, Any] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, send request) for each row of a recipients CSV.

    The ``to`` column is the recipient; ``message_id`` is optional; every
    column can be used in the body template as ``{column}``. A row that
    repeats a recipient (the same message id) is skipped with a notice.
    """
    if channel is None or campaign_id is None or template is None:
        missing = [flag for flag, v in (("--channel", channel), ("--campaign", campaign_id),
                                        ("--body-template", template)) if v is None]
        raise ConfigError(f"publish --csv: {', '.join(missing)} required")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise ConfigError(f"--body-template: {exc}") from None
    if any(not f.isidentifier() for f in fields):
        raise ConfigError("--body-template: use plain {column} names only")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"--csv: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--csv: {path} is not UTF-8: {exc.reason}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise ConfigError(f"--csv: {path}: {exc}") from None
    if "to" not in columns:
        raise ConfigError(f"--csv: {path} has no 'to' column"
                          f" (columns: {', '.join(columns) or 'none'})")
    unknown = sorted(set(fields) - set(columns))
    if unknown:
        raise ConfigError(f"--body-template: {{{unknown[0]}}} is not a column of {path}")
    seen: set[str] = set()
    duplicates = 0
    try:
        for row in reader:
            line = reader.line_num
            to = (row.get("to") or "").strip()
            if not to:
                raise ConfigError(f"{path}:{line}: empty 'to'")
            values = {k: (v or "") for k, v in row.items() if k is not None}
            message_id = (row.get("message_id") or "").strip() or message_id_for(
                campaign_id, to)
            if message_id in seen:
                duplicates += 1
                continue
            seen.add(message_id)
            yield line, {"message_id": message_id, "channel": channel, "to": to,
                         "body": template.format_map(values), "campaign_id": campaign_id,
                         **(extra or {})}
    except csv.Error as exc:
        raise ConfigError(f"--csv: {path}:{reader.line_num}: {exc}") from None
    if duplicates:
        print(f"herald: {path}: {duplicates} row(s) repeat a recipient and were skipped",
              file=sys.stderr)


async def known_ids(pool: asyncpg.Pool, limit: int = 500) -> list[str]:
    """Campaign ids with a campaign row or with messages, sorted (the messages'
    ids by a skip scan of messages_campaign_status_idx: one probe per campaign)."""
    rows = await pool.fetch(
        """WITH RECURSIVE seen(id) AS (
               (SELECT campaign_id FROM messages WHERE campaign_id IS NOT NULL
                 ORDER BY campaign_id LIMIT 1)
               UNION ALL
               SELECT (SELECT campaign_id FROM messages
                        WHERE campaign_id IS NOT NULL AND campaign_id > seen.id
                        ORDER BY campaign_id LIMIT 1)
                 FROM seen WHERE seen.id IS NOT NULL)
           SELECT id FROM seen WHERE id IS NOT NULL
           UNION SELECT campaign_id FROM campaigns
           ORDER BY 1 LIMIT $1""", limit)
    return [r["id"] for r in rows]


async def usage_today(pool: asyncpg.Pool, campaign_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each campaign's daily limit and what today (in its time zone) used of it."""
    rows = await pool.fetch(
        """SELECT c.campaign_id, c.daily_limit, c.timezone,
                  (now() AT TIME ZONE c.timezone)::date AS day,
                  COALESCE(u.first_attempts, 0) AS first_attempts,
                  COALESCE(u.retries, 0) AS retries
             FROM campaigns c
             LEFT JOIN campaign_daily_usage u ON u.campaign_id = c.campaign_id
                  AND u.day = (now() AT TIME ZONE c.timezone)::date
            WHERE c.campaign_id = ANY($1::text[])""", campaign_ids)
    return {r["campaign_id"]: {
        "daily_limit": r["daily_limit"], "timezone": r["timezone"], "day": r["day"].isoformat(),
        "first_attempts": int(r["first_attempts"]), "retries": int(r["retries"]),
        "used": int(r["first_attempts"]) + int(r["retries"]),
    } for r in rows}


TARGETS = ("min_delivered_share", "min_retry_success_share", "max_average_attempts")


async def targets(pool: asyncpg.Pool, campaign_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The thresholds operators set per campaign (see :func:`save_targets`)."""
    rows = await pool.fetch(
        f"""SELECT campaign_id, {", ".join(TARGETS)}, updated_at, updated_by
              FROM campaign_targets WHERE campaign_id = ANY($1::text[])""", campaign_ids)
    return {r["campaign_id"]: {k: r[k] for k in (*TARGETS, "updated_by")}
            | {"updated_at": r["updated_at"].isoformat()} for r in rows}


async def save_targets(pool: asyncpg.Pool, campaign_id: str, values: dict[str, float | None],
                       actor: str) -> None:
    """Set a campaign's thresholds: delivered share and retry success share at
    least (0–1), average attempts at most (≥ 1); None clears one."""
    low, retry, attempts = (values.get(k) for k in TARGETS)
    for name, value, lo, hi in (("min_delivered_share", low, 0.0, 1.0),
                                ("min_retry_success_share", retry, 0.0, 1.0),
                                ("max_average_attempts", attempts, 1.0, 100.0)):
        if value is not None and not lo <= value <= hi:
            raise ConfigError(f"{name}: between {lo:g} and {hi:g}")
    await pool.execute(
        """INSERT INTO campaign_targets AS t (campaign_id, min_delivered_share,
               min_retry_success_share, max_average_attempts, updated_by)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (campaign_id) DO UPDATE SET
               min_delivered_share = EXCLUDED.min_delivered_share,
               min_retry_success_share = EXCLUDED.min_retry_success_share,
               max_average_attempts = EXCLUDED.max_average_attempts,
               updated_by = EXCLUDED.updated_by, updated_at = now()""",
        campaign_id, low, retry, attempts, actor)


def judge(figures: dict[str, Any], limits: dict[str, Any] | None) -> dict[str, bool | None]:
    """Whether each figure meets its threshold (None: no threshold, or no figure yet)."""
    limits = limits or {}
    verdict: dict[str, bool | None] = {}
    for figure, target, at_least in (("delivered_share", "min_delivered_share", True),
                                     ("retry_success_share", "min_retry_success_share", True),
                                     ("average_attempts", "max_average_attempts", False)):
        value, limit = figures.get(figure), limits.get(target)
        if value is None or limit is None:
            verdict[figure] = None
        else:
            verdict[figure] = value >= limit if at_least else value <= limit
    return verdict
