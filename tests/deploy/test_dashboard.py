"""deploy/grafana: the dashboard's structure, and every panel's queries
returning data from a real Prometheus scraping a running Herald under load.

The end-to-end test starts, as subprocesses: the provider sandbox, Herald
split by role (senders, events, gateway, each with its own /metrics on its
admin listener), and a private Prometheus (Debian package, via
deploy/local/prometheus.sh run) that scrapes the three admin listeners every
second and evaluates deploy/prometheus/herald-rules.yaml.
It then publishes a mix of messages (successes with latency, retries,
parked, scheduled, WhatsApp and SMS through the sandbox with status
callbacks) and drives the scenarios that some panels need: an expired Twilio
token pauses the sms channel, an unsigned webhook is a signature failure, and
parked messages are replayed through the admin API. Each panel query must
return at least one series; nothing is padded with `or vector(0)`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection

from consumer.sandbox.env import sandbox_env
from tests.conftest import AMQP_URL, REPO, free_port
from tests.deploy.metric_names import exported_metric_names
from tests.helpers import publish_all

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "herald.json"
RULES = REPO / "deploy" / "prometheus" / "herald-rules.yaml"
PROMETHEUS_SH = REPO / "deploy" / "local" / "prometheus.sh"
# Grafana's variables, as a dashboard opened on the last 10 minutes would have them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "10m"}
PANEL_DATA_TIMEOUT_S = 45.0
ADMIN_TOKEN = "dashboard-test-token"


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana's variables filled in) for every target."""
    found = []
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], target["refId"], expr))
    return found


# -- structure -----------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in query_panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert "vector(0)" not in target["expr"], "no padding with vector(0)"


def test_dashboard_covers_the_issue() -> None:
    titles = " | ".join(p["title"].lower() for p in query_panels())
    for wanted in ("throughput by channel and outcome", "errors by type", "retries by attempt",
                   "parked messages", "parked per second", "delay-level occupancy",
                   "provider latency quantiles", "webhook status funnel", "paused channels"):
        assert wanted in titles, f"no panel for {wanted!r}"


def test_dashboard_reads_only_known_series() -> None:
    exported = exported_metric_names()
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for title, ref, expr in panel_queries():
        for name in re.findall(r"\b(herald_[a-z0-9_]+|herald:[a-z0-9_:]+)", expr):
            known = name in recorded if ":" in name else name in exported
            assert known, f"panel {title!r} ({ref}) reads unknown series {name}"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    assert dashboard()["templating"]["list"][0]["current"]["value"] in uids
    providers = yaml.safe_load((provisioning / "dashboards" / "herald.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# -- every panel with data from a real scrape ----------------------------------------------


@dataclass
class Process:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}):\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    sandbox_url: str
    herald_urls: dict[str, str]  # public listeners: webhooks
    admin_urls: dict[str, str]  # admin listeners: admin API, /metrics
    prometheus_url: str
    processes: list[Process] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)


async def start(stack: Stack, name: str, args: list[str], env: dict[str, str],
                log_dir: Path) -> None:
    log = log_dir / f"{name}.log"
    with log.open("ab") as handle:
        proc = await asyncio.create_subprocess_exec(
            *args, env={**os.environ, **env}, stdout=handle, stderr=handle, cwd=str(REPO),
            start_new_session=True)
    stack.processes.append(Process(name, proc, log))


async def wait_http(stack: Stack, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            for p in stack.processes:
                if p.proc.returncode is not None:
                    raise AssertionError(f"{p.name} exited ({p.proc.returncode})\n{stack.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready after {timeout:g} s\n{stack.logs()}")
            await asyncio.sleep(0.2)


async def stop(process: Process) -> None:
    if process.proc.returncode is None:
        process.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.proc.wait(), 30)
        except TimeoutError:
            process.proc.kill()
            await process.proc.wait()


def prometheus_config(targets: dict[str, str]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "herald",
            "static_configs": [
                {"targets": [url.removeprefix("http://")], "labels": {"role": role}}
                for role, url in targets.items()
            ],
        }],
    }


