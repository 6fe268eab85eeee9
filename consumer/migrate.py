"""Forward-only SQL migrations, ``NNNN_name.sql``, applied by ``herald migrate``.

The files live in ``sql/`` at the top of the repository; the wheel carries
them inside the package as ``consumer/sql/`` (pyproject.toml's
``force-include``), where :func:`source` finds them with
:mod:`importlib.resources`. A source checkout (or an editable install) has no
``consumer/sql/`` and reads the checkout's ``sql/`` instead. Finding no
migration at all is an error: an installation without them must never
report a database as up to date.

Each pending file runs in its own transaction and is recorded in
``schema_migrations`` with the SHA-256 of its bytes; an advisory lock makes
concurrent ``herald migrate`` runs (several replicas starting at once) wait
for each other instead of applying a file twice. A file whose bytes differ
from what was applied means the database and the code disagree about the
schema, so both ``herald migrate`` and ``herald run`` refuse to go on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# An arbitrary constant identifying Herald's migration lock.
_LOCK_KEY = 0x4E_52_41_4C_44
# Where a source checkout keeps them: sql/ next to the consumer package, in a
# directory that also holds the project's pyproject.toml.
_CHECKOUT = Path(__file__).resolve().parent.parent


Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class MigrationError(Exception):
    """The migrations cannot be found or read, or the database disagrees with them."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return f"{self.version}_{self.name}.sql"


def source() -> Traversable:
    """The directory holding the migrations: the package's copy, else the checkout's."""
    packaged = resources.files("consumer").joinpath("sql")
    if packaged.is_dir():
        return packaged
    checkout = _CHECKOUT / "sql"
    if checkout.is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
        return checkout
    raise MigrationError(
        f"no migrations found (looked in {packaged} and {checkout}): "
        "this installation of Herald is incomplete"
    )


def discover(directory: Traversable | None = None) -> list[Migration]:
    """Every migration file, in order; raises :class:`MigrationError` when there is none."""
    directory = source() if directory is None else directory
    found = []
    entries = sorted(directory.iterdir(), key=lambda e: e.name) if directory.is_dir() else []
    for entry in entries:
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME_RE.match(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: migration files are named NNNN_name.sql")
        data = entry.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MigrationError(f"{entry.name}: not UTF-8") from None
        found.append(Migration(match.group(1), match.group(2), text,
                               hashlib.sha256(data).hexdigest()))
    if not found:
        raise MigrationError(
            f"no migrations found in {directory}: this installation of Herald is incomplete")
    versions = [m.version for m in found]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        raise MigrationError(f"two migration files share the number {duplicates[0]}")
    return found


async def _applied(conn: Conn) -> dict[str, str | None]:
    """Version → checksum (None when applied before checksums) of what the database
    has applied; empty before any."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return {}
    has_checksum = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = to_regclass('schema_migrations')
                            AND attname = 'checksum' AND NOT attisdropped)""")
    rows = await conn.fetch(
        "SELECT version, checksum FROM schema_migrations" if has_checksum
        else "SELECT version, NULL::text AS checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


def _changed(migrations: list[Migration], applied: dict[str, str | None]) -> None:
    for m in migrations:
        checksum = applied.get(m.version)
        if checksum is not None and checksum != m.checksum:
            raise MigrationError(
                f"migration {m.filename} changed after it was applied (sha256 {checksum[:12]}… "
                f"in schema_migrations, {m.checksum[:12]}… now): migrations are forward-only, "
                "put the change in a new file")


async def verify(conn: Conn, migrations: list[Migration] | None = None) -> None:
    """Refuse (:class:`MigrationError`) a database that lacks a migration or applied another
    version of one; what ``herald run`` checks before it starts anything."""
    migrations = discover() if migrations is None else migrations
    applied = await _applied(conn)
    _changed(migrations, applied)
    missing = [m.version for m in migrations if m.version not in applied]
    if missing:
        raise MigrationError(
            f"the database lacks migration(s) {', '.join(missing)}: run `herald migrate` first")


async def migrate(conn: asyncpg.Connection, directory: Traversable | None = None
                  ) -> list[Migration]:
    """Apply pending migrations; return the ones applied now.

    Raises :class:`MigrationError`, before applying anything, when an applied
    file has changed since.
    """
    migrations = discover(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        # The runner's own bookkeeping, so the runner keeps its shape up to date:
        # databases migrated by a Herald older than the checksums get the column
        # here, before anything is compared or applied.
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    text PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   checksum   text)"""
        )
        await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
        applied = await _applied(conn)
        _changed(migrations, applied)
        # Files applied before checksums were recorded: what is on disk now is the
        # best record there is of them, from here on every change is caught.
        for m in migrations:
            if m.version in applied and applied[m.version] is None:
                await conn.execute(
                    "UPDATE schema_migrations SET checksum = $2"
                    " WHERE version = $1 AND checksum IS NULL", m.version, m.checksum)
        done = []
        for m in migrations:
            if m.version in applied:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)", m.version, m.name, m.checksum)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.filename} failed (rolled back): {exc}"
                                     ) from exc
            done.append(m)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
