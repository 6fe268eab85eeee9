"""Group commit (consumer.group_commit.Batcher): one item's bad data fails that
item alone; an outage fails every caller alike."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from consumer.group_commit import Batcher


class Refused(ValueError):
    """Stands for the database refusing one item's data."""


class Outage(OSError):
    """Stands for the database being away."""


class Table:
    """A fake write: all or nothing, like one SQL statement."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.rows: list[int] = []
        self.down = False

    async def write(self, items: Sequence[int]) -> list[str]:
        self.calls.append(list(items))
        await asyncio.sleep(0)
        if self.down:
            raise Outage("connection refused")
        if any(i < 0 for i in items):
            raise Refused(f"value out of range in a batch of {len(items)}")
        self.rows.extend(items)
        return [f"ok {i}" for i in items]


def isolate(exc: BaseException) -> bool:
    return not isinstance(exc, OSError)


async def submit_together(batcher: Batcher[int, str], items: Sequence[int]
                          ) -> list[str | BaseException]:
    # Submitted in one loop iteration: they land in one batch.
    return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)


async def test_one_culprit_fails_alone() -> None:
    table = Table()
    batcher = Batcher(table.write, name="t", isolate=isolate)
    results = await submit_together(batcher, [1, 2, -3, 4, 5])
    assert results[:2] == ["ok 1", "ok 2"] and results[3:] == ["ok 4", "ok 5"]
    assert isinstance(results[2], Refused)
    assert str(results[2]) == "value out of range in a batch of 1"
    assert table.calls[0] == [1, 2, -3, 4, 5]  # one batch first, then item by item
    assert table.calls[1:] == [[1], [2], [-3], [4], [5]]
    assert sorted(table.rows) == [1, 2, 4, 5]  # each written once
    await batcher.close()


async def test_several_culprits_each_fail_alone() -> None:
    table = Table()
    batcher = Batcher(table.write, name="t", isolate=isolate)
    results = await submit_together(batcher, [-1, 2, -3])
    assert [type(r) for r in results] == [Refused, str, Refused]
    await batcher.close()


async def test_an_outage_fails_every_caller_without_splitting() -> None:
    table = Table()
    table.down = True
    batcher = Batcher(table.write, name="t", isolate=isolate)
    results = await submit_together(batcher, [1, 2, 3])
    assert all(isinstance(r, Outage) for r in results)
    assert table.calls == [[1, 2, 3]]
    await batcher.close()


async def test_without_isolate_a_failed_batch_fails_everyone() -> None:
    table = Table()
    batcher = Batcher(table.write, name="t")
    results = await submit_together(batcher, [1, -2])
    assert all(isinstance(r, Refused) for r in results)
    assert table.calls == [[1, -2]]
    await batcher.close()


async def test_a_single_failing_item_is_not_written_twice() -> None:
    table = Table()
    batcher = Batcher(table.write, name="t", isolate=isolate)
    with pytest.raises(Refused):
        await batcher.submit(-1)
    assert table.calls == [[-1]]
    await batcher.close()


async def test_the_batcher_goes_on_after_a_split() -> None:
    table = Table()
    batcher = Batcher(table.write, name="t", isolate=isolate)
    await submit_together(batcher, [1, -2])
    assert await batcher.submit(3) == "ok 3"
    await batcher.close()
