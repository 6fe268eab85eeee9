"""Untrusted text made storable and printable (consumer/text.py), and the
operator output that uses it (CLI human output, JSON output)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from consumer.cli.common import counts, cut, print_json
from consumer.text import printable, storable

HOSTILE = ("\x1b[2J\x1b[31mred\x07\rover\x00nul\x08\x7f\x9b31m\u202egnp.exe\u2028x"
           "\u2066iso\u2069\x0b\x0c\x1c")
CONTROL = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    "\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def _raw_controls(text: str, *, allowed: str = "") -> set[str]:
    return {c for c in text if c in CONTROL and c not in allowed}


def test_storable_replaces_what_postgresql_refuses() -> None:
    assert storable("a\x00b") == "a\ufffdb"
    assert storable("x\ud800y\udfffz") == "x\ufffdy\ufffdz"
    assert storable("plain é ✓ 🎉") == "plain é ✓ 🎉"
    text = storable("\x00" * 10 + "\ud83d")  # a lone high surrogate, as json.loads makes it
    text.encode("utf-8")  # encodable: PostgreSQL (and asyncpg) take it


def test_storable_caps_length() -> None:
    assert storable("abcdef", 4) == "abc…"
    assert storable("abcd", 4) == "abcd"
    assert len(storable("x" * 10_000, 300)) == 300


def test_storable_from_a_json_answer_can_be_stored() -> None:
    answer = json.loads('{"id": "abc\\u0000\\ud800def"}')
    assert "\x00" in answer["id"]
    cleaned = storable(answer["id"])
    assert "\x00" not in cleaned
    cleaned.encode("utf-8")


def test_printable_escapes_every_control_character() -> None:
    shown = printable(HOSTILE)
    assert _raw_controls(shown) == set()
    assert "\\x1b[2J" in shown and "\\r" in shown and "\\x00" in shown
    assert "\\x9b" in shown and "\\u202e" in shown and "\\u2028" in shown
    assert "red" in shown and "gnp.exe" in shown  # the text itself stays readable


@pytest.mark.parametrize("char", sorted(CONTROL))
def test_printable_escapes_each_control_character(char: str) -> None:
    assert _raw_controls(printable(f"a{char}b")) == set()


def test_printable_keeps_newlines_and_tabs_only_when_asked() -> None:
    assert printable("a\nb\tc") == "a\\nb\\tc"
    assert printable("a\nb\tc\r\x1b", newlines=True) == "a\nb\tc\\r\\x1b"


def test_printable_leaves_ordinary_text_alone() -> None:
    text = "Hello, wörld — 你好 ✓ 🎉 +15551234567 https://h.example/x?a=1"
    assert printable(text) == text


def test_cli_cells_and_counts_are_escaped() -> None:
    assert _raw_controls(cut(HOSTILE, 500)) == set()
    assert cut("\x1b[31m" + "x" * 100, 10).startswith("\\x1b[31m")
    assert len(cut("\x1b" * 100, 10)) == 10
    assert _raw_controls(counts({HOSTILE: 3, "network": 1})) == set()


def test_json_output_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    print_json({"last_error": HOSTILE, "to": "\x1b]0;title\x07", "n": 1})
    out = capsys.readouterr().out
    assert _raw_controls(out, allowed="\n") == set()
    assert json.loads(out)["last_error"] == HOSTILE  # escaped, not lost


def test_admin_json_answers_escape_control_characters() -> None:
    from aiohttp import web

    response = web.json_response({"recipient": HOSTILE})
    assert response.body is not None
    body = bytes(response.body).decode()  # type: ignore[arg-type]
    assert _raw_controls(body) == set()
    assert json.loads(body) == {"recipient": HOSTILE}


def _status(**message: Any) -> Any:
    from consumer.records.history import Entry, MessageStatus

    base: dict[str, Any] = {
        "message_id": "m-1", "status": "failed", "channel": "http", "provider": "http",
        "provider_message_id": None, "recipient": "https://h.example/x", "campaign_id": None,
        "attempts": 1, "next_attempt_at": None, "last_error_type": None,
        "last_error_code": None, "last_error": None,
    }
    from consumer.records.history import STATUS_TIMES

    base |= {f"{s}_at": None for s in STATUS_TIMES}
    base |= message
    at = datetime(2026, 1, 1, tzinfo=UTC)
    entry = Entry(at=at, kind="attempt", what=HOSTILE, detail={})
    return MessageStatus(message=base, history=[entry])


def test_herald_status_escapes_untrusted_fields() -> None:
    from consumer.cli.status import render

    status = _status(message_id="m\x1b[2J", provider_message_id="id\r\x00",
                     campaign_id="c\u202e", last_error_type="provider_error",
                     last_error_code="5\x1b", last_error=HOSTILE + "\nstatus    delivered")
    for reveal in (False, True):
        text = render(status, reveal=reveal)
        assert _raw_controls(text, allowed="\n") == set()
        # No untrusted text starts a line of its own that looks like Herald's.
        assert not any(line.startswith("status    delivered") for line in text.splitlines())
    revealed = render(_status(recipient="+1555\x1b[8m1234567"), reveal=True)
    assert "\\x1b[8m" in revealed


def test_parked_show_body_keeps_its_lines_but_escapes_the_rest() -> None:
    from consumer.cli.parked import _indent

    shown = _indent("line one\x1b[31m\nline two\r\x9b")
    assert shown.split("\n") == ["  line one\\x1b[31m", "  line two\\r\\x9b"]
    shown = _indent({"body": "\x85next\u202e", "n": 1})
    assert _raw_controls(shown, allowed="\n") == set()
