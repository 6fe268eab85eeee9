"""Reading AMQP frames whose text is not UTF-8, instead of dying on them.

AMQP's short strings (a message's ``message_id``, ``content_type``,
``correlation_id``, ``app_id``…, the routing key, and every header *name*)
are bytes on the wire; nothing checks that they are UTF-8, neither the
broker nor the publishing client. pamqp, the codec under aio-pika, decodes
them as strict UTF-8, and one byte that is not makes it fail to read the
whole frame: the connection's reader stops, the connection is closed, and
the message, never acked, is delivered again to the next connection, which
dies the same way. One publisher's message would stop every consumer and
publisher sharing that connection, again and again, until the broker's
delivery limit dead-letters it (and then the parking tools die on it). A
timestamp (the ``timestamp`` property, or a header of that type) past the
year 9999 does the same: the broker passes any 64-bit value on, and
Python's ``datetime`` cannot hold it.

:func:`install` replaces pamqp's short-string and field-table decoders with
ones that show undecodable bytes as U+FFFD, as Herald does with every other
text from outside, and its timestamp decoder with one that reads a
timestamp out of ``datetime``'s range as absent (None). Long strings need
nothing: pamqp already hands back bytes for one that is not UTF-8 (see
:func:`consumer.wire.encodable`). Herald calls it when the package is
imported, before any connection exists.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from pamqp import common, decode

_installed = False


def short_str(value: bytes) -> tuple[int, str]:
    """A short string (one length byte, then the bytes), undecodable bytes replaced."""
    if not value:
        raise ValueError("Could not unpack short string value")
    length = value[0]
    return length + 1, bytes(value[1:length + 1]).decode("utf-8", "replace")


def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """A field table (a 4-byte length, then name/value pairs), names decoded as
    :func:`short_str` does."""
    try:
        (length,) = common.Struct.integer.unpack(value[0:4])
    except struct.error as exc:
        raise ValueError("Could not unpack field table") from exc
    end = 4 + length
    if end > len(value):
        raise ValueError("Field table length exceeds available data")
    table: dict[str, Any] = {}
    offset = 4
    while offset < end:
        used, name = short_str(value[offset:end])
        if offset + used > end:
            raise ValueError("Field table key length exceeds data")
        offset += used
        used, item = decode.embedded_value(value[offset:end])
        if used == 0:
            raise ValueError("Field table value missing")
        offset += used
        table[name] = item
    return end, table


def timestamp(value: bytes) -> tuple[int, datetime | None]:
    """A timestamp (8 bytes of seconds; pamqp reads values past 2106 as
    milliseconds, and so does this), or None when no ``datetime`` can hold it."""
    try:
        (seconds,) = common.Struct.timestamp.unpack(value[0:8])
    except struct.error as exc:
        raise ValueError("Could not unpack timestamp value") from exc
    scaled: float = seconds / 1000.0 if seconds > 0xFFFFFFFF else seconds
    try:
        return 8, datetime.fromtimestamp(scaled, tz=UTC)
    except (OverflowError, ValueError, OSError):
        return 8, None


def install() -> None:
    """Use the decoders above for every frame pamqp reads (idempotent)."""
    global _installed
    if _installed:
        return
    decode.short_str = short_str
    decode.field_table = field_table
    decode.timestamp = timestamp  # type: ignore[assignment]  # None: no datetime holds it
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["table"] = field_table
    decode.METHODS["timestamp"] = timestamp
    decode.TABLE_MAPPING[b"F"] = field_table
    decode.TABLE_MAPPING[b"T"] = timestamp
    _installed = True
