"""The operator tools' pure parts and their command line: no broker, no database."""

from __future__ import annotations

import argparse
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from consumer.admin.api import authenticate, parse_tokens
from consumer.cli.common import duration, moment, progress_bar
from consumer.errors import ConfigError
from consumer.logs import mask_tree
from consumer.parking.lot import LotError, Selection
from consumer.parking.passes import copy_id, index_row
from consumer.parking.replay import Edit, ReplayReport, edited_body
from consumer.records.campaigns import CampaignDefaults, message_id_for, requests_from_csv
from consumer.topology import Names
from tests.unit.test_cli import herald, one_line

# -- durations and times --------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400), ("12h", 43200), ("45m", 2700), ("90s", 90), ("2w", 14 * 86400),
    ("1.5h", 5400), (" 7D ", 7 * 86400)])
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["30", "d", "30x", "-1d", "1 d", "thirty days", ""])
def test_not_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_moments_are_ages_or_zoned_times() -> None:
    assert abs(moment("2h") - (datetime.now(UTC) - timedelta(hours=2))) < timedelta(seconds=5)
    assert moment("2026-11-23T10:00:00Z") == datetime(2026, 11, 23, 10, tzinfo=UTC)
    for bad in ("2026-11-23T10:00:00", "yesterday"):
        with pytest.raises(argparse.ArgumentTypeError):
            moment(bad)


def test_progress_bar() -> None:
    assert progress_bar(0, 4, width=8) == "[........]   0% 0/4"
    assert progress_bar(2, 4, width=8) == "[####....]  50% 2/4"
    assert progress_bar(4, 4, width=8) == "[########] 100% 4/4"
    assert progress_bar(0, 0, width=4) == "[####] 100% 0/0"


# -- admin tokens ---------------------------------------------------------------------


OPS = "abc123-q8Zr7LmX0pTw"
BOT = "zz9-Nq4Vb2Kc7HsD1f"
PLAIN = "plainTOKEN==x7Gq2Lm9"
VIEW = "view-8Hs2Lq0Zr5Tb3Mx"


def test_tokens_with_and_without_labels_and_roles() -> None:
    tokens = parse_tokens(f"ops:{OPS}, ci-bot:{BOT} ,{PLAIN}, night:viewer:{VIEW}")
    assert [t.label for t in tokens] == [
        "ops", "ci-bot", "sha256:" + hashlib.sha256(PLAIN.encode()).hexdigest()[:8], "night"]
    # Without a role a token is an operator (the format before roles existed).
    assert [t.role for t in tokens] == ["operator", "operator", "operator", "viewer"]
    assert authenticate(f"Bearer {OPS}", tokens) == tokens[0]
    assert authenticate(f"bearer {BOT}", tokens) == tokens[1]
    assert authenticate(f"Bearer {PLAIN}", tokens) == tokens[2]
    found = authenticate(f"Bearer {VIEW}", tokens)
    assert found is not None and found.label == "night" and not found.can_act
    # What looks like a label but is not one keeps the colon in the token.
    (odd,) = parse_tokens(f"1st:{OPS}")
    assert authenticate(f"Bearer 1st:{OPS}", [odd]) == odd
    # With a role, the token itself may hold colons.
    (coloned,) = parse_tokens(f"ops:operator:{OPS}:more")
    assert authenticate(f"Bearer {OPS}:more", [coloned]) == coloned


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", f"Basic {OPS}", f"Token {OPS}", f"Bearer {OPS}4",
    f"Bearer ops:{OPS}", f"Bearer{OPS}"])
def test_wrong_or_missing_bearer_tokens(header: str | None) -> None:
    assert authenticate(header, parse_tokens(f"ops:{OPS}")) is None


