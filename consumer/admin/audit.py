"""The audit log: one row per mutating operator call (admin API or CLI)."""

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
