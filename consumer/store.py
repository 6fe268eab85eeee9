"""PostgreSQL access: the message's status, its attempts, campaigns.

Every decision the pipeline needs from the database is made by a SQL
function (``herald_claim``, ``herald_record``), so PostgreSQL decides
atomically whether a copy of a message may be sent. The messages in flight
share transactions through group commit (:mod:`consumer.group_commit`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dt_time
from typing import Any, Literal

import asyncpg

from consumer.delivery.backoff import RetryPolicy
from consumer.delivery.rules import BUILTIN_RULES, RetryFields, RetryPlan, RetryRule, RuleBook
from consumer.group_commit import Batcher
from consumer.settings import Settings
from consumer.text import storable
from schemas import RetrySpec

ClaimOutcome = Literal["claimed", "reclaimed", "held", "duplicate", "stale"]
RecordOutcome = Literal["sent", "retrying", "failed", "paused"]

# SQLSTATE classes that mean "the database is not there right now" rather than
# "this statement is wrong": connection exceptions, insufficient resources,
# operator intervention (shutdown, restart), transaction rollback.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
# SQLSTATE classes that mean "this value cannot be stored": data exceptions
# (NUL in text, an unsupported Unicode escape in jsonb, a number out of range),
# integrity constraints, program limits (an index row too large, JSON nested
# past the stack).
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")


def is_transient_db_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is not there right now (retry later),
    rather than that this statement or its data is wrong."""
    # InternalClientError: asyncpg's protocol state was broken by a connection
    # that died mid-operation (seen when PostgreSQL restarts).
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.InternalClientError
                  | asyncio.TimeoutError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by the data written, not by the database.

    PostgreSQL's data, integrity and program-limit classes; asyncpg's own
    refusal to encode an argument (an int past int4, a lone surrogate) is
    reported in class 22 too. A ``ValueError``/``TypeError``/``OverflowError``
    raised while the statement's input was being built (``json.dumps``, a
    timestamp out of range) is the data's fault as well. Such an error is the
    same however often the write is tried again.
    """
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _DATA_SQLSTATE_CLASSES
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return False
    return isinstance(exc, ValueError | TypeError | OverflowError)


def _isolate(exc: BaseException) -> bool:
    """Whether a failed group-commit batch is retried item by item: for anything
    but an outage (an outage fails every item alike, and each caller waits it out)."""
    return not is_transient_db_error(exc)


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    status: str
    attempts: int
    claimed_until: datetime | None
    # The attempts used before the message's last fresh budget, as PostgreSQL
    # grants it (a copy's own x-herald-attempt-base counts only when a replay
    # recorded it; see sql/0011).
    attempt_base: int = 0


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    max_attempts: int | None
    base_delay_s: float | None
    max_delay_s: float | None
    retry_mode: str | None
    priority: str | None = None
    daily_limit: int | None = None
    timezone: str = "UTC"
    quiet_start: dt_time | None = None
    quiet_end: dt_time | None = None


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook replacing asyncpg's default reset query (a round trip per
    release): Herald never leaves session state (LISTEN, SET, locks) behind."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings, *, min_size: int = 1) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        max_size=settings.db_pool_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
    )
    assert pool is not None
    return pool


class Store:
    """The pipeline's view of PostgreSQL."""

    CAMPAIGN_CACHE_S = 30.0
    RULES_CACHE_S = 30.0

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 200) -> None:
        self.pool = pool
        # A batch that fails for a reason other than an outage is retried item by
        # item, so one message's unstorable data fails that message alone.
        self._claims: Batcher[dict[str, Any], Claim] = Batcher(
            self._claim_many, max_batch=max_batch, name="claims", isolate=_isolate)
        self._records: Batcher[dict[str, Any], str] = Batcher(
            self._record_many, max_batch=max_batch, name="records", isolate=_isolate)
        self._campaigns: dict[str, tuple[float, Campaign | None]] = {}
        self._histories: Batcher[dict[str, Any], dict[tuple[str, str | None], int]] = Batcher(
            self._history_many, max_batch=max_batch, name="histories")
        self._rules: tuple[float, RuleBook] | None = None

    async def ping(self) -> None:
        async with self.pool.acquire(timeout=5) as conn:
            await conn.fetchval("SELECT 1")

    async def claim(
        self,
        *,
        message_id: str,
        channel: str,
        recipient: str,
        campaign_id: str | None,
        payload_json: str,
        attempt: int,
        owner: str,
        lease_s: float,
        attempt_base: int = 0,
        urgent: bool = False,
    ) -> Claim:
        """Claim attempt ``attempt`` of a message (see ``herald_claim`` in sql/0001).

        ``payload_json`` is the request as published (already JSON text, so it
        is stored without being decoded and encoded again).
        """
        return await self._claims.submit({
            "message_id": message_id, "channel": channel, "recipient": recipient,
            "campaign_id": campaign_id, "payload_json": payload_json, "attempt": attempt,
            "owner": owner, "lease_s": lease_s, "attempt_base": attempt_base,
        }, urgent=urgent)

    async def _claim_many(self, items: Sequence[dict[str, Any]]) -> list[Claim]:
        results: list[Claim | None] = [None] * len(items)
        parts: list[str] = []
        seen: set[str] = set()
        for idx, item in enumerate(items):
            if item["message_id"] in seen:
                # A second copy of a message in the same batch waits for the first.
                results[idx] = Claim("held", "sending", item["attempt"], None)
                continue
            seen.add(item["message_id"])
            fields = {k: v for k, v in item.items() if k != "payload_json"}
            fields["idx"] = idx
            # The payload is spliced in as the JSON text it already is.
            parts.append(json.dumps(fields)[:-1] + ',"payload":' + item["payload_json"] + "}")
        rows = await self.pool.fetch(
            "SELECT * FROM herald_claim_batch($1::text::jsonb)", "[" + ",".join(parts) + "]"
        )
        for r in rows:
            results[r["idx"]] = Claim(r["outcome"], r["status"], r["attempts"],
                                      r["claimed_until"], r["attempt_base"] or 0)
        return [c if c is not None else Claim("held", "sending", 0, None) for c in results]

    async def record(
        self,
        *,
        message_id: str,
        attempt: int,
        outcome: RecordOutcome,
        started_at: datetime,
        latency_ms: float | None,
        provider: str | None = None,
        provider_message_id: str | None = None,
        error_type: str | None = None,
        error_code: str | None = None,
        error_text: str | None = None,
        next_attempt_at: datetime | None = None,
        urgent: bool = False,
        retry_rule: str | None = None,
    ) -> str:
        """Record an attempt's outcome; returns the message's status afterwards.
        ``retry_rule``: the rule that retried or parked it."""
        return await self._records.submit({
            "message_id": message_id, "attempt": attempt, "outcome": outcome,
            "started_at": started_at.isoformat(), "latency_ms": latency_ms,
            "provider": provider, "provider_message_id": provider_message_id,
            "error_type": error_type, "error_code": error_code,
            "error_text": None if error_text is None else error_text[:2000],
            "next_attempt_at": None if next_attempt_at is None else next_attempt_at.isoformat(),
            "retry_rule": retry_rule,
        }, urgent=urgent)

    async def _record_many(self, items: Sequence[dict[str, Any]]) -> list[str]:
        # One SQL call per round of distinct messages (two outcomes of one
        # message in a batch are rare, and must apply in order).
        rounds: list[list[dict[str, Any]]] = []
        remaining = list(enumerate(items))
        while remaining:
            this_round: list[dict[str, Any]] = []
            later: list[tuple[int, dict[str, Any]]] = []
            seen: set[str] = set()
            for idx, item in remaining:
                if item["message_id"] in seen:
                    later.append((idx, item))
                else:
                    seen.add(item["message_id"])
                    this_round.append(item | {"idx": idx})
            rounds.append(this_round)
            remaining = later
        results: list[str] = [""] * len(items)
        if len(rounds) == 1:
            rows = await self.pool.fetch(
                "SELECT * FROM herald_record_batch($1::text::jsonb)", json.dumps(rounds[0]))
            for r in rows:
                results[r["idx"]] = str(r["status"])
            return results
        # Several rounds in one transaction: a batch is all or nothing, so a failed
        # one can be written again item by item without applying any outcome twice.
        async with self.pool.acquire() as conn, conn.transaction():
            for this_round in rounds:
                rows = await conn.fetch(
                    "SELECT * FROM herald_record_batch($1::text::jsonb)", json.dumps(this_round))
                for r in rows:
                    results[r["idx"]] = str(r["status"])
        return results

    async def close(self) -> None:
        await self._claims.close()
        await self._records.close()
        await self._histories.close()

    async def failure_history(self, message_id: str, *, base: int, before: int
                              ) -> dict[tuple[str, str | None], int]:
        """The message's failed attempts numbered above ``base`` and below ``before``,
        counted by (error_type, code): what its retry budgets have spent
        (consumer.delivery.rules). Asked on failures only."""
        return await self._histories.submit(
            {"message_id": message_id, "base": base, "before": before})

    async def _history_many(self, items: Sequence[dict[str, Any]]
                            ) -> list[dict[tuple[str, str | None], int]]:
        rows = await self.pool.fetch(
            """SELECT x.idx, a.error_type, a.error_code, count(*) AS n
                 FROM jsonb_to_recordset($1::text::jsonb)
                      AS x(idx integer, message_id text, base integer, before integer)
                 JOIN delivery_attempts a ON a.message_id = x.message_id
                      AND a.attempt > x.base AND a.attempt < x.before
                WHERE a.outcome IN ('retrying', 'failed') AND a.error_type IS NOT NULL
                GROUP BY x.idx, a.error_type, a.error_code""",
            json.dumps([item | {"idx": i} for i, item in enumerate(items)]))
        found: list[dict[tuple[str, str | None], int]] = [{} for _ in items]
        for r in rows:
            found[r["idx"]][(r["error_type"], r["error_code"])] = int(r["n"])
        return found

    async def rule_book(self) -> RuleBook:
        """The retry rules in the database (the operator's and campaigns'), cached
        briefly like campaigns: a change reaches running consumers within 30 s."""
        now = time.monotonic()
        if self._rules is not None and now - self._rules[0] < self.RULES_CACHE_S:
            return self._rules[1]
        book = await load_rule_book(self.pool)
        self._rules = (now, book)
        return book

    async def record_expired(
        self, *, message_id: str, channel: str, recipient: str, campaign_id: str | None,
        payload: Any,
    ) -> None:
        await self.pool.execute(
            """INSERT INTO messages AS m (message_id, status, channel, recipient, campaign_id,
                                     payload, queued_at, expired_at, last_error_type)
               VALUES ($1, 'expired', $2, $3, $4, $5, now(), now(), 'expired')
               ON CONFLICT (message_id) DO UPDATE
                  SET status = 'expired', expired_at = now(), updated_at = now(),
                      last_error_type = 'expired', claimed_by = NULL, claimed_until = NULL
                WHERE m.status IN ('queued', 'retrying', 'sending')""",
            message_id,
            channel,
            recipient,
            campaign_id,
            payload,
        )

    async def record_scheduled(
        self, *, message_id: str, channel: str, recipient: str, campaign_id: str | None,
        payload: Any, due_at: datetime,
    ) -> None:
        """A message deferred before its first attempt (``send_at``) is ``queued``."""
        await self.pool.execute(
            """INSERT INTO messages AS m (message_id, status, channel, recipient, campaign_id,
                                     payload, queued_at, next_attempt_at)
               VALUES ($1, 'queued', $2, $3, $4, $5, now(), $6)
               ON CONFLICT (message_id) DO UPDATE
                  SET next_attempt_at = $6, updated_at = now()
                WHERE m.status = 'queued'""",
            message_id,
            channel,
            recipient,
            campaign_id,
            payload,
            due_at,
        )

    async def record_parked(
        self, *, parked_id: uuid.UUID, message_id: str | None, channel: str,
        recipient: str | None, campaign_id: str | None, attempts: int, error_type: str,
        error_code: str | None, last_error: str, parked_at: datetime, body: bytes,
        headers: dict[str, Any], body_limit: int | None = None,
    ) -> None:
        """Index a parked copy (already confirmed by the broker) for operators.

        Everything here may come from a publisher, so it is made storable
        first (:func:`parked_row`): the parked copy in the queue keeps the
        original bytes, the index keeps what PostgreSQL can hold.
        """
        row = parked_row(
            message_id=message_id, channel=channel, recipient=recipient,
            campaign_id=campaign_id, attempts=attempts, error_type=error_type,
            error_code=error_code, last_error=last_error, body=body, headers=headers,
            body_limit=body_limit)
        await self.pool.execute(
            """INSERT INTO parked_messages (parked_id, message_id, channel, recipient,
                   campaign_id, attempts, error_type, error_code, last_error, parked_at,
                   body, headers, body_size)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
               ON CONFLICT (parked_id) DO NOTHING""",
            parked_id, row["message_id"], row["channel"], row["recipient"],
            row["campaign_id"], row["attempts"], row["error_type"], row["error_code"],
            row["last_error"], parked_at, row["body"], row["headers"], row["body_size"],
        )

    async def take_quota(self, campaign_id: str, message_id: str, day: date, *, first: bool,
                         limit: int, day_end: datetime) -> bool:
        """One send from the campaign's daily quota (see sql/0005 herald_take_quota)."""
        return bool(await self.pool.fetchval(
            "SELECT herald_take_quota($1, $2, $3, $4, $5, $6)",
            campaign_id, message_id, day, first, limit, day_end,
        ))

    async def campaign(self, campaign_id: str) -> Campaign | None:
        """A campaign's retry defaults, cached briefly (they change rarely)."""
        now = time.monotonic()
        cached = self._campaigns.get(campaign_id)
        if cached is not None and now - cached[0] < self.CAMPAIGN_CACHE_S:
            return cached[1]
        row = await self.pool.fetchrow(
            """SELECT campaign_id, max_attempts, base_delay_s, max_delay_s, retry_mode,
                      priority, daily_limit, timezone, quiet_start, quiet_end
                 FROM campaigns WHERE campaign_id = $1""",
            campaign_id,
        )
        found = Campaign(**dict(row)) if row is not None else None
        if len(self._campaigns) > 10_000:
            self._campaigns.clear()
        self._campaigns[campaign_id] = (now, found)
        return found


