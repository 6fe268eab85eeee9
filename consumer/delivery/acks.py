"""Acks of one AMQP channel, coalesced into ``multiple`` acks where that is exact.

A delivery is acked only after its outcome is committed (and, for a retry or
a parking, confirmed by the broker). Deliveries finish together, a group
commit at a time; sending one ``basic.ack`` per delivery costs a frame each
on both sides, and on a quorum queue a settlement each in the queue's log.
A ``multiple`` ack of tag T settles every delivery of the channel up to T,
so it is exact only when every one of them is finished: the
:class:`AckLedger` knows every tag the channel delivered (tags are
consecutive from 1 on a channel) and covers only an unbroken run of finished
ones. A delivery that finishes behind one still in flight is acked alone at
once, so a slow send never holds other deliveries' prefetch slots.

:class:`ChannelAcks` sends what the ledger decides once per turn of the
event loop, so the deliveries a group commit releases together share a
frame. Each caller still awaits the frame that acks its own delivery (or
the error when the channel is gone: the broker then redelivers it, and the
claim recognises the copy as a duplicate).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

# How many deliveries a ledger tracks behind the oldest one not settled. A
# channel has at most HERALD_PREFETCH_MAX (2048) unacked at once; past this
# many the oldest is stuck (left unacked on purpose), the ledger stops
# coalescing and acks everything alone, and its memory stays bounded.
TRACK_LIMIT = 16_384


class AckLedger:
    """Which acks to send for the deliveries of one channel (no I/O)."""

    def __init__(self, *, track_limit: int = TRACK_LIMIT) -> None:
        self._outstanding: deque[int] = deque()  # delivered, in tag order
        self._expected = 1  # the lowest tag not yet settled by a run
        self._finished: set[int] = set()  # to ack, not yet sent
        self._settled: set[int] = set()  # acked alone, or settled otherwise
        self._track_limit = track_limit
        self.coalescing = True  # False: every ack goes alone from now on

    def delivered(self, tag: int) -> None:
        if not self.coalescing:
            return
        if not self._outstanding and tag != self._expected:
            # Tags below it were delivered before this ledger existed: a run
            # could never start, so none is attempted.
            self._stop_coalescing()
            return
        self._outstanding.append(tag)
        if len(self._outstanding) > self._track_limit:
            self._stop_coalescing()

    def _stop_coalescing(self) -> None:
        self.coalescing = False
        self._outstanding.clear()
        self._settled.clear()

    def finished(self, tag: int) -> None:
        """The delivery is to be acked."""
        self._finished.add(tag)

    def settled(self, tag: int) -> None:
        """The delivery was settled some other way (rejected): never ack it."""
        self._finished.discard(tag)
        if self.coalescing:
            self._settled.add(tag)

    def take(self) -> list[tuple[int, bool]]:
        """The acks to send now, as ``(tag, multiple)``, in order."""
        acks: list[tuple[int, bool]] = []
        if not self.coalescing:
            acks = [(tag, False) for tag in sorted(self._finished)]
            self._finished.clear()
            return acks
        run_end: int | None = None
        outstanding = self._outstanding
        if outstanding and outstanding[0] != self._expected:
            # A tag this ledger never saw: no run may pass it.
            self._stop_coalescing()
            return self.take()
        while outstanding and outstanding[0] == self._expected:
            tag = outstanding[0]
            if tag in self._finished:
                self._finished.remove(tag)
                run_end = tag
            elif tag in self._settled:
                self._settled.remove(tag)
            else:
                break
            outstanding.popleft()
            self._expected = tag + 1
        if run_end is not None:
            # Every tag below run_end is settled or covered by this ack.
            acks.append((run_end, True))
        # Finished behind a delivery still in flight: acked alone, now.
        for tag in sorted(self._finished):
            acks.append((tag, False))
            self._settled.add(tag)
        self._finished.clear()
        return acks

    @property
    def pending(self) -> int:
        """Deliveries known and not yet covered by a sent ack."""
        return len(self._outstanding)


class ChannelAcks:
    """Sends a channel's acks once per turn of the event loop."""

    def __init__(self, send: Callable[[int, bool], Awaitable[Any]]) -> None:
        self._send = send  # (delivery_tag, multiple): the channel's basic.ack
        self.ledger = AckLedger()
        self._next: asyncio.Future[None] | None = None
        # The last write: each waits for the one before, because a multiple ack
        # written ahead of an earlier single one would settle that tag first
        # (and the single ack would then close the channel: unknown tag).
        self._last: asyncio.Task[None] | None = None

    def delivered(self, tag: int) -> None:
        self.ledger.delivered(tag)

    def rejected(self, tag: int) -> None:
        self.ledger.settled(tag)

    async def ack(self, tag: int) -> None:
        """Ack the delivery; returns once the frame that acks it is written."""
        self.ledger.finished(tag)
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            loop.call_soon(self._flush)
        await asyncio.shield(self._next)

    def _flush(self) -> None:
        done, self._next = self._next, None
        assert done is not None
        self._last = asyncio.get_running_loop().create_task(
            self._write(self.ledger.take(), done, self._last))

    async def _write(self, acks: list[tuple[int, bool]], done: asyncio.Future[None],
                     previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            for tag, multiple in acks:
                await self._send(tag, multiple)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
                done.exception()  # retrieved: every waiter gets it, none may be left
        else:
            if not done.done():
                done.set_result(None)
