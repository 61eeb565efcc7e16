"""The Prometheus alert rules: the guide's rows, promtool's verdict, and the metrics they read.

`promtool test rules` runs deploy/prometheus/authpool-rules.test.yaml; this
module checks that every alert there has series that fire it and series that
do not, that each row of the guide's Alert Rules and Key Metrics tables has
its alert at the guide's severity, that the PrometheusRule is the rules file,
and that every metric and label the rules read is one the running server
exports.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml

from authpool_server.domain import SubscriptionStatus
from tests.deploy.conftest import DEPLOY, RULES, RULES_TEST, Scrape, label_matchers, metric_names, only, run

# The production guide's rows -> the alerts implementing them, and the severity it gives them.
GUIDE_ROWS = {
    # Alert Rules: critical (PagerDuty)
    "All subscriptions exhausted (100% fallback)": ("AuthPoolAllSubscriptionsExhausted", "critical"),
    "Error rate >5%": ("AuthPoolErrorRateCritical", "critical"),
    "Memory leak detected (growing >10% per hour)": ("AuthPoolMemoryLeak", "critical"),
    "Auth pool initialization failed": ("AuthPoolInitializationFailed", "critical"),
    # Alert Rules: warning (Slack)
    "Allocation success rate <95%": ("AuthPoolAllocationSuccessLow", "warning"),
    "Average health score <50": ("AuthPoolHealthLow", "warning"),
    "Webhook delivery failures": ("AuthPoolWebhookDeadLettered", "warning"),
    "Webhook delivery failures (ongoing)": ("AuthPoolWebhookDeliveryFailing", "warning"),
    "Rebalancing not occurring": ("AuthPoolRebalancingNotOccurring", "warning"),
    # Alert Rules: info (email)
    "Weekly budget 80% threshold crossed": ("AuthPoolBudgetThresholdCrossed", "info"),
    "New subscription added": ("AuthPoolSubscriptionAdded", "info"),
    "Config reloaded": ("AuthPoolConfigReloaded", "info"),
    # Key Metrics alert thresholds (the ones not already above)
    "Allocation Success Rate <90%": ("AuthPoolAllocationSuccessCritical", "critical"),
    "Average Health Score <50": ("AuthPoolHealthLow", "warning"),
    "Rebalancing Frequency <1 per hour": ("AuthPoolRebalancingNotOccurring", "warning"),
    "Failover Rate >10%": ("AuthPoolFailoverRateHigh", "warning"),
    "Response Time (p95) >1000ms": ("AuthPoolLatencyHigh", "warning"),
    "Memory Usage >1 GB": ("AuthPoolMemoryHigh", "warning"),
    "Error Rate >1%": ("AuthPoolErrorRateHigh", "warning"),
}
# Ours beyond the guide's rows: a config reload that was refused leaves the old config running.
EXTRA_ALERTS = {"AuthPoolConfigReloadRejected": "warning"}
# Made by Prometheus itself for every target, not by the server.
SCRAPE_METRICS = {"up"}


def alerts() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"] if "alert" in rule}


def test_promtool_accepts_the_rules(promtool: str) -> None:
    out = run([promtool, "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(alerts())} rules found" in out


def test_promtool_unit_tests_pass(promtool: str) -> None:
    out = run([promtool, "test", "rules", str(RULES_TEST)], cwd=RULES_TEST.parent)
    assert "SUCCESS" in out


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"
    assert (fired | quiet) - names == set(), "tests of alerts that do not exist"


def test_every_guide_row_has_its_alert_at_the_guides_severity() -> None:
    rules = alerts()
    for row, (alert, severity) in GUIDE_ROWS.items():
        assert alert in rules, f"{row}: no alert {alert}"
        assert rules[alert]["labels"]["severity"] == severity, row
    for alert, severity in EXTRA_ALERTS.items():
        assert rules[alert]["labels"]["severity"] == severity, alert
    assert set(rules) == {alert for alert, _ in GUIDE_ROWS.values()} | set(EXTRA_ALERTS), "an alert nobody asks for"
    for name, rule in rules.items():
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), name


def test_every_runbook_link_names_a_section_of_the_runbook() -> None:
    operations = (DEPLOY.parent / "docs" / "operations.md").read_text()
    anchors = set()
    for line in operations.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add("".join(c for c in title.replace(" ", "-") if c.isalnum() or c in "-_"))
    for name, rule in alerts().items():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md", name
        assert anchor in anchors, f"{name}: docs/operations.md has no section #{anchor}"


def test_the_prometheusrule_is_the_rules_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    generator = DEPLOY / "prometheus" / "prometheusrule.py"
    result = subprocess.run(
        [sys.executable, str(generator), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rule = only(rendered["monitoring"], "PrometheusRule")
    assert rule["spec"] == {"groups": yaml.safe_load(RULES.read_text())["groups"]}


def test_the_rules_read_only_metrics_and_labels_the_server_exports(exported: Scrape) -> None:
    for name, rule in alerts().items():
        expr = rule["expr"]
        unknown = metric_names(expr) - exported.names - SCRAPE_METRICS
        assert not unknown, f"{name} reads {sorted(unknown)}, which the server does not export"
        for metric, label in label_matchers(expr):
            if metric in SCRAPE_METRICS or label in {"job", "namespace", "instance"}:
                continue  # added by the scrape
            assert label in exported.labels[metric], f"{name}: {metric} has no label {label!r}"


def test_the_label_values_the_rules_match_are_the_ones_the_server_writes(exported: Scrape) -> None:
    # gRPC status codes are numbers ("0", "5"), not names: the rules' code regex depends on it.
    codes = exported.values("rpc_server_duration_seconds_count", "rpc_grpc_status_code")
    assert {"0", "5"} <= codes, codes
    assert "authpool.v1.AuthPool" in exported.values("rpc_server_duration_seconds_count", "rpc_service")
    assert {"new", "fallback"} <= exported.values("authpool_allocations_total", "decision")
    assert exported.values("authpool_subscription_status", "status") == {str(s) for s in SubscriptionStatus}
    assert "active" in {str(s) for s in SubscriptionStatus}
    assert "operator" in exported.values("authpool_rebalance_runs_total", "trigger")
    assert "retry" in exported.values("authpool_webhook_attempts_total", "result")


@pytest.mark.parametrize("alert", ["AuthPoolAllSubscriptionsExhausted", "AuthPoolInitializationFailed"])
def test_alerts_that_read_gauges_name_them_as_exported(alert: str, exported: Scrape) -> None:
    """The two pages that decide on a gauge being there at all: the gauge must really be there when serving."""
    assert "authpool_pool_health" in exported.names
    assert "authpool_subscription_status" in exported.names
    assert metric_names(alerts()[alert]["expr"]) <= exported.names | SCRAPE_METRICS
