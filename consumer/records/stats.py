"""Delivery and retry statistics (``herald stats``, ``GET /admin/stats``).

Read from the views of sql/0004 (failed_deliveries_summary,
retry_effectiveness, first_attempt_success) and the messages table, for one
campaign or for everything.

Definitions (all over messages attempted at least once, unless said):

- ``sent_first_attempt``: succeeded (sent, delivered or read) with one attempt;
- ``needed_retries``: took more than one attempt (whatever the outcome);
  ``recovered_by_retries``: of those, the ones that succeeded;
- ``retry_rate`` = needed_retries / attempted;
- ``average_attempts`` = attempts made / attempted;
- ``success_rate`` = succeeded / finished (sent, delivered, read, failed,
  expired, cancelled): messages still on their way do not count yet.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

import asyncpg

from consumer.logs import mask_recipient
from consumer.parking.lot import NotFound
from consumer.records.completion import completion_of
from consumer.settings import Settings
from consumer.store import Campaign, Store, resolve_policy

STATUSES = ("queued", "sending", "sent", "delivered", "read", "retrying", "failed",
            "expired", "cancelled")


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def retry_config(settings: Settings, campaign: Campaign | None) -> dict[str, Any]:
    """The retry policy a message of the campaign gets unless it carries its own,
    and which fields the campaign sets (the rest come from settings)."""
    policy = resolve_policy(settings, campaign, max_attempts=None, base_delay_s=None,
                            max_delay_s=None, mode=None)
    from_campaign = []
    if campaign is not None:
        from_campaign = [name for name, value in (
            ("max_attempts", campaign.max_attempts), ("base_delay_s", campaign.base_delay_s),
            ("max_delay_s", campaign.max_delay_s), ("mode", campaign.retry_mode))
            if value is not None]
    return asdict(policy) | {"from_campaign": from_campaign,
                             "retry_rules": settings.retry_rules}


async def statistics(pool: asyncpg.Pool, settings: Settings, campaign_id: str | None = None,
                     *, recent: int = 10) -> dict[str, Any]:
    """Totals by status, first-attempt and retry figures, failures by
    error_type, retries by attempt number, the retry configuration in force
    and the most recent errors."""
    where, params = ("WHERE campaign_id = $1", [campaign_id]) if campaign_id else ("", [])
    campaign = await Store(pool).campaign(campaign_id) if campaign_id else None
    async with pool.acquire() as conn:
        totals = {r["status"]: int(r["n"]) for r in await conn.fetch(
            f"SELECT status, count(*) AS n FROM messages {where} GROUP BY status", *params)}
        if campaign_id and campaign is None and not totals:
            raise NotFound(f"no campaign {campaign_id!r} (no campaign row and no messages)")
        first = await conn.fetchrow(
            f"""SELECT COALESCE(sum(attempted), 0)::bigint AS attempted,
                       COALESCE(sum(succeeded), 0)::bigint AS succeeded,
                       COALESCE(sum(sent_first_attempt), 0)::bigint AS sent_first_attempt,
                       COALESCE(sum(needed_retries), 0)::bigint AS needed_retries,
                       COALESCE(sum(recovered_by_retries), 0)::bigint AS recovered_by_retries,
                       COALESCE(sum(finished), 0)::bigint AS finished,
                       COALESCE(sum(total_attempts), 0)::bigint AS total_attempts
                  FROM first_attempt_success {where}""", *params)
        assert first is not None  # an aggregate without GROUP BY returns one row
        failures = await conn.fetch(
            f"""SELECT error_type, sum(failed_attempts)::bigint AS failed_attempts,
                       sum(messages_affected)::bigint AS messages_affected,
                       sum(messages_failed)::bigint AS messages_failed,
                       max(last_failure_at) AS last_failure_at
                  FROM failed_deliveries_summary {where}
                 GROUP BY error_type ORDER BY sum(failed_attempts) DESC, error_type""",
            *params)
        by_attempt = await conn.fetch(
            f"""SELECT attempt, sum(attempts)::bigint AS attempts, sum(sent)::bigint AS sent,
                       sum(retried)::bigint AS retried, sum(failed)::bigint AS failed,
                       sum(paused)::bigint AS paused, sum(abandoned)::bigint AS abandoned
                  FROM retry_effectiveness {where} GROUP BY attempt ORDER BY attempt""",
            *params)
        recent_rows = await conn.fetch(
            f"""SELECT a.finished_at, a.message_id, a.attempt, a.outcome, a.error_type,
                       a.error_code, a.error_text, m.recipient, m.campaign_id
                  FROM delivery_attempts a JOIN messages m ON m.message_id = a.message_id
                 WHERE a.error_type IS NOT NULL
                       {"AND m.campaign_id = $1" if campaign_id else ""}
                 ORDER BY a.finished_at DESC, a.id DESC LIMIT {int(recent)}""", *params)
        # The rule each failed attempt was charged to (consumer.delivery.rules).
        rules = await conn.fetch(
            f"""SELECT a.retry_rule,
                       count(*) FILTER (WHERE a.outcome = 'retrying') AS retried,
                       count(*) FILTER (WHERE a.outcome = 'failed') AS parked,
                       max(a.finished_at) AS last_at
                  FROM delivery_attempts a
                  {"JOIN messages m ON m.message_id = a.message_id" if campaign_id else ""}
                 WHERE a.retry_rule IS NOT NULL
                       {"AND m.campaign_id = $1" if campaign_id else ""}
                 GROUP BY a.retry_rule ORDER BY count(*) DESC, a.retry_rule LIMIT 50""",
            *params)
        parked = {r["error_type"]: int(r["n"]) for r in await conn.fetch(
            f"""SELECT error_type, count(*) AS n FROM parked_messages
                 WHERE state = 'parked' {"AND campaign_id = $1" if campaign_id else ""}
                 GROUP BY error_type ORDER BY error_type""", *params)}
    attempted = int(first["attempted"])
    completion = await completion_of(pool, campaign_id) if campaign_id else None
    return {
        "campaign": campaign_id,
        "totals": {"all": sum(totals.values())} | {s: totals.get(s, 0) for s in STATUSES},
        "attempted": attempted,
        "succeeded": int(first["succeeded"]),
        "sent_first_attempt": int(first["sent_first_attempt"]),
        "needed_retries": int(first["needed_retries"]),
        "recovered_by_retries": int(first["recovered_by_retries"]),
        "finished": int(first["finished"]),
        "attempts_made": int(first["total_attempts"]),
        "first_attempt_success_rate": _rate(int(first["sent_first_attempt"]), attempted),
        "retry_rate": _rate(int(first["needed_retries"]), attempted),
        "average_attempts": _rate(int(first["total_attempts"]), attempted),
        "success_rate": _rate(int(first["succeeded"]), int(first["finished"])),
        "failures_by_error_type": {
            r["error_type"]: {
                "failed_attempts": int(r["failed_attempts"]),
                "messages_affected": int(r["messages_affected"]),
                "messages_failed": int(r["messages_failed"]),
                "last_failure_at": r["last_failure_at"].isoformat(),
            } for r in failures},
        "by_attempt": [
            dict(r) | {"success_rate": _rate(int(r["sent"]), int(r["attempts"]))}
            for r in by_attempt],
        "parked_by_error_type": parked,
        "retry_config": retry_config(settings, campaign),
        "completion": completion,
        "rules_applied": [
            {"rule": r["retry_rule"], "retried": int(r["retried"]), "parked": int(r["parked"]),
             "last_at": r["last_at"].isoformat()} for r in rules],
        "recent_errors": [
            {"at": r["finished_at"].isoformat(), "message_id": r["message_id"],
             "campaign_id": r["campaign_id"], "attempt": r["attempt"], "outcome": r["outcome"],
             "error_type": r["error_type"], "error_code": r["error_code"],
             "error": (r["error_text"] or "")[:300], "recipient": mask_recipient(r["recipient"])}
            for r in recent_rows],
    }


async def recent_flow(pool: asyncpg.Pool, window_s: float = 3600) -> dict[str, dict[str, int]]:
    """Per channel, what happened in the last ``window_s`` seconds: messages sent
    (accepted by the provider; ``sent_at`` in the window, whatever their status
    now), messages waiting for a retry scheduled in the window, and copies
    parked in the window. Read through messages_status_idx (status, updated_at)
    and parked_state_time_idx (state, parked_at); the cost grows with the
    window's traffic, not with the tables."""
    window = timedelta(seconds=window_s)
    found: dict[str, dict[str, int]] = {}

    def add(rows: list[asyncpg.Record], key: str) -> None:
        for r in rows:
            found.setdefault(r["channel"], {"sent": 0, "retrying": 0, "parked": 0})[key] = (
                int(r["n"]))

    async with pool.acquire() as conn:
        add(await conn.fetch(
            """SELECT channel, count(*) AS n FROM messages
                WHERE status IN ('sent', 'delivered', 'read')
                  AND updated_at >= now() - $1::interval AND sent_at >= now() - $1::interval
                GROUP BY channel""", window), "sent")
        add(await conn.fetch(
            """SELECT channel, count(*) AS n FROM messages
                WHERE status = 'retrying' AND updated_at >= now() - $1::interval
                GROUP BY channel""", window), "retrying")
        add(await conn.fetch(
            """SELECT channel, count(*) AS n FROM parked_messages
                WHERE state IN ('parked', 'replayed', 'rejected', 'purged', 'resolved')
                  AND parked_at >= now() - $1::interval
                GROUP BY channel""", window), "parked")
    return found