@pytest.fixture
async def stack(prefix: str, db_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.fail("prometheus/promtool not found: run `deploy/local/prometheus.sh install` "
                    "(make services does) to install the Debian package prometheus")
    sandbox_port, prometheus_port = free_port(), free_port()
    ports = {role: free_port() for role in ("senders", "events", "gateway")}
    admin_ports = {role: free_port() for role in ports}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    admin_urls = {role: f"http://127.0.0.1:{port}" for role, port in admin_ports.items()}
    stack = Stack(f"http://127.0.0.1:{sandbox_port}", urls, admin_urls,
                  f"http://127.0.0.1:{prometheus_port}")
    try:
        await start(stack, "sandbox", [sys.executable, "-m", "consumer", "sandbox", "--port",
                                       str(sandbox_port)], {}, tmp_path)
        base_env = {
            **sandbox_env(sandbox_port, public_url=urls["gateway"]),
            "HERALD_AMQP_URL": AMQP_URL, "HERALD_DATABASE_URL": db_url, "HERALD_PREFIX": prefix,
            "HERALD_HTTP_HOST": "127.0.0.1", "HERALD_LOG_LEVEL": "warning",
            "HERALD_BASE_DELAY_S": "1", "HERALD_MAX_DELAY_S": "2", "HERALD_RETRY_JITTER": "0",
            "HERALD_MAX_ATTEMPTS": "3", "HERALD_SEND_TIMEOUT_S": "5",
            "HERALD_ADMIN_TOKEN": ADMIN_TOKEN,
            "HERALD_HTTP_ALLOW_NETWORKS": "127.0.0.0/8",  # the sandbox's http endpoints
        }
        for role, port in ports.items():
            await start(stack, f"herald-{role}",
                        [sys.executable, "-m", "consumer", "run", "--roles", role],
                        {**base_env, "HERALD_HTTP_PORT": str(port),
                         "HERALD_ADMIN_PORT": str(admin_ports[role])}, tmp_path)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(admin_urls)))
        await start(stack, "prometheus", [str(PROMETHEUS_SH), "run", str(config),
                                          str(prometheus_port), str(tmp_path / "tsdb")],
                    {}, tmp_path)
        await wait_http(stack, f"{stack.sandbox_url}/_sandbox/counts")
        for url in urls.values():
            await wait_http(stack, f"{url}/readyz")
        await wait_http(stack, f"{stack.prometheus_url}/-/ready")
        yield stack
    finally:
        for process in reversed(stack.processes):
            await stop(process)


def http_request(sandbox: str, query: str, **extra: Any) -> dict[str, Any]:
    return {"message_id": f"m-{uuid.uuid4().hex[:12]}", "channel": "http",
            "to": f"{sandbox}/http/dash?{query}" if query else f"{sandbox}/http/dash",
            "body": {"text": "hi"}, **extra}


def provider_request(channel: str, number: int) -> dict[str, Any]:
    return {"message_id": f"m-{uuid.uuid4().hex[:12]}", "channel": channel,
            "to": f"+1555010{number:04d}", "body": "Your code is 123456"}


