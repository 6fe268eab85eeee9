"""The audit log: one row per mutating operator call (admin API, console or CLI),
and per reveal of a recipient.

The admin API and the console write the row *before* the action runs
(:func:`begin`, outcome ``started``) and fill in its outcome after
(:func:`finish`): an action that was cut short still shows who started it.
The CLI writes one row after (:func:`record`)."""

from __future__ import annotations

import getpass
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("herald.audit")


def cli_actor() -> str:
    """Who runs the CLI, as the audit log and the message history name them."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


async def record(pool: asyncpg.Pool, *, source: str, actor: str, action: str,
                 params: dict[str, Any], affected: int, outcome: str = "ok") -> None:
    """Write one audit row. Never raises: the action it records is already done,
    and failing the call now would tell the caller it was not."""
    try:
        await pool.execute(
            """INSERT INTO audit_log (source, actor, action, params, affected, outcome)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            source, actor, action, params, affected, outcome[:1000])
    except Exception as exc:
        log.error("audit.write_failed", action=action, actor=actor, error=repr(exc)[:300])


async def begin(pool: asyncpg.Pool, *, source: str, actor: str, action: str,
                params: dict[str, Any]) -> int:
    """Write the audit row of an action about to run (outcome ``started``) and
    return its id for :func:`finish`. Raises when the row cannot be written:
    an action that cannot be audited must not run."""
    audit_id = await pool.fetchval(
        """INSERT INTO audit_log (source, actor, action, params, affected, outcome)
           VALUES ($1, $2, $3, $4, 0, 'started') RETURNING id""",
        source, actor, action, params)
    return int(audit_id)


async def finish(pool: asyncpg.Pool, audit_id: int, *, affected: int,
                 outcome: str = "ok") -> None:
    """Record the outcome of an action :func:`begin` announced. Never raises (the
    action is done; the row already says it was started)."""
    try:
        await pool.execute(
            "UPDATE audit_log SET affected = $2, outcome = $3 WHERE id = $1",
            audit_id, affected, outcome[:1000])
    except Exception as exc:
        log.error("audit.write_failed", audit_id=audit_id, error=repr(exc)[:300])
