"""Fixtures for the deployment tests: the tools, the rendered manifests, and a real server run from them.

`kubectl` (for `kubectl kustomize`), `promtool` (Debian's `prometheus`
package) and `kubernetes-validate` (the dev extra) are needed. Without one the
tests that need it are skipped, saying why, unless `CI` is set: then they fail,
so a CI machine missing a tool cannot pass by skipping.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from authpool_client.api import authpool_pb2, authpool_pb2_grpc

from tests.conftest import secret
from tests.integration.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("embedded", "ha")
RULES = DEPLOY / "prometheus" / "authpool-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "authpool-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "authpool-dashboard.json"

INSTALL_HINTS = {
    "kubectl": "install kubectl (https://kubernetes.io/docs/tasks/tools/); `kubectl kustomize` needs no cluster",
    "promtool": "apt-get install prometheus (Debian ships promtool in it)",
}


def missing(what: str, hint: str) -> None:
    """Skip (or, with CI set, fail) a test that needs a tool this machine lacks."""
    reason = f"{what} is not available: {hint}"
    if "CI" in os.environ:
        pytest.fail(f"{reason}. CI is set, so the deployment tests may not be skipped", pytrace=False)
    pytest.skip(reason)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name, INSTALL_HINTS[name])
    assert path is not None
    return path


def run(argv: list[str], *, cwd: Path = ROOT, timeout: float = 60) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def kubectl() -> str:
    return tool("kubectl")


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")


def kustomize(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed: every object it renders (offline; no cluster involved)."""
    text = run([kubectl, "kustomize", str(directory)])
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Every overlay (and the monitoring kustomization), rendered."""
    out = {name: kustomize(kubectl, K8S / "overlays" / name) for name in OVERLAYS}
    out["monitoring"] = kustomize(kubectl, K8S / "monitoring")
    return out


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = only(objects, "Deployment", "authpool")["spec"]["template"]["spec"]
    [main] = [c for c in pod["containers"] if c["name"] == "authpool"]
    return main


def config_document(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """auth-pool.json from the ConfigMap the Deployment mounts."""
    pod = only(objects, "Deployment", "authpool")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "config"]
    config_map = only(objects, "ConfigMap", volume["configMap"]["name"])
    return json.loads(config_map["data"]["auth-pool.json"])


# --- PromQL ------------------------------------------------------------------------

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's interval variables become durations, `$job` any job."""
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[a-zA-Z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def label_matchers(expr: str) -> set[tuple[str, str]]:
    """(metric, label name) for every label matcher written on a named metric."""
    pairs = set()
    for metric, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", matchers):
            pairs.add((metric, label))
    return pairs


# --- a real server, run from the rendered manifests ---------------------------------


@dataclass(frozen=True)
class Scrape:
    """One /metrics page: sample names (as PromQL sees them) and the label names each carries."""

    text: str
    labels: dict[str, set[str]]

    @property
    def names(self) -> set[str]:
        return set(self.labels)

    def values(self, name: str, label: str) -> set[str]:
        pattern = re.compile(rf'^{re.escape(name)}\{{[^}}]*\b{label}="([^"]*)"', re.MULTILINE)
        return set(pattern.findall(self.text))


def parse_scrape(text: str) -> Scrape:
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
        assert match, f"not a sample line: {line!r}"
        names = labels.setdefault(match.group(1), set())
        names.update(re.findall(r'(\w+)="', match.group(2) or ""))
    return Scrape(text, labels)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class DeployedServer:
    process: ServerProcess
    admin_token: str
    secret_files: dict[str, Path]  # env variable -> the file the manifest points it at, here

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    def metrics(self) -> Scrape:
        url = f"http://127.0.0.1:{self.process.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return parse_scrape(response.read().decode())


def pod_environment(main: dict[str, Any], mounts: dict[str, Path]) -> tuple[dict[str, str], dict[str, Path]]:
    """The container's environment as the kubelet would give it, with mounted paths moved under `mounts`."""
    env: dict[str, str] = {"POD_NAME": "authpool-0", "POD_NAMESPACE": "test"}
    files: dict[str, Path] = {}
    for entry in main["env"]:
        if "value" not in entry:
            continue  # fieldRef values are set above
        value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], entry["value"])
        for mount_path, local in mounts.items():
            if value.startswith(mount_path + "/"):
                value = str(local / value.removeprefix(mount_path + "/"))
                files[entry["name"]] = Path(value)
        env[entry["name"]] = value
    return env, files