@pytest.mark.parametrize("raw, why", [
    (",", "holds no token"), (" , ", "holds no token"),
    (f"a:{OPS},a:{BOT}", "share a label"), (f"a:{OPS},b:{OPS}", "given twice"),
    (f"ops:veiwer:{OPS}", "role 'veiwer'"), (f"ops:admin:{OPS}", "role 'admin'"),
    ("ops:", "shorter than 16"), ("ops:viewer:", "is empty"),
    ("CHANGE-ME", "shorter than 16"), ("ops:short-token", "shorter than 16"),
    ("demo-admin-token", "placeholder"), ("please-CHANGE-ME-now-0000", "placeholder"),
    ("ops:<your-admin-token-here>", "placeholder"), ("replace-me-with-a-token", "placeholder"),
    ("${ADMIN_TOKEN_VALUE}", "placeholder"), ("aaaaaaaaaaaaaaaaaaaaaa", "repetitive"),
    ("ops:viewer:your-secret-token", "placeholder"), ("admin-secret-password", "placeholder"),
])
def test_bad_or_weak_token_configuration(raw: str, why: str) -> None:
    with pytest.raises(ConfigError, match="HERALD_ADMIN_TOKEN") as info:
        parse_tokens(raw)
    message = str(info.value)
    assert why in message
    assert "\n" not in message
    secret = raw.rsplit(":", 1)[-1]
    if len(secret) >= 4:
        assert secret not in message  # labels are named, tokens never


def test_weak_tokens_stop_start_up_with_one_line() -> None:
    from consumer.settings import Settings

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_ADMIN_TOKEN": "CHANGE-ME"})
    assert str(info.value).startswith("HERALD_ADMIN_TOKEN: ")
    assert "CHANGE-ME" not in str(info.value)
    settings = Settings.from_env({"HERALD_ADMIN_TOKEN": f"ops:{OPS},night:viewer:{VIEW}"})
    assert settings.admin_token == f"ops:{OPS},night:viewer:{VIEW}"


# -- selections, masking ----------------------------------------------------------------


def test_selection_conditions_and_description() -> None:
    since = datetime(2026, 11, 1, tzinfo=UTC)
    ids = (uuid.uuid4(),)
    selection = Selection(ids=ids, channel="sms", error_types=("network", "permission"),
                          campaign="c", recipient="+15551234567", since=since)
    params: list[Any] = ["first"]
    found = selection.conditions(params)
    assert found == ["p.parked_id = ANY($2::uuid[])", "p.channel = $3",
                     "p.error_type = ANY($4::text[])", "p.campaign_id = $5",
                     "p.recipient = $6", "p.parked_at >= $7"]
    assert params[1:] == [list(ids), "sms", ["network", "permission"], "c", "+15551234567",
                          since]
    assert Selection(error_types=("x",)).conditions([]) == ["p.error_type = $1"]
    shown = selection.describe()
    assert shown["recipient"] == "+15*******67"
    assert json.loads(json.dumps(shown))["since"] == since.isoformat()
    assert Selection().empty and not Selection(all=True).empty


def test_mask_tree_masks_recipients_at_any_depth() -> None:
    value = {"to": "+15551234567", "body": "hi", "raw": {"From": "+15557654321",
                                                        "list": [{"recipient": "1234567890123"}]}}
    assert mask_tree(value) == {"to": "+15*******67", "body": "hi", "raw": {
        "From": "+15*******21", "list": [{"recipient": "12*********23"}]}}


# -- copies the broker parked by itself ---------------------------------------------------


class _Copy:
    def __init__(self, body: bytes, headers: dict[str, Any], message_id: str | None = None):
        self.body = body
        self.headers = headers
        self.message_id = message_id
        self.timestamp = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def _dead_lettered(body: bytes, when: datetime) -> Any:
    return cast(Any, _Copy(body, {
        "x-herald-attempt": 2,
        "x-first-death-queue": "h.send.sms.bulk", "x-first-death-reason": "delivery_limit",
        "x-death": [{"queue": "h.send.sms.bulk", "reason": "delivery_limit", "count": 1,
                     "time": when, "routing-keys": ["send.sms.bulk"]}]}))


def test_a_dead_lettered_copy_gets_the_same_id_every_time_and_a_row() -> None:
    body = json.dumps({"message_id": "m-1", "channel": "sms", "to": "+15551234567",
                       "body": "hi", "campaign_id": "c"}).encode()
    when = datetime(2026, 11, 23, 7, 59, tzinfo=UTC)
    first, from_header = copy_id(_dead_lettered(body, when))
    assert not from_header
    assert copy_id(_dead_lettered(body, when))[0] == first
    assert copy_id(_dead_lettered(body, when + timedelta(seconds=1)))[0] != first
    assert copy_id(_dead_lettered(body + b" ", when))[0] != first
    row = index_row(_dead_lettered(body, when), first, Names("h"))
    assert {k: row[k] for k in ("message_id", "channel", "recipient", "campaign_id", "attempts",
                                "error_type", "error_code", "parked_at")} == {
        "message_id": "m-1", "channel": "sms", "recipient": "+15551234567", "campaign_id": "c",
        "attempts": 2, "error_type": "other", "error_code": "delivery_limit", "parked_at": when}
    assert "kept failing" in row["last_error"]
    assert row["headers"]["x-death"][0]["time"] == when.isoformat()


