"""The end of a parking-queue pass: it waits until what it held is ready again
(the broker answers a channel's close before a quorum queue puts the messages
back), and never longer than its deadline, whatever the connection does."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractConnection

from consumer.parking import passes
from consumer.parking.passes import LotPass
from consumer.topology import Names


def _pass() -> LotPass:
    return LotPass(cast(AbstractConnection, object()), Names("unit"))


async def test_it_polls_until_everything_held_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = iter([0, 0, 120, 300, 300])
    calls: list[int] = []

    async def ready_count(connection: Any, names: Names) -> int:
        value = next(counts)
        calls.append(value)
        return value

    monkeypatch.setattr(passes, "ready_count", ready_count)
    await asyncio.wait_for(_pass()._await_return(300), 5)
    assert calls == [0, 0, 120, 300]


async def test_a_count_that_hangs_is_given_up_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def ready_count(connection: Any, names: Names) -> int:
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(passes, "ready_count", ready_count)
    monkeypatch.setattr(passes, "RETURN_WAIT_S", 0.3)
    await asyncio.wait_for(_pass()._await_return(10), 5)


async def test_it_stops_at_the_deadline_when_they_never_all_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    async def ready_count(connection: Any, names: Names) -> int:
        calls.append(1)
        return 9

    monkeypatch.setattr(passes, "ready_count", ready_count)
    monkeypatch.setattr(passes, "RETURN_WAIT_S", 0.3)
    await asyncio.wait_for(_pass()._await_return(10), 5)
    assert len(calls) >= 2
