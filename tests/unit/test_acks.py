"""Coalesced acks: a multiple ack only ever covers finished deliveries."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.delivery.acks import AckLedger, ChannelAcks
from tests.helpers import wait_for


def ledger_with(n: int) -> AckLedger:
    ledger = AckLedger()
    for tag in range(1, n + 1):
        ledger.delivered(tag)
    return ledger


def test_deliveries_finished_in_order_share_one_multiple_ack() -> None:
    ledger = ledger_with(5)
    for tag in (1, 2, 3):
        ledger.finished(tag)
    assert ledger.take() == [(3, True)]
    assert ledger.pending == 2
    ledger.finished(4)
    ledger.finished(5)
    assert ledger.take() == [(5, True)]
    assert ledger.pending == 0
    assert ledger.take() == []


def test_one_finished_behind_a_delivery_in_flight_is_acked_alone_at_once() -> None:
    ledger = ledger_with(3)
    ledger.finished(3)
    assert ledger.take() == [(3, False)]
    ledger.finished(2)
    assert ledger.take() == [(2, False)]
    ledger.finished(1)
    # 2 and 3 were acked alone: the run's ack must not name them again.
    assert ledger.take() == [(1, True)]
    assert ledger.pending == 0


def test_a_rejected_delivery_is_passed_over_never_acked() -> None:
    ledger = ledger_with(4)
    ledger.finished(1)
    ledger.settled(2)
    ledger.finished(3)
    assert ledger.take() == [(3, True)]
    assert ledger.pending == 1


def test_a_delivery_left_for_redelivery_is_never_covered() -> None:
    ledger = ledger_with(4)
    ledger.finished(1)
    # 2 is neither finished nor settled (left unacked while stopping)
    ledger.finished(3)
    ledger.finished(4)
    assert ledger.take() == [(1, True), (3, False), (4, False)]
    ledger.delivered(5)
    ledger.finished(5)
    assert ledger.take() == [(5, False)]


def test_tags_the_ledger_never_saw_stop_the_run() -> None:
    ledger = AckLedger()
    ledger.delivered(2)  # 1 was delivered before this ledger existed
    ledger.finished(2)
    assert ledger.take() == [(2, False)]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_no_ack_ever_covers_a_delivery_that_is_not_finished(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 40))
    ledger = AckLedger(track_limit=data.draw(st.integers(1, 60)))
    for tag in range(1, n + 1):
        ledger.delivered(tag)
    fate = {tag: data.draw(st.sampled_from(["ack", "reject", "keep"])) for tag in range(1, n + 1)}
    order = data.draw(st.permutations([t for t in fate if fate[t] != "keep"]))
    acked: set[int] = set()
    done: set[int] = set()  # finished or settled so far

    def send_what_the_ledger_takes() -> None:
        for ack_tag, multiple in ledger.take():
            covered = {t for t in range(1, ack_tag + 1) if fate[t] == "ack"} - acked \
                if multiple else {ack_tag}
            assert ack_tag not in acked, "acked twice"
            assert covered <= done, "covers a delivery still in flight"
            assert all(fate[t] == "ack" for t in covered)
            # a multiple ack must not reach a delivery that is kept or unfinished
            if multiple:
                assert all(t in done for t in range(1, ack_tag + 1))
            acked.update(covered)

    for tag in order:
        if fate[tag] == "ack":
            ledger.finished(tag)
        else:
            ledger.settled(tag)
        done.add(tag)
        if data.draw(st.booleans()):
            send_what_the_ledger_takes()
    send_what_the_ledger_takes()
    assert acked == {t for t in fate if fate[t] == "ack"}


async def test_acks_of_one_loop_turn_share_a_frame_and_each_caller_waits_for_it() -> None:
    sent: list[tuple[int, bool]] = []

    async def send(tag: int, multiple: bool) -> None:
        sent.append((tag, multiple))

    acks = ChannelAcks(send)
    for tag in range(1, 11):
        acks.delivered(tag)
    await asyncio.gather(*(acks.ack(tag) for tag in range(1, 11)))
    assert sent == [(10, True)]


async def test_every_caller_gets_the_error_when_the_channel_is_gone() -> None:
    async def send(tag: int, multiple: bool) -> None:
        raise RuntimeError("channel closed")

    acks = ChannelAcks(send)
    for tag in (1, 2):
        acks.delivered(tag)
    results = await asyncio.gather(acks.ack(1), acks.ack(2), return_exceptions=True)
    assert [str(r) for r in results] == ["channel closed", "channel closed"]


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    gate, writing = asyncio.Event(), asyncio.Event()
    sent: list[tuple[int, bool]] = []

    async def send(tag: int, multiple: bool) -> None:
        writing.set()
        await gate.wait()
        sent.append((tag, multiple))

    acks = ChannelAcks(send)
    for tag in (1, 2):
        acks.delivered(tag)
    first = asyncio.create_task(acks.ack(1))
    second = asyncio.create_task(acks.ack(2))
    await asyncio.wait_for(writing.wait(), 5)
    first.cancel()
    gate.set()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert sent == [(2, True)]


async def test_writes_keep_their_order_when_one_waits_for_the_socket() -> None:
    """A later multiple ack must not overtake an earlier flush's single ack: it
    would settle that tag first, and the single ack would close the channel."""
    entered: list[tuple[int, bool]] = []
    sent: list[tuple[int, bool]] = []
    socket_free = asyncio.Event()

    async def send(tag: int, multiple: bool) -> None:
        entered.append((tag, multiple))
        if len(entered) == 1:
            await socket_free.wait()  # the writer's buffer is full: drain
        sent.append((tag, multiple))

    acks = ChannelAcks(send)
    for tag in range(1, 6):
        acks.delivered(tag)
    # Flush 1: 1 finishes (a run of one), 3 finishes behind 2 (alone).
    first = asyncio.gather(acks.ack(1), acks.ack(3))
    await wait_for(lambda: entered == [(1, True)], timeout=5, interval=0.001,
                   what="flush 1 writing")
    # Flush 2 while flush 1 waits for the socket: 2, 4 and 5 finish (a run up to 5).
    second = asyncio.gather(acks.ack(2), acks.ack(4), acks.ack(5))
    await wait_for(lambda: acks.ledger.pending == 0, timeout=5, interval=0.001,
                   what="flush 2 taken")
    for _ in range(5):  # every ready task runs: flush 2's write would start now
        await asyncio.sleep(0)
    assert entered == [(1, True)]
    socket_free.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert sent == [(1, True), (3, False), (5, True)]


def test_a_ledger_that_missed_earlier_tags_acks_everything_alone() -> None:
    ledger = AckLedger()
    for tag in (7, 8, 9):  # 1-6 were delivered before it existed
        ledger.delivered(tag)
    ledger.finished(8)
    ledger.finished(7)
    assert ledger.take() == [(7, False), (8, False)]
    assert not ledger.coalescing and ledger.pending == 0


def test_a_gap_in_the_tags_stops_coalescing() -> None:
    ledger = ledger_with(2)
    ledger.finished(1)
    ledger.finished(2)
    assert ledger.take() == [(2, True)]
    ledger.delivered(4)  # 3 never reached the ledger
    ledger.finished(4)
    assert ledger.take() == [(4, False)]
    assert not ledger.coalescing


def test_behind_a_delivery_stuck_for_good_the_memory_stays_bounded() -> None:
    ledger = AckLedger(track_limit=100)
    ledger.delivered(1)  # never finished: left unacked on purpose
    for tag in range(2, 500):
        ledger.delivered(tag)
        ledger.finished(tag)
        assert ledger.take() == [(tag, False)]
    assert not ledger.coalescing
    assert ledger.pending == 0
    # Still never acked: 1 is not covered by anything sent after it.
    ledger.finished(1)
    assert ledger.take() == [(1, False)]
