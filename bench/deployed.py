"""What the Kubernetes deployment sets that changes the server's cost: its trace sampling.

The bench's "as deployed" server runs with the sampler the shipped
Deployment gives its pods (`deploy/k8s/base/deployment.yaml`), read from
that file so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["deployed_trace_sampling"]

DEPLOYMENT = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "base" / "deployment.yaml"


def deployed_trace_sampling(deployment: Path = DEPLOYMENT) -> dict[str, str]:
    """The `OTEL_TRACES_SAMPLER*` variables of the authpool container, as the pods get them."""
    manifest = yaml.safe_load(deployment.read_text())
    containers = manifest["spec"]["template"]["spec"]["containers"]
    (server,) = (container for container in containers if container["name"] == "authpool")
    sampling = {
        entry["name"]: str(entry["value"])
        for entry in server.get("env", ())
        if entry["name"].startswith("OTEL_TRACES_SAMPLER") and "value" in entry
    }
    if "OTEL_TRACES_SAMPLER" not in sampling:
        raise ValueError(f"{deployment}: the authpool container sets no OTEL_TRACES_SAMPLER")
    return sampling
