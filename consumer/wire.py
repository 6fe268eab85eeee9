"""Every AMQP header name Herald reads or writes, in one place, and what
Herald believes of the ones that arrive with a message.

Herald's own headers all start with ``x-herald-``. Herald adds them when it
re-sends, defers, parks or replays a message; a publisher should set none of
them. The broker adds the dead-lettering headers (``x-death``,
``x-first-death-*``, ``x-last-death-*``) and, on quorum queues,
``x-delivery-count``.

Nothing stops a publisher from setting ``x-herald-*`` headers, so the
pipeline reads them with :func:`read_copy_headers`, by these rules:

- ``x-herald-attempt``: an AMQP integer (or a string of digits) from 1 to
  :data:`MAX_ATTEMPT`. ``x-herald-attempt-base``: the same, from 0 to the
  attempt minus one. Anything else (another type, a value out of range) parks
  the message as ``invalid_payload`` with a reason naming the header: these
  two decide whether a copy is sent, so a value Herald cannot trust is shown
  to a person rather than guessed at (treating it as absent could take one of
  Herald's own late copies for a first attempt, which the claim then drops as
  stale). The bound is far above any number Herald reaches (at most 100
  attempts per budget, a fresh budget per replay) and far below PostgreSQL's
  int4.
- Within range they cannot buy a message more attempts than its retry
  policy allows: the claim in PostgreSQL (sql/0011) grants a fresh budget
  (a base above the stored one) only to a replay's copy, claims a parked
  (failed) message again only for a replay, and holds every copy while
  another consumer's lease on the message runs. A forged higher attempt
  number can only use up the message's own budget sooner.
- ``x-herald-first-seen`` (epoch seconds, feeds the end-to-end latency
  metric) and ``x-herald-due-at`` (epoch seconds, when a long delay ends):
  a finite number; a first-seen in the future (beyond a day of clock skew)
  or a due-at more than :data:`DUE_HORIZON_S` ahead is ignored, as is any
  other type. Ignoring them costs a wrong latency sample or an earlier send
  of that message alone, never another message's.
- Every other header is the publisher's own: carried along on the copies
  Herald re-sends (:func:`encodable` makes sure they can be published
  again), never read.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

# -- on every copy Herald sends round again (retries, deferrals, replays) --------------

# The attempt this copy is (1 for the first), fencing the claim in PostgreSQL.
HEADER_ATTEMPT = "x-herald-attempt"
# Attempts numbered up to this one were used before a replay with a fresh budget.
HEADER_ATTEMPT_BASE = "x-herald-attempt-base"
# When Herald first saw the message (epoch seconds), kept across retries.
HEADER_FIRST_SEEN = "x-herald-first-seen"
# When a delay longer than one trip through the delay levels is due (epoch seconds).
HEADER_DUE_AT = "x-herald-due-at"

# -- why the last attempt failed (on retries and parked copies) -------------------------
HEADER_ERROR_TYPE = "x-herald-error-type"
HEADER_ERROR_CODE = "x-herald-error-code"
HEADER_LAST_ERROR = "x-herald-last-error"

# -- on parked copies -----------------------------------------------------------------
HEADER_PARKED_AT = "x-herald-parked-at"
HEADER_CHANNEL = "x-herald-channel"
HEADER_MESSAGE_ID = "x-herald-message-id"
HEADER_PARKED_ID = "x-herald-parked-id"
# A parked provider event's id (the AMQP message id the receiver gave it), which
# its replay publishes again so that the events consumer still recognises it.
HEADER_EVENT_ID = "x-herald-event-id"

# -- on replayed copies -----------------------------------------------------------------
HEADER_REPLAY_OF = "x-herald-replay-of"

# -- added by the broker ----------------------------------------------------------------
HEADER_DEATH = "x-death"
HEADER_FIRST_DEATH_QUEUE = "x-first-death-queue"
HEADER_FIRST_DEATH_REASON = "x-first-death-reason"
HEADER_DELIVERY_COUNT = "x-delivery-count"
BROKER_HEADERS = frozenset({
    HEADER_DEATH, "x-first-death-exchange", HEADER_FIRST_DEATH_QUEUE,
    HEADER_FIRST_DEATH_REASON, "x-last-death-exchange", "x-last-death-queue",
    "x-last-death-reason", HEADER_DELIVERY_COUNT,
})

# Headers that describe one attempt's failure or one delay trip: never carried
# over to the next copy of a message.
PER_ATTEMPT = frozenset({HEADER_ERROR_TYPE, HEADER_ERROR_CODE, HEADER_LAST_ERROR,
                         HEADER_DUE_AT, HEADER_ATTEMPT}) | BROKER_HEADERS

# -- what arrives from outside ------------------------------------------------------------

# The largest x-herald-attempt accepted: 1,000 fresh budgets of 100 attempts.
MAX_ATTEMPT = 100_000
# The furthest ahead an x-herald-due-at is believed. Herald's own due times
# come from delays of at most a few days (retry delays and a provider's
# Retry-After are capped at one trip through the delay levels, about 3 days);
# a first attempt's send_at is re-read from the request, not from this header.
DUE_HORIZON_S = 366 * 86400
# Clock skew tolerated on x-herald-first-seen.
FIRST_SEEN_SKEW_S = 86400
# AMQP's message-id property is a shortstr.
MAX_AMQP_SHORTSTR_BYTES = 255

_DIGITS_RE = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class CopyHeaders:
    """What Herald believes of a copy's ``x-herald-*`` headers.

    ``problem`` (the message must be parked, and why) is set when the
    attempt or its base cannot be trusted; ``ignored`` names the headers
    that were left out as unbelievable.
    """

    attempt: int = 1
    base: int = 0
    first_seen: float | None = None
    due_at: float | None = None
    problem: str | None = None
    ignored: tuple[str, ...] = ()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: object) -> int | None:
    """An AMQP integer, or a plain string of digits; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _seconds(value: object) -> float | None:
    """A finite number of epoch seconds, or None."""
    if isinstance(value, bool):
        return None
    number: float
    try:
        if isinstance(value, int | float | Decimal):
            number = float(value)
        elif isinstance(value, str | bytes | bytearray):
            text = value.decode("ascii") if isinstance(value, bytes | bytearray) else value
            number = float(text.strip()[:40])
        else:
            return None
    except (ValueError, OverflowError, UnicodeDecodeError):
        return None
    return number if math.isfinite(number) else None


