"""AMQP frames with text that is not UTF-8 are read, not fatal (consumer.amqp_decode)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, decode, encode, frame, header

import consumer  # noqa: F401  (importing the package installs the decoders)
from consumer import amqp_decode


def table_with_key(key: bytes, value: bytes = b"b\x01") -> bytes:
    data = struct.pack("B", len(key)) + key + value
    return struct.pack(">I", len(data)) + data


def test_the_package_installs_the_decoders() -> None:
    assert decode.METHODS["shortstr"] is amqp_decode.short_str
    assert decode.METHODS["table"] is amqp_decode.field_table
    assert decode.TABLE_MAPPING[b"F"] is amqp_decode.field_table
    assert decode.METHODS["timestamp"] is amqp_decode.timestamp
    assert decode.TABLE_MAPPING[b"T"] is amqp_decode.timestamp


def test_a_header_name_that_is_not_utf8_is_read() -> None:
    used, table = amqp_decode.field_table(table_with_key(b"\xff\xfekey"))
    assert table == {"\ufffd\ufffdkey": 1}
    assert used == 4 + 1 + 5 + 2


def test_a_nested_table_with_such_a_name_is_read() -> None:
    inner = table_with_key(b"\xc3(")
    outer = table_with_key(b"outer", b"F" + inner)
    assert decode.field_table(outer)[1] == {"outer": {"\ufffd(": 1}}


def test_a_short_string_that_is_not_utf8_is_read() -> None:
    assert amqp_decode.short_str(b"\x03a\xffb") == (4, "a\ufffdb")


def test_a_content_header_with_such_a_message_id_is_read() -> None:
    props = commands.Basic.Properties(message_id="PLACEHOLDER", headers={"k": 1})
    raw = frame.marshal(header.ContentHeader(0, 5, props), 1)
    raw = raw.replace(b"\x0bPLACEHOLDER", b"\x04\xff\xfe\xfd\xfc")
    # Frame and payload lengths shrink with the string.
    size = struct.unpack(">I", raw[3:7])[0] - 7
    raw = raw[:3] + struct.pack(">I", size) + raw[7:]
    _, _, read = frame.unmarshal(raw)
    assert read.properties.message_id == "\ufffd" * 4
    assert read.properties.headers == {"k": 1}


def test_a_timestamp_past_datetimes_range_reads_as_absent() -> None:
    assert amqp_decode.timestamp(struct.pack(">Q", 2**63 - 1)) == (8, None)
    huge = table_with_key(b"when", b"T" + struct.pack(">Q", 2**64 - 1))
    assert decode.field_table(huge)[1] == {"when": None}
    assert decode.field_table(table_with_key(b"when", b"T" + struct.pack(">Q", 1)))[1][
        "when"].year == 1970


def test_a_content_header_with_such_a_timestamp_is_read() -> None:
    props = commands.Basic.Properties(message_id="m", timestamp=datetime(2030, 1, 1, tzinfo=UTC))
    raw = frame.marshal(header.ContentHeader(0, 5, props), 1)
    stamp = struct.pack(">Q", int(datetime(2030, 1, 1, tzinfo=UTC).timestamp()))
    assert stamp in raw
    _, _, read = frame.unmarshal(raw.replace(stamp, struct.pack(">Q", 2**63 - 1)))
    assert (read.properties.message_id, read.properties.timestamp) == ("m", None)


def test_utf8_tables_read_as_before() -> None:
    headers = {"x-herald-attempt": 3, "name": "é", "nested": {"a": [1, "b"]}}
    assert decode.field_table(encode.field_table(headers))[1] == headers


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_any_bytes_either_decode_or_raise_value_error(data: bytes) -> None:
    # A malformed table is the frame's fault (pamqp raises ValueError); bytes that
    # are not UTF-8 in a well-formed one are not.
    try:
        amqp_decode.field_table(table_with_key(data[:255]))
    except UnicodeDecodeError as exc:
        raise AssertionError("a name that is not UTF-8 must be read") from exc
    try:
        amqp_decode.field_table(data)
    except UnicodeDecodeError as exc:
        raise AssertionError("a name that is not UTF-8 must be read") from exc
    except ValueError:
        pass