async def drive_load(stack: Stack, amqp: AbstractRobustConnection, prefix: str,
                     db_url: str, db: asyncpg.Connection) -> None:
    sandbox = stack.sandbox_url
    gateway = stack.herald_urls["gateway"]
    gateway_admin = stack.admin_urls["gateway"]
    # Meta's status webhooks go to the gateway (Twilio's follow StatusCallback).
    callbacks = {"whatsapp_url": f"{gateway}/webhooks/whatsapp",
                 "messenger_url": f"{gateway}/webhooks/messenger"}
    async with aiohttp.ClientSession() as session, session.post(
            f"{sandbox}/_sandbox/callbacks", json=callbacks) as r:
        if r.status != 200:
            stack.notes.append(f"sandbox callbacks config answered {r.status}")
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    requests = (
        [http_request(sandbox, "latency_ms=20") for _ in range(150)]
        + [http_request(sandbox, "latency_ms=80") for _ in range(30)]
        + [http_request(sandbox, "fail=1&fail_status=503") for _ in range(15)]
        + [http_request(sandbox, "fail=2&fail_status=503") for _ in range(10)]
        + [http_request(sandbox, "status=400") for _ in range(8)]
        + [http_request(sandbox, "status=503") for _ in range(4)]
        + [http_request(sandbox, "", send_at=later) for _ in range(5)]
        + [provider_request("whatsapp", i) for i in range(20)]
        + [provider_request("sms", i) for i in range(10)]
    )
    await publish_all(amqp, prefix, requests)

    finished_http = len(requests) - 5 - 30  # all http but the scheduled ones

    async def http_done() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM messages WHERE channel = 'http' AND status IN "
            "('sent', 'failed', 'delivered', 'read')")
        return int(count) >= finished_http

    await wait(http_done, timeout=60, what="http messages sent or parked", stack=stack)

    # Twilio refuses the token for a few seconds (20003, provider-wide): the sms
    # channel pauses, and its probe resumes it once the mode is over.
    mode = {"provider": "twilio", "mode": "token_expired", "seconds": 8}
    async with aiohttp.ClientSession() as session, session.post(
            f"{sandbox}/_sandbox/provider", json=mode) as r:
        if r.status != 200:
            stack.notes.append(f"sandbox provider mode answered {r.status}")
    await publish_all(amqp, prefix, [provider_request("sms", 100 + i) for i in range(3)])

    # An unsigned status webhook: refused and counted as a signature failure.
    unsigned = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered"}
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway}/webhooks/twilio", data=unsigned) as r:
        if r.status != 403:
            stack.notes.append(f"unsigned POST /webhooks/twilio answered {r.status}, not 403")

    # An operator replays the parked invalid requests through the gateway's admin
    # API (parked again: the endpoint still answers 400; the replay is what the
    # panel counts). `herald parked replay` would count in its own, unscraped process.
    replay = {"channel": "http", "error_types": ["invalid_request"]}
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway_admin}/admin/parked/replay", json=replay,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        if r.status != 200:
            stack.notes.append(f"POST /admin/parked/replay answered {r.status}: "
                               f"{(await r.text())[:300]}")


async def wait(condition: Any, *, timeout: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        for p in stack.processes:
            if p.proc.returncode is not None:
                raise AssertionError(f"{p.name} exited ({p.proc.returncode})\n{stack.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{stack.logs()}")
        await asyncio.sleep(0.5)


async def panels_without_data(prometheus_url: str) -> list[str]:
    missing = []
    async with aiohttp.ClientSession() as session:
        for title, ref, expr in panel_queries():
            async with session.get(f"{prometheus_url}/api/v1/query",
                                   params={"query": expr}) as response:
                body = await response.json()
            if body.get("status") != "success":
                missing.append(f"{title} ({ref}): query error {body.get('error')}: {expr}")
            elif not body["data"]["result"]:
                missing.append(f"{title} ({ref}): no data: {expr}")
    return missing


@pytest.mark.slow
async def test_every_panel_has_data_from_a_real_scrape(
    stack: Stack, amqp: AbstractRobustConnection, prefix: str, db_url: str,
) -> None:
    db = await asyncpg.connect(db_url)
    try:
        await drive_load(stack, amqp, prefix, db_url, db)
    finally:
        await db.close()

    deadline = time.monotonic() + PANEL_DATA_TIMEOUT_S
    missing = await panels_without_data(stack.prometheus_url)
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(2)
        missing = await panels_without_data(stack.prometheus_url)
    assert not missing, (
        f"{len(missing)} of {len(panel_queries())} panel queries returned no data after "
        f"{PANEL_DATA_TIMEOUT_S:g} s:\n  " + "\n  ".join(missing)
        + ("\nscenario notes:\n  " + "\n  ".join(stack.notes) if stack.notes else "")
    )
