"""The admin API's OpenAPI document (/admin/openapi.json): behind the token, exactly the
routes the API registers, and the running API checked against it by schemathesis."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.admin.openapi import document
from consumer.service import Service
from consumer.settings import Settings
from tests.helpers import request
from tests.integration.operator_tools import park_directly

TOKEN = "openapi-5b0e2c7d91f84a36"
TOKENS = f"ops:{TOKEN}"


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[tuple[Service, str]]:
    """A real Herald serving the admin API (gateway role only: a replay the fuzzer
    asks for is published, and nothing consumes it)."""
    service = Service(settings.replace(admin_token=TOKENS, http_port=0, admin_port=0),
                      serve_http=True, roles=("gateway",))
    await service.start()
    assert service.admin_listener is not None
    port = service.admin_listener.port
    yield service, f"http://127.0.0.1:{port}"
    await service.stop()


def _admin_app(service: Service) -> web.Application:
    assert service.admin_listener is not None
    for resource in service.admin_listener.app.router.resources():
        info = resource.get_info()
        if info.get("prefix") == "/admin":
            app: web.Application = info["app"]
            return app
    raise AssertionError("no application mounted at /admin")


async def test_the_document_needs_the_token_like_every_admin_route(
    gateway: tuple[Service, str],
) -> None:
    _, base = gateway
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/admin/openapi.json") as answer:
            assert answer.status == 401
        async with session.get(f"{base}/admin/openapi.json",
                               headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
            assert answer.status == 200
            assert answer.content_type == "application/json"
            served = await answer.json()
    assert served == document()
    assert served["openapi"].startswith("3.")
    assert served["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_the_document_has_exactly_the_registered_routes(
    gateway: tuple[Service, str],
) -> None:
    service, _ = gateway
    # Once mounted, the sub-application's resources carry the /admin prefix.
    registered = {(route.method.lower(), route.resource.canonical)
                  for route in _admin_app(service).router.routes()
                  if route.method != "HEAD" and route.resource is not None}
    documented = {(method, path) for path, item in document()["paths"].items()
                  for method in item}
    assert documented == registered
    ids = [op["operationId"] for item in document()["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    gateway: tuple[Service, str], amqp: AbstractRobustConnection, prefix: str,
    db: asyncpg.Connection, tmp_path: Path,
) -> None:
    _, base = gateway
    # Something to list, show and follow links to.
    await park_directly(amqp, db, prefix, [
        (request(f"o-{i}", "http://127.0.0.1:9/x"), kind)
        for i, kind in enumerate(("permission", "invalid_request", "permission"))])
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert binary, "schemathesis is not installed (pip install -e '.[dev]')"
    report = tmp_path / "report.json"
    process = await asyncio.create_subprocess_exec(
        binary, "run", f"{base}/admin/openapi.json",
        "--header", f"Authorization: Bearer {TOKEN}",
        # Never a 5xx; every status and content type documented; bodies as documented;
        # and the token really required (the same call without it gets 401).
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance,ignored_auth",
        "--mode", "all", "--phases", "coverage,fuzzing,stateful",
        "--max-examples", "25", "--workers", "1", "--seed", "14",
        "--generation-database", "none", "--request-timeout", "20", "--no-color",
        "--report", "json", "--report-json-path", str(report),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 600)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    # Every operation (but the document itself, which schemathesis loads) was exercised.
    tested = [line for line in text.splitlines() if "Tested:" in line]
    operations = sum(len(item) for item in document()["paths"].values())
    assert tested and tested[0].split()[-1] == str(operations - 1), text[-3000:]
    assert json.loads(report.read_text()), "schemathesis wrote no report"



# -- what schemathesis found (each was a 500) ------------------------------------------------


@pytest.mark.parametrize(("method", "path", "params", "body"), [
    # An id "prefix" longer than an id.
    ("GET", "/parked/" + "0" * 40, {}, None),
    ("POST", "/parked/replay", {}, {"ids": ["0" * 40], "dry_run": True}),
    ("POST", "/parked/reject", {}, {"ids": ["0" * 40], "reason": "x"}),
    # NUL characters, which PostgreSQL cannot store in text.
    ("GET", "/parked", {"campaign": "a\x00b"}, None),
    ("GET", "/parked", {"recipient": "\x00"}, None),
    ("GET", "/stats", {"campaign": "\x00"}, None),
    ("GET", "/campaigns/a%00b", {}, None),
    ("POST", "/parked/replay", {}, {"campaign": "a\x00b", "dry_run": True}),
    ("POST", "/parked/reject", {}, {"ids": ["0" * 32], "reason": "a\x00b"}),
    ("POST", "/parked/replay", {}, {"ids": [], "a\x00": 1}),
])
async def test_bad_input_that_was_a_server_error_is_a_400(
    gateway: tuple[Service, str], db: asyncpg.Connection,
    method: str, path: str, params: dict[str, str], body: object,
) -> None:
    _, base = gateway
    async with aiohttp.ClientSession() as session, session.request(
            method, f"{base}/admin{path}", params=params, json=body,
            headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
        assert answer.status == 400, await answer.text()
        assert "error" in await answer.json()
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_a_deeply_nested_body_is_a_400(gateway: tuple[Service, str]) -> None:
    _, base = gateway
    deep = "[" * 100_000 + "]" * 100_000
    async with aiohttp.ClientSession() as session, session.post(
            f"{base}/admin/parked/replay", data=deep,
            headers={"Authorization": f"Bearer {TOKEN}",
                     "Content-Type": "application/json"}) as answer:
        assert answer.status == 400
        assert "nested" in (await answer.json())["error"]
