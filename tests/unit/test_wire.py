"""What Herald believes of the x-herald-* headers a copy arrives with, and what
it can publish again (consumer.wire)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import decode, encode

from consumer.wire import (
    CARRIED_HEADERS_BYTES,
    DUE_HORIZON_S,
    HEADER_ATTEMPT,
    HEADER_ATTEMPT_BASE,
    HEADER_DUE_AT,
    HEADER_FIRST_SEEN,
    MAX_ATTEMPT,
    CopyHeaders,
    amqp_shortstr,
    encodable,
    read_copy_headers,
)

NOW = 1_800_000_000.0


def read(**headers: Any) -> CopyHeaders:
    names = {"attempt": HEADER_ATTEMPT, "base": HEADER_ATTEMPT_BASE,
             "first_seen": HEADER_FIRST_SEEN, "due_at": HEADER_DUE_AT}
    return read_copy_headers({names[k]: v for k, v in headers.items()}, now=NOW)


def test_no_headers_is_a_first_attempt() -> None:
    assert read_copy_headers({}, now=NOW) == CopyHeaders()


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1), (2, 2), (MAX_ATTEMPT, MAX_ATTEMPT), ("7", 7), (" 8 ", 8), (b"9", 9),
])
def test_attempt_within_range(value: object, expected: int) -> None:
    copy = read(attempt=value)
    assert (copy.attempt, copy.problem) == (expected, None)


@pytest.mark.parametrize("value", [0, -4, MAX_ATTEMPT + 1, 10**12, 2**63 - 1])
def test_attempt_out_of_range_parks(value: int) -> None:
    copy = read(attempt=value)
    assert copy.problem == (
        f"x-herald-attempt: {value} is out of range (1 to {MAX_ATTEMPT}; Herald sets it on"
        " its own copies; a publisher must not)")
    assert (copy.attempt, copy.base) == (1, 0)


@pytest.mark.parametrize("value", [True, False, 2.0, Decimal(3), "2.5", "", "abc", "-2",
                                   b"\xff", ["3"], {"a": 1}, None, "9" * 5000,
                                   datetime(2030, 1, 1, tzinfo=UTC)])
def test_attempt_that_is_not_a_whole_number_parks(value: object) -> None:
    copy = read(attempt=value)
    assert copy.problem is not None
    assert copy.problem.startswith("x-herald-attempt: ")
    assert "is not a whole number" in copy.problem
    assert len(copy.problem) < 200


@pytest.mark.parametrize(("attempt", "base", "ok"), [
    (1, 0, True), (5, 4, True), (300, 299, True), (5, 0, True),
    (1, 1, False), (5, 5, False), (5, 9, False), (5, -1, False),
])
def test_base_must_be_below_the_attempt(attempt: int, base: int, ok: bool) -> None:
    copy = read(attempt=attempt, base=base)
    if ok:
        assert (copy.attempt, copy.base, copy.problem) == (attempt, base, None)
    else:
        assert copy.problem is not None
        assert copy.problem.startswith("x-herald-attempt-base: ")
        assert (copy.attempt, copy.base) == (1, 0)


def test_base_without_attempt_is_out_of_range() -> None:
    assert read(base=3).problem is not None
    assert read(base=0).problem is None


def test_first_seen_and_due_at_within_range_are_kept() -> None:
    copy = read(first_seen=NOW - 60.5, due_at=int(NOW) + 3600)
    assert (copy.first_seen, copy.due_at, copy.ignored) == (NOW - 60.5, NOW + 3600, ())
    assert read(due_at=NOW + DUE_HORIZON_S).due_at == NOW + DUE_HORIZON_S
    assert read(due_at="1800000100").due_at == 1800000100.0
    assert read(due_at=Decimal("1800000100.5")).due_at == 1800000100.5
    assert read(due_at=0).due_at == 0  # long past: due now


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, -5, "soon", b"\xff",
                                   True, [1], NOW + DUE_HORIZON_S + 1, 2**70])
def test_unbelievable_due_at_is_ignored(value: object) -> None:
    copy = read(due_at=value)
    assert (copy.due_at, copy.problem, copy.ignored) == (None, None, (HEADER_DUE_AT,))


@pytest.mark.parametrize("value", [float("nan"), 0, -1, NOW + 2 * 86400, "x", None])
def test_unbelievable_first_seen_is_ignored(value: object) -> None:
    copy = read(first_seen=value)
    assert (copy.first_seen, copy.problem, copy.ignored) == (None, None, (HEADER_FIRST_SEEN,))


@given(st.dictionaries(
    st.sampled_from([HEADER_ATTEMPT, HEADER_ATTEMPT_BASE, HEADER_FIRST_SEEN, HEADER_DUE_AT,
                     "x-other"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
              st.binary(max_size=30), st.decimals(), st.lists(st.integers(), max_size=3))))
@settings(max_examples=500, deadline=None)
def test_any_headers_give_numbers_herald_can_store(headers: dict[str, Any]) -> None:
    copy = read_copy_headers(headers, now=NOW)
    assert 1 <= copy.attempt <= MAX_ATTEMPT
    assert 0 <= copy.base < copy.attempt
    for seconds in (copy.first_seen, copy.due_at):
        assert seconds is None or (math.isfinite(seconds) and seconds >= 0)
    if copy.problem is not None:
        assert (copy.attempt, copy.base) == (1, 0)
        assert "\n" not in copy.problem


# -- the AMQP message id --------------------------------------------------------------------


def test_message_id_that_fits_a_shortstr_is_kept() -> None:
    assert amqp_shortstr("é" * 127) == "é" * 127  # 254 bytes
    assert amqp_shortstr(None) is None


def test_message_id_over_255_bytes_is_left_out() -> None:
    assert amqp_shortstr("é" * 128) is None  # 128 characters, 256 bytes
    assert amqp_shortstr("\ud800") is None
    # A content type of 255 bytes that were not UTF-8, as read back: 765 bytes.
    assert amqp_shortstr("\ufffd" * 255) is None


# -- headers published again -----------------------------------------------------------------


def round_trip(headers: dict[str, Any]) -> dict[str, Any]:
    """Encode as the client does, decode as the broker's copy would be."""
    data = encode.field_table(headers)
    return dict(decode.field_table(data)[1])


