"""Herald as a user installs it: the wheel (built from the sdist, as a release
would be) in a fresh virtual environment outside the repository, then
``herald migrate`` against an empty database and ``herald run`` against the
real broker.

Nothing here imports Herald from the checkout: every command runs in the new
environment, from a directory outside the repository, with no ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import AMQP_URL, DATABASE_URL, REPO, free_port
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SQL = REPO / "sql"


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class Install:
    venv: Path
    home: Path  # a working directory outside the repository

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self, **herald: str) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith("HERALD_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        # The checkout's venv must not be found before the new one.
        environ["PATH"] = os.pathsep.join(
            [str(self.venv / "bin")] + [p for p in environ.get("PATH", "").split(os.pathsep)
                                        if not p.startswith(str(REPO))])
        environ.update(herald)
        return environ

    def run(self, *args: str, **herald: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.bin("herald"), *args], cwd=self.home,
                              env=self.env(**herald), capture_output=True, text=True,
                              timeout=120, check=False)


def _outside_repo(path: Path) -> Path:
    assert not path.resolve().is_relative_to(REPO), f"{path} is inside the repository"
    return path


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel built from it (``python -m build``), once per session."""
    out = _outside_repo(tmp_path_factory.mktemp("dist"))
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = out.glob("herald-*.whl")
    (sdist,) = out.glob("herald-*.tar.gz")
    return Dist(wheel, sdist)


@pytest.fixture(scope="session")
def install(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Install:
    """A fresh venv with the wheel (and its dependencies from PyPI) installed."""
    root = _outside_repo(tmp_path_factory.mktemp("installed"))
    venv = root / "venv"
    home = root / "home"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = Install(venv, home)
    subprocess.run([done.bin("pip"), "install", "--quiet", str(dist.wheel)], cwd=home,
                   env=done.env(), check=True, capture_output=True, timeout=600)
    return done


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A new, empty database on the test PostgreSQL; dropped afterwards."""
    name = f"herald_wheel_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    base, _, _ = DATABASE_URL.partition("?")
    yield base.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


def test_the_wheel_and_the_sdist_carry_the_migrations(dist: Dist) -> None:
    expected = {p.name: p.read_bytes() for p in SQL.glob("*.sql")}
    assert expected
    with zipfile.ZipFile(dist.wheel) as wheel:
        packaged = {Path(n).name: wheel.read(n) for n in wheel.namelist()
                    if n.startswith("consumer/sql/")}
        names = set(wheel.namelist())
    assert packaged == expected
    assert "schemas/json/send_request.schema.json" in names
    assert not any(n.startswith(("sql/", "tests/", "deploy/")) for n in names)
    with tarfile.open(dist.sdist) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        in_sdist = {Path(n).name for n in sdist.getnames() if n.startswith(f"{top}/sql/")}
    assert in_sdist == set(expected)


def test_herald_is_imported_from_the_new_environment(install: Install) -> None:
    result = subprocess.run(
        [install.bin("python"), "-c", "import consumer.migrate as m; print(m.__file__);"
         " print(m.source())"],
        cwd=install.home, env=install.env(), capture_output=True, text=True, check=True)
    module, migrations = result.stdout.splitlines()
    assert Path(module).is_relative_to(install.venv)
    assert Path(migrations).is_relative_to(install.venv)
    assert Path(migrations).name == "sql"


async def test_herald_migrate_from_the_wheel_creates_the_tables(
    install: Install, empty_database: str,
) -> None:
    result = install.run("migrate", HERALD_DATABASE_URL=empty_database)
    assert result.returncode == 0, result.stderr
    versions = sorted(p.name.removesuffix(".sql") for p in SQL.glob("*.sql"))
    assert result.stdout.splitlines() == [f"applied {v}" for v in versions]

    conn = await asyncpg.connect(empty_database)
    try:
        for table in ("messages", "delivery_attempts", "parked_messages", "provider_events",
                      "campaigns", "audit_log"):
            assert await conn.fetchval("SELECT to_regclass($1)", table) is not None, table
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        assert len(rows) == len(versions) and all(len(r["checksum"]) == 64 for r in rows)
    finally:
        await conn.close()

    again = install.run("migrate", HERALD_DATABASE_URL=empty_database)
    assert again.returncode == 0 and again.stdout == "database is up to date\n"


async def test_herald_run_from_the_wheel_becomes_ready(
    install: Install, empty_database: str, prefix: str, tmp_path: Path,
) -> None:
    assert install.run("migrate", HERALD_DATABASE_URL=empty_database).returncode == 0
    port = free_port()
    log = tmp_path / "herald.log"
    env = install.env(
        HERALD_AMQP_URL=AMQP_URL, HERALD_DATABASE_URL=empty_database, HERALD_PREFIX=prefix,
        HERALD_HTTP_HOST="127.0.0.1", HERALD_HTTP_PORT=str(port),
        HERALD_PREFECH="16")  # a typo: warned about, and the service still starts
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            install.bin("herald"), "run", cwd=install.home, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as session:
            async def ready() -> bool:
                assert process.returncode is None, f"herald run exited: {log.read_text()}"
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz",
                                           timeout=aiohttp.ClientTimeout(total=2)) as answer:
                        return answer.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await wait_for(ready, timeout=60, interval=0.2,
                           what="/readyz of the installed herald")
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 60)
    output = log.read_text()
    assert code == 0, output
    warnings = [line for line in output.splitlines() if "settings.unknown_variable" in line]
    assert len(warnings) == 1 and "HERALD_PREFECH" in warnings[0], output
    assert "did you mean HERALD_PREFETCH?" in warnings[0]


@pytest.fixture
def without_migrations(install: Install) -> Iterator[Install]:
    """The same install with its packaged migrations moved away (put back afterwards)."""
    (packaged,) = install.venv.glob("lib/python*/site-packages/consumer/sql")
    hidden = packaged.with_name("sql.hidden")
    packaged.rename(hidden)
    try:
        yield install
    finally:
        hidden.rename(packaged)


def test_an_install_without_its_migrations_refuses_in_one_line(
    without_migrations: Install, empty_database: str,
) -> None:
    result = without_migrations.run("migrate", HERALD_DATABASE_URL=empty_database)
    assert result.returncode == 1
    assert result.stderr.startswith("herald: no migrations found")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