def read_copy_headers(headers: Mapping[str, Any], *, now: float) -> CopyHeaders:
    """The attempt, base, first-seen and due time of a copy, by the rules in
    this module's docstring. ``now``: epoch seconds. Pure."""
    problem: str | None = None
    ignored: list[str] = []
    attempt, base = 1, 0
    rule = "Herald sets it on its own copies; a publisher must not"
    if HEADER_ATTEMPT in headers:
        raw = headers[HEADER_ATTEMPT]
        value = _whole(raw)
        if value is None:
            problem = f"{HEADER_ATTEMPT}: {_shown(raw)} is not a whole number ({rule})"
        elif not 1 <= value <= MAX_ATTEMPT:
            problem = (f"{HEADER_ATTEMPT}: {value} is out of range (1 to {MAX_ATTEMPT};"
                       f" {rule})")
        else:
            attempt = value
    if problem is None and HEADER_ATTEMPT_BASE in headers:
        raw = headers[HEADER_ATTEMPT_BASE]
        value = _whole(raw)
        if value is None:
            problem = f"{HEADER_ATTEMPT_BASE}: {_shown(raw)} is not a whole number ({rule})"
        elif not 0 <= value < attempt:
            problem = (f"{HEADER_ATTEMPT_BASE}: {value} is out of range (0 to"
                       f" {HEADER_ATTEMPT} - 1 = {attempt - 1}; {rule})")
        else:
            base = value
    if problem is not None:
        attempt, base = 1, 0
    first_seen = None
    if HEADER_FIRST_SEEN in headers:
        first_seen = _seconds(headers[HEADER_FIRST_SEEN])
        if first_seen is None or not 0 < first_seen <= now + FIRST_SEEN_SKEW_S:
            first_seen = None
            ignored.append(HEADER_FIRST_SEEN)
    due_at = None
    if HEADER_DUE_AT in headers:
        due_at = _seconds(headers[HEADER_DUE_AT])
        if due_at is None or not 0 <= due_at <= now + DUE_HORIZON_S:
            due_at = None
            ignored.append(HEADER_DUE_AT)
    return CopyHeaders(attempt, base, first_seen, due_at, problem, tuple(ignored))


