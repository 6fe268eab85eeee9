"""Passes over the parking queue ``{prefix}.parked`` that keep its order.

Replay, reject, purge and sync take messages from the queue, act on some and
leave the rest parked *where they were*. How rests on what RabbitMQ's quorum
queues do with unacknowledged messages (measured on 3.10, 4.0 and 4.3:
deploy/local/BROKERS.md, pinned by tests/integration/test_parked.py):

- ``basic.nack``/``basic.reject`` with requeue puts a message at the *tail*
  on 3.10 and back in its place on 4.x: never used here;
- when a channel closes, the messages it held unacked go back to the *head*
  of the queue, in their original order, behind those of channels closed
  before it and ahead of everything not yet taken.

So a pass holds the messages it leaves parked unacked, and returns them by
closing its channels at the end. A killed pass (SIGKILL) ends the same way:
the broker returns every unacked message, nothing is lost.

The pass takes the messages through *windows*: channels, each with a
consumer whose prefetch is the number of messages it is to take,
``window`` or the fewer still to come (the queue's depth when the pass
began, less what earlier windows took). A window stops consuming
(``basic.cancel``) once it has them all, and the next window opens when
they have been handed out. At the end the windows' channels are closed one
after the other, oldest first, so the held messages return in queue order.
(Only a pass killed while holding more than one window may bring them back
in a different order across windows.) This keeps every window from taking
anything out of turn, on every version:

- A window stops when it is full, so nothing can be on its way to it. On
  4.x a message the broker is sending at the moment of a ``basic.cancel``
  goes back to the head at once, ahead of the messages older windows hold.
- Messages the pass is done with are acked once their window has stopped
  (until then the ack waits). An ack frees a prefetch slot, and a window
  with a free slot would take a message out of turn: one parked after the
  pass began (perhaps the very one it replayed and the pipeline parked
  again), or one that an older window's channel returns as it closes.
  The acks go out together (one ``multiple`` ack for a run), and a channel
  closes only a moment after its last ack (:data:`ACK_GRACE_S`).
- No window consumes any more when the channels close.

Copies the pipeline parked carry ``x-herald-parked-id``. Copies the broker
dead-lettered (``x-delivery-limit``: a message that kept killing consumers)
do not; they get an id derived from their body and ``x-death`` so that
every pass finds the same index row for them (:func:`copy_id`).

Every pass counts as one delivery of each message it returns: the parking
queue's delivery limit is set high enough (:mod:`consumer.topology`) that
passes never wear a message out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from asyncpg.pool import PoolConnectionProxy
from pydantic import ValidationError

from consumer.logs import mask_headers
from consumer.store import parked_row
from consumer.text import storable
from consumer.topology import Names
from consumer.wire import (
    HEADER_ATTEMPT,
    HEADER_CHANNEL,
    HEADER_DEATH,
    HEADER_ERROR_CODE,
    HEADER_ERROR_TYPE,
    HEADER_FIRST_DEATH_QUEUE,
    HEADER_FIRST_DEATH_REASON,
    HEADER_LAST_ERROR,
    HEADER_MESSAGE_ID,
    HEADER_PARKED_AT,
    HEADER_PARKED_ID,
)
from schemas import SendRequest

log = structlog.get_logger("herald.parking_queue")

# A connection of its own or one borrowed from a pool.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
# Namespace of the ids given to copies the broker parked by itself.
_DEAD_LETTER_NS = uuid.UUID("5a0f7d1e-3c1b-4e52-9a55-6c8f0b7e2d41")


class LotBusy(Exception):
    """Another replay, reject, purge or sync is working on this parking lot."""


@contextlib.asynccontextmanager
async def lot_lock(pool: asyncpg.Pool, prefix: str) -> AsyncIterator[None]:
    """One pass at a time per parking lot: a second would not see the messages
    the first holds. A session advisory lock dies with its connection, so a
    killed pass never leaves the lot locked."""
    async with pool.acquire() as conn:
        key = f"herald.parked:{prefix}"
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            raise LotBusy("another replay, reject, purge or sync is running on this parking lot")
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get(HEADER_DEATH)
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[-1], dict):
        # x-death lists the most recent death first; the first one is last.
        return dict(deaths[-1])
    return {}


def copy_id(message: AbstractIncomingMessage) -> tuple[uuid.UUID, bool]:
    """The parked copy's index id, and whether the pipeline gave it (header)."""
    headers = dict(message.headers or {})
    raw = _text(headers.get(HEADER_PARKED_ID))
    if raw:
        with contextlib.suppress(ValueError):
            return uuid.UUID(raw), True
    death = _first_death(headers)
    material = json.dumps([
        hashlib.sha256(message.body).hexdigest(), message.message_id,
        _text(headers.get(HEADER_FIRST_DEATH_QUEUE)), _text(headers.get(HEADER_FIRST_DEATH_REASON)),
        _text(death.get("time")), _text(message.timestamp),
    ])
    return uuid.uuid5(_DEAD_LETTER_NS, material), False


