"""The console in a real headless Chromium against a real Herald: sign in,
filter, replay at a rate with a live progress bar, edit then replay, reject,
what a viewer may not do, and forms without their CSRF token.

Each test saves screenshots of the pages it visits under
test-artifacts/console/<test name>/ (git-ignored) for a reviewer to look at.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.topology import Names
from tests.conftest import RunningSandbox
from tests.console.conftest import OPS_TOKEN, VIEW_TOKEN, Browser, RunningHerald
from tests.helpers import queue_depth, request, wait_for
from tests.integration.operator_tools import park_directly

pytestmark = pytest.mark.slow


async def park(amqp: AbstractRobustConnection, db: asyncpg.Connection, prefix: str,
               to: str, spec: list[tuple[str, str, int]], *, tag: str = "m",
               body: object = None) -> list[uuid.UUID]:
    """Park (error_type, error_code, how many) messages as the pipeline would."""
    ids: list[uuid.UUID] = []
    n = 0
    for error_type, code, count in spec:
        reqs = []
        for _ in range(count):
            n += 1
            reqs.append((request(f"{tag}-{n:03d}", to, body), error_type))
        made = await park_directly(amqp, db, prefix, reqs)
        await db.execute("UPDATE parked_messages SET error_code = $2 WHERE parked_id = ANY($1)",
                         made, code)
        ids += made
    return ids


async def _parked(db: asyncpg.Connection) -> Counter[str]:
    return Counter({r["error_type"]: r["n"] for r in await db.fetch(
        "SELECT error_type, count(*) AS n FROM parked_messages WHERE state = 'parked'"
        " GROUP BY error_type")})


async def test_sign_in_filter_and_replay_one_error_type_at_a_rate(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, sandbox: RunningSandbox, browser: Browser,
) -> None:
    await park(amqp, db, prefix, sandbox.url("ok"),
               [("network", "503", 12), ("network", "502", 4), ("permission", "403", 6)])
    # One of them was delivered meanwhile (a late webhook): it is not sent again.
    await db.execute("UPDATE messages SET status = 'delivered' WHERE message_id = 'm-001'")

    await browser.get(f"{herald.console}/parked")
    await browser.wait_url(r"/console/login\?next=")
    await browser.shot("sign-in")
    await browser.fill("#token", OPS_TOKEN)
    await browser.click("#sign-in")
    await browser.wait_url(r"/console/parked$")
    assert "ops · operator" in await browser.text("#who")
    cookie = {c["name"]: c for c in await browser.cookies()}["herald_console"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console/" and "expiry" in cookie
    await browser.shot("parking-lot")
    assert await browser.text("#match-count") == "22"
    assert "network 16" in await browser.text("#badges")
    assert "503 12" in await browser.text("#badges")

    # Filter by one error type by clicking its badge, then by one code.
    await browser.click('a[data-error-type="network"]')
    await browser.wait_url(r"error_type=network")
    assert await browser.text("#match-count") == "16"
    assert len(await browser.all("#lot tbody tr[data-parked-id]")) == 16
    await browser.shot("filtered-network")
    await browser.click('a[data-error-code="502"]')
    await browser.wait_text("#match-count", r"^4$")
    await browser.shot("filtered-network-502")
    await browser.click('a[data-error-type="network"]')
    await browser.wait_text("#match-count", r"^16$")

    # Everything matching: the dry run says what would happen.
    await browser.click("#preview-matching")
    await browser.wait_text("#p-selected", r"^16$")
    assert await browser.text("#p-replayed") == "15"
    assert await browser.text("#p-delivered") == "1"
    await browser.shot("replay-preview")
    assert await db.fetchval("SELECT count(*) FROM lot_jobs") == 0  # a preview changes nothing

    # Replay at 5 messages a second, in the background; watch the bar fill.
    await browser.fill("#rate", "5")
    await browser.click("#start-replay")
    await browser.wait_url(r"/console/jobs/\d+$")
    seen: list[tuple[float, float]] = []

    async def finished() -> bool:
        value = await browser.script(
            "const p = document.getElementById('job-progress');"
            " return p ? [p.value, p.max] : null;")
        if value is not None:
            seen.append((float(value[0]), float(value[1])))
            if len(seen) == 8:
                await browser.shot("replay-running")
        return bool(value is not None and value[1] == 16 and value[0] == 16
                    and "done" in (await browser.text_if_there("#job-state") or ""))

    await wait_for(finished, timeout=40, interval=0.15, what="the progress bar to reach the end")
    await browser.wait_text("#job-replayed", r"^15$")
    await browser.shot("replay-done")
    # It moved: the bar showed the replay part-way, not only its start and its end.
    assert any(0 < done < 16 and total == 16 for done, total in seen), seen
    assert await browser.text("#job-delivered") == "1"

    async def all_sent() -> bool:
        return await db.fetchval(
            "SELECT count(*) FROM messages WHERE status = 'sent'") == 15

    await wait_for(all_sent, timeout=30, what="the replayed messages sent")
    accepted = sandbox.sandbox.accepted_counts()
    assert len(accepted) == 15 and set(accepted.values()) == {1}
    assert "m-001" not in accepted

    # The counts changed: only the permission badge is left.
    await browser.get(f"{herald.console}/parked")
    assert await browser.text("#match-count") == "6"
    assert not await browser.exists('a[data-error-type="network"]')
    await browser.shot("parking-lot-after")
    assert await _parked(db) == Counter({"permission": 6})
    assert await queue_depth(amqp, Names(prefix).parked) == 6
    (row,) = await db.fetch("SELECT actor, action, affected, outcome FROM audit_log"
                            " WHERE action = 'parked.replay'")
    assert tuple(row) == ("ops", "parked.replay", 15, "ok")


async def test_edit_one_message_then_replay_it_and_reject_another(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, sandbox: RunningSandbox, browser: Browser,
) -> None:
    first, second = await park(amqp, db, prefix, sandbox.url("ok"),
                               [("invalid_request", "400", 2)], body={"text": "helo wrold"})
    await browser.sign_in(herald, OPS_TOKEN)
    await browser.get(f"{herald.console}/parked")
    await browser.click(f'tr[data-parked-id="{first}"] a')
    await browser.wait_url(rf"/console/parked/{first}$")
    assert "http://127.0.0.1/…" in await browser.text("#recipient")
    await browser.shot("message")
    # Revealing the recipient is an audited action.
    await browser.click("#reveal")
    await browser.wait_text("#recipient", r"127\.0\.0\.1:\d+/http/ok")
    await browser.shot("message-revealed")
    (reveal,) = await db.fetch("SELECT actor, outcome, params FROM audit_log"
                               " WHERE action = 'parked.reveal'")
    assert (reveal["actor"], reveal["outcome"]) == ("ops", "ok")
    assert json.loads(reveal["params"]) == {"parked_id": str(first)}

    assert json.loads(await browser.script(
        "return document.getElementById('edit-body').value")) == {"text": "helo wrold"}
    await browser.fill("#edit-body", '{"text": "hello world"}')
    await browser.click("#edit-preview")
    await browser.wait_text("#diff", "hello world")
    diff = [line for line in (await browser.text("#diff")).splitlines()
            if line[:1] in "+-"]
    # Only the body changed, nothing else of the request.
    assert [(line[0], line[1:].strip()) for line in diff] == [
        ("-", '"text": "helo wrold"'), ("+", '"text": "hello world"')]
    assert "helo wrold" in await browser.text("#before")
    assert "hello world" in await browser.text("#after")
    await browser.shot("edit-before-after")
    await browser.click("#edit-replay")
    await browser.wait_url(r"/console/jobs/\d+$")
    await browser.wait_text("#job-state", "done", timeout=30)
    await browser.shot("edit-replayed")

    async def sent() -> bool:
        return await db.fetchval(
            "SELECT status FROM messages WHERE message_id = 'm-001'") == "sent"

    await wait_for(sent, timeout=20, what="the edited message sent")
    (received,) = [r for r in sandbox.sandbox.attempts_for("m-001") if r.status < 300]
    assert received.body == {"text": "hello world"}
    await browser.get(f"{herald.console}/parked/{first}")
    timeline = await browser.text("#timeline")
    assert "edited by ops" in timeline and "replayed by ops" in timeline
    assert "hello world" in timeline and "helo wrold" in timeline  # before/after kept
    await browser.shot("message-after-edit")

    # Reject the other one, with a reason.
    await browser.get(f"{herald.console}/parked")
    await browser.click(f'tr[data-parked-id="{second}"] input[name=id]')
    await browser.fill("#reject-reason", "customer asked us to stop")
    await browser.click("#reject-selected")
    await browser.wait_text("#reject-reason-shown", "customer asked us to stop")
    await browser.shot("reject-confirm")
    await browser.click("#confirm-reject")
    await browser.wait_url(r"/console/jobs/\d+$")
    await browser.wait_text("#job-state", "done", timeout=30)
    await browser.shot("rejected")
    assert await db.fetchval(
        "SELECT status FROM messages WHERE message_id = 'm-002'") == "cancelled"
    assert await db.fetchval("SELECT count(*) FROM parked_messages WHERE state = 'parked'") == 0
    assert await queue_depth(amqp, Names(prefix).parked) == 0
    await browser.get(f"{herald.console}/parked")
    assert await browser.text("#match-count") == "0"
    await browser.shot("lot-empty")
    assert "m-002" not in sandbox.sandbox.accepted_counts()


async def test_a_viewer_sees_no_buttons_and_every_post_is_refused(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, sandbox: RunningSandbox, browser: Browser,
) -> None:
    (parked_id, _) = await park(amqp, db, prefix, sandbox.url("ok"), [("network", "503", 2)])
    await browser.sign_in(herald, VIEW_TOKEN)
    assert "night · viewer" in await browser.text("#who")
    await browser.shot("overview-viewer")
    await browser.get(f"{herald.console}/parked")
    assert await browser.text("#match-count") == "2"
    for absent in ("input[name=id]", "#actions", "#preview-matching", "#reject-selected",
                   "#purge-form", "input.select-all"):
        assert not await browser.exists(absent), absent
    await browser.shot("lot-viewer")
    # On a phone the rows become cards that fit the screen: nothing scrolls sideways.
    await browser.resize(390, 844)
    await browser.get(f"{herald.console}/parked")
    assert await browser.script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1") is True
    await browser.shot("lot-viewer-phone")
    await browser.resize(1280, 1000)
    await browser.get(f"{herald.console}/parked/{parked_id}")
    assert "http://127.0.0.1/…" in await browser.text("#recipient")
    for absent in ("#reveal", "#edit-form", "#replay-one", "#reject-one"):
        assert not await browser.exists(absent), absent
    await browser.shot("message-viewer")

    # The buttons are absent; the POSTs behind them are refused too, even with
    # the viewer's own valid CSRF token.
    csrf = await browser.script("return document.querySelector('input[name=csrf]').value")
    posts = {
        "/console/parked/preview": {"scope": "matching", "error_type": "network"},
        "/console/jobs": {"kind": "replay", "all": "1", "rate": "5"},
        "/console/parked/reject": {"id": str(parked_id), "reason": "x"},
        f"/console/parked/{parked_id}/edit": {"body": "x"},
        f"/console/parked/{parked_id}/reveal": {},
        "/console/parked/purge": {"older_than": "0s"},
        "/console/jobs/1/cancel": {},
        "/console/campaigns/c/targets": {"max_average_attempts": "2"},
    }
    for path, fields in posts.items():
        status = await browser.fetch_post(path, {**fields, "csrf": csrf})
        assert status == 403, (path, status)
    # And as a form the page submits, the answer says why.
    await browser.script(
        """const f = document.createElement('form'); f.method = 'post';
           f.action = '/console/jobs';
           for (const [k, v] of Object.entries(arguments[0])) {
             const i = document.createElement('input'); i.type = 'hidden'; i.name = k;
             i.value = v; f.appendChild(i); }
           document.body.appendChild(f); f.submit();""",
        {"kind": "replay", "all": "1", "csrf": csrf})
    await browser.wait_text("#error-message", "viewer")
    await browser.shot("viewer-refused")
    assert await db.fetchval("SELECT count(*) FROM lot_jobs") == 0
    assert await db.fetchval("SELECT count(*) FROM campaign_targets") == 0
    assert await _parked(db) == Counter({"network": 2})
    assert await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE action <> 'console.sign_in'") == 0
    assert await queue_depth(amqp, Names(prefix).parked) == 2


async def test_a_form_without_its_csrf_token_is_refused(
    amqp: AbstractRobustConnection, prefix: str, db: asyncpg.Connection,
    herald: RunningHerald, sandbox: RunningSandbox, browser: Browser,
) -> None:
    (parked_id,) = await park(amqp, db, prefix, sandbox.url("ok"), [("network", "503", 1)])
    # The sign-in form too: without its token, a valid admin token does not sign in.
    await browser.get(f"{herald.console}/login")
    await browser.script("document.querySelector('#login-form input[name=csrf]').remove()")
    await browser.fill("#token", OPS_TOKEN)
    await browser.click("#sign-in")
    await browser.wait_text("#login-error", "expired or was not sent by the console")
    await browser.shot("sign-in-without-csrf")
    assert not any(c["name"] == "herald_console" for c in await browser.cookies())

    await browser.sign_in(herald, OPS_TOKEN)
    await browser.get(f"{herald.console}/parked")
    await browser.click(f'tr[data-parked-id="{parked_id}"] input[name=id]')
    await browser.fill("#reject-reason", "no csrf")
    await browser.script("document.querySelector('#lot-form input[name=csrf]').remove()")
    await browser.click("#reject-selected")
    await browser.wait_text("#error-message", "CSRF")
    await browser.shot("reject-without-csrf")
    # A wrong token is no better than none.
    await browser.get(f"{herald.console}/parked/{parked_id}")
    await browser.script(
        "document.querySelector('#edit-form input[name=csrf]').value = 'forged'")
    await browser.click("#edit-preview")
    await browser.wait_text("#error-message", "CSRF")
    await browser.shot("edit-with-a-forged-csrf")
    status = await browser.fetch_post("/console/jobs", {"kind": "replay", "all": "1"})
    assert status == 403
    assert await db.fetchval("SELECT count(*) FROM lot_jobs") == 0
    assert await _parked(db) == Counter({"network": 1})
    assert await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE action <> 'console.sign_in'") == 0
