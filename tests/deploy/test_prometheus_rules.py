"""deploy/prometheus: the rules pass `promtool check rules`, their unit tests
pass `promtool test rules`, every alert has a case that fires and one that
does not, and every metric the rules read is one Herald exports.

promtool comes from the Debian package `prometheus`, which `make services`
installs (deploy/local/prometheus.sh install). A missing promtool fails these
tests: it is never a reason to skip them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import consumer.metrics as metrics
from tests.conftest import REPO
from tests.deploy.metric_names import exported_metric_names

RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "herald-rules.yaml"
RULE_TESTS = RULES_DIR / "herald-rules.test.yaml"
EXPECTED_ALERTS = {
    "HeraldDown", "HeraldParkingLotGrowing", "HeraldRetryRateHigh", "HeraldChannelPaused",
    "HeraldBacklogAgeHigh", "HeraldQueueWithoutConsumer", "HeraldWebhookSignatureFailures",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `deploy/local/prometheus.sh install` "
                    "(make services does) to install the Debian package prometheus")
    return path


def run_promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    output = run_promtool("check", "rules", RULES.name, cwd=RULES_DIR)
    assert "SUCCESS" in output


def test_promtool_unit_tests_pass() -> None:
    output = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULES_DIR)
    assert "SUCCESS" in output


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == EXPECTED_ALERTS
    fires: set[str] = set()
    silent: set[str] = set()
    for case in load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - fires == set(), "alerts with no test case where they fire"
    assert alerts - silent == set(), "alerts with no test case where they stay silent"


def test_alerts_have_severity_and_text() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_only_read_metrics_herald_exports() -> None:
    exported = exported_metric_names()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        for name in re.findall(r"\b(herald_[a-z0-9_]+|herald:[a-z0-9_:]+)", rule["expr"]):
            known = name in recorded if ":" in name else name in exported
            assert known, f"{rule.get('record') or rule.get('alert')} reads unknown {name}"


def test_readme_documents_every_metric() -> None:
    """Every metric in consumer/metrics.py has a row (name and labels) in the README's table."""
    readme = (REPO / "README.md").read_text()
    rows = {line for line in readme.splitlines() if line.startswith("| `herald_")}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name = value._name + ("_total" if value._type == "counter" else "")
        row = next((r for r in rows if f"`{name}`" in r), None)
        assert row is not None, f"README.md's metrics table has no row for {name}"
        labels = row.split("|")[2]
        for label in value._labelnames:
            assert label in labels, f"README.md: {name} row does not name label {label}"
