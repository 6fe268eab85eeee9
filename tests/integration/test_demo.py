"""The newcomer demo (`herald demo`, run by `make run`) end to end: the whole
stack in one process — consumers, webhooks receiver, events consumer — with the
sandbox sending signed status callbacks back to Herald's HTTP server."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp import web

from consumer.cli.demo import CAMPAIGN, run_demo
from consumer.sandbox import Sandbox
from consumer.sandbox.callbacks import CallbackConfig
from consumer.sandbox.env import sandbox_env
from consumer.service import Service
from consumer.settings import Settings
from tests.conftest import free_port, herald_env


@pytest.mark.slow
async def test_demo_campaign_ends_as_scripted(
    prefix: str, db_url: str, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str],
) -> None:
    http_port, sandbox_port = free_port(), free_port()
    public_url = f"http://127.0.0.1:{http_port}"
    box = Sandbox(callbacks=CallbackConfig.for_herald(public_url))
    runner = web.AppRunner(box.app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", sandbox_port).start()
    env = herald_env(prefix, db_url) | sandbox_env(sandbox_port) | {
        "HERALD_HTTP_PORT": str(http_port), "HERALD_PUBLIC_URL": public_url}
    settings = Settings.from_env(env)
    service = Service(settings)
    await service.start()
    try:
        assert await run_demo(settings, sandbox_url=f"http://127.0.0.1:{sandbox_port}",
                              timeout_s=120) == 0
    finally:
        await service.stop()
        await runner.cleanup()

    shown = capsys.readouterr().out
    assert "herald parked list --campaign demo" in shown
    statuses = dict(await db.fetch("SELECT status, count(*) FROM messages "
                                   "WHERE campaign_id = $1 GROUP BY status", CAMPAIGN))
    assert sum(statuses.values()) == 220
    assert not statuses.get("retrying") and not statuses.get("sending")
    # The scripted permanent failures, and nothing else, are parked.
    parked = dict(await db.fetch("SELECT error_type, count(*) FROM parked_messages "
                                 "WHERE campaign_id = $1 AND state = 'parked' GROUP BY 1",
                                 CAMPAIGN))
    assert parked == {"invalid_recipient": 8, "invalid_request": 2, "provider_error": 3}
    # Status callbacks came back through the webhooks: most messages got further than sent.
    assert statuses.get("read", 0) + statuses.get("delivered", 0) > 100
