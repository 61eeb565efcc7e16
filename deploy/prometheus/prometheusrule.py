"""Write deploy/k8s/monitoring/prometheusrule.yaml from deploy/prometheus/authpool-rules.yaml.

The rules are kept once, in the plain Prometheus rules file; the Prometheus
operator's PrometheusRule is generated from it (`make k8s` runs this), and
tests/deploy fails when the generated copy is stale.

Usage: python deploy/prometheus/prometheusrule.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "authpool-rules.yaml"
TARGET = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/authpool-rules.yaml by deploy/prometheus/prometheusrule.py
# (`make k8s`): edit the rules file, never this one. If your Prometheus operator selects
# rules by label (ruleSelector, e.g. release: prometheus), add that label in your overlay.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so the generated file reads like the source."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(rules_text: str) -> str:
    """The PrometheusRule document for the rules in `rules_text`."""
    rules: dict[str, Any] = yaml.safe_load(rules_text)
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "authpool", "labels": {"app.kubernetes.io/name": "authpool"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the generated file is stale")
    args = parser.parse_args(argv)
    text = render(RULES.read_text(encoding="utf-8"))
    if args.check:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run `make k8s`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
