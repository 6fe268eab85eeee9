"""Successes are debug lines; the log gets one info summary per period instead."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture, capture_logs

from consumer.delivery import pipeline as pipeline_module
from consumer.delivery.pipeline import Pipeline
from consumer.settings import Settings


def bare_pipeline() -> Pipeline:
    none: Any = None
    return Pipeline(Settings(), none, none, {}, instance_id="t", stopping=asyncio.Event())


async def test_successes_are_summed_per_channel_outside_any_message_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = bare_pipeline()
    clock = [100.0]
    monkeypatch.setattr(pipeline_module.time, "monotonic", lambda: clock[0])
    pipe._summary_since = clock[0]
    capture = LogCapture()
    saved = structlog.get_config()
    # With the context merged in, as in production: the summary must not carry
    # the message being handled when the period ended.
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture],
                        cache_logger_on_first_use=False)
    logs = capture.entries
    try:
        with structlog.contextvars.bound_contextvars(message_id="m-1", channel="http"):
            for channel in ("http", "http", "sms"):
                pipe._sent_summary(channel)
            await asyncio.sleep(0)
            assert logs == []  # within the period: nothing yet
            clock[0] += pipeline_module.SENT_SUMMARY_S
            pipe._sent_summary("http")
            await asyncio.sleep(0)  # the line is logged on the next loop turn
    finally:
        structlog.configure(**saved)
    assert len(logs) == 1
    line = logs[0]
    assert line["event"] == "delivery.sent_summary" and line["log_level"] == "info"
    assert line["sent"] == {"http": 3, "sms": 1}
    assert line["over_s"] == pipeline_module.SENT_SUMMARY_S
    assert "message_id" not in line
    with capture_logs() as logs:
        pipe._sent_summary("http")
        await asyncio.sleep(0)
    assert logs == []  # counting starts again
