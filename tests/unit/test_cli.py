"""The ``herald`` CLI (consumer/cli.py) as a user meets it: a real process.

Each case runs ``python -m consumer ...`` with an environment holding no
``HERALD_*`` variable except the ones the test sets. The broker URL points at
a closed port, so a case that wrongly got as far as connecting fails instead
of finding a broker by accident. None of these needs a broker or a database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Value-42"


def herald(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    environ["HERALD_AMQP_URL"] = "amqp://guest:guest@127.0.0.1:1/"
    environ["HERALD_DATABASE_URL"] = "postgresql://herald:herald@127.0.0.1:1/herald"
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=60, check=False,
    )


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, repr(stderr)
    return stderr.rstrip("\n")


BAD_ARGUMENTS = [
    ((), "required"),
    (("pigeon",), "pigeon"),
    (("run", "--bogus"), "--bogus"),
    (("topology",), "required"),
    (("topology", "frobnicate"), "frobnicate"),
    (("topology", "export", "--extra"), "--extra"),
    (("publish", "--channel", "pigeon"), "pigeon"),
    (("publish", "--max-attempts", "many"), "many"),
    (("sandbox", "--port", "eighty"), "eighty"),
    (("run", "--channels", "x"), "'x'"),
    (("run", "--channels", "sms,pigeon"), "'pigeon'"),
]


@pytest.mark.parametrize(("args", "mentions"), BAD_ARGUMENTS,
                         ids=[" ".join(a) or "<none>" for a, _ in BAD_ARGUMENTS])
def test_bad_argument_exits_2_with_one_line(args: tuple[str, ...], mentions: str) -> None:
    result = herald(*args)
    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line.startswith("herald"), line
    assert mentions in line
    assert result.stdout == ""


def test_unknown_channel_line_lists_the_valid_ones() -> None:
    line = one_line(herald("publish", "--channel", "pigeon").stderr)
    assert "--channel" in line
    for channel in ("http", "sms", "whatsapp", "messenger"):
        assert channel in line


@pytest.mark.parametrize(
    "args",
    [
        ("publish", "--channel", "sms"),  # --to and --body missing
        ("publish", "--channel", "sms", "--to", "+15551234567", "--body", ""),  # empty text
        ("publish", "--channel", "sms", "--to", "+15551234567", "--body", "hi",
         "--send-at", "2030-01-01T10:00:00"),  # no time zone
    ],
)
def test_invalid_publish_request_exits_2_before_connecting(args: tuple[str, ...]) -> None:
    result = herald(*args)
    assert result.returncode == 2, result
    assert one_line(result.stderr).startswith("herald: publish")


def test_bad_config_variable_exits_2_with_one_line_naming_it() -> None:
    result = herald("topology", "export", HERALD_PREFETCH="abc")
    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line == "herald: HERALD_PREFETCH: must be a whole number (got 'abc')"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("HERALD_HTTP_PORT", "70000"),
        ("HERALD_PREFIX", "bad prefix"),
        ("HERALD_RETRY_MODE", "sometimes"),
        ("HERALD_AMQP_URL", f"http://guest:{SECRET}@127.0.0.1/"),
        ("HERALD_AMQP_URL", f"amqp://guest:{SECRET}@[::1/"),
    ],
)
def test_bad_config_never_shows_a_traceback_or_a_password(var: str, value: str) -> None:
    result = herald("topology", "export", **{var: value})
    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line.startswith(f"herald: {var}: ")
    assert SECRET not in result.stderr


def test_base_delay_above_max_is_a_config_error() -> None:
    result = herald("topology", "export", HERALD_BASE_DELAY_S="100", HERALD_MAX_DELAY_S="10")
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("herald: HERALD_BASE_DELAY_S: ")


def test_topology_export_needs_no_broker_and_uses_the_prefix() -> None:
    result = herald("topology", "export", HERALD_PREFIX="clitest", HERALD_DELIVERY_LIMIT="9")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    definitions = json.loads(result.stdout)
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    assert queues["clitest.send.sms"]["x-delivery-limit"] == 9
    assert "clitest.parked" in queues
    assert {e["name"] for e in definitions["exchanges"]} >= {"clitest", "clitest.delay.17"}
    assert all(name.startswith("clitest") for name in queues)


def test_help_exits_0_and_lists_the_commands() -> None:
    result = herald("--help")
    assert result.returncode == 0
    for command in ("run", "migrate", "topology", "publish", "sandbox"):
        assert command in result.stdout


def test_publish_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    result = herald("publish", "--file", str(missing))
    assert result.returncode == 2, result
    assert one_line(result.stderr) == (
        f"herald: --file: cannot read {missing}: No such file or directory"
    )


def test_publish_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"to": "caf\xe9"}\n')
    result = herald("publish", "--file", str(path))
    assert result.returncode == 2, result
    assert "is not UTF-8" in one_line(result.stderr)


def test_publish_file_names_the_bad_line_before_sending_anything(tmp_path: Path) -> None:
    path = tmp_path / "campaign.jsonl"
    good = {"message_id": "a", "channel": "sms", "to": "+15551234567", "body": "hi"}
    lines = [json.dumps(good), "", json.dumps({**good, "message_id": "b", "channel": "pigeon"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = herald("publish", "--file", str(path))
    assert result.returncode == 2, result
    assert one_line(result.stderr).startswith(f"herald: {path}:3: channel: ")


def test_publish_file_with_a_line_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"message_id": "a",\n', encoding="utf-8")
    result = herald("publish", "--file", str(path))
    assert result.returncode == 2, result
    assert one_line(result.stderr).startswith(f"herald: {path}:1: not JSON: ")


@pytest.mark.parametrize(("line", "says"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    (json.dumps({"message_id": "a", "channel": "http", "to": "https://example.com/",
                 "body": {"k": "v\x00"}}), "body: body.k contains NUL"),
    (json.dumps({"message_id": "é" * 128, "channel": "sms", "to": "+15551234567",
                 "body": "hi"}), "message_id: is 256 bytes in UTF-8"),
])
def test_publish_file_with_a_hostile_line(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "hostile.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    result = herald("publish", "--file", str(path))
    assert result.returncode == 2, result
    assert one_line(result.stderr).startswith(f"herald: {path}:1: {says}")
