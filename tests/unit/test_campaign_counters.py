"""The counters of a finished campaign (consumer.records.completion.counters): every
status of the issue's list, failures by error type, and what 'accepted' means."""

from __future__ import annotations

from consumer.records.completion import OPEN, STATUSES, counters, notice_id


def test_counters_from_rows_of_every_status() -> None:
    rows = [
        {"status": "sent", "last_error_type": None, "n": 40},
        {"status": "sent", "last_error_type": "network", "n": 2},  # retried, then sent
        {"status": "delivered", "last_error_type": None, "n": 30},
        {"status": "read", "last_error_type": None, "n": 20},
        {"status": "failed", "last_error_type": "invalid_recipient", "n": 5},
        {"status": "failed", "last_error_type": "provider_error", "n": 1},
        {"status": "failed", "last_error_type": None, "n": 1},  # parked before an attempt
        {"status": "expired", "last_error_type": None, "n": 3},
        {"status": "cancelled", "last_error_type": "invalid_request", "n": 4},
    ]
    c = counters(rows)
    assert c.model_dump() == {
        "total": 106, "accepted": 92, "sent": 42, "delivered": 30, "read": 20, "failed": 7,
        "failed_by_error_type": {"invalid_recipient": 5, "other": 1, "provider_error": 1},
        "expired": 3, "cancelled": 4}
    assert list(c.failed_by_error_type) == sorted(c.failed_by_error_type)


def test_an_empty_campaign_counts_nothing_and_open_statuses_are_statuses() -> None:
    assert counters([]).total == 0
    assert set(OPEN) <= set(STATUSES)
    assert notice_id("spring", 2) == "campaign.completed/spring/2"
