"""Migrations (consumer/migrate.py): where they are found, their checksums, and the
refusal to run when an applied file changed, against a real PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from consumer import migrate as migrate_module
from consumer.migrate import MigrationError, discover, migrate, source, verify
from consumer.service import NotMigrated, Service
from consumer.settings import Settings
from tests.conftest import DATABASE_URL, REPO, herald_env, with_search_path

SQL = REPO / "sql"


@pytest.fixture
async def schema_url() -> AsyncIterator[str]:
    """A fresh, empty schema (not migrated); the URL selects it through search_path."""
    schema = f"m_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.close()
    yield with_search_path(DATABASE_URL, schema)
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()


@pytest.fixture
async def conn(schema_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(schema_url)
    yield connection
    await connection.close()


def copy_of_sql(tmp_path: Path) -> Path:
    target = tmp_path / "sql"
    shutil.copytree(SQL, target)
    return target


def herald_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    environ["HERALD_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "consumer", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


# -- finding them --------------------------------------------------------------------------


def test_a_checkout_reads_the_top_level_sql_directory() -> None:
    assert Path(str(source())) == SQL
    found = discover()
    assert [m.filename for m in found] == sorted(p.name for p in SQL.glob("*.sql"))
    for m in found:
        assert m.checksum == hashlib.sha256((SQL / m.filename).read_bytes()).hexdigest()


def test_no_migrations_at_all_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations found"):
        discover(tmp_path)
    (tmp_path / "README").write_text("not a migration")
    with pytest.raises(MigrationError, match="no migrations found"):
        discover(tmp_path)
    with pytest.raises(MigrationError, match="no migrations found"):
        discover(tmp_path / "absent")


def test_an_installation_without_migrations_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Neither a packaged copy (the checkout has none) nor a checkout's sql/ beside it.
    monkeypatch.setattr(migrate_module, "_CHECKOUT", tmp_path)
    with pytest.raises(MigrationError, match="incomplete"):
        source()
    # sql/ without a project file beside it is not a checkout either.
    (tmp_path / "sql").mkdir()
    with pytest.raises(MigrationError, match="incomplete"):
        source()


@pytest.mark.parametrize(("files", "error"), [
    ({"0001_core.sql": "", "1_bad.sql": ""}, "1_bad.sql: migration files are named"),
    ({"0001_core.sql": "", "0001_again.sql": ""}, "share the number 0001"),
    ({"0001_core.sql": b"\xff\xfe"}, "0001_core.sql: not UTF-8"),
])
def test_badly_named_or_encoded_files_are_refused(
    tmp_path: Path, files: dict[str, str | bytes], error: str,
) -> None:
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    with pytest.raises(MigrationError, match=re.escape(error)):
        discover(tmp_path)


# -- applying and checksums -----------------------------------------------------------------


async def test_migrate_records_each_file_with_its_checksum(conn: asyncpg.Connection) -> None:
    applied = await migrate(conn)
    assert [m.filename for m in applied] == [m.filename for m in discover()]
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations"
                            " ORDER BY version")
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in discover()]
    assert await conn.fetchval("SELECT to_regclass('messages')") is not None
    assert await migrate(conn) == []
    await verify(conn)


async def test_a_changed_applied_file_is_refused_and_nothing_is_applied(
    conn: asyncpg.Connection, tmp_path: Path,
) -> None:
    directory = copy_of_sql(tmp_path)
    await migrate(conn, directory)
    first = sorted(directory.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an edit after the fact\n")
    (directory / "9999_later.sql").write_text("CREATE TABLE later (id int);")

    with pytest.raises(MigrationError) as info:
        await migrate(conn, directory)
    message = str(info.value)
    assert first.name in message and "changed after it was applied" in message
    assert "\n" not in message
    assert await conn.fetchval("SELECT to_regclass('later')") is None
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = '9999'"
                               ) == 0
    with pytest.raises(MigrationError, match=re.escape(first.name)):
        await verify(conn, discover(directory))


async def test_a_database_migrated_before_checksums_gets_them_then_is_checked(
    conn: asyncpg.Connection, tmp_path: Path,
) -> None:
    directory = copy_of_sql(tmp_path)
    await migrate(conn, directory)
    # What an older Herald left: the table without the checksum column.
    await conn.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
    await verify(conn, discover(directory))  # nothing to compare yet: accepted

    assert await migrate(conn, directory) == []
    checksums = dict(await conn.fetch("SELECT version, checksum FROM schema_migrations"))
    assert checksums == {m.version: m.checksum for m in discover(directory)}

    last = sorted(directory.glob("*.sql"))[-1]
    last.write_text(last.read_text().replace(";", " ;", 1))
    with pytest.raises(MigrationError, match=re.escape(last.name)):
        await migrate(conn, directory)


async def test_a_failing_migration_is_rolled_back_and_named(
    conn: asyncpg.Connection, tmp_path: Path,
) -> None:
    directory = copy_of_sql(tmp_path)
    (directory / "9999_broken.sql").write_text(
        "CREATE TABLE half_done (id int); SELECT no_such_function();")
    with pytest.raises(MigrationError, match=r"9999_broken\.sql failed"):
        await migrate(conn, directory)
    assert await conn.fetchval("SELECT to_regclass('half_done')") is None
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
        discover(directory)) - 1


async def test_herald_run_refuses_a_database_whose_applied_file_changed(
    conn: asyncpg.Connection, schema_url: str,
) -> None:
    await migrate(conn)
    await conn.execute("UPDATE schema_migrations SET checksum = repeat('0', 64)"
                       " WHERE version = '0001'")
    settings = Settings.from_env(herald_env("unused", schema_url))
    service = Service(settings, serve_http=False)
    with pytest.raises(NotMigrated, match=r"0001_core\.sql changed after it was applied"):
        await service.start()
    await service.stop()


async def test_herald_run_refuses_a_database_that_lacks_a_migration(
    conn: asyncpg.Connection, schema_url: str,
) -> None:
    await migrate(conn)
    await conn.execute("DELETE FROM schema_migrations WHERE version = '0002'")
    service = Service(Settings.from_env(herald_env("unused", schema_url)), serve_http=False)
    with pytest.raises(NotMigrated, match=r"lacks migration.*0002.*herald migrate"):
        await service.start()
    await service.stop()


async def test_the_cli_says_so_in_one_line_and_exits_1(
    conn: asyncpg.Connection, schema_url: str,
) -> None:
    result = herald_cli("migrate", database_url=schema_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"applied {discover()[0].version}_core"
    await conn.execute("UPDATE schema_migrations SET checksum = repeat('0', 64)"
                       " WHERE version = '0003'")
    result = herald_cli("migrate", database_url=schema_url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("herald: migration 0003_provider_events.sql changed")
    result = herald_cli("run", database_url=schema_url)
    assert result.returncode == 1
    assert "0003_provider_events.sql changed" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_names_an_unreachable_database_in_one_line() -> None:
    result = herald_cli("migrate", database_url="postgresql://herald:herald@127.0.0.1:1/herald")
    assert result.returncode == 1
    assert result.stderr.startswith("herald: cannot reach the database")
    assert result.stderr.count("\n") == 1, result.stderr
