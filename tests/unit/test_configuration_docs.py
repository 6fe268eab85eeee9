"""docs/configuration.md is generated from the settings (consumer/settings_reference.py)
and must not drift from them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from consumer import settings_reference
from consumer.settings import Settings, known_variables
from consumer.settings_reference import meanings, render

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "configuration.md"


def test_the_committed_page_is_the_generated_one() -> None:
    assert PAGE.read_text() == render(), (
        "docs/configuration.md is stale: python -m consumer.settings_reference "
        "> docs/configuration.md")


def test_every_setting_appears_once_with_its_default_and_what_it_accepts() -> None:
    page = render()
    for var in known_variables():
        rows = [line for line in page.splitlines() if line.startswith(f"| `{var}` |")]
        assert len(rows) == 1, var
    row = next(line for line in page.splitlines() if line.startswith("| `HERALD_PREFETCH` |"))
    assert "| `256` |" in row and "a whole number from 1 to 65535" in row
    row = next(line for line in page.splitlines()
               if line.startswith("| `HERALD_RETRY_MODE` |"))
    assert "one of auto, manual" in row
    row = next(line for line in page.splitlines()
               if line.startswith("| `HERALD_TWILIO_AUTH_TOKEN` |"))
    assert "| unset |" in row


def test_each_row_has_four_cells() -> None:
    for line in render().splitlines():
        if line.startswith("| `HERALD_"):
            assert len(re.split(r"(?<!\\)\|", line)) == 6, line


def test_a_setting_without_a_meaning_fails_the_render(monkeypatch: pytest.MonkeyPatch) -> None:
    trimmed = [(title, [(v, m) for v, m in rows if v != "HERALD_PREFETCH"])
               for title, rows in settings_reference.SECTIONS]
    monkeypatch.setattr(settings_reference, "SECTIONS", trimmed)
    with pytest.raises(ValueError, match="HERALD_PREFETCH"):
        render()


def test_a_meaning_of_no_setting_fails_the_render(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = [*settings_reference.SECTIONS, ("Gone", [("HERALD_GONE", "removed")])]
    monkeypatch.setattr(settings_reference, "SECTIONS", extra)
    with pytest.raises(ValueError, match="HERALD_GONE"):
        render()


def test_every_parser_says_what_it_accepts() -> None:
    for f in dataclasses.fields(Settings):
        assert (f.metadata["parse"].__doc__ or "").strip(), f.metadata["env"]
    assert set(meanings()) == set(known_variables())