# What the parking lot's index keeps of a parked copy's body when no limit is
# given (HERALD_MAX_BODY_BYTES's default): the queue keeps the whole of it.
STORED_BODY_LIMIT = 256 * 1024
# Limits of the index's text columns: ids as SendRequest allows them, a
# recipient as long as a btree index row may hold.
_ID_LIMIT = 200
_RECIPIENT_LIMIT = 2048
_ERROR_LIMIT = 2000
_HEADER_TEXT_LIMIT = 1000


def parked_row(
    *, message_id: str | None, channel: str, recipient: str | None, campaign_id: str | None,
    attempts: int, error_type: str, error_code: str | None, last_error: str, body: bytes,
    headers: dict[str, Any], body_limit: int | None = None,
) -> dict[str, Any]:
    """The columns of a ``parked_messages`` row, made storable.

    Text loses NUL and lone surrogates and is capped (PostgreSQL's ``text``
    and ``jsonb`` refuse the former; btree index rows are at most ~2.7 kB);
    a body longer than ``body_limit`` is cut, with its whole size in
    ``body_size`` (the copy in the parking queue keeps every byte); header
    values other than text and numbers are left out; ``attempts`` is kept in
    int4's range.
    """
    limit = STORED_BODY_LIMIT if body_limit is None else body_limit

    def text(value: str | None, cap: int) -> str | None:
        return None if value is None else storable(str(value), cap)

    def cap_utf8(value: str | None, cap_bytes: int) -> str | None:
        if value is None:
            return None
        clean = storable(value)
        encoded = clean.encode("utf-8")
        if len(encoded) <= cap_bytes:
            return clean
        return encoded[: cap_bytes - 3].decode("utf-8", "ignore") + "…"

    kept: dict[str, Any] = {}
    for key, value in headers.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            continue
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        kept[storable(str(key), 255)] = (storable(value, _HEADER_TEXT_LIMIT)
                                         if isinstance(value, str) else value)
    return {
        "message_id": text(message_id, _ID_LIMIT) or None,
        "channel": storable(channel, 100),
        "recipient": cap_utf8(recipient, _RECIPIENT_LIMIT),
        "campaign_id": text(campaign_id, _ID_LIMIT),
        "attempts": min(max(int(attempts), 0), 2**31 - 1),
        "error_type": storable(error_type, 100),
        "error_code": text(error_code, 100),
        "last_error": storable(last_error, _ERROR_LIMIT),
        "body": body[:limit],
        "body_size": len(body) if len(body) > limit else None,
        "headers": kept,
    }


