"""What the Kubernetes deployment sets that changes the server's cost: its telemetry.

The bench's "as deployed" server runs with the trace sampler and metric
exporters the shipped Deployment gives its pods
(`deploy/k8s/base/deployment.yaml`), read from that file so the two cannot
drift apart.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["deployed_telemetry"]

DEPLOYMENT = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "base" / "deployment.yaml"


_VARIABLES = ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_METRICS_EXPORTER")


def deployed_telemetry(deployment: Path = DEPLOYMENT) -> dict[str, str]:
    """The trace sampler and metric exporter variables of the authpool container, as the pods get them."""
    manifest = yaml.safe_load(deployment.read_text())
    containers = manifest["spec"]["template"]["spec"]["containers"]
    (server,) = (container for container in containers if container["name"] == "authpool")
    telemetry = {
        entry["name"]: str(entry["value"])
        for entry in server.get("env", ())
        if entry["name"] in _VARIABLES and "value" in entry
    }
    if "OTEL_TRACES_SAMPLER" not in telemetry:
        raise ValueError(f"{deployment}: the authpool container sets no OTEL_TRACES_SAMPLER")
    return telemetry