def jsonable(value: Any) -> Any:
    """AMQP header values (bytes, datetimes, nested tables) as JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def index_row(message: AbstractIncomingMessage, parked_id: uuid.UUID,
              names: Names) -> dict[str, Any]:
    """An index row for a parked copy that has none, from what the copy carries.

    Herald's own copies say everything in their headers (their row is missing
    only when the pipeline died between parking and indexing). A copy the
    broker dead-lettered has its original headers plus ``x-death``: it is
    indexed as error_type ``other`` with the broker's reason as its code.
    """
    headers = dict(message.headers or {})
    request: SendRequest | None = None
    with contextlib.suppress(ValidationError, UnicodeDecodeError):
        request = SendRequest.model_validate_json(message.body)
    death = _first_death(headers)
    death_queue = _text(headers.get(HEADER_FIRST_DEATH_QUEUE)) or _text(death.get("queue")) or ""
    send_prefix = f"{names.prefix}.send."
    channel = (_text(headers.get(HEADER_CHANNEL))
               or (request.channel if request else None)
               # {prefix}.send.{channel}, or a lane of it ({prefix}.send.{channel}.{lane})
               or (death_queue[len(send_prefix):].split(".")[0]
                   if death_queue.startswith(send_prefix) else None)
               or "unknown")
    attempts = headers.get(HEADER_ATTEMPT)
    parked_at = datetime.now(UTC)
    if HEADER_PARKED_ID in headers:
        error_type = _text(headers.get(HEADER_ERROR_TYPE)) or "other"
        error_code = _text(headers.get(HEADER_ERROR_CODE)) or None
        last_error = _text(headers.get(HEADER_LAST_ERROR)) or ""
        with contextlib.suppress(TypeError, ValueError):
            parked_at = datetime.fromisoformat(str(_text(headers.get(HEADER_PARKED_AT))))
    else:
        reason = _text(headers.get(HEADER_FIRST_DEATH_REASON)) or _text(death.get("reason"))
        count = death.get("count")
        error_type, error_code = "other", reason or "dead_lettered"
        last_error = (f"dead-lettered by the broker from {death_queue or 'a queue'}"
                      f" ({reason or 'no reason given'}"
                      + (f", {count} time(s)" if count else "") + ")"
                      + (": it kept failing the consumers that took it"
                         if reason == "delivery_limit" else ""))
        if isinstance(death.get("time"), datetime):
            parked_at = death["time"]
    if parked_at.tzinfo is None:
        parked_at = parked_at.replace(tzinfo=UTC)
    # Whatever the copy carries may come from a publisher: made storable, the
    # body capped (the copy stays whole in the queue).
    headers_json = jsonable(mask_headers(headers))
    row = parked_row(
        message_id=(request.message_id if request else None)
        or _text(headers.get(HEADER_MESSAGE_ID)) or message.message_id,
        channel=channel,
        recipient=request.to if request else None,
        campaign_id=request.campaign_id if request else None,
        attempts=attempts if isinstance(attempts, int) and attempts > 0 else 1,
        error_type=error_type, error_code=error_code, last_error=last_error,
        body=message.body, headers={},
    )
    return row | {
        "parked_id": parked_id,
        "parked_at": parked_at,
        "headers": _storable_json(headers_json),
    }


def _storable_json(value: Any, depth: int = 0) -> Any:
    """A JSON value PostgreSQL's jsonb can store: no NUL or lone surrogate in
    strings or keys, finite numbers, bounded depth."""
    if depth > 16:
        return "…"
    if isinstance(value, str):
        return storable(value, 2000)
    if isinstance(value, dict):
        return {storable(str(k), 255): _storable_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable_json(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


async def index_missing(conn: Conn, rows: list[dict[str, Any]],
                        actor: str) -> int:
    """Index copies found in the queue without a row (see :func:`index_row`);
    returns how many rows were added."""
    added = 0
    for row in rows:
        inserted = await conn.fetchval(
            """INSERT INTO parked_messages (parked_id, message_id, channel, recipient,
                   campaign_id, attempts, error_type, error_code, last_error, parked_at,
                   body, headers, body_size)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
               ON CONFLICT (parked_id) DO NOTHING
               RETURNING parked_id""",
            row["parked_id"], row["message_id"], row["channel"], row["recipient"],
            row["campaign_id"], row["attempts"], row["error_type"], row["error_code"],
            row["last_error"], row["parked_at"], row["body"], row["headers"],
            row.get("body_size"),
        )
        if inserted is not None:
            added += 1
            await conn.execute(
                """INSERT INTO message_actions (message_id, parked_id, action, actor, detail)
                   VALUES ($1, $2, 'indexed', $3, $4)""",
                row["message_id"], row["parked_id"], actor,
                {"error_type": row["error_type"], "error_code": row["error_code"],
                 "note": "found in the parking queue without an index row"},
            )
            log.info("parked.indexed", parked_id=str(row["parked_id"]),
                     message_id=row["message_id"], error_code=row["error_code"])
    return added


async def ready_count(connection: AbstractConnection, names: Names) -> int:
    """Messages ready in the parking queue (not counting any a pass holds)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(names.parked, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


@dataclass
class Delivery:
    """A message taken from the parking queue, by the window that holds it."""

    message: AbstractIncomingMessage
    window: int
    parked_id: uuid.UUID


# How long a window's channel stays open after its last ack. A quorum queue's
# client in the broker's channel sends at most about 32 settlements at a time
# and keeps the rest until the queue confirms the earlier ones; closing the
# channel meanwhile drops the kept ones, and their messages come back to the
# queue (measured on 4.0: 64 acks then an immediate close left 31 of them
# parked; 10 ms later none). Nothing in AMQP tells when they are applied.
ACK_GRACE_S = 0.25
# How long a pass waits at its end for the messages it held to be ready again.
RETURN_WAIT_S = 10.0


@dataclass
class _Window:
    channel: AbstractChannel
    queue: AbstractQueue
    tag: str | None
    size: int  # its prefetch: the messages it is to take
    delivered: int = 0
    taken: int = 0  # handed out by batch()
    held: int = 0  # taken by the pass and not acked: they stay parked
    # Delivered and not acked, by delivery tag, in delivery order.
    unacked: dict[int, AbstractIncomingMessage] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)  # the pass is done with them: acks to send
    last_ack: float = 0.0

    @property
    def full(self) -> bool:
        return self.delivered >= self.size

    @property
    def empty(self) -> bool:
        """Stopped, and holding nothing: its channel has nothing to put back."""
        return self.tag is None and not self.unacked