def resolve_policy(
    settings: Settings,
    campaign: Campaign | None,
    *,
    max_attempts: int | None,
    base_delay_s: float | None,
    max_delay_s: float | None,
    mode: str | None,
) -> RetryPolicy:
    """The message's own retry fields win, then the campaign's, then settings."""

    def pick(own: Any, from_campaign: Any, default: Any) -> Any:
        if own is not None:
            return own
        if from_campaign is not None:
            return from_campaign
        return default

    base = pick(base_delay_s, campaign and campaign.base_delay_s, settings.base_delay_s)
    cap = pick(max_delay_s, campaign and campaign.max_delay_s, settings.max_delay_s)
    return RetryPolicy(
        max_attempts=pick(max_attempts, campaign and campaign.max_attempts, settings.max_attempts),
        base_delay_s=base,
        max_delay_s=max(cap, base),
        mode="manual" if pick(mode, campaign and campaign.retry_mode, settings.retry_mode)
        == "manual" else "auto",
        jitter=settings.retry_jitter,
    )


async def load_rule_book(pool: asyncpg.Pool) -> RuleBook:
    """Every retry rule kept in the database."""
    general: list[RetryRule] = []
    campaigns: dict[str, list[RetryRule]] = {}
    for r in await pool.fetch(
            """SELECT id, campaign_id, channel, error_type, error_code, max_attempts,
                      base_delay_s, max_delay_s, note
                 FROM retry_rules ORDER BY id"""):
        rule = RetryRule(r["max_attempts"], r["base_delay_s"], r["max_delay_s"],
                         channel=r["channel"], error_type=r["error_type"], code=r["error_code"],
                         source="campaign" if r["campaign_id"] else "operator",
                         note=r["note"] or "", rule_id=r["id"])
        if r["campaign_id"] is None:
            general.append(rule)
        else:
            campaigns.setdefault(r["campaign_id"], []).append(rule)
    return RuleBook(tuple(general), {k: tuple(v) for k, v in campaigns.items()})