def test_a_copy_with_a_parked_id_header_keeps_it() -> None:
    parked_id = uuid.uuid4()
    copy = cast(Any, _Copy(b"{not json", {
        "x-herald-parked-id": str(parked_id).encode(), "x-herald-error-type": "invalid_payload",
        "x-herald-last-error": "not JSON", "x-herald-channel": "http",
        "x-herald-parked-at": "2026-11-23T08:00:00+00:00"}, message_id="amqp-id"))
    assert copy_id(copy) == (parked_id, True)
    row = index_row(copy, parked_id, Names("h"))
    assert (row["error_type"], row["channel"], row["message_id"], row["recipient"]) == (
        "invalid_payload", "http", "amqp-id", None)
    assert row["parked_at"] == datetime(2026, 11, 23, 8, tzinfo=UTC)


# -- edits ---------------------------------------------------------------------------


ORIGINAL = json.dumps({"message_id": "m-1", "channel": "http", "to": "http://h/x",
                       "body": {"text": "old"}}).encode()


def test_set_body_replaces_the_body_field_only() -> None:
    new = json.loads(edited_body(Edit(body='{"text": "new"}'), ORIGINAL, "http"))
    assert new == {"message_id": "m-1", "channel": "http", "to": "http://h/x",
                   "body": {"text": "new"}, "metadata": {}}
    assert json.loads(edited_body(Edit(body="plain words"), ORIGINAL, "http"))["body"] == (
        "plain words")
    sms = json.dumps({"message_id": "s", "channel": "sms", "to": "+15551234567",
                      "body": "x"}).encode()
    with pytest.raises(LotError, match="non-empty text"):
        edited_body(Edit(body=""), sms, "sms")
    with pytest.raises(LotError, match="--set-request"):
        edited_body(Edit(body="x"), b"{not json", "http")


def test_set_request_keeps_the_idempotency_key_of_a_valid_message() -> None:
    same = json.dumps({"message_id": "m-1", "channel": "http", "to": "http://h/y",
                       "body": 1}).encode()
    assert json.loads(edited_body(Edit(request=same), ORIGINAL, "http"))["to"] == "http://h/y"
    other = same.replace(b"m-1", b"m-2")
    with pytest.raises(LotError, match="must stay 'm-1'"):
        edited_body(Edit(request=other), ORIGINAL, "http")
    # An invalid original has no key to keep.
    assert json.loads(edited_body(Edit(request=other), b"{broken", "http"))["message_id"] == "m-2"
    with pytest.raises(LotError, match="channel"):
        edited_body(Edit(request=same), ORIGINAL, "sms")


def test_a_report_is_complete_only_when_nothing_was_left() -> None:
    assert ReplayReport(dry_run=False, selected=2, replayed=2).complete
    assert not ReplayReport(dry_run=False, not_found=1).complete
    assert not ReplayReport(dry_run=False, interrupted=True).complete
    assert not ReplayReport(dry_run=False, skipped=[{"id": "x"}]).complete


# -- campaigns and CSV ---------------------------------------------------------------------


def test_campaign_defaults_are_checked() -> None:
    CampaignDefaults("c", max_attempts=3, base_delay_s=1, max_delay_s=60,
                     retry_mode="manual").check()
    for bad in (CampaignDefaults(""), CampaignDefaults("c", max_attempts=0),
                CampaignDefaults("c", max_delay_s=0.5), CampaignDefaults("c", retry_mode="x")):
        with pytest.raises(ConfigError):
            bad.check()


