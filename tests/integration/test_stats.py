"""Statistics and campaigns: herald stats against the sandbox's own record,
campaign defaults inherited by messages, herald publish --csv."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from consumer.records.stats import statistics
from consumer.settings import Settings
from consumer.store import create_pool
from consumer.topology import Names
from tests.conftest import RunningSandbox, ServiceFactory, herald_env
from tests.helpers import publish_all, queue_depth, request, wait_for
from tests.integration.operator_tools import herald_cli


def _from_sandbox(sandbox: RunningSandbox, ids: set[str]) -> dict[str, Any]:
    """The figures herald stats reports, computed from what the provider saw."""
    calls: dict[str, list[int]] = defaultdict(list)
    for r in sandbox.sandbox.received:
        if r.message_id in ids:
            calls[r.message_id].append(r.status)
    ok = {mid for mid, statuses in calls.items() if statuses[-1] < 300}
    failed_attempts: dict[str, int] = defaultdict(int)
    for statuses in calls.values():
        for status in statuses:
            if status >= 500:
                failed_attempts["provider_error"] += 1
            elif status >= 400:
                failed_attempts["invalid_request"] += 1
    made: dict[int, int] = defaultdict(int)
    sent: dict[int, int] = defaultdict(int)
    for statuses in calls.values():
        for number, status in enumerate(statuses, 1):
            made[number] += 1
            sent[number] += status < 300
    attempted = len(calls)
    total = sum(len(s) for s in calls.values())
    return {
        "attempted": attempted,
        "succeeded": len(ok),
        "sent_first_attempt": sum(1 for s in calls.values() if s[0] < 300),
        "needed_retries": sum(1 for s in calls.values() if len(s) > 1),
        "recovered_by_retries": sum(1 for mid in ok if len(calls[mid]) > 1),
        "attempts_made": total,
        "average_attempts": round(total / attempted, 4),
        "success_rate": round(len(ok) / attempted, 4),
        "failed_attempts": dict(failed_attempts),
        "by_attempt": {n: (made[n], sent[n]) for n in made},
    }


async def test_campaign_stats_match_what_the_provider_saw(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, settings: Settings,
) -> None:
    env = herald_env(prefix, db_url)
    code, out, err = await herald_cli(env, "campaign", "create", "spring", "--max-attempts",
                                      "3", "--base-delay", "1", "--max-delay", "2")
    assert (code, out.strip()) == (0, "created campaign spring"), err
    code, out, _ = await herald_cli(env, "campaign", "create", "spring", "--name", "Spring")
    assert out.strip() == "updated campaign spring"

    def spring(mid: str, to: str, **extra: Any) -> dict[str, Any]:
        return request(mid, to, campaign_id="spring", **extra)

    # Transient failures of 10 of 33 first attempts: far from an outage of the host.
    reqs = [spring(f"ok-{i}", sandbox.url("ok")) for i in range(20)]
    reqs += [spring(f"flaky-{i}", sandbox.url("flaky", fail=1, fail_status=500))
             for i in range(5)]
    reqs += [spring(f"down-{i}", sandbox.url("down", status=503)) for i in range(3)]
    reqs += [spring(f"bad-{i}", sandbox.url("bad", status=400)) for i in range(4)]
    # Their own retry fields win over the campaign's.
    reqs += [spring(f"own-{i}", sandbox.url("down", status=503), retry={"max_attempts": 1})
             for i in range(2)]
    others = [request(f"other-{i}", sandbox.url("ok")) for i in range(3)]
    await start_service()
    await publish_all(amqp, prefix, reqs + others)

    async def settled() -> bool:
        rows = dict(await db.fetch("SELECT status, count(*) FROM messages GROUP BY status"))
        return rows == {"sent": 28, "failed": 9}

    await wait_for(settled, timeout=60, interval=0.3, what="25+3 sent and 9 failed")
    ids = {r["message_id"] for r in reqs}
    expected = _from_sandbox(sandbox, ids)
    attempts = dict(await db.fetch("SELECT message_id, attempts FROM messages"))
    assert {attempts[f"down-{i}"] for i in range(3)} == {3}  # the campaign's max_attempts
    assert {attempts[f"own-{i}"] for i in range(2)} == {1}  # the message's own

    code, out, err = await herald_cli(env, "stats", "--campaign", "spring", "--json")
    assert code == 0, err
    stats = json.loads(out)
    for key in ("attempted", "succeeded", "sent_first_attempt", "needed_retries",
                "recovered_by_retries", "attempts_made", "average_attempts", "success_rate"):
        assert stats[key] == expected[key], (key, stats[key], expected[key])
    assert stats["totals"]["all"] == 34
    assert (stats["totals"]["sent"], stats["totals"]["failed"]) == (25, 9)
    assert stats["retry_rate"] == round(expected["needed_retries"] / 34, 4)
    assert stats["first_attempt_success_rate"] == round(20 / 34, 4)
    assert {k: v["failed_attempts"] for k, v in stats["failures_by_error_type"].items()} == (
        expected["failed_attempts"])
    assert {k: v["messages_failed"] for k, v in stats["failures_by_error_type"].items()} == {
        "provider_error": 5, "invalid_request": 4}
    assert {a["attempt"]: (a["attempts"], a["sent"]) for a in stats["by_attempt"]} == (
        expected["by_attempt"])
    config = stats["retry_config"]
    assert (config["max_attempts"], config["base_delay_s"], config["max_delay_s"]) == (3, 1, 2)
    assert set(config["from_campaign"]) == {"max_attempts", "base_delay_s", "max_delay_s"}
    assert len(stats["recent_errors"]) == 10
    assert all(e["message_id"] in ids and e["recipient"] == "http://127.0.0.1/…"
               for e in stats["recent_errors"])
    assert stats["parked_by_error_type"] == {"provider_error": 5, "invalid_request": 4}

    code, out, _ = await herald_cli(env, "stats", "--campaign", "spring")
    assert "sent on first attempt 20" in out and "from the campaign" in out
    assert "127.0.0.1:" not in out  # recipients masked
    code, out, _ = await herald_cli(env, "campaign", "show", "spring")
    assert code == 0 and "campaign spring (Spring)" in out

    pool = await create_pool(settings)
    try:
        everything = await statistics(pool, settings)
    finally:
        await pool.close()
    assert everything["totals"]["all"] == 37 and everything["succeeded"] == 28
    assert everything["retry_config"]["from_campaign"] == []
    code, _, err = await herald_cli(env, "stats", "--campaign", "nope")
    assert code == 1 and "no campaign 'nope'" in err


async def test_publish_csv_fans_a_campaign_out_once_per_recipient(
    amqp: AbstractRobustConnection, prefix: str, db_url: str, db: asyncpg.Connection,
    sandbox: RunningSandbox, start_service: ServiceFactory, tmp_path: Path,
) -> None:
    people = [("Ada", "a"), ("Grace", "g"), ("Edsger", "e"), ("Barbara", "b")]
    path = tmp_path / "recipients.csv"
    rows = ["name,to"] + [f"{name},{sandbox.url(slug)}" for name, slug in people]
    rows.append(f"Ada again,{sandbox.url('a')}")  # the same recipient twice
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    env = herald_env(prefix, db_url)
    args = ("publish", "--channel", "http", "--campaign", "autumn", "--csv", str(path),
            "--body-template", "Hi {name}")
    await start_service()
    code, out, err = await herald_cli(env, *args)
    assert code == 0, err
    assert "accepted 4 message(s)" in out
    assert "1 row(s) repeat a recipient" in err

    async def sent(n: int) -> bool:
        return await db.fetchval(
            "SELECT count(*) FROM messages WHERE status = 'sent'"
            " AND campaign_id = 'autumn'") == n

    await wait_for(lambda: sent(4), timeout=15, what="4 campaign messages sent")
    bodies = sorted(r.body for r in sandbox.sandbox.received)
    assert bodies == sorted(f"Hi {name}" for name, _ in people)

    # Publishing the same file again sends nobody a second message.
    code, out, err = await herald_cli(env, *args)
    assert code == 0 and "accepted 4" in out, err
    names = Names(prefix)

    async def drained() -> bool:
        depths = [await queue_depth(amqp, q) for q in (names.send_queue("http"),)]
        return sum(depths) == 0 and await db.fetchval(
            "SELECT count(*) FROM messages WHERE status <> 'sent'") == 0

    await wait_for(drained, timeout=15, what="the second run consumed")
    await publish_all(amqp, prefix, [request("marker", sandbox.url("ok"))])
    await wait_for(lambda: sandbox.sandbox.accepted_counts()["marker"] == 1, timeout=15,
                   what="a marker published after the second run")
    counts = sandbox.sandbox.accepted_counts()
    assert sorted(counts.values()) == [1] * 5

    code, _, err = await herald_cli(env, "publish", "--channel", "http", "--campaign", "x",
                                    "--csv", str(path), "--body-template", "Hi {nickname}")
    assert code == 2 and "{nickname} is not a column" in err
