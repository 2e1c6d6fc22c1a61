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


def test_the_ood_rate_alerts_use_two_windows_the_calibrated_rate_and_a_minimum_count():
    """A page and a ticket, each ANDing a long and a short window, both burning against p0's upper bound, with
    a minimum count, in the group that records their windows (rules of one group run in order)."""
    rules = yaml.safe_load((DEPLOY / "rules.yml").read_text())
    group = next(g for g in rules["groups"] if g["name"] == "oodguard.ood_rate")
    by_name = {r.get("alert") or r["record"]: r for r in group["rules"]}
    page, ticket = by_name["OODGuardFlaggedRateAboveCalibration"], by_name["OODGuardFlaggedRateDrift"]
    assert page["labels"]["severity"] == "page" and ticket["labels"]["severity"] == "ticket"
    for rule, windows, minimum in ((page, ("15m", "5m"), ">= 100"), (ticket, ("6h", "1h"), ">= 1000")):
        for window in windows:
            assert f"oodguard:flagged_burn:{window}" in rule["expr"] and f"oodguard:flagged_burn:{window}" in by_name
        assert minimum in rule["expr"] and "oodguard:flagged_excess_z:" in rule["expr"]
    assert "calibrated_flag_rate:max" in by_name["oodguard:flagged_burn:15m"]["expr"]
    assert page["expr"].count(">= oodguard:calibrated_flag_rate_upper:max") == 2  # both windows above p0u
    order = [r.get("alert") or r["record"] for r in group["rules"]]
    assert order.index("OODGuardFlaggedRateAboveCalibration") > order.index("oodguard:flagged_excess_z:6h")


def test_rules_name_only_metrics_the_gateway_exports():
    # the unit tests feed made-up series: a metric renamed in serve/metrics/ would silently never alert
    source = "".join(p.read_text() for p in sorted(Path(metrics.__file__).parent.glob("*.py")))  # the package
    names = set(re.findall(r"\boodguard_[a-z_]+", (DEPLOY / "rules.yml").read_text()))
    assert {"oodguard_queue_reachable", "oodguard_queue_spool_backlog", "oodguard_queue_stats_up"} <= names
    family = {n: re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names}
    unexported = {n for n in names if f'"{family[n]}"' not in source}
    assert not unexported, f"rules.yml names metrics serve/metrics/ does not export: {sorted(unexported)}"