def _csv(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.csv"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_rows_become_requests_with_stable_ids(tmp_path: Path) -> None:
    path = _csv(tmp_path, "\ufeffto,name,message_id\n+15551234567,Ada,\n"
                          "+15557654321,Grace,own-id\n+15551234567,Ada twice,\n")
    got = list(requests_from_csv(path, channel="sms", campaign_id="spring",
                                 template="Hi {name}", extra={"retry": {"max_attempts": 2}}))
    assert [(line, r["message_id"], r["body"]) for line, r in got] == [
        (2, message_id_for("spring", "+15551234567"), "Hi Ada"), (3, "own-id", "Hi Grace")]
    assert got[0][1]["retry"] == {"max_attempts": 2} and got[0][1]["campaign_id"] == "spring"
    assert message_id_for("spring", "+15551234567") == message_id_for("spring", "+15551234567")
    assert message_id_for("spring", "+15551234567") != message_id_for("autumn", "+15551234567")


@pytest.mark.parametrize(("text", "template", "problem"), [
    ("name\nAda\n", "Hi {name}", "no 'to' column"),
    ("to,name\n+15551234567,Ada\n", "Hi {nick}", "{nick} is not a column"),
    ("to,name\n+15551234567,Ada\n", "Hi {name", "--body-template"),
    ("to,name\n+15551234567,Ada\n", "Hi {0}", "plain {column} names"),
    ("to,name\n,Ada\n", "Hi {name}", ":2: empty 'to'"),
])
def test_csv_problems_are_named_before_anything_is_sent(
    tmp_path: Path, text: str, template: str, problem: str,
) -> None:
    with pytest.raises(ConfigError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        list(requests_from_csv(_csv(tmp_path, text), channel="sms", campaign_id="c",
                               template=template))


# -- the command line ------------------------------------------------------------------


BAD_OPERATOR_ARGUMENTS = [
    (("parked",), "required"),
    (("parked", "list", "--error-type", "bogus"), "bogus"),
    (("parked", "list", "--since", "yesterday"), "yesterday"),
    (("parked", "list", "--offset", "-5"), "-5"),
    (("parked", "replay", "--rate", "-1"), "-1"),
    (("parked", "replay", "--rate", "fast"), "fast"),
    (("parked", "reject", "abc"), "--reason"),
    (("parked", "purge"), "--older-than"),
    (("parked", "purge", "--older-than", "30x"), "30x"),
    (("prune", "--older-than", "90"), "'90'"),
    (("prune", "--older-than", "3d"), "at least 4d 49m 3s"),
    (("campaign", "create"), "campaign_id"),
    (("campaign", "create", "c", "--retry-mode", "sometimes"), "sometimes"),
    (("stats", "--recent", "0"), "'0'"),
]


@pytest.mark.parametrize(("args", "mentions"), BAD_OPERATOR_ARGUMENTS,
                         ids=[" ".join(a) for a, _ in BAD_OPERATOR_ARGUMENTS])
def test_bad_operator_arguments_exit_2_with_one_line(args: tuple[str, ...], mentions: str) -> None:
    result = herald(*args)
    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line.startswith("herald"), line
    assert mentions in line


def test_publish_csv_needs_campaign_and_template(tmp_path: Path) -> None:
    path = _csv(tmp_path, "to\n+15551234567\n")
    result = herald("publish", "--csv", path, "--channel", "sms")
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "herald: publish --csv: --campaign, --body-template required")
    result = herald("publish", "--csv", path, "--file", path)
    assert "--csv goes with --body-template" in one_line(result.stderr)


def test_operator_commands_without_a_database_say_so_in_one_line() -> None:
    result = herald("parked", "list")
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("herald: cannot reach the database")


def test_help_lists_the_operator_commands() -> None:
    result = herald("--help")
    for command in ("parked", "stats", "campaign", "prune"):
        assert command in result.stdout
    result = herald("parked", "replay", "--help")
    for flag in ("--dry-run", "--rate", "--no-reset-attempts", "--set-body", "--all"):
        assert flag in result.stdout


def test_the_deploy_files_ship_no_usable_admin_token() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    docs = list(yaml.safe_load_all((root / "deploy/k8s/config.yaml").read_text()))
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    with pytest.raises(ConfigError, match="placeholder"):
        parse_tokens(secret["stringData"]["HERALD_ADMIN_TOKEN"])
    compose = yaml.safe_load((root / "deploy/compose.yaml").read_text())
    # Off unless the person starting it gives tokens.
    assert compose["x-herald"]["environment"]["HERALD_ADMIN_TOKEN"] == "${HERALD_ADMIN_TOKEN:-}"
    run = (root / "deploy/local/run.sh").read_text()
    assert "demo-admin-token" not in run and "secrets.token_urlsafe" in run