async def campaign_overview(pool: asyncpg.Pool, campaign_ids: list[str]
                            ) -> dict[str, dict[str, Any]]:
    """For each campaign: messages per status, completion, and the figures it is
    judged by (delivered share = success_rate, retry success share, average
    attempts), with the definitions of :func:`statistics`."""
    found: dict[str, dict[str, Any]] = {
        c: {"totals": dict.fromkeys(STATUSES, 0), "all": 0} for c in campaign_ids}
    async with pool.acquire() as conn:
        for r in await conn.fetch(
                """SELECT campaign_id, status, count(*) AS n FROM messages
                    WHERE campaign_id = ANY($1::text[]) GROUP BY campaign_id, status""",
                campaign_ids):
            entry = found[r["campaign_id"]]
            entry["totals"][r["status"]] = int(r["n"])
            entry["all"] += int(r["n"])
        firsts = {r["campaign_id"]: r for r in await conn.fetch(
            """SELECT campaign_id, attempted, succeeded, needed_retries, recovered_by_retries,
                      finished, total_attempts
                 FROM first_attempt_success WHERE campaign_id = ANY($1::text[])""",
            campaign_ids)}
    for campaign_id, entry in found.items():
        first = firsts.get(campaign_id)
        attempted = int(first["attempted"]) if first else 0
        finished = int(first["finished"]) if first else 0
        needed = int(first["needed_retries"]) if first else 0
        entry |= {
            "attempted": attempted,
            "finished": finished,
            "completion": _rate(finished, entry["all"]),
            "delivered_share": _rate(int(first["succeeded"]), finished) if first else None,
            "retry_success_share": _rate(int(first["recovered_by_retries"]), needed)
            if first else None,
            "average_attempts": _rate(int(first["total_attempts"]), attempted)
            if first else None,
        }
    return found
