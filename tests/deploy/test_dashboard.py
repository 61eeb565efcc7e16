"""The Grafana dashboard: the guide's five panel groups, each query valid PromQL on exported metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import DASHBOARD, Scrape, grafana_to_promql, label_matchers, metric_names, run

# The guide's "Grafana Dashboard Panels": group -> panel -> visualisation.
GUIDE_PANELS = {
    "Allocation": {
        "Allocation success rate": "timeseries",
        "Subscription distribution": "piechart",
        "Fallback usage": "barchart",
    },
    "Health": {
        "Per-subscription health": "gauge",
        "Average pool health": "timeseries",
        "Status distribution": "barchart",
    },
    "Cost": {
        "Weekly usage per subscription": "timeseries",
        "Projected end-of-week cost": "timeseries",
        "Cost distribution": "piechart",
    },
    "Performance": {
        "Response time percentiles": "timeseries",
        "Allocation latency": "heatmap",
        "Rebalancing duration": "timeseries",
    },
    "System": {"Memory usage": "timeseries", "CPU usage": "timeseries", "Error rate": "timeseries"},
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def groups() -> dict[str, list[dict[str, Any]]]:
    """Panels under each row, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    current = None
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            current = out.setdefault(panel["title"], [])
        else:
            assert current is not None, f"panel {panel['title']!r} is above the first row"
            current.append(panel)
    return out


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"{panel['title']}/{target['refId']}", target["expr"])
        for panels in groups().values()
        for panel in panels
        for target in panel["targets"]
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            inner = variable["query"]["query"].removeprefix("label_values(").rpartition(",")[0]
            found.append((f"${variable['name']}", inner))
    return found


def test_the_five_groups_hold_the_guides_panels() -> None:
    found = {row: {p["title"]: p["type"] for p in panels} for row, panels in groups().items()}
    assert found == GUIDE_PANELS


def test_panels_are_laid_out_and_queried_like_a_grafana_import_expects() -> None:
    document = dashboard()
    assert document["uid"] == "authpool"
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    for panels in groups().values():
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert panel["description"], panel["title"]
            assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
            assert [t["refId"] for t in panel["targets"]] == [chr(ord("A") + i) for i in range(len(panel["targets"]))]


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables filled in) as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)} for i, (_, expr) in enumerate(queries())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run([promtool, "check", "rules", str(path)])


def test_every_query_names_only_metrics_and_labels_the_server_exports(exported: Scrape) -> None:
    used = set()
    for where, expr in queries():
        names = metric_names(grafana_to_promql(expr))
        assert names, f"{where} names no metric"
        assert names <= exported.names, f"{where} reads {sorted(names - exported.names)}, not exported"
        used |= names
        for metric, label in label_matchers(expr):
            assert label == "job" or label in exported.labels[metric], f"{where}: {metric} has no label {label!r}"
    # The guide's Key Metrics each have a panel.
    assert {
        "authpool_allocations_total",
        "authpool_pool_health",
        "authpool_rebalance_duration_seconds_sum",
        "rpc_server_duration_seconds_bucket",
        "authpool_process_memory_bytes",
        "process_cpu_seconds_total",
        "rpc_server_duration_seconds_count",
    } <= used
