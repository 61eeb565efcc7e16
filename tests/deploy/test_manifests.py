"""The Kubernetes manifests, as `kubectl kustomize` renders them, and the image they run.

Every overlay renders offline and validates against the Kubernetes JSON
schemas; the properties an operator relies on are asserted on the rendered
output (what `kubectl apply -k` would send), not on the source files.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from importlib import metadata
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from packaging.version import Version

from authpool_server.server import DEFAULT_GRACE_SECONDS, LIVENESS, READINESS
from authpool_server.telemetry.providers import exports
from bench.deployed import deployed_telemetry
from tests.deploy.conftest import DEPLOY, OVERLAYS, ROOT, config_document, container, missing, only

# Kubernetes versions the manifests must be valid for: the oldest we claim
# (native gRPC probes are GA since 1.27, the preStop `sleep` action since 1.30)
# and the newest the bundled schemas know.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
# Kinds from CRDs, which kubernetes-validate has no schema for; checked otherwise (test_alerts.py).
CUSTOM_KINDS = {"PrometheusRule", "ServiceMonitor"}
SECRET_VARIABLES = re.compile(r"^AUTHPOOL_\w*(TOKEN|SECRET|DATABASE_URL)(_FILE)?$")


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "pip install -e '.[dev]' (it is in the dev extra)")
    return kubernetes_validate


@pytest.mark.parametrize("overlay", [*OVERLAYS, "monitoring"])
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    validator = kubernetes_validate()
    objects = rendered[overlay]
    assert objects, f"{overlay} renders nothing"
    unchecked = set()
    for version in KUBERNETES_VERSIONS:
        target = validator.latest_version() if version == "latest" else version
        for obj in objects:
            if obj["kind"] in CUSTOM_KINDS:
                unchecked.add(obj["kind"])
                continue
            try:
                validator.validate(obj, target, strict=True)  # strict: unknown fields are errors
            except validator.ValidationError as error:
                where = ".".join(str(p) for p in error.path)
                pytest.fail(
                    f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for {target}: {where}: {error}"
                )
    assert unchecked <= CUSTOM_KINDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_native_grpc_with_separate_liveness_and_readiness(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    main = container(rendered[overlay])
    grpc_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
    probes = {kind: main[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
    for kind, probe in probes.items():
        assert probe["grpc"]["port"] == grpc_port, kind
    # The names the server reports: a store outage fails readiness only, so the
    # pod leaves the Service without being restarted.
    assert probes["liveness"]["grpc"]["service"] in LIVENESS
    assert probes["readiness"]["grpc"]["service"] in READINESS
    assert probes["liveness"]["grpc"]["service"] != probes["readiness"]["grpc"]["service"]
    # Liveness waits for the startup probe, which gives store recovery minutes, not seconds.
    startup = probes["startup"]
    assert startup["grpc"]["service"] in LIVENESS
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_preStop_pause_and_the_servers_drain(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    pod = only(rendered[overlay], "Deployment", "authpool")["spec"]["template"]["spec"]
    pause = container(rendered[overlay])["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after the pause; the server then drains for up to DEFAULT_GRACE_SECONDS and flushes.
    assert pod["terminationGracePeriodSeconds"] >= pause + DEFAULT_GRACE_SECONDS + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_non_root_read_only_without_capabilities(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    pod = only(objects, "Deployment", "authpool")["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    # The only writable places: /tmp (in memory) and the data directory.
    writable = {m["mountPath"] for m in main["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", config_document(objects)["dataDir"]}
    account = only(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    requests, limits = main["resources"]["requests"], main["resources"]["limits"]
    assert {"cpu", "memory"} <= requests.keys()
    assert {"cpu", "memory"} <= limits.keys()
    # The memory limit sits above the 1 GB alert, so the alert fires before the OOM kill.
    assert limits["memory"].endswith("Mi")
    assert int(limits["memory"][:-2]) * 2**20 > 1e9


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_included(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    assert not [o for o in objects if o["kind"] == "Secret"], "no Secret object is committed"
    main = container(objects)
    pod = only(objects, "Deployment", "authpool")["spec"]["template"]["spec"]
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    secret_mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"] if m["name"] in secret_volumes}
    secret_env = {e["name"]: e for e in main["env"] if SECRET_VARIABLES.match(e["name"])}
    expected = {"AUTHPOOL_CLIENT_TOKEN", "AUTHPOOL_OPERATOR_TOKEN", "AUTHPOOL_ADMIN_TOKEN", "AUTHPOOL_WEBHOOK_SECRET"}
    if overlay == "ha":
        expected.add("AUTHPOOL_DATABASE_URL")
    assert {name.removesuffix("_FILE") for name in secret_env} == expected
    for name, entry in secret_env.items():
        if "value" in entry:
            # A literal value is only allowed as the path of a file on a mounted Secret.
            assert name.endswith("_FILE"), f"{name} has a literal value"
            mount = entry["value"].rpartition("/")[0]
            assert mount in secret_mounts, f"{name} points outside every mounted Secret: {entry['value']}"
            assert next(m for m in main["volumeMounts"] if m["mountPath"] == mount)["readOnly"] is True
        else:
            assert "secretKeyRef" in entry["valueFrom"], name
    # Nothing in the rendered output looks like a token or a webhook secret.
    text = json.dumps(objects)
    assert not re.search(r"whsec_[A-Za-z0-9+/=]{8,}|Bearer [A-Za-z0-9]|postgres(ql)?://[^\"@]*:[^\"@]*@", text)


def test_docs_create_every_secret_key_the_manifests_read(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """docs/deployment.md's `kubectl create secret` lines make exactly the files the pods read."""
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for overlay in OVERLAYS:
        main = container(rendered[overlay])
        pod = only(rendered[overlay], "Deployment", "authpool")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for entry in main["env"]:
            if entry["name"].endswith("_FILE") and SECRET_VARIABLES.match(entry["name"]):
                mount, _, key = entry["value"].rpartition("/")
                volume = next(m["name"] for m in main["volumeMounts"] if m["mountPath"] == mount)
                secret_name = volumes[volume]["secret"]["secretName"]
                command = re.search(
                    rf"kubectl (?:-n \S+ )?create secret generic {secret_name}\b(?:[^\n]*\\\n)*[^\n]*", docs
                )
                assert command, f"docs/deployment.md does not create the Secret {secret_name}"
                assert f"--from-literal={key}=" in command.group() or f"--from-file={key}=" in command.group(), (
                    f"docs/deployment.md creates {secret_name} without the key {key}"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_names_the_grpc_and_admin_ports(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    service = only(objects, "Service", "authpool")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    main = container(objects)
    container_ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert container_ports == {"grpc": 50051, "admin": 9464}
    assert {name: p["port"] for name, p in ports.items()} == container_ports
    assert {p["targetPort"] for p in ports.values()} == {"grpc", "admin"}
    # The config listens where the ports point, on every interface (not the loopback default).
    config = config_document(objects)
    assert config["listen"] == "0.0.0.0:50051"
    assert config["admin"]["listen"] == "0.0.0.0:9464"
    pod_labels = only(objects, "Deployment", "authpool")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = only(objects, "NetworkPolicy", "authpool")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"grpc", "admin"}


def test_embedded_keeps_its_sqlite_store_on_a_claim_and_never_runs_two(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["embedded"]
    deployment = only(objects, "Deployment", "authpool")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = only(objects, "PersistentVolumeClaim")
    [data] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "data")
    config = config_document(objects)
    assert config.get("store", {}).get("kind", "sqlite") == "sqlite"
    assert mount["mountPath"] == config["dataDir"]
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]