def retry_plan(settings: Settings, *, channel: str, spec: RetrySpec | None,
               campaign_id: str | None, campaign: Campaign | None, book: RuleBook
               ) -> RetryPlan:
    """A message's retry plan: its own retry fields and rules, its campaign's, the
    operator's and (HERALD_RETRY_RULES=builtin) the shipped rules, then settings."""
    mode = spec.mode if spec is not None and spec.mode is not None else (
        campaign.retry_mode if campaign is not None and campaign.retry_mode else
        settings.retry_mode)
    message_rules = tuple(
        RetryRule(r.max_attempts, r.base_delay_s, r.max_delay_s, error_type=r.error_type,
                  code=r.code, source="message")
        for r in (spec.rules or () if spec is not None else ()))
    general = book.general + (BUILTIN_RULES if settings.retry_rules == "builtin" else ())
    return RetryPlan(
        channel=channel,
        settings=RetryFields("settings", settings.max_attempts, settings.base_delay_s,
                             settings.max_delay_s),
        mode="manual" if mode == "manual" else "auto",
        jitter=settings.retry_jitter,
        message=RetryFields("message", spec.max_attempts, spec.base_delay_s, spec.max_delay_s)
        if spec is not None else RetryFields("message"),
        message_rules=message_rules,
        campaign=RetryFields("campaign", campaign.max_attempts, campaign.base_delay_s,
                             campaign.max_delay_s) if campaign is not None
        else RetryFields("campaign"),
        campaign_rules=book.for_campaign(campaign_id),
        general_rules=general,
    )