def test_headers_the_client_cannot_encode_become_ones_it_can() -> None:
    decoded = {"raw": b"\xff\xfe", "big": 1e300, "small": 1.5, "huge": 2**70,
               "dec": Decimal("1.25"), "void": None, "nested": {"x": [b"\xff", 1e300]},
               "when": datetime(2030, 1, 1, tzinfo=UTC)}
    with pytest.raises((TypeError, OverflowError)):
        encode.field_table(decoded)
    fixed = encodable(decoded)
    again = round_trip(fixed)
    assert again["raw"] == bytearray(b"\xff\xfe")
    assert again["big"] == "1e+300"
    assert again["huge"] == str(2**70)
    assert again["small"] == 1.5
    assert again["dec"] == Decimal("1.25")
    assert again["nested"] == {"x": [bytearray(b"\xff"), "1e+300"]}


def test_headers_over_the_budget_lose_the_largest() -> None:
    headers = {"small": "x", "big": "y" * 100_000, "medium": "z" * 10_000}
    kept = encodable(headers)
    assert set(kept) == {"small", "medium"}
    assert encodable(headers, max_bytes=100) == {"small": "x"}
    assert len(encode.field_table(encodable({f"k{i}": "v" * 1000 for i in range(200)}))) \
        <= CARRIED_HEADERS_BYTES


def test_herald_own_headers_pass_unchanged() -> None:
    own = {HEADER_ATTEMPT: 3, HEADER_ATTEMPT_BASE: 2, HEADER_FIRST_SEEN: NOW,
           "x-herald-last-error": "timeout", "x-herald-error-code": ""}
    assert encodable(own) == own


# Values as pamqp hands them back from a frame (the types a broker can deliver).
_decoded_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(width=64), st.text(max_size=20), st.binary(max_size=20),
              st.decimals(places=2, min_value=-10**6, max_value=10**6)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20)


@given(st.dictionaries(st.text(max_size=20), _decoded_values, max_size=8))
@settings(max_examples=300, deadline=None)
def test_encodable_headers_always_encode(headers: dict[str, Any]) -> None:
    encode.field_table(encodable(headers))