def _secret_value(variable: str) -> str:
    if "WEBHOOK_SECRET" in variable:
        return secret("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    return secret(secrets.token_hex(24))


@pytest.fixture(scope="session")
def deployed_server(
    rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeployedServer]:
    """`authpool serve` with the embedded overlay's ConfigMap, environment and secret files.

    What differs from the pod, and why: the addresses (loopback, free ports),
    the data directory (a temporary one), the webhook URL (a closed loopback
    port, so a test never reaches the internet; its deliveries fail and are
    retried, which is what the webhook metrics need), and the secret values
    (generated here, as an operator does with `kubectl create secret`).
    """
    objects = rendered["embedded"]
    main = container(objects)
    base = tmp_path_factory.mktemp("deployed")
    mounts = {m["mountPath"]: base / m["name"] for m in main["volumeMounts"]}
    env, files = pod_environment(main, mounts)
    for variable, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_secret_value(variable))
    document = config_document(objects)
    document["notifications"]["webhookUrl"] = f"http://127.0.0.1:{closed_port()}/notify"
    document["notifications"]["allowInsecureLoopback"] = True
    config = base / "auth-pool.json"
    config.write_text(json.dumps(document))
    server = ServerProcess(config, base / "data", env=env)
    server.start()
    try:
        yield DeployedServer(server, files["AUTHPOOL_ADMIN_TOKEN_FILE"].read_text(), files)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def exported(deployed_server: DeployedServer) -> Scrape:
    """/metrics of the deployed server after traffic that touches every instrument.

    Counters and histograms appear on the page only once something happened:
    a lease granted and one on the fallback (every subscription drained), usage
    reported, a rebalancing cycle, a failed call, a webhook attempt.
    """
    auth = (("authorization", f"Bearer {deployed_server.admin_token}"),)
    with grpc.insecure_channel(deployed_server.address) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        lease = stub.Allocate(authpool_pb2.AllocateRequest(client_id="smoke-1"), metadata=auth, timeout=10).lease
        stub.ReportUsage(
            authpool_pb2.ReportUsageRequest(
                request_id="smoke-usage-1",
                lease_id=lease.lease_id,
                fencing_token=lease.fencing_token,
                cost_micros=25_000,
                model="claude-sonnet-4",
            ),
            metadata=auth,
            timeout=10,
        )
        subscriptions = [
            s.subscription_id for s in stub.Status(authpool_pb2.StatusRequest(), metadata=auth).subscriptions
        ]
        for subscription_id in subscriptions:
            stub.DrainSubscription(
                authpool_pb2.DrainSubscriptionRequest(subscription_id=subscription_id), metadata=auth, timeout=10
            )
        fallback = stub.Allocate(authpool_pb2.AllocateRequest(client_id="smoke-2"), metadata=auth, timeout=10)
        assert fallback.lease.fallback
        for subscription_id in subscriptions:
            stub.ResumeSubscription(
                authpool_pb2.ResumeSubscriptionRequest(subscription_id=subscription_id), metadata=auth, timeout=10
            )
        stub.Rebalance(authpool_pb2.RebalanceRequest(dry_run=False), metadata=auth, timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            stub.Renew(authpool_pb2.RenewRequest(lease_id="no-such-lease", fencing_token=1), metadata=auth, timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 20
    while True:
        scrape = deployed_server.metrics()
        if "authpool_webhook_attempts_total" in scrape.names or time.monotonic() > deadline:
            return scrape
        time.sleep(0.2)
