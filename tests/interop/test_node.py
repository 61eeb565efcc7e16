"""Another language against a real server: Node.js with @grpc/grpc-js and @grpc/proto-loader, with a token.

`authpool_interop.mjs` loads protos/authpool/v1/authpool.proto at run time
and calls Allocate, Status and WatchEvents; this test starts a real server
(with tokens, on its own thread), runs the script with node, and checks what
it printed against what the server holds. The npm packages come from
`make interop-deps` (`npm ci` from the committed package-lock.json).

Without node or the packages the test is skipped with the reason, but only
outside CI: with `CI` set it fails, so a CI job that did not install them
cannot pass by skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from authpool_client import AuthPoolClient

from tests.client.server_thread import CLIENT_TOKEN, OPERATOR_TOKEN, ServerThread, client_spec, token_security

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "authpool_interop.mjs"
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")


@pytest.fixture
def node() -> str:
    """The node binary, once node and the npm packages are installed."""
    binary = shutil.which("node")
    missing = [name for name in PACKAGES if not (HERE / "node_modules" / name / "package.json").is_file()]
    if binary is None:
        reason = "node is not on PATH (Node.js 18 or newer)"
    elif missing:
        reason = (
            f"npm packages {', '.join(missing)} are not installed in {HERE / 'node_modules'}: run `make interop-deps`"
        )
    else:
        return binary
    if "CI" in os.environ:
        pytest.fail(f"{reason}. CI is set, so the Node interop test may not be skipped", pytrace=False)
    pytest.skip(f"Node interop test skipped: {reason}")


def run_node(node: str, target: str, token: str, client_id: str) -> dict[str, Any]:
    done = subprocess.run(
        [node, str(SCRIPT), client_id],
        env={**os.environ, "AUTHPOOL_TARGET": target, "AUTHPOOL_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"node failed ({done.returncode}): {done.stderr}"
    assert token not in done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A real server with tokens, on its own thread, so that node's calls are served while the test waits."""
    server = ServerThread(client_spec(ttl=60.0), tmp_path, token_security())
    server.start()
    yield server
    server.close()


def test_a_node_client_allocates_reads_status_and_watches_events_with_a_token(node: str, server: ServerThread) -> None:
    with AuthPoolClient(server.target, insecure=True, token=CLIENT_TOKEN) as python:
        python_lease = python.allocate("py-worker").lease  # an event before Node's, so the watch reads several

    result = run_node(node, server.target, OPERATOR_TOKEN, "node-worker-1")

    allocate = result["allocate"]
    lease = allocate["lease"]
    assert allocate["decision"] == "DECISION_KIND_NEW"
    assert (lease["client_id"], lease["labels"]) == ("node-worker-1", {"lang": "node"})
    assert lease["credential_ref"] == f"/creds/.claude-{lease['subscription_id']}"
    assert lease["fencing_token"].isdigit()  # uint64 as a decimal string, no precision lost
    assert int(lease["expires_at"]["seconds"]) > int(lease["granted_at"]["seconds"])

    status = result["status"]
    assert [s["subscription_id"] for s in status["subscriptions"]] == ["sub1", "sub2", "sub3"]
    assert all(s["status"] == "SUBSCRIPTION_STATUS_ACTIVE" for s in status["subscriptions"])
    assert {c["lease_id"] for c in status["clients"]} == {python_lease.lease_id, lease["lease_id"]}
    assert status["totals"]["live_clients"] == 2

    events = result["events"]
    assert [(e["type"], e["client_id"]) for e in events] == [
        ("EVENT_TYPE_LEASE_GRANTED", "py-worker"),
        ("EVENT_TYPE_LEASE_GRANTED", "node-worker-1"),
    ]
    assert [int(e["sequence"]) for e in events] == [1, 2]
    assert events[1]["lease_id"] == lease["lease_id"]

    assert result["unauthenticated"]["name"] == "UNAUTHENTICATED"

    # What Node was granted is what the server holds, as a Python client sees it.
    with AuthPoolClient(server.target, insecure=True, token=OPERATOR_TOKEN) as python:
        held = {c.client_id: c for c in python.status(include_clients=True).clients}
    assert held["node-worker-1"].lease_id == lease["lease_id"]
    assert held["node-worker-1"].fencing_token == int(lease["fencing_token"])
