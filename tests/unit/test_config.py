"""Tests for authpool_server.config: the guide's template, overrides, and every rule."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from authpool_server.config import EXAMPLE_CONFIG, ConfigError, Settings, load_config

# The production guide's "Configuration Template", verbatim: it must keep loading.
GUIDE_TEMPLATE = """\
{
  "subscriptions": [
    {
      "id": "prod-sub1",
      "email": "team+sub1@company.com",
      "type": "claude-pro",
      "configDir": "~/.claude-prod-sub1",
      "weeklyBudget": 456,
      "maxClientsPerSub": 15
    },
    {
      "id": "prod-sub2",
      "email": "team+sub2@company.com",
      "type": "claude-pro",
      "configDir": "~/.claude-prod-sub2",
      "weeklyBudget": 456,
      "maxClientsPerSub": 15
    },
    {
      "id": "prod-sub3",
      "email": "team+sub3@company.com",
      "type": "claude-pro",
      "configDir": "~/.claude-prod-sub3",
      "weeklyBudget": 456,
      "maxClientsPerSub": 15
    }
  ],
  "maxClientsPerSubscription": 15,
  "weeklyBudgetThreshold": 0.85,
  "fallbackWhenExhausted": true,
  "rebalancing": {
    "enabled": true,
    "intervalSeconds": 300,
    "costGapThreshold": 5.0,
    "maxClientsToMovePerCycle": 3
  },
  "notifications": {
    "rules": [
      {
        "type": "usage_threshold",
        "threshold": 0.8,
        "channels": ["webhook"],
        "enabled": true
      },
      {
        "type": "usage_threshold",
        "threshold": 0.9,
        "channels": ["webhook"],
        "enabled": true
      },
      {
        "type": "failover",
        "channels": ["webhook"],
        "enabled": true
      },
      {
        "type": "rotation",
        "channels": ["log"],
        "enabled": false
      }
    ],
    "webhookUrl": "https://your-webhook-endpoint.company.com/notify"
  }
}
"""

DELETE = object()  # marks a key to remove in `edit`


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A credentials root, so no test depends on the real home directory."""
    path = tmp_path / "creds"
    path.mkdir()
    return Path(os.path.realpath(path))


def guide_doc(root: Path) -> dict[str, Any]:
    doc = json.loads(GUIDE_TEMPLATE)
    doc["credentialsRoot"] = str(root)
    return doc


