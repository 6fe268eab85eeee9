"""The console's Escalations page and the campaigns' completion (plain HTTP)."""

from __future__ import annotations

import asyncpg

from tests.console.conftest import VIEW_TOKEN, RunningHerald
from tests.console.test_pages import Client, client

__all__ = ["client"]  # the fixture, used here too


async def test_escalations_and_completed_campaigns_are_shown(
    db: asyncpg.Connection, herald: RunningHerald, client: Client,
) -> None:
    await client.sign_in(VIEW_TOKEN)
    status, page, _ = await client.get("/console/escalations")
    assert status == 200 and "No escalation rules" in page
    await db.execute(
        """INSERT INTO escalation_rules (name, error_type, target_channel, target, window_s,
                                         created_by)
           VALUES ('oncall', 'invalid_recipient', 'http',
                   'https://chat.example.com/hooks/T0/B0/secret', 300, 'test')""")
    await db.execute(
        """INSERT INTO escalation_digests (rule_id, window_start, window_end, state, parked,
                                           sent_at)
           VALUES (1, '2026-11-23T10:00:00Z', '2026-11-23T10:05:00Z', 'sent', 9800, now())""")
    status, page, _ = await client.get("/console/escalations")
    assert status == 200
    assert 'id="escalation-1"' in page and "invalid_recipient" in page
    assert "https://chat.example.com/…" in page and "secret" not in page
    assert "2026-11-23 10:00:00 UTC" in page and "9,800" in page
    assert 'href="/console/escalations" aria-current="page"' in page

    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, campaign_id, payload)
           VALUES ('m1', 'sent', 'http', 'http://x', 'spring', '{}')""")
    await db.execute(
        """INSERT INTO campaign_completion (campaign_id, state, last_activity_at, completed_at,
                                           completions, counters)
           VALUES ('spring', 'completed', now(), now(), 1, '{}')""")
    status, page, _ = await client.get("/console/campaigns")
    assert status == 200 and '<span class="badge good"' in page and ">completed</span>" in page
    status, page, _ = await client.get("/console/campaigns/spring")
    assert status == 200 and 'id="completed"><span class="badge good">completed</span>' in page
