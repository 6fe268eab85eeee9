"""ThrottledCheck (consumer/http_server.py): /readyz's check runs at most once per
TTL, and concurrent callers share one run."""

from __future__ import annotations

import asyncio

import pytest

from consumer.http_server import ThrottledCheck


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SlowCheck:
    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> dict[str, bool]:
        self.calls += 1
        await self.release.wait()
        return {"database": self.calls % 2 == 1}


async def test_concurrent_callers_share_one_run_and_the_answer_is_cached() -> None:
    clock, check = Clock(), SlowCheck()
    throttled = ThrottledCheck(check, ttl_s=1.0, clock=clock)
    callers = [asyncio.create_task(throttled()) for _ in range(50)]
    await asyncio.sleep(0)
    check.release.set()
    assert await asyncio.gather(*callers) == [{"database": True}] * 50
    assert check.calls == 1
    clock.now += 0.9
    assert await throttled() == {"database": True} and check.calls == 1
    clock.now += 0.2
    assert await throttled() == {"database": False} and check.calls == 2


async def test_a_caller_that_goes_away_does_not_cancel_the_others() -> None:
    check = SlowCheck()
    throttled = ThrottledCheck(check, ttl_s=1.0, clock=Clock())
    leaving, staying = asyncio.create_task(throttled()), asyncio.create_task(throttled())
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    check.release.set()
    assert await staying == {"database": True}
    assert check.calls == 1


async def test_callers_get_their_own_copy() -> None:
    check = SlowCheck()
    check.release.set()
    throttled = ThrottledCheck(check, ttl_s=1.0, clock=Clock())
    first = await throttled()
    first["database"] = False
    assert await throttled() == {"database": True}
