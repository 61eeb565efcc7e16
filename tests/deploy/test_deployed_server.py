"""A real `authpool serve` run from the embedded overlay's ConfigMap, environment and secret files.

What the kubelet would see: the probes' health service names answer SERVING
without a token, the API refuses a caller without one, and /metrics is open.
"""

from __future__ import annotations

import subprocess
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2, authpool_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.conftest import DeployedServer, Scrape, container


def test_every_probe_of_the_manifest_answers_serving(
    deployed_server: DeployedServer, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    main = container(rendered["embedded"])
    with grpc.insecure_channel(deployed_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for kind in ("startup", "liveness", "readiness"):
            service = main[f"{kind}Probe"]["grpc"]["service"]
            # No token: the kubelet sends none.
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, kind


def test_the_api_needs_the_tokens_from_the_mounted_secret(deployed_server: DeployedServer) -> None:
    with grpc.insecure_channel(deployed_server.address) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Status(authpool_pb2.StatusRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        operator = deployed_server.secret_files["AUTHPOOL_OPERATOR_TOKEN_FILE"].read_text()
        status = stub.Status(
            authpool_pb2.StatusRequest(), metadata=(("authorization", f"Bearer {operator}"),), timeout=5
        )
        assert [s.subscription_id for s in status.subscriptions] == ["prod-sub1", "prod-sub2", "prod-sub3"]


def test_metrics_are_served_in_prometheus_format(exported: Scrape, promtool: str) -> None:
    assert {"authpool_pool_health", "authpool_allocations_total", "rpc_server_duration_seconds_bucket"} <= (
        exported.names
    )
    # Every series from the server is one promtool can read (exposition format errors fail here).
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exported.text, capture_output=True, text=True, timeout=30, check=False
    )
    # Exit 3 is lint advice (e.g. help texts); 1 would be a page promtool cannot parse.
    assert result.returncode in (0, 3), result.stderr
    assert "error while linting" not in result.stderr, result.stderr