def edit(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


def load_doc(tmp_path: Path, doc: Any, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "auth-pool.json"
    path.write_text(json.dumps(doc))
    return load_config(path, env={} if env is None else env)


def problems_of(tmp_path: Path, doc: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_doc(tmp_path, doc, env)
    return caught.value.problems


# --- what must load ----------------------------------------------------------


def test_guide_template_loads_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "auth-pool.json"
    path.write_text(GUIDE_TEMPLATE)
    settings = load_config(path, env={})
    pool = settings.pool
    home = Path(os.path.realpath(Path.home()))

    assert [s.id for s in pool.subscriptions] == ["prod-sub1", "prod-sub2", "prod-sub3"]
    assert [s.weekly_budget_micros for s in pool.subscriptions] == [456_000_000] * 3
    assert [s.max_clients for s in pool.subscriptions] == [15] * 3
    assert pool.subscriptions[0].credential_ref == str(home / ".claude-prod-sub1")
    assert pool.threshold_ppm == 850_000
    assert pool.fallback_when_exhausted is True
    assert pool.rebalancing.cost_gap_micros == 5_000_000
    assert pool.rebalancing.interval_seconds == 300
    assert pool.rebalancing.max_moves_per_cycle == 3
    assert settings.raw.notifications.webhook_url == "https://your-webhook-endpoint.company.com/notify"
    assert [str(r.threshold) for r in settings.raw.notifications.rules] == ["0.8", "0.9", "None", "None"]
    assert settings.source == path
    assert settings.listen == "127.0.0.1:50051"


def test_defaults_for_our_additions(tmp_path: Path, root: Path) -> None:
    settings = load_doc(tmp_path, guide_doc(root))
    assert settings.pool.lease_ttl_seconds == 60
    assert settings.pool.usage_retention_seconds == 7 * 86_400
    assert settings.pool.event_retention_seconds == 7 * 86_400
    assert settings.pool.rebalancing.idle_seconds == 300
    assert settings.pool.fallback.id == "fallback"
    assert settings.pool.fallback.type == "pay-as-you-go"
    assert settings.data_dir == Path.cwd() / "var"
    assert (settings.log_level, settings.log_format) == ("info", "text")


def test_packaged_example_loads_when_nothing_is_named() -> None:
    settings = load_config(env={})
    assert settings.source == EXAMPLE_CONFIG
    assert [s.id for s in settings.pool.subscriptions] == ["local-sub1", "local-sub2", "local-sub3"]
    assert all(s.email.endswith("@company.com") for s in settings.pool.subscriptions)


def test_auth_pool_config_names_the_file_and_an_explicit_path_wins(tmp_path: Path, root: Path) -> None:
    path = tmp_path / "from-env.json"
    path.write_text(json.dumps(guide_doc(root)))
    assert load_config(env={"AUTH_POOL_CONFIG": str(path)}).source == path
    assert load_config(EXAMPLE_CONFIG, env={"AUTH_POOL_CONFIG": str(path)}).source == EXAMPLE_CONFIG


@pytest.mark.parametrize(
    ("budget", "micros"),
    [(456, 456_000_000), (12.5, 12_500_000), (0.1, 100_000), (0.000001, 1), (19.99, 19_990_000)],
)
def test_budget_becomes_exact_micros(tmp_path: Path, root: Path, budget: float, micros: int) -> None:
    doc = edit(guide_doc(root), ("subscriptions", 0, "weeklyBudget"), budget)
    assert load_doc(tmp_path, doc).pool.subscriptions[0].weekly_budget_micros == micros


def test_max_clients_defaults_to_the_top_level_value(tmp_path: Path, root: Path) -> None:
    doc = edit(guide_doc(root), ("subscriptions", 1, "maxClientsPerSub"), DELETE)
    doc["maxClientsPerSubscription"] = 4
    assert [s.max_clients for s in load_doc(tmp_path, doc).pool.subscriptions] == [15, 4, 15]


@pytest.mark.parametrize(
    ("config_dir", "expected"),
    [
        ("~/.claude-a", ".claude-a"),
        ("~", "."),
        ("relative/dir", "relative/dir"),
        ("./dot/./parts", "dot/parts"),
    ],
)
def test_config_dir_resolves_under_credentials_root(tmp_path: Path, root: Path, config_dir: str, expected: str) -> None:
    doc = edit(guide_doc(root), ("subscriptions", 0, "configDir"), config_dir)
    ref = load_doc(tmp_path, doc).pool.subscriptions[0].credential_ref
    assert ref == os.path.normpath(root / expected)


def test_absolute_config_dir_inside_root_and_symlink_inside_root_are_fine(tmp_path: Path, root: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    doc = edit(guide_doc(root), ("subscriptions", 0, "configDir"), str(root / "abs"))
    doc = edit(doc, ("subscriptions", 1, "configDir"), "alias/sub")
    subs = load_doc(tmp_path, doc).pool.subscriptions
    assert subs[0].credential_ref == str(root / "abs")
    assert subs[1].credential_ref == str(root / "real" / "sub")


# --- environment overrides -----------------------------------------------------


def test_weekly_budget_overrides_every_subscription(tmp_path: Path, root: Path) -> None:
    doc = edit(guide_doc(root), ("subscriptions", 2, "weeklyBudget"), DELETE)
    settings = load_doc(tmp_path, doc, env={"WEEKLY_BUDGET": "100.5"})
    assert [s.weekly_budget_micros for s in settings.pool.subscriptions] == [100_500_000] * 3


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.1234567", "nan"])
def test_invalid_weekly_budget_is_reported_by_name(tmp_path: Path, root: Path, value: str) -> None:
    problems = problems_of(tmp_path, guide_doc(root), env={"WEEKLY_BUDGET": value})
    assert len(problems) == 1
    assert problems[0].startswith("WEEKLY_BUDGET: ")


def test_data_dir_env_overrides_the_file(tmp_path: Path, root: Path) -> None:
    settings = load_doc(tmp_path, guide_doc(root), env={"AUTHPOOL_DATA_DIR": str(tmp_path / "data")})
    assert settings.data_dir == tmp_path / "data"


@pytest.mark.parametrize(
    ("env", "level", "fmt"),
    [
        ({}, "info", "text"),
        ({"LOG_LEVEL": "debug", "LOG_FORMAT": "json"}, "debug", "json"),
        ({"LOG_LEVEL": "WARN"}, "warning", "text"),
        ({"LOG_LEVEL": "warning"}, "warning", "text"),
        ({"LOG_LEVEL": "Error", "LOG_FORMAT": "TEXT"}, "error", "text"),
    ],
)
def test_log_settings(tmp_path: Path, root: Path, env: dict[str, str], level: str, fmt: str) -> None:
    settings = load_doc(tmp_path, guide_doc(root), env=env)
    assert (settings.log_level, settings.log_format) == (level, fmt)


@pytest.mark.parametrize(
    ("env", "name"),
    [({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"), ({"LOG_FORMAT": "xml"}, "LOG_FORMAT")],
)
def test_invalid_log_settings_are_reported(tmp_path: Path, root: Path, env: dict[str, str], name: str) -> None:
    problems = problems_of(tmp_path, guide_doc(root), env=env)
    assert len(problems) == 1
    assert problems[0].startswith(f"{name}: ")


# --- what must be rejected -------------------------------------------------------

INVALID = [
    pytest.param(("subscriptions", 1, "id"), "prod-sub1", "subscriptions[1].id", "duplicate", id="dup-id"),
    pytest.param(("subscriptions", 0, "id"), "Prod Sub!", "subscriptions[0].id", "a-z", id="id-chars"),
    pytest.param(("subscriptions", 0, "id"), "", "subscriptions[0].id", "a-z", id="id-empty"),
    pytest.param(("subscriptions", 0, "id"), "fallback", "subscriptions[0].id", "fallback", id="id-fallback"),
    pytest.param(("subscriptions", 0, "email"), "not-an-email", "subscriptions[0].email", "email", id="email"),
    pytest.param(("subscriptions", 0, "type"), "", "subscriptions[0].type", "empty", id="type-empty"),
    pytest.param(
        ("subscriptions", 2, "weeklyBudget"), -1, "subscriptions[2].weeklyBudget", "greater than 0", id="budget<0"
    ),
    pytest.param(("subscriptions", 2, "weeklyBudget"), 0, "subscriptions[2].weeklyBudget", "greater", id="budget0"),
    pytest.param(
        ("subscriptions", 0, "weeklyBudget"), 1.1234567, "subscriptions[0].weeklyBudget", "6", id="budget-places"
    ),
    pytest.param(
        ("subscriptions", 0, "weeklyBudget"), "456", "subscriptions[0].weeklyBudget", "number", id="budget-str"
    ),
    pytest.param(
        ("subscriptions", 0, "weeklyBudget"), DELETE, "subscriptions[0].weeklyBudget", "required", id="no-budget"
    ),
    pytest.param(
        ("subscriptions", 1, "maxClientsPerSub"), 0, "subscriptions[1].maxClientsPerSub", "at least 1", id="max0"
    ),
    pytest.param(
        ("subscriptions", 1, "maxClientsPerSub"), 1.5, "subscriptions[1].maxClientsPerSub", "integer", id="max-frac"
    ),
    pytest.param(("subscriptions",), [], "subscriptions", "at least one", id="no-subscriptions"),
    pytest.param(("subscriptions",), DELETE, "subscriptions", "required", id="subscriptions-missing"),
    pytest.param(("maxClientsPerSubscription",), 0, "maxClientsPerSubscription", "at least 1", id="top-max0"),
    pytest.param(("weeklyBudgetThreshold",), 0, "weeklyBudgetThreshold", "greater than 0", id="threshold0"),
    pytest.param(("weeklyBudgetThreshold",), 1.5, "weeklyBudgetThreshold", "at most 1", id="threshold1.5"),
    pytest.param(("fallbackWhenExhausted",), "yes", "fallbackWhenExhausted", "true or false", id="bool-str"),
    pytest.param(
        ("rebalancing", "intervalSeconds"), 0, "rebalancing.intervalSeconds", "greater than 0", id="interval0"
    ),
    pytest.param(("rebalancing", "costGapThreshold"), -1, "rebalancing.costGapThreshold", "at least 0", id="gap"),
    pytest.param(
        ("rebalancing", "maxClientsToMovePerCycle"), -1, "rebalancing.maxClientsToMovePerCycle", "0", id="moves"
    ),
    pytest.param(
        ("notifications", "webhookUrl"),
        "http://hooks.company.com/notify",
        "notifications.webhookUrl",
        "must be an https:// URL",
        id="http-webhook",
    ),
    pytest.param(("notifications", "webhookUrl"), "ftp://x", "notifications.webhookUrl", "https", id="ftp"),
    pytest.param(("notifications", "webhookUrl"), DELETE, "notifications.webhookUrl", "required", id="webhook-missing"),
    pytest.param(
        ("notifications", "rules", 0, "threshold"),
        1.5,
        "notifications.rules[0].threshold",
        "at most 1",
        id="rule-threshold",
    ),
    pytest.param(
        ("notifications", "rules", 1, "threshold"),
        DELETE,
        "notifications.rules[1].threshold",
        "required for usage_threshold",
        id="usage-without-threshold",
    ),
    pytest.param(
        ("notifications", "rules", 2, "threshold"),
        0.5,
        "notifications.rules[2].threshold",
        "only applies",
        id="failover-with-threshold",
    ),
    pytest.param(
        ("notifications", "rules", 0, "channels"),
        ["email"],
        "notifications.rules[0].channels[0]",
        "'webhook' or 'log'",
        id="bad-channel",
    ),
    pytest.param(("notifications", "rules", 3, "type"), "reboot", "notifications.rules[3].type", "failover", id="type"),
    pytest.param(
        ("subscriptions", 0, "weeklyBuget"), 1, "subscriptions[0].weeklyBuget", "'weeklyBudget'", id="typo-nested"
    ),
    pytest.param(("rebalanceing",), {}, "rebalanceing", "'rebalancing'", id="typo-top"),
    pytest.param(
        ("subscriptions", 1, "configDir"), "~/../etc", "subscriptions[1].configDir", "must not contain '..'", id="dots"
    ),
    pytest.param(("subscriptions", 1, "configDir"), "a/../../b", "subscriptions[1].configDir", "'..'", id="dots-inner"),
    pytest.param(
        ("subscriptions", 1, "configDir"), "/etc/claude", "subscriptions[1].configDir", "credentialsRoot", id="abs"
    ),
    pytest.param(("subscriptions", 1, "configDir"), "~other/x", "subscriptions[1].configDir", "~user", id="tilde-user"),
    pytest.param(
        ("subscriptions", 1, "configDir"), "~/.claude-prod-sub1", "subscriptions[1].configDir", "same", id="same-dir"
    ),
    pytest.param(("credentialsRoot",), "relative/root", "credentialsRoot", "absolute", id="relative-root"),
    pytest.param(("listen",), "localhost", "listen", "host:port", id="listen"),
    pytest.param(("leaseTtlSeconds",), 0, "leaseTtlSeconds", "greater than 0", id="ttl"),
    pytest.param(("usageRetentionDays",), -1, "usageRetentionDays", "greater than 0", id="retention"),
]


@pytest.mark.parametrize(("where", "value", "field_path", "fragment"), INVALID)
def test_each_invalid_value_is_one_problem_at_its_path(
    tmp_path: Path, root: Path, where: tuple[str | int, ...], value: Any, field_path: str, fragment: str
) -> None:
    problems = problems_of(tmp_path, edit(guide_doc(root), where, value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field_path}: "), problems
    assert fragment in problems[0]


@pytest.mark.parametrize("config_dir", ["escape", "escape/sub", "~/escape", "inside/../escape"])
def test_config_dir_through_a_symlink_out_of_root_is_rejected(tmp_path: Path, root: Path, config_dir: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    problems = problems_of(tmp_path, edit(guide_doc(root), ("subscriptions", 0, "configDir"), config_dir))
    assert len(problems) == 1
    assert problems[0].startswith("subscriptions[0].configDir: ")
    assert "'..'" in problems[0] or "symlink" in problems[0]


def test_tilde_means_the_credentials_root_not_home(tmp_path: Path, root: Path) -> None:
    # An absolute path under $HOME is outside a root that is not $HOME.
    home_path = str(Path.home() / ".claude-prod-sub1")
    problems = problems_of(tmp_path, edit(guide_doc(root), ("subscriptions", 0, "configDir"), home_path))
    assert [p.split(":")[0] for p in problems] == ["subscriptions[0].configDir"]


def test_all_problems_are_reported_together(tmp_path: Path, root: Path) -> None:
    doc = guide_doc(root)
    doc = edit(doc, ("subscriptions", 0, "email"), "nope")
    doc = edit(doc, ("subscriptions", 1, "configDir"), "../x")
    doc = edit(doc, ("subscriptions", 2, "id"), "prod-sub1")
    doc = edit(doc, ("rebalancing", "intervalSeconds"), -5)
    doc = edit(doc, ("notifications", "webhookUrl"), "http://hooks.company.com")
    problems = problems_of(tmp_path, doc, env={"LOG_FORMAT": "xml"})
    assert [p.split(": ")[0] for p in problems] == [
        "LOG_FORMAT",
        "subscriptions[0].email",
        "subscriptions[1].configDir",
        "subscriptions[2].id",
        "rebalancing.intervalSeconds",
        "notifications.webhookUrl",
    ]


@pytest.mark.parametrize(
    ("where", "value", "line"),
    [
        (("subscriptions", 1, "configDir"), "../x", "subscriptions[1].configDir: must not contain '..'"),
        (("rebalancing", "intervalSeconds"), 0, "rebalancing.intervalSeconds: must be greater than 0"),
        (("weeklyBudgetThreshold",), 1.5, "weeklyBudgetThreshold: must be at most 1"),
    ],
)
def test_problem_lines_read_as_documented(
    tmp_path: Path, root: Path, where: tuple[str | int, ...], value: Any, line: str
) -> None:
    assert problems_of(tmp_path, edit(guide_doc(root), where, value)) == [line]


def test_config_error_prints_one_problem_per_line_and_no_traceback(tmp_path: Path, root: Path) -> None:
    doc = edit(guide_doc(root), ("weeklyBudgetThreshold",), 2)
    doc = edit(doc, ("rebalancing", "intervalSeconds"), 0)
    with pytest.raises(ConfigError) as caught:
        load_doc(tmp_path, doc)
    assert str(caught.value).splitlines() == caught.value.problems
    assert "Traceback" not in str(caught.value)
    assert "pydantic" not in str(caught.value)


# --- the file itself -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{\n  "subscriptions": [\n  }\n', "line 3"),
        ('{"a": 1,}', "line 1"),
        ("", "line 1"),
        ('{"subscriptions": [], "subscriptions": []}', "duplicate key 'subscriptions'"),
        ('{"weeklyBudgetThreshold": NaN}', "NaN"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_unusable_json_is_reported_with_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "auth-pool.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: ")
    assert fragment in problem


@pytest.mark.parametrize("via_env", [False, True])
def test_missing_file(tmp_path: Path, via_env: bool) -> None:
    missing = tmp_path / "nope.json"
    path, env = (None, {"AUTH_POOL_CONFIG": str(missing)}) if via_env else (missing, {})
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env)
    assert caught.value.problems == [f"{missing}: file not found"]
    assert caught.value.source == missing
