"""Random mutations of the production guide's config template, fed to `load_config` and `authpool config check`.

Each mutated file is either accepted, and then the settings hold what the
rest of the server relies on, or refused with `ConfigError` whose every
problem starts with the path of a field in the JSON's own names
(`subscriptions[1].weeklyBudget: ...`), or with the file for a file-level
problem. Never another exception, never a traceback.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authpool_server.config import EXAMPLE_CONFIG, ConfigError, Settings, load_config
from tests.fuzz.support import fuzz_settings
from tests.unit.test_config import GUIDE_TEMPLATE

TEMPLATES = {"guide": json.loads(GUIDE_TEMPLATE), "example": json.loads(EXAMPLE_CONFIG.read_text())}
# `name`, `name[0]`, `name.sub[2].leaf`: JSON names, as an operator reads them in the file.
_SEGMENT = r"\[\d+\]|\[\"(?:[^\"\\]|\\.)*\"\]"  # [1] or ["odd key"]
FIELD_PATH = re.compile(rf"(?:[A-Za-z_][\w-]*|{_SEGMENT})(?:\.[A-Za-z_][\w-]*|{_SEGMENT})*")
ENV_NAMES = ("WEEKLY_BUDGET", "LOG_LEVEL", "LOG_FORMAT", "AUTHPOOL_", "AUTH_POOL_")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 15, 456, 10**30, -(10**30), 0.85, 1.0000001, 1e308, -0.0, 1.1234567]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\u202e",
            "../../../etc/passwd",
            "~/../escape",
            "~root/x",
            "/etc",
            "prod-sub1",
            "fallback",
            "https://169.254.169.254/latest/meta-data/",
            "http://hooks.company.com/x",
            "https://metadata.google.internal/computeMetadata/v1/",
            "https://[fd00:ec2::254]/",
            "not an email",
            "claude-pro",
            "monday",
            "Mars/Olympus",
            "2026-01-07T09:30:00",
            "x" * 5000,
        ]
    ),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """One of the templates with one to three random edits: replace, delete, add an unknown key, duplicate."""
    doc = copy.deepcopy(TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths)) if paths else ()
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1] if path else None
        edit = draw(st.sampled_from(["replace", "replace", "delete", "unknown", "duplicate"]))
        if key is None:
            continue
        if edit == "replace":
            parent[key] = draw(json_values)
        elif edit == "delete":
            del parent[key]
        elif edit == "unknown" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["weeklyBuget", "extra", "", "configDIR"]))] = draw(json_values)
        elif edit == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return doc


def _load(tmp_path: Path, doc: dict[str, Any]) -> Settings:
    path = tmp_path / "auth-pool.json"
    path.write_text(json.dumps(doc))
    return load_config(path, env={})


def _outcome(tmp_path: Path, doc: dict[str, Any]) -> Settings | ConfigError:
    try:
        return _load(tmp_path, doc)
    except ConfigError as error:  # anything else fails the test, with its traceback
        return error


def _check_problem(problem: str, source: Path) -> None:
    assert "Traceback" not in problem
    assert "pydantic" not in problem.lower()
    if problem.startswith(str(source)) or problem.startswith(ENV_NAMES):
        return
    path, sep, message = problem.partition(": ")
    assert sep, f"no field path in {problem!r}"
    assert path == "<root>" or FIELD_PATH.fullmatch(path), f"{path!r} is not a field path ({problem!r})"
    assert message.strip(), problem


def _check_settings(settings: Settings, root: Path) -> None:
    pool = settings.pool
    assert pool.subscriptions
    assert len({s.id for s in pool.subscriptions}) == len(pool.subscriptions)
    assert len({s.credential_ref for s in pool.subscriptions}) == len(pool.subscriptions)
    for sub in pool.subscriptions:
        assert sub.weekly_budget_micros > 0
        assert sub.max_clients >= 1
        # Whatever the file said, a credential directory is inside the credentials root.
        assert Path(os.path.realpath(sub.credential_ref)).is_relative_to(
            os.path.realpath(settings.raw.credentials_root)
        )
    assert 0 < pool.threshold_ppm <= 1_000_000
    assert pool.lease_ttl_seconds > 0
    if settings.webhooks is not None:
        assert settings.webhooks.url.lower().startswith(("https://", "http://"))
    del root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "creds"
    path.mkdir(exist_ok=True)
    return Path(os.path.realpath(path))


@fuzz_settings(150)
@given(doc=mutated())
def test_a_mutated_template_is_accepted_whole_or_refused_field_by_field(
    tmp_path: Path, root: Path, doc: dict[str, Any]
) -> None:
    if isinstance(doc, dict) and "credentialsRoot" not in doc:
        doc["credentialsRoot"] = str(root)
    outcome = _outcome(tmp_path, doc)
    if isinstance(outcome, ConfigError):
        assert outcome.problems
        for problem in outcome.problems:
            _check_problem(problem, tmp_path / "auth-pool.json")
        assert str(outcome).splitlines() == [line for p in outcome.problems for line in p.splitlines()]
        return
    settings = outcome
    _check_settings(settings, root)


# -- the CLI, for a few cases -----------------------------------------------------------------

CLI_CASES = {
    "budget-negative": (("subscriptions", 1, "weeklyBudget"), -5, "subscriptions[1].weeklyBudget"),
    "budget-string": (("subscriptions", 0, "weeklyBudget"), "456", "subscriptions[0].weeklyBudget"),
    "config-dir-traversal": (("subscriptions", 2, "configDir"), "~/../../etc", "subscriptions[2].configDir"),
    "webhook-metadata": (
        ("notifications", "webhookUrl"),
        "https://169.254.169.254/latest/meta-data/iam",
        "notifications.webhookUrl",
    ),
    "rules-not-a-list": (("notifications", "rules"), {"type": "failover"}, "notifications.rules"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_config_check_refuses_with_exit_2_and_names_the_field(tmp_path: Path, root: Path, case: str) -> None:
    where, value, field = CLI_CASES[case]
    doc = copy.deepcopy(TEMPLATES["guide"])
    doc["credentialsRoot"] = str(root)
    target: Any = doc
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = value
    path = tmp_path / "auth-pool.json"
    path.write_text(json.dumps(doc))

    done = subprocess.run(
        [sys.executable, "-m", "authpool_server", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )

    assert done.returncode == 2, done
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert f"{field}: " in output
    if "169.254" in str(value):
        assert "169.254.169.254/latest" not in output, "the URL is echoed"


@pytest.mark.parametrize(
    ("key", "shown"),
    [("", 'subscriptions[0][""]'), ("a.b", 'subscriptions[0]["a.b"]'), ("weeklyBuget", "subscriptions[0].weeklyBuget")],
)
def test_an_unknown_key_is_shown_so_that_it_reads_as_one_key(tmp_path: Path, root: Path, key: str, shown: str) -> None:
    """Once `subscriptions[0].: unknown field` for "", and `subscriptions[0].a.b` (a nested path) for "a.b"."""
    doc = copy.deepcopy(TEMPLATES["guide"])
    doc["credentialsRoot"] = str(root)
    doc["subscriptions"][0][key] = 1

    outcome = _outcome(tmp_path, doc)

    assert isinstance(outcome, ConfigError)
    assert [p.partition(": ")[0] for p in outcome.problems] == [shown]
