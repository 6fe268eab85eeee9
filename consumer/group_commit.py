"""Group commit: many callers' writes in one database transaction.

Each message's claim and outcome must be committed before its ack, but a
commit per message makes the disk's fsync the speed limit. A
:class:`Batcher` collects the requests of all messages in flight and runs
them as one statement; while one batch is being written, the next one fills
up, so batches grow with load and stay at one item when idle. Each caller
still awaits *its own* result.

A batch is written all or nothing, so one item the database refuses (a text
PostgreSQL cannot store, a number out of range) would fail every message in
it. When the error is one that ``isolate`` says is not an outage, the batch
is written again item by item and only the culprit's caller gets the error;
the others get their results as if nothing had happened. An outage fails
every caller alike (each then waits it out on its own, as with a single
write).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from consumer import metrics

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        write: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int = 500,
        name: str = "batch",
        isolate: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._name = name
        self._isolate = isolate
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._urgent = 0  # how many at the front of _pending are urgent
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._size = metrics.DB_BATCH_SIZE.labels(name)
        self._seconds = metrics.DB_BATCH_SECONDS.labels(name)
        self._splits = metrics.DB_BATCH_SPLITS.labels(name)

    async def submit(self, item: Item, *, urgent: bool = False) -> Result:
        """Queue ``item`` for the next batch; ``urgent`` ones go to the front of it
        (a transactional message does not wait behind a campaign's writes)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self._name}")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if urgent:
            self._pending.insert(self._urgent, (item, future))
            self._urgent += 1
        else:
            self._pending.append((item, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._urgent = max(0, self._urgent - len(batch))
                live = [(item, fut) for item, fut in batch if not fut.cancelled()]
                if not live:
                    continue
                self._size.observe(len(live))
                started = time.perf_counter()
                try:
                    results = await self._write([item for item, _ in live])
                    self._seconds.observe(time.perf_counter() - started)
                except asyncio.CancelledError:
                    for _, fut in live:
                        if not fut.done():
                            fut.cancel()
                    raise
                except Exception as exc:
                    if len(live) > 1 and self._isolate is not None and self._isolate(exc):
                        self._splits.inc()
                        await self._one_by_one(live)
                        continue
                    for _, fut in live:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                if len(results) != len(live):
                    error = RuntimeError(f"{self._name}: {len(results)} results for "
                                         f"{len(live)} items")
                    for _, fut in live:
                        if not fut.done():
                            fut.set_exception(error)
                    continue
                for (_, fut), result in zip(live, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)

    async def _one_by_one(self, live: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """Write each item of a failed batch alone: only the culprit fails."""
        for item, fut in live:
            if fut.done():
                continue
            try:
                results = await self._write([item])
            except asyncio.CancelledError:
                for _, other in live:
                    if not other.done():
                        other.cancel()
                raise
            except Exception as exc:
                fut.set_exception(exc)
                continue
            if len(results) != 1:
                fut.set_exception(RuntimeError(f"{self._name}: {len(results)} results for 1"))
            else:
                fut.set_result(results[0])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, fut in self._pending:
            if not fut.done():
                fut.cancel()
        self._pending.clear()