def test_ha_runs_three_spread_replicas_on_postgres(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["ha"]
    deployment = only(objects, "Deployment", "authpool")
    autoscaler = only(objects, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "authpool"}
    assert autoscaler["spec"]["minReplicas"] == 3
    assert autoscaler["spec"]["maxReplicas"] > 3
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert config_document(objects)["store"]["kind"] == "postgres"
    assert "AUTHPOOL_DATABASE_URL_FILE" in {e["name"] for e in container(objects)["env"]}
    egress = [
        p["port"] for o in objects if o["kind"] == "NetworkPolicy" for r in o["spec"]["egress"] for p in r["ports"]
    ]
    assert 5432 in egress


def test_ha_config_is_the_base_config_on_postgres(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base, ha = config_document(rendered["embedded"]), config_document(rendered["ha"])
    assert ha.pop("store")["kind"] == "postgres"
    assert ha == base, "deploy/k8s/overlays/ha/auth-pool.json drifted from the base's"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_accepts_the_configmap(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Any
) -> None:
    """`authpool config check` on the rendered auth-pool.json, with every secret the pod would have."""
    path = tmp_path / "auth-pool.json"
    path.write_text(json.dumps(config_document(rendered[overlay])))
    tokens = {}
    for name in ("client", "operator", "admin"):
        (tmp_path / name).write_text(name * 8)  # each principal its own token, as the server demands
        tokens[f"AUTHPOOL_{name.upper()}_TOKEN_FILE"] = str(tmp_path / name)
    (tmp_path / "webhook").write_text("whsec_" + "A" * 44)
    (tmp_path / "url").write_text("postgresql://authpool@db:5432/authpool")
    env = {
        "PATH": "/usr/bin:/bin",
        **tokens,
        "AUTHPOOL_WEBHOOK_SECRET_FILE": str(tmp_path / "webhook"),
        "AUTHPOOL_DATABASE_URL_FILE": str(tmp_path / "url"),
    }
    authpool = ROOT / ".venv" / "bin" / "authpool"
    executable = str(authpool) if authpool.exists() else "authpool"
    result = subprocess.run(
        [executable, "config", "check", str(path)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "valid; 3 subscriptions" in result.stdout
    assert "note:" not in result.stdout, result.stdout  # nothing missing for `serve`


def test_the_dockerfile_builds_the_image_the_manifests_run(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile)
    assert all("${PYTHON_IMAGE}" in stage for stage in stages)
    runtime = dockerfile[dockerfile.rindex("\nFROM ") :]
    assert "COPY --from=build" in runtime
    assert "pip install '.[postgres]'" in dockerfile
    # The last USER is the numeric, non-root one the pod's securityContext expects.
    [*_, user] = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    uid, _, gid = user.partition(":")
    pod = only(rendered["embedded"], "Deployment", "authpool")["spec"]["template"]["spec"]["securityContext"]
    assert uid.isdigit()
    assert int(uid) != 0
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])
    assert re.search(r'^ENTRYPOINT \["authpool", "serve"\]', dockerfile, re.MULTILINE)
    assert re.search(r"^EXPOSE 50051 9464$", dockerfile, re.MULTILINE)
    # The tag the manifests run is the version the Dockerfile labels and pyproject.toml builds.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f'org.opencontainers.image.version="{version}"' in dockerfile
    for overlay in OVERLAYS:
        assert container(rendered[overlay])["image"] == f"authpool:{version}"
    # The build context holds what the build stage copies, and nothing else.
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1 :][:3] == ["!pyproject.toml", "!README.md", "!authpool_server/"]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE)
    assert sorted(" ".join(copied).split()) == ["README.md", "authpool_server", "pyproject.toml"]


