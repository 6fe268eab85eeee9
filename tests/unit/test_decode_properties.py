"""Properties of the pipeline's decoder over arbitrary input (hypothesis).

Whatever the bytes, ``decode_request`` returns, never raises: either a request
that PostgreSQL and AMQP can carry, or a one-line reason to park the message.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumer.delivery.pipeline import decode_request
from schemas import SendRequest
from schemas.send_request import MAX_NESTING, json_problem

CHANNELS = ("http", "sms", "whatsapp", "messenger")

# Text that includes what PostgreSQL refuses (NUL), what terminals obey (ESC),
# and characters of every width in UTF-8.
text = st.text(st.characters(codec="utf-8") | st.sampled_from("\x00\x1b\n\u202e😀é"),
               max_size=40)
numbers = (st.integers(min_value=-(10**400), max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([Decimal("1e-400"), Decimal("1e400"), Decimal("-0.0"),
                              Decimal("1e-300")]))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=30)


def nested(value: Any, depth: int) -> Any:
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


deep_values = st.builds(nested, json_values, st.integers(min_value=0, max_value=400))


def dumps(value: Any) -> str:
    """JSON text, numbers written as given (NaN, Infinity, 1e-400 included)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return json.dumps(value, allow_nan=True)
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"


def requests() -> st.SearchStrategy[dict[str, Any]]:
    """Send requests, most of them nearly valid, with any field swapped for anything."""
    valid = st.fixed_dictionaries({
        "message_id": st.text(min_size=1, max_size=210) | st.just("m-1"),
        "channel": st.sampled_from(CHANNELS),
        "to": st.sampled_from(["+15551234567", "https://example.com/hook", "psid-1"]) | text,
        "body": json_values | deep_values,
    }, optional={
        "campaign_id": text | st.none(),
        "metadata": st.dictionaries(text, json_values | deep_values, max_size=3),
        "retry": st.fixed_dictionaries({}, optional={"max_attempts": numbers,
                                                     "base_delay_s": numbers}),
        "send_at": text | st.just("2030-01-01T00:00:00Z"),
        "priority": st.sampled_from(["high", "normal", "urgent"]),
    })
    swaps = st.dictionaries(st.sampled_from(["message_id", "to", "body", "unknown"]),
                            json_values | deep_values, max_size=2)
    return st.builds(lambda base, swapped: base | swapped, valid, swaps)


def check(raw: bytes, channel: str) -> None:
    request, reason = decode_request(raw, channel)
    if request is None:
        assert reason, "a refusal needs a reason"
        assert "\n" not in reason and "\r" not in reason and "\x00" not in reason
        assert len(reason) <= 1000
        return
    assert reason == ""
    assert isinstance(request, SendRequest) and request.channel == channel
    assert len(request.message_id.encode("utf-8")) <= 255
    for field in (request.message_id, request.to, request.campaign_id or ""):
        assert "\x00" not in field
    assert json_problem(request.body, "body") is None
    assert json_problem(request.metadata, "metadata") is None
    # The text PostgreSQL is given: every number a float holds (or a true zero).
    document = json.loads(raw, parse_float=Decimal, parse_int=Decimal,
                          parse_constant=lambda token: _fail(f"constant {token}"))
    _numbers_fit(document, 0)


def _fail(why: str) -> Any:
    raise AssertionError(why)


def _numbers_fit(value: Any, depth: int) -> None:
    assert depth <= MAX_NESTING + 2
    if isinstance(value, Decimal):
        as_float = float(value)
        assert math.isfinite(as_float)
        assert as_float != 0.0 or value == 0
    elif isinstance(value, dict):
        for item in value.values():
            _numbers_fit(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _numbers_fit(item, depth + 1)


@given(st.binary(max_size=2000), st.sampled_from(CHANNELS))
@settings(max_examples=1000, deadline=None)
@example(b"[" * 100_000, "http")
@example(b'{"message_id": "m", "channel": "http", "to": "x", "body": ' + b"[" * 100_000, "http")
@example(b"\xef\xbb\xbf{}", "sms")
def test_any_bytes(raw: bytes, channel: str) -> None:
    check(raw, channel)


@given(json_values | deep_values, st.sampled_from(CHANNELS))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_document(document: Any, channel: str) -> None:
    check(dumps(document).encode(), channel)


@given(requests())
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_send_request(request: dict[str, Any]) -> None:
    raw = dumps(request).encode("utf-8", "surrogatepass")
    channel = request["channel"] if request.get("channel") in CHANNELS else "http"
    check(raw, channel)
    # Truncated anywhere, it is still answered.
    for cut in (1, len(raw) // 3, len(raw) - 1):
        check(raw[:cut], channel)


def test_the_strategies_reach_both_answers() -> None:
    """The properties above would hold vacuously if every example were refused."""
    accepted = refused = 0

    @given(requests())
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    def count(request: dict[str, Any]) -> None:
        nonlocal accepted, refused
        raw = dumps(request).encode("utf-8", "surrogatepass")
        found, _ = decode_request(raw, str(request.get("channel")))
        if found is None:
            refused += 1
        else:
            accepted += 1

    count()
    assert accepted >= 10 and refused >= 10, (accepted, refused)
