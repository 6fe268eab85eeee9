"""What the command groups share: argument types, output helpers, and the
wrapper for commands that work on the database.

Errors a person can fix are one line on stderr (exit 1); usage errors exit 2
like every other command (see :mod:`consumer.cli.main`).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from consumer.errors import BrokerUnreachable
from consumer.settings import Settings
from consumer.text import printable

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]
PoolHandler = Callable[[argparse.Namespace, Settings, asyncpg.Pool], Awaitable[int]]

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``45m``, ``90s``, ``2w``."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 45m, 90s")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def moment(text: str) -> datetime:
    """An ISO-8601 time with a zone, or an age (``2h``: two hours ago)."""
    if _DURATION_RE.fullmatch(text.strip().lower()):
        return datetime.now(UTC) - duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time with a zone (2026-11-23T10:00:00Z) or an age (2h)")
    return when




def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    percent = 100 * done // total if total else 100
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent:3d}% {done}/{total}"



def with_pool(handler: PoolHandler) -> Handler:
    """A command that needs the database: opens a pool, turns the errors a
    person can fix (no database, no migrations, no broker, a bad selection)
    into one line, and closes the pool."""

    @functools.wraps(handler)
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        import aio_pika

        from consumer.parking.lot import LotError
        from consumer.parking.passes import LotBusy
        from consumer.store import create_pool

        try:
            pool = await create_pool(settings)
        except (OSError, asyncpg.PostgresError) as exc:
            return fail(f"cannot reach the database: {exc}")
        try:
            return await handler(args, settings, pool)
        except (LotError, LotBusy) as exc:
            return fail(str(exc))
        except asyncpg.UndefinedTableError as exc:
            return fail(f"{exc}: run `herald migrate` first")
        except BrokerUnreachable as exc:
            return fail(str(exc))
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            return fail(f"lost the broker: {exc!r} (run the command again)")
        finally:
            await pool.close()

    return run


def fail(message: str) -> int:
    print(f"herald: {printable(message)}", file=sys.stderr)
    return 1


def print_json(value: Any) -> None:
    # json.dumps escapes every control character (and, with ensure_ascii, every
    # non-ASCII one), so untrusted text in JSON output is safe for terminals.
    print(json.dumps(value, indent=2, default=str))


def cut(text: str | None, width: int) -> str:
    """Untrusted text for one table cell: control characters escaped, cut to ``width``."""
    text = printable((text or "").replace("\n", " "))
    return text if len(text) <= width else text[: width - 1] + "…"


def counts(by_type: dict[str, int]) -> str:
    return ", ".join(f"{printable(str(k))} {v}" for k, v in sorted(by_type.items())) or "none"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


async def audit(pool: asyncpg.Pool, action: str, params: dict[str, Any], affected: int) -> None:
    """Write an operator action run from the command line to the audit log."""
    from consumer.admin import audit as audit_log

    await audit_log.record(pool, source="cli", actor=audit_log.cli_actor(), action=action,
                           params=params, affected=affected)