def test_the_build_context_is_enough_to_build_the_package(tmp_path: Any) -> None:
    """What the Dockerfile copies into the build stage builds a wheel with the server, its stubs and its data."""
    for name in ("pyproject.toml", "README.md"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        ["cp", "-r", str(ROOT / "authpool_server"), str(tmp_path / "authpool_server")], check=True, timeout=60
    )
    pip = ROOT / ".venv" / "bin" / "pip"
    if not pip.exists():
        missing("the project's virtualenv", "make venv")
    # The virtualenv's own setuptools when it is recent enough (fast, offline); else pip fetches one.
    isolation = [] if Version(metadata.version("setuptools")) < Version("70.1") else ["--no-build-isolation"]
    result = subprocess.run(
        [str(pip), "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("authpool-*.whl")
    listing = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "zipfile", "-l", str(wheel)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for needed in ("authpool_server/api/authpool_pb2.py", "authpool_server/cli.py", "store/migrations/postgres/0001_"):
        assert needed in listing, needed
    assert "entry_points.txt" in listing


def test_docs_and_readme_of_the_deploy_directory_name_the_real_files() -> None:
    readme = (DEPLOY / "k8s" / "README.md").read_text()
    for path in re.findall(r"`(deploy/[\w./-]+)`", readme + (ROOT / "docs" / "deployment.md").read_text()):
        assert (ROOT / path).exists(), f"{path} is named in the docs but does not exist"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_telemetry_is_what_the_benchmark_measures(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unknown sampler name makes the SDK warn once and export every span: the cost `make bench`
    # says the deployment avoids. The SDK itself must build the ratio sampler from what the pods get.
    env = {e["name"]: e.get("value") for e in container(rendered[overlay])["env"]}
    telemetry = deployed_telemetry()
    assert {name: env.get(name) for name in telemetry} == telemetry
    for name, value in telemetry.items():
        monkeypatch.setenv(name, value)
    description = TracerProvider().sampler.get_description()
    assert description.startswith("ParentBased{root:TraceIdRatioBased{0.01}"), description
    # Scraped, not pushed: with an OTLP endpoint set for the traces, metrics still have one reader.
    pushed = {**telemetry, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert exports(pushed, "TRACES")
    assert not exports(pushed, "METRICS")