def amqp_shortstr(value: str | None) -> str | None:
    """``value`` as an AMQP short-string property (a message-id, a content type),
    or None when it cannot be one: a shortstr holds at most 255 bytes of UTF-8.

    A message id too long for it still travels in the body, which is what
    Herald reads; the property is a courtesy. A content type a publisher sent
    with bytes that were not UTF-8 comes back longer than it went (each such
    byte is read as U+FFFD, three bytes), and is dropped rather than making
    the publish of the parked copy fail for good.
    """
    if value is None:
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None
    return value if size <= MAX_AMQP_SHORTSTR_BYTES else None


# How much of a publisher's headers Herald's copies carry (encoded, roughly).
# A copy adds Herald's own headers (a few kB at most) to what it carries, and a
# header frame larger than the connection's frame_max (128 KiB by default)
# makes the broker close the whole connection: every consumer on it, over
# and over, as the copy is redelivered.
CARRIED_HEADERS_BYTES = 32 * 1024


def encodable(headers: Mapping[str, Any], *, max_bytes: int = CARRIED_HEADERS_BYTES
              ) -> dict[str, Any]:
    """``headers`` as they can be published again.

    A publisher's headers come back from the broker as the client decoded
    them, and not all of those can be encoded again: a long string that was
    not UTF-8 arrives as ``bytes`` (the client only encodes ``bytearray``), a
    double arrives as a float that the client would send as a 32-bit float
    (too large ones overflow), a number past 64 bits cannot be sent at all.
    Such values become a form that can (byte arrays, text); what has no
    such form is left out, and so are the largest headers when all of them
    together come to more than ``max_bytes``. Herald's own values pass
    unchanged.
    """
    kept: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for key, value in headers.items():
        fixed = _encodable_value(value, 0)
        if fixed is not _DROP:
            kept[str(key)] = fixed
            sizes[str(key)] = 1 + len(str(key).encode("utf-8", "replace")) + _size(fixed)
    total = sum(sizes.values())
    for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if total <= max_bytes:
            break
        total -= sizes[key]
        del kept[key]
    return kept


def _size(value: Any) -> int:
    """An upper bound of a header value's encoded size."""
    if isinstance(value, str):
        return 5 + len(value.encode("utf-8", "replace"))
    if isinstance(value, bytearray):
        return 5 + len(value)
    if isinstance(value, Mapping):
        return 5 + sum(1 + len(str(k).encode("utf-8", "replace")) + _size(v)
                       for k, v in value.items())
    if isinstance(value, list):
        return 5 + sum(_size(v) for v in value)
    return 9


_DROP = object()
_MAX_HEADER_DEPTH = 16


def _encodable_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | str | bytearray | datetime):
        return value
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, float):
        try:
            struct.pack(">f", value)
        except OverflowError:
            return repr(value)
        return value
    if isinstance(value, Decimal):
        # What the client can encode: a scale of 0..255 and a 32-bit mantissa.
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and -255 <= exponent <= 9:
            mantissa = int(value) if exponent > 0 else int(value.scaleb(-exponent))
            if -(2**31) <= mantissa < 2**31:
                return value
        return str(value)
    if depth >= _MAX_HEADER_DEPTH:
        return _DROP
    if isinstance(value, Mapping):
        table = {}
        for k, v in value.items():
            fixed = _encodable_value(v, depth + 1)
            if fixed is not _DROP:
                table[str(k)] = fixed
        return table
    if isinstance(value, list | tuple):
        items = [_encodable_value(v, depth + 1) for v in value]
        return [v for v in items if v is not _DROP]
    return _DROP