@dataclass
class LotPass:
    """One ordered pass over the parking queue (see the module's docstring).

    Use as an async context manager; :meth:`batch` returns taken messages
    until every message that was in the queue when the pass began has been
    seen (or the queue stays silent for ``idle_s``). Each must then be
    :meth:`ack`-ed (done with) or simply left: leaving it keeps it parked.
    """

    connection: AbstractConnection
    names: Names
    window: int = 2000
    max_held: int = 200_000
    idle_s: float = 2.0
    depth: int = 0
    seen: int = 0
    truncated: bool = False
    _windows: list[_Window] = field(default_factory=list)
    _inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _over: bool = False

    async def __aenter__(self) -> LotPass:
        self.depth = await ready_count(self.connection, self.names)
        if self.depth > 0:
            await self._open_window()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def held(self) -> int:
        """Messages taken and left parked, held until the pass ends."""
        return sum(w.held for w in self._windows)

    @property
    def _delivered(self) -> int:
        return sum(w.delivered for w in self._windows)

    async def _open_window(self) -> None:
        index = len(self._windows)
        size = min(self.window, 65535, self.depth - self._delivered)
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=size)
        queue = await channel.get_queue(self.names.parked, ensure=False)
        window = _Window(channel, queue, None, size)
        self._windows.append(window)

        async def deliver(message: AbstractIncomingMessage) -> None:
            window.delivered += 1
            if message.delivery_tag is not None:
                window.unacked[message.delivery_tag] = message
            self._inbox.put_nowait(Delivery(message, index, copy_id(message)[0]))
            self._arrived.set()

        window.tag = await queue.consume(deliver)

    async def _stop(self, window: _Window) -> None:
        """Stop ``window`` consuming once it is full (or nothing has arrived for a
        while: messages counted in the depth that are no longer there), then send
        the acks that waited."""
        if window.tag is not None:
            quiet = min(self.idle_s, 1.0)
            while not window.full:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), quiet)
                except TimeoutError:
                    break
            tag, window.tag = window.tag, None
            await window.queue.cancel(tag)
        await self._settle(window)

    async def _settle(self, window: _Window) -> None:
        """Send the acks of a stopped window, as few as possible: one ack with
        ``multiple`` for the run of done messages at the head of what it holds
        (the usual case), one each for the rest. Then close its channel if it
        holds nothing any more (a long pass that keeps little would otherwise
        open channels by the thousand; RabbitMQ allows 2047 per connection)."""
        if window.tag is not None or window.channel.is_closed:
            return
        if window.done:
            head: AbstractIncomingMessage | None = None
            for tag, message in window.unacked.items():
                if tag not in window.done:
                    break
                head = message
            if head is not None and head.delivery_tag is not None:
                last = head.delivery_tag
                await head.ack(multiple=True)
                for tag in [t for t in window.unacked if t <= last]:
                    del window.unacked[tag]
                    window.done.discard(tag)
            for tag in sorted(window.done):
                await window.unacked.pop(tag).ack()
            window.done.clear()
            window.last_ack = asyncio.get_running_loop().time()
        if window.empty and window.taken == window.delivered:
            await self._close_window(window)

    async def _close_window(self, window: _Window) -> None:
        wait = window.last_ack + ACK_GRACE_S - asyncio.get_running_loop().time()
        if window.last_ack and wait > 0:
            await asyncio.sleep(wait)
        await window.channel.close()

    async def batch(self, size: int) -> list[Delivery]:
        """Up to ``size`` more messages in queue order; [] when the pass is over."""
        for window in self._windows:
            if window.done:
                await self._settle(window)
        if self._over or not self._windows or self.seen >= self.depth:
            self._over = True
            return []
        current = self._windows[-1]
        if current.tag is not None and current.full:
            await self._stop(current)
        if current.tag is None and self._inbox.empty() and self._delivered < self.depth:
            # The current window has taken all it was to take: go on in a new one.
            if self.held >= self.max_held:
                self.truncated = self._over = True
                return []
            await self._open_window()
        try:
            first = await asyncio.wait_for(self._inbox.get(), self.idle_s)
        except TimeoutError:
            self._over = True
            return []
        taken = [first]
        while len(taken) < size and self.seen + len(taken) < self.depth:
            try:
                taken.append(self._inbox.get_nowait())
            except asyncio.QueueEmpty:
                break
        for d in taken:
            self._windows[d.window].taken += 1
            self._windows[d.window].held += 1
        self.seen += len(taken)
        taken.sort(key=lambda d: (d.window, d.message.delivery_tag or 0))
        return taken

    async def ack(self, delivery: Delivery) -> None:
        """Done with ``delivery``: it leaves the queue. The ack itself is sent
        once its window has stopped consuming, at the next :meth:`batch` or at
        the end (see the module's docstring)."""
        window = self._windows[delivery.window]
        window.held -= 1
        if delivery.message.delivery_tag is not None:
            window.done.add(delivery.message.delivery_tag)

    async def close(self) -> None:
        """Return what is held to the head of the queue, in order: stop the
        consuming window, send the acks that wait, then close the windows'
        channels one after the other, oldest first."""
        self._over = True
        if self._windows:
            try:
                await self._stop(self._windows[-1])
                for window in self._windows:
                    await self._settle(window)
            except Exception as exc:
                log.warning("parked.pass_stop_failed", error=repr(exc))
        held = self.held
        for window in self._windows:
            if not window.channel.is_closed:
                with contextlib.suppress(Exception):
                    await self._close_window(window)
        self._windows.clear()
        if held:
            await self._await_return(held)

    async def _await_return(self, held: int) -> None:
        """Wait until the ``held`` messages are ready in the queue again.

        The broker answers a channel's close before a quorum queue has put
        back what the channel held (that is a step of its own, in the queue's
        log), so a pass that started just then would count too few messages
        and miss some. Nothing but a pass takes from the parking queue, so
        once ``held`` are ready they include everything this pass returned.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETURN_WAIT_S
        ready = 0
        while loop.time() < deadline:
            try:
                # A connection that is reconnecting could hold the count up.
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    ready = await ready_count(self.connection, self.names)
            except Exception as exc:
                log.warning("parked.pass_return_unknown", error=repr(exc))
                return
            if ready >= held:
                return
            await asyncio.sleep(0.02)
        log.warning("parked.pass_return_slow", held=held, ready=ready, waited_s=RETURN_WAIT_S)
