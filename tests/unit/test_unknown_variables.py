"""Unknown ``HERALD_*`` variables (consumer/settings.py ``unknown_variables``): one
warning each, naming the closest setting; the tooling's own variables are left alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from consumer.settings import (
    TOOLING_PREFIXES,
    TOOLING_VARIABLES,
    known_variables,
    unknown_variables,
)

REPO = Path(__file__).resolve().parents[2]
# Where HERALD_* names are used: the service, its deployment, the scripts and tests.
SCANNED = ["consumer", "schemas", "deploy", "tests", "bench", ".ci", "docs", "Makefile",
           "Dockerfile", "README.md"]
NAME_RE = re.compile(r"\bHERALD_[A-Z0-9_]*[A-Z0-9]\b")
# Wrong names written on purpose, as examples of a typo or of a removed setting.
EXAMPLES = {"HERALD_PREFECH", "HERALD_GONE"}


@pytest.mark.parametrize(("typo", "meant"), [
    ("HERALD_PREFECH", "HERALD_PREFETCH"),
    ("HERALD_ADMIN_TOKENS", "HERALD_ADMIN_TOKEN"),
    ("HERALD_DATABASE", "HERALD_DATABASE_URL"),
    ("HERALD_SMS_RATES", "HERALD_SMS_RATE"),
    ("HERALD_TWILIO_TOKEN", "HERALD_TWILIO_AUTH_TOKEN"),
    ("HERALD_MAX_ATTEMPT", "HERALD_MAX_ATTEMPTS"),
])
def test_a_typo_gets_one_line_naming_it_and_the_closest_setting(typo: str, meant: str) -> None:
    (warning,) = unknown_variables({typo: "3", "HERALD_PREFIX": "p"})
    assert warning.startswith(f"{typo} is not a Herald setting")
    assert warning.endswith(f"did you mean {meant}?")
    assert "\n" not in warning


def test_a_name_like_no_setting_says_so() -> None:
    (warning,) = unknown_variables({"HERALD_ZZZZQQ": "1"})
    assert warning == "HERALD_ZZZZQQ is not a Herald setting and is ignored; " \
                      "no setting has a similar name"


def test_values_are_never_shown() -> None:
    (warning,) = unknown_variables({"HERALD_TWILIO_AUTH_TOKN": "s3cr3t-Value-42"})
    assert "s3cr3t" not in warning


def test_a_strange_name_stays_on_one_line() -> None:
    (warning,) = unknown_variables({"HERALD_X\nINJECTED": "1"})
    assert "\n" not in warning and warning.startswith("'HERALD_X\\nINJECTED'")


def test_settings_other_variables_and_the_tooling_are_not_warned_about() -> None:
    environ = {var: "x" for var in known_variables()} | {
        "PATH": "/bin", "HERALDRY": "1", "herald_prefetch": "1", "HERALD_NO_DEMO": "1",
        "HERALD_LOCAL_PG_PORT": "5433", "HERALD_LOCAL_ANYTHING_NEW": "1",
        "HERALD_SANDBOX_FUTURE": "1"}
    assert unknown_variables(environ) == []


def test_several_are_reported_in_order() -> None:
    found = unknown_variables({"HERALD_PREFECH": "1", "HERALD_AMQP": "1", "HERALD_PREFIX": "p"})
    assert [w.split()[0] for w in found] == ["HERALD_AMQP", "HERALD_PREFECH"]


def test_without_a_mapping_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERALD_PREFECH", "1")
    assert any(w.startswith("HERALD_PREFECH ") for w in unknown_variables())


def _used_names() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for entry in SCANNED:
        root = REPO / entry
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            if path == Path(__file__) or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for name in NAME_RE.findall(text):
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_herald_variable_used_in_the_repository_is_a_setting_or_the_toolings() -> None:
    used = _used_names()
    assert "HERALD_LOCAL_PG_PORT" in used and "HERALD_NO_DEMO" in used  # the scan sees them
    stray = {name: sorted(where) for name, where in used.items()
             if name not in known_variables() and name not in TOOLING_VARIABLES
             and name not in EXAMPLES
             and not name.startswith(TOOLING_PREFIXES)}
    assert stray == {}, ("HERALD_* names that are neither a setting nor listed as the "
                         f"tooling's in consumer/settings.py: {stray}")


def test_the_cli_warns_once_on_stderr_and_still_works() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    environ |= {"HERALD_PREFECH": "16", "HERALD_LOCAL_PG_PORT": "5433"}
    result = subprocess.run([sys.executable, "-m", "consumer", "topology", "export"],
                            cwd=REPO, env=environ, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("{")  # stdout stays clean for redirection
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "settings.unknown_variable" in lines[0] and "HERALD_PREFECH" in lines[0]
    assert "HERALD_PREFETCH" in lines[0] and "HERALD_LOCAL_PG_PORT" not in lines[0]
