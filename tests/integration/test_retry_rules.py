"""Retry rules per error code, end to end through the sandbox: a Twilio 30003 reported
after acceptance follows its rule (two retries, the rule's delay apart, then parked),
and a storm of 429s spends its own budget, not the one of the other failures."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from consumer.records import retry_rules
from consumer.records.stats import statistics
from consumer.settings import Settings
from tests.conftest import REPO, RunningSandbox, SandboxServices
from tests.helpers import publish_all, request, wait_for
from tests.integration.test_webhooks import HeraldFactory, start_herald

__all__ = ["start_herald"]  # the fixture, used here too

RULE_30003 = "operator rule #1 sms code 30003: 3 attempts, delay 3-3 s"


async def herald_cli(db_url: str, *args: str, **env: str) -> tuple[int, str, str]:
    """Run ``herald`` as a user does (without blocking the services in this loop)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    environment |= {"HERALD_DATABASE_URL": db_url, **env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *args, env=environment, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_30003_reported_after_acceptance_is_retried_twice_by_its_rule_then_parked(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, start_herald: HeraldFactory,
) -> None:
    # The shipped rule waits an hour; the operator's rule for the same code wins (3 s).
    code, out, err = await herald_cli(
        db_url, "retry-rules", "set", "--channel", "sms", "--code", "30003",
        "--max-attempts", "3", "--base-delay", "3", "--max-delay", "3",
        "--note", "short for the test")
    assert code == 0, err
    assert "created retry rule #1: sms code 30003: 3 attempts, delay 3s to 3s" in out
    await start_herald(sandbox_port=int(sandbox.base_url.rsplit(":", 1)[1]),
                       HERALD_RETRY_RULES="builtin")
    box = sandbox.sandbox.providers
    box.configure_callbacks(statuses=("sent",))
    unreachable = "+15550030003"
    box.script("twilio", unreachable, callback_error=30003)  # accepted, then undelivered
    # No retry fields of its own: HERALD_MAX_ATTEMPTS (5) would allow five attempts.
    await publish_all(amqp, prefix, [{"message_id": "off", "channel": "sms",
                                      "to": unreachable, "body": "hi"}])

    async def failed() -> bool:
        return await db.fetchval("SELECT status FROM messages WHERE message_id = 'off'"
                                 ) == "failed"

    await wait_for(failed, timeout=60, what="the message parked after its third attempt")
    sends = [r for r in box.accepted("twilio") if r.recipient == unreachable]
    assert len(sends) == 3
    gaps = [b.at - a.at for a, b in itertools.pairwise(sends)]
    assert all(gap >= 3.0 for gap in gaps), gaps  # the rule's delay, not the settings' 1 s
    history = [tuple(r) for r in await db.fetch(
        """SELECT attempt, outcome, error_code, retry_rule FROM delivery_attempts
            WHERE message_id = 'off' ORDER BY id""")]
    assert history == [(1, "sent", None, None), (1, "retrying", "30003", RULE_30003),
                       (2, "sent", None, None), (2, "retrying", "30003", RULE_30003),
                       (3, "sent", None, None), (3, "failed", "30003", RULE_30003)]
    parked = await db.fetchrow("SELECT attempts, error_code FROM parked_messages"
                               " WHERE message_id = 'off'")
    assert parked is not None and tuple(parked) == (3, "30003")

    figures = await statistics_of(db_url)
    assert figures["rules_applied"] == [
        {"rule": RULE_30003, "retried": 2, "parked": 1,
         "last_at": figures["rules_applied"][0]["last_at"]}]
    code, out, err = await herald_cli(db_url, "stats")
    assert code == 0, err
    assert f"retried 2      parked 1      {RULE_30003}" in out
    code, out, _ = await herald_cli(db_url, "status", "off")
    assert f"attempt 2 retrying: provider_error 30003 [{RULE_30003}]" in out
    code, out, _ = await herald_cli(db_url, "retry-rules", "list",
                                    HERALD_RETRY_RULES="builtin")
    assert "#1     sms code 30003: 3 attempts, delay 3s to 3s  (short for the test)" in out
    assert "replaced  sms code 30003: 3 attempts, delay 3600s to 3600s" in out


async def statistics_of(db_url: str) -> dict[str, object]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        return await statistics(pool, Settings())
    finally:
        await pool.close()


async def test_a_storm_of_429s_spends_its_own_budget(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection, db_url: str,
    sandbox: RunningSandbox, sandbox_services: SandboxServices,
) -> None:
    """Four 429s, then two 503s, then success: the 429s spend the rate-limit rule's
    budget (10), the 503s the catch-all's (3 attempts), so the message is delivered on
    its seventh attempt; with three 503s the catch-all is spent and it is parked."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await retry_rules.save(pool, retry_rules.RuleSpec(
            10, error_type="rate_limit", base_delay_s=1, max_delay_s=1), "test")
    finally:
        await pool.close()
    await sandbox_services(HERALD_MAX_ATTEMPTS="3", HERALD_RETRY_RULES="off")
    storm = [request(f"storm-{i}", sandbox.url(f"storm{i}", fail=4, fail_status=429,
                                               retry_after=1, then_fail=2, then_status=503))
             for i in range(20)]
    spent = [request(f"spent-{i}", sandbox.url(f"spent{i}", fail=2, fail_status=429,
                                               retry_after=1, then_fail=3, then_status=503))
             for i in range(5)]
    await publish_all(amqp, prefix, storm + spent)

    async def settled() -> bool:
        rows = await db.fetch("SELECT status FROM messages")
        return len(rows) == 25 and all(r["status"] in ("sent", "failed") for r in rows)

    await wait_for(settled, timeout=90, interval=0.5, what="every message sent or parked")
    rows = {r["message_id"]: (r["status"], r["attempts"]) for r in await db.fetch(
        "SELECT message_id, status, attempts FROM messages")}
    assert {rows[f"storm-{i}"] for i in range(20)} == {("sent", 7)}
    assert {rows[f"spent-{i}"] for i in range(5)} == {("failed", 5)}
    rule = "operator rule #1 rate_limit: 10 attempts, delay 1-1 s"
    catch_all = "settings retry fields: 3 attempts, delay 1-8 s"
    history = [tuple(r) for r in await db.fetch(
        """SELECT outcome, error_code, retry_rule FROM delivery_attempts
            WHERE message_id = 'spent-0' ORDER BY id""")]
    assert history == [("retrying", "429", rule), ("retrying", "429", rule),
                       ("retrying", "503", catch_all), ("retrying", "503", catch_all),
                       ("failed", "503", catch_all)]
    received = [r for r in sandbox.sandbox.received if r.message_id == "storm-0"]
    assert [r.status for r in received] == [429] * 4 + [503] * 2 + [200]
    figures = json.loads(json.dumps(await statistics_of(db_url), default=str))
    by_rule = {r["rule"]: (r["retried"], r["parked"]) for r in figures["rules_applied"]}
    assert by_rule == {rule: (20 * 4 + 5 * 2, 0), catch_all: (20 * 2 + 5 * 2, 5)}
