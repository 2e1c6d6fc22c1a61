"""The Prometheus recording and alert rules (deploy/prometheus/) under `promtool check rules` and
`promtool test rules`. promtool comes from Debian's prometheus package (scripts/setup_prometheus.sh); without
it these tests skip with the reason, unless OODGUARD_REQUIRE_PROMTOOL=1 (set by .ci/run): then they fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from missing import missing
import yaml

from oodguard.serve import metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        missing("promtool is not installed; run `bash scripts/setup_prometheus.sh`", "OODGUARD_REQUIRE_PROMTOOL")
    return binary


def run(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_check_rules_and_config(promtool):
    assert "SUCCESS" in run(promtool, "check", "rules", "rules.yml")
    assert "SUCCESS" in run(promtool, "check", "config", "prometheus.yml")


def test_promtool_rule_unit_tests(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "rules_test.yml")


def test_every_alert_has_a_firing_and_a_silent_case():
    rules = yaml.safe_load((DEPLOY / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "rules_test.yml").read_text())["tests"]
    fires, silent = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - fires == set(), "alerts without a case where they fire"
    assert alerts - silent == set(), "alerts without a case where they stay silent"


def test_flagged_rate_alert_uses_the_calibrated_rate_and_a_minimum_count():
    rules = yaml.safe_load((DEPLOY / "rules.yml").read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "OODGuardFlaggedRateAboveCalibration")
    assert "oodguard:calibrated_flag_rate_upper:max" in rule["expr"] and "sqrt(" in rule["expr"]
    assert ">= 200" in rule["expr"]


def test_rules_name_only_metrics_the_gateway_exports():
    # the unit tests feed made-up series: a metric renamed in serve/metrics.py would silently never alert
    source = Path(metrics.__file__).read_text()
    names = set(re.findall(r"\boodguard_[a-z_]+", (DEPLOY / "rules.yml").read_text()))
    assert {"oodguard_queue_reachable", "oodguard_queue_spool_backlog", "oodguard_queue_stats_up"} <= names
    family = {n: re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names}
    unexported = {n for n in names if f'"{family[n]}"' not in source}
    assert not unexported, f"rules.yml names metrics serve/metrics.py does not export: {sorted(unexported)}"
