"""The command line and settings of retry rules, escalation and campaign completion:
bad input is one line, before anything is connected."""

from __future__ import annotations

import pytest

from consumer.errors import ConfigError
from consumer.records.retry_rules import RuleSpec, describe
from consumer.settings import Settings
from tests.unit.test_cli import herald, one_line

BAD = [
    (("retry-rules",), "required"),
    (("retry-rules", "set", "--code", "30003"), "--max-attempts"),
    (("retry-rules", "set", "--code", "30003", "--max-attempts", "0"), "'0'"),
    (("retry-rules", "set", "--error-type", "invalid_recipient", "--max-attempts", "2"),
     "invalid_recipient"),
    (("retry-rules", "set", "--code", "1", "--max-attempts", "2", "--base-delay", "-1"),
     "'-1'"),
    (("retry-rules", "remove", "abc"), "'abc'"),
    (("escalation", "add", "x", "--to", "https://h/x"), "--to-channel"),
    (("escalation", "add", "x", "--to-channel", "pager", "--to", "y"), "pager"),
    (("escalation", "add", "x", "--to-channel", "http", "--to", "https://h/x", "--window",
      "5x"), "5x"),
    (("escalation", "remove"), "rule"),
]


@pytest.mark.parametrize(("args", "mentions"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(args: tuple[str, ...], mentions: str) -> None:
    result = herald(*args)
    assert result.returncode == 2, result
    line = one_line(result.stderr)
    assert line.startswith("herald") and mentions in line, line


@pytest.mark.parametrize(("spec", "why"), [
    (RuleSpec(3), "names a --channel, an --error-type or a --code"),
    (RuleSpec(3, channel="fax"), "--channel"),
    (RuleSpec(3, error_type="invalid_recipient"), "never retried"),
    (RuleSpec(0, code="30003"), "--max-attempts"),
    (RuleSpec(3, code="x" * 101), "--code"),
    (RuleSpec(3, code="30003\n"), "--code"),
    (RuleSpec(3, code="30003", base_delay_s=60, max_delay_s=30), "must not exceed"),
    (RuleSpec(3, code="30003", max_delay_s=10**6), "--max-delay"),
])
def test_bad_rules_are_one_line(spec: RuleSpec, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        spec.check()
    assert "\n" not in str(caught.value)


def test_a_rule_in_words() -> None:
    row = {"campaign_id": "spring", "channel": "sms", "error_type": None, "error_code": "30003",
           "max_attempts": 3, "base_delay_s": 3600.0, "max_delay_s": None, "note": "night"}
    assert describe(row) == ("campaign spring sms code 30003: 3 attempts, delay 3600s to -"
                             "  (night)")


@pytest.mark.parametrize(("var", "value"), [("HERALD_RETRY_RULES", "sometimes"),
                                            ("HERALD_CAMPAIGN_QUIET_S", "0"),
                                            ("HERALD_CAMPAIGN_QUIET_S", "soon")])
def test_bad_settings_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: value})
    assert Settings.from_env({}).retry_rules == "builtin"
    assert Settings.from_env({}).campaign_quiet_s == 300
