"""The operator CLI (`authpool status`, `watch`, `rebalance`, `drain`, `undrain`) against a real server.

The server runs in this process with authentication on (a client, an
operator and an admin token) and a FakeClock, so leases never expire behind
a test's back and idleness is a matter of `clock.advance`. Most tests call
the CLI's `main` in a worker thread (the server shares this thread's event
loop) with stdout and stderr captured; a few run the installed
`authpool` executable as an operator would, for what only a real process
shows: the exit status, Ctrl-C, the environment.

Every token is registered with `secret()`, so the session fails if one
reaches a log line, and `cli` fails a test whose output holds one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from authpool_server.api import authpool_pb2 as pb
from authpool_server.api import authpool_pb2_grpc
from authpool_server.cli import _parser, main
from authpool_server.domain import PoolSpec
from authpool_server.ops.errors import OpsError
from authpool_server.ops.watch import event_types
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings, TlsFiles
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from tests.conftest import FakeClock, make_spec, secret

UNIT = 1_000_000
AUTHPOOL = str(Path(sys.executable).with_name("authpool"))
CLIENT_TOKEN = secret("ops-cli-client-token-4f1e2d3c")
OPERATOR_TOKEN = secret("ops-cli-operator-token-8a7b6c5d")
ADMIN_TOKEN = secret("ops-cli-admin-token-0e9f8a7b6c")
TOKENS = (CLIENT_TOKEN, OPERATOR_TOKEN, ADMIN_TOKEN)
# The variables the CLI reads; a developer's own must not leak into a test.
CLI_VARIABLES = ("AUTHPOOL_TARGET", "AUTHPOOL_TOKEN", "AUTHPOOL_TOKEN_FILE", "AUTHPOOL_CA", "COLUMNS")

Stub = authpool_pb2_grpc.AuthPoolStub


def security(tls: TlsFiles | None = None) -> SecuritySettings:
    return SecuritySettings(
        tokens=TokenDirectory(
            [
                (CLIENT_TOKEN, Principal("worker", Role.CLIENT)),
                (OPERATOR_TOKEN, Principal("operator", Role.OPERATOR)),
                (ADMIN_TOKEN, Principal("admin", Role.ADMIN)),
            ]
        ),
        open_services=frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}),
        tls=tls,
    )


@pytest.fixture
def spec() -> PoolSpec:
    # Leases outlive the 60 s idle time, so a test lets clients go idle without renewing them.
    return make_spec(ttl=600)


@pytest.fixture
async def server(tmp_path: Path, spec: PoolSpec, clock: FakeClock) -> AsyncIterator[Server]:
    server = Server(spec, data_dir=tmp_path, security=security(), listen="127.0.0.1:0", background=False, clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[Stub]:
    # Acts as the callers of the pool (a client token) and, for checks, as an admin.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield authpool_pb2_grpc.AuthPoolStub(channel)


AS_CLIENT = (("authorization", f"Bearer {CLIENT_TOKEN}"),)
AS_ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert not [token for token in TOKENS if token in text], "a token was printed"


def assert_one_line_error(run: Run, starts: str) -> None:
    assert run.code == 1
    assert run.out == ""
    assert run.err.count("\n") == 1, run.err
    assert run.err.startswith(starts), run.err
    assert "Traceback" not in run.err


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in CLI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def cli(server: Server, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `authpool ARGS` in this process against `server`, with AUTHPOOL_TOKEN set to `token` (None: unset)."""
    clean_env.setenv("AUTHPOOL_TARGET", f"127.0.0.1:{server.port}")

    async def run(*args: str, token: str | None = OPERATOR_TOKEN) -> Run:
        if token is None:
            clean_env.delenv("AUTHPOOL_TOKEN", raising=False)
        else:
            clean_env.setenv("AUTHPOOL_TOKEN", token)
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(args))
        captured = capsys.readouterr()
        assert_no_token(captured.out, captured.err)
        return Run(code, captured.out, captured.err)

    return run


async def authpool_process(*args: str, env: dict[str, str]) -> Run:
    """The installed `authpool` executable, as an operator runs it."""
    base = {name: value for name, value in os.environ.items() if name not in CLI_VARIABLES}
    process = await asyncio.create_subprocess_exec(
        AUTHPOOL, *args, env={**base, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    run = Run(process.returncode, out.decode(), err.decode())
    assert_no_token(run.out, run.err)
    return run


async def allocate(stub: Stub, client_id: str) -> pb.Lease:
    return (await stub.Allocate(pb.AllocateRequest(client_id=client_id), metadata=AS_CLIENT)).lease


async def report(stub: Stub, lease: pb.Lease, cost_micros: int, request_id: str) -> None:
    request = pb.ReportUsageRequest(
        request_id=request_id, lease_id=lease.lease_id, fencing_token=lease.fencing_token, cost_micros=cost_micros
    )
    await stub.ReportUsage(request, metadata=AS_CLIENT)


async def pool_status(stub: Stub) -> pb.StatusResponse:
    return await stub.Status(pb.StatusRequest(include_clients=True), metadata=AS_ADMIN)


def live_by_subscription(status: dict[str, Any]) -> dict[str, int]:
    return {s["subscription_id"]: s["live_clients"] for s in status["subscriptions"]}


# -- status ---------------------------------------------------------------------------


async def test_status_table_shows_each_subscription_and_the_pool(cli: Any, stub: Stub) -> None:
    leases = [await allocate(stub, f"worker-{i}") for i in range(4)]
    await report(stub, leases[0], 10 * UNIT, "r1")

    run = await cli("status")

    assert run.code == 0, run.err
    rows = {line.split("│")[1].strip(): line for line in run.out.splitlines() if line.startswith("│")}
    assert sorted(rows) == ["sub1", "sub2", "sub3"]
    assert "10.00 / 100.00 (10%)" in rows["sub1"]
    assert "0.00 / 100.00 (0%)" in rows["sub3"]
    assert "2 / 2" in rows["sub1"]  # worker-0, then worker-3 (the healthiest with room again)
    assert "1 / 2" in rows["sub2"]
    assert all(" active " in row for row in rows.values())
    assert "in " in rows["sub1"].rsplit("│", 2)[1]  # spending: the threshold is some time away
    assert "Pool: 3 of 3 subscriptions active · 4 live clients, 0 on the fallback" in run.out
    assert "usage 10.00 / 300.00 (3%)" in run.out
    assert "Live leases" not in run.out


async def test_status_clients_lists_every_live_lease(cli: Any, stub: Stub) -> None:
    leases = [await allocate(stub, f"worker-{i}") for i in range(2)]

    run = await cli("status", "--clients")

    assert run.code == 0, run.err
    assert "Live leases (2)" in run.out
    for lease in leases:
        line = next(line for line in run.out.splitlines() if lease.lease_id in line)
        assert lease.client_id in line
        assert lease.subscription_id in line


async def test_status_json_has_stable_keys_and_reflects_allocations(cli: Any, stub: Stub) -> None:
    leases = [await allocate(stub, f"worker-{i}") for i in range(3)]
    await report(stub, leases[1], 25 * UNIT, "r1")
    truth = await pool_status(stub)

    run = await cli("status", "--json", "--clients")

    assert run.code == 0, run.err
    status = run.json()
    assert set(status) == {"as_of", "subscriptions", "totals", "webhooks", "clients"}
    sub2 = status["subscriptions"][1]
    assert sub2 == {
        **sub2,
        "subscription_id": "sub2",
        "type": "claude-pro",
        "masked_email": "t***@company.com",
        "status": "active",
        "live_clients": 1,
        "max_clients": 2,
        "weekly_usage_micros": 25 * UNIT,  # numbers, not grpcurl's strings
        "weekly_budget_micros": 100 * UNIT,
        "utilization": 0.25,
    }
    assert set(sub2) >= {"health_score", "projected_window_usage_micros", "seconds_to_threshold", "window_end"}
    assert live_by_subscription(status) == {"sub1": 1, "sub2": 1, "sub3": 1}
    assert status["totals"]["live_clients"] == 3
    assert status["totals"]["weekly_usage_micros"] == 25 * UNIT
    assert status["totals"]["last_sequence"] == truth.totals.last_sequence
    assert sorted((c["client_id"], c["lease_id"]) for c in status["clients"]) == sorted(
        (lease.client_id, lease.lease_id) for lease in leases
    )
    assert "clients" not in (await cli("status", "--json")).json()  # only when asked for


# -- watch ----------------------------------------------------------------------------


async def test_watch_replays_then_resumes_from_the_printed_sequence(cli: Any, stub: Stub) -> None:
    first = await allocate(stub, "worker-1")
    release = pb.ReleaseRequest(lease_id=first.lease_id, fencing_token=first.fencing_token)
    await stub.Release(release, metadata=AS_CLIENT)

    run = await cli("watch", "--from-sequence", "0", "--count", "2", "--json")

    assert run.code == 0, run.err
    events = run.json_lines()
    assert [(e["kind"], e["sequence"], e["type"], e["client_id"]) for e in events] == [
        ("event", 1, "lease_granted", "worker-1"),
        ("event", 2, "lease_released", "worker-1"),
    ]
    assert events[0]["lease_id"] == first.lease_id
    assert events[0]["attributes"] == {"kind": "new"}
    assert run.err == "2 events; last sequence 2 (resume with --from-sequence 2)\n"

    second = await allocate(stub, "worker-2")
    resumed = await cli("watch", "--from-sequence", "2", "--count", "1")

    assert resumed.code == 0, resumed.err
    [line] = resumed.out.splitlines()
    assert line.split()[0] == "3"
    assert "lease_granted" in line
    assert f"client=worker-2 lease={second.lease_id}" in line
    assert "last sequence 3" in resumed.err


async def test_watch_filters_and_progress_move_the_resume_point(cli: Any, stub: Stub) -> None:
    leases = [await allocate(stub, f"worker-{i}") for i in range(3)]  # on sub1, sub2, sub3
    for lease in leases:
        release = pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        await stub.Release(release, metadata=AS_CLIENT)

    # Any of the types, any of the clients, and about sub1: worker-1 is on sub2.
    run = await cli(
        "watch",
        "--from-sequence=0",
        "--type",
        "LEASE_RELEASED,lease-granted",
        "--client",
        "worker-0",
        "--client=worker-1",
        "--subscription",
        "sub1",
        "--progress-interval",
        "1",
        "--duration",
        "2.5",
        "--json",
    )

    assert run.code == 0, run.err  # --duration ends a watch normally
    lines = run.json_lines()
    events = [line for line in lines if line["kind"] == "event"]
    assert [(e["sequence"], e["client_id"], e["type"]) for e in events] == [
        (1, "worker-0", "lease_granted"),
        (4, "worker-0", "lease_released"),
    ]
    progress = [line for line in lines if line["kind"] == "progress"]
    assert progress, lines
    assert progress[-1]["sequence"] == 6  # every event was considered, the filtered-out ones too
    assert run.err == "2 events; last sequence 6 (resume with --from-sequence 6)\n"


async def test_watch_without_a_sequence_shows_only_new_events(cli: Any, stub: Stub, server: Server) -> None:
    await allocate(stub, "before")
    watching = asyncio.create_task(cli("watch", "--count", "1", "--duration", "20", "--json"))
    async with asyncio.timeout(20):
        # The stream is open, so the CLI has taken its cursor from Status.
        while not server.pool.events.watcher_backlogs():  # noqa: ASYNC110 - the CLI's thread opens it
            await asyncio.sleep(0.01)

    await allocate(stub, "after")

    run = await watching
    assert run.code == 0, run.err
    assert [(e["sequence"], e["client_id"]) for e in run.json_lines()] == [(2, "after")]


async def test_watch_rejects_an_unknown_event_type(cli: Any) -> None:
    run = await cli("watch", "--type", "lease_stolen")

    assert run.code == 2
    assert run.err.startswith("authpool watch: --type 'lease_stolen' is not an event type; one of: lease_granted")


async def test_watch_stops_cleanly_on_ctrl_c_and_prints_where_to_resume(server: Server, stub: Stub) -> None:
    await allocate(stub, "worker-1")
    process = await asyncio.create_subprocess_exec(
        AUTHPOOL,
        "watch",
        "--from-sequence",
        "0",
        env={**os.environ, "AUTHPOOL_TARGET": f"127.0.0.1:{server.port}", "AUTHPOOL_TOKEN": OPERATOR_TOKEN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # As from a terminal: a shell that starts a job in the background makes it ignore SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), timeout=20)  # the event, live

    process.send_signal(signal.SIGINT)

    rest, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0
    assert "lease_granted" in first.decode()
    assert rest == b""
    assert err.decode() == "1 events; last sequence 1 (resume with --from-sequence 1)\n"


# -- rebalance, drain, undrain ----------------------------------------------------------


async def test_rebalance_dry_run_plans_and_a_real_run_moves(cli: Any, stub: Stub, clock: FakeClock) -> None:
    leases = [await allocate(stub, f"worker-{i}") for i in range(3)]
    await report(stub, leases[0], 10 * UNIT, "r1")  # a 10-unit gap, over the 5-unit threshold
    clock.advance(61)  # everyone idle

    plan = await cli("rebalance", "--dry-run", "--json")

    assert plan.code == 0, plan.err
    assert plan.json() == {
        "dry_run": True,
        "reason": plan.json()["reason"],
        "moves": [
            {
                "lease_id": leases[0].lease_id,
                "client_id": "worker-0",
                "from_subscription_id": "sub1",
                "to_subscription_id": "sub2",
                "fencing_token": 0,
            }
        ],
    }
    assert plan.json()["reason"]
    assert live_by_subscription((await cli("status", "--json")).json()) == {"sub1": 1, "sub2": 1, "sub3": 1}

    done = await cli("rebalance")

    assert done.code == 0, done.err
    assert done.out.startswith("Moved 1 client; each learns it on its next Renew.")
    row = next(line for line in done.out.splitlines() if "worker-0" in line)
    assert [cell.strip() for cell in row.split("│")[1:4]] == ["worker-0", "sub1", "sub2"]
    assert live_by_subscription((await cli("status", "--json")).json()) == {"sub1": 0, "sub2": 2, "sub3": 1}
    again = await cli("rebalance", "--dry-run")
    assert again.out.startswith("Nothing to move.")


async def test_drain_and_undrain_move_a_subscription_out_of_rotation_and_back(
    cli: Any, stub: Stub, clock: FakeClock
) -> None:
    idle = await allocate(stub, "worker-1")
    assert idle.subscription_id == "sub1"
    clock.advance(61)  # idle: it moves at once

    drained = await cli("drain", "sub1", token=ADMIN_TOKEN)

    assert drained.code == 0, drained.err
    assert drained.out.startswith("sub1 is draining: it takes no new clients; 1 idle client moved now")
    status = (await cli("status", "--json")).json()
    assert status["subscriptions"][0]["status"] == "draining"
    assert live_by_subscription(status)["sub1"] == 0
    assert (await allocate(stub, "worker-2")).subscription_id != "sub1"
    assert "draining" in next(line for line in (await cli("status")).out.splitlines() if "│ sub1" in line)

    resumed = await cli("undrain", "sub1", "--json", token=ADMIN_TOKEN)

    assert resumed.code == 0, resumed.err
    assert resumed.json() == {"subscription_id": "sub1", "resumed": True}
    assert (await cli("status", "--json")).json()["subscriptions"][0]["status"] == "active"
    again = await cli("drain", "sub1", "--json", token=ADMIN_TOKEN)
    assert again.json() == {"subscription_id": "sub1", "status": "draining", "clients_moved": 0}
    assert (await cli("resume", "sub1", token=ADMIN_TOKEN)).code == 0  # the alias


async def test_drain_needs_an_admin_and_an_existing_subscription(cli: Any) -> None:
    refused = await cli("drain", "sub1")  # an operator's token

    assert_one_line_error(refused, "authpool drain: PERMISSION_DENIED: DrainSubscription needs the admin role")
    unknown = await cli("drain", "sub9", token=ADMIN_TOKEN)
    assert_one_line_error(unknown, "authpool drain: NOT_FOUND (SUBSCRIPTION_NOT_FOUND): subscription_id:")
    assert (await cli("status", "--json")).json()["subscriptions"][0]["status"] == "active"


# -- target, token, TLS, failures ---------------------------------------------------------


async def test_token_from_a_file_from_the_environment_or_a_file_named_there(
    cli: Any, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text(OPERATOR_TOKEN + "\n")  # as `openssl rand -hex 32 > file` leaves it

    from_flag = await cli("status", "--json", "--token-file", str(token_file), token=None)
    from_env = await cli("status", "--json")  # AUTHPOOL_TOKEN
    clean_env.setenv("AUTHPOOL_TOKEN_FILE", str(token_file))
    from_env_file = await cli("status", "--json", token=None)

    for run in (from_flag, from_env, from_env_file):
        assert run.code == 0, run.err
        assert run.json()["totals"]["subscriptions"] == 3
    # The flag beats the environment.
    wrong = await cli("status", "--token-file", str(tmp_path / "missing"))
    assert wrong.code == 2
    assert wrong.err.startswith(f"authpool status: cannot read --token-file {tmp_path / 'missing'}")


async def test_a_token_file_with_several_tokens_is_refused_without_echoing_them(cli: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "rotation.tokens"
    token_file.write_text(f"{OPERATOR_TOKEN}\n{ADMIN_TOKEN}\n")

    run = await cli("status", "--token-file", str(token_file), token=None)

    assert run.code == 2
    assert run.err == (
        f"authpool status: --token-file {token_file} holds more than one token; give the CLI exactly one\n"
    )


async def test_a_missing_or_wrong_token_is_one_unauthenticated_line(cli: Any) -> None:
    missing = await cli("status", token=None)
    wrong = await cli("status", "--json", token=secret("not-a-known-token-3c2b1a"))

    assert_one_line_error(
        missing,
        "authpool status: UNAUTHENTICATED: authorization: a bearer token is required ('authorization: Bearer <token>')"
        "; no token was given: set AUTHPOOL_TOKEN",
    )
    assert_one_line_error(
        wrong, "authpool status: UNAUTHENTICATED: authorization: the token is not valid; the server does not know"
    )
    client = await cli("rebalance", token=CLIENT_TOKEN)
    assert_one_line_error(client, "authpool rebalance: PERMISSION_DENIED: Rebalance needs the operator role")


async def test_an_unreachable_target_is_one_unavailable_line(cli: Any, closed_port: int) -> None:
    run = await cli("status", "--target", f"127.0.0.1:{closed_port}")

    assert_one_line_error(run, "authpool status: UNAVAILABLE: ")
    assert f"is the server at 127.0.0.1:{closed_port} up" in run.err


async def test_the_installed_command_reads_its_target_and_token_from_the_environment(server: Server) -> None:
    env = {"AUTHPOOL_TARGET": f"127.0.0.1:{server.port}", "AUTHPOOL_TOKEN": OPERATOR_TOKEN}

    ok = await authpool_process("status", "--json", env=env)
    refused = await authpool_process("status", env={**env, "AUTHPOOL_TOKEN": secret("wrong-token-for-process-9a8b")})

    assert ok.code == 0, ok.err
    assert ok.json()["totals"]["subscriptions"] == 3
    assert_one_line_error(refused, "authpool status: UNAUTHENTICATED: ")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_server(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Server]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    tls = TlsFiles(
        cert_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes(),
        client_ca=None,
        require_client_cert=False,
    )
    server = Server(make_spec(), data_dir=tmp_path, security=security(tls), listen="127.0.0.1:0", background=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_tls_with_the_ca_from_a_flag_or_the_environment(
    tls_server: Server, ca: trustme.CA, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    env = {"AUTHPOOL_TARGET": f"localhost:{tls_server.port}", "AUTHPOOL_TOKEN": OPERATOR_TOKEN}

    with_flag = await authpool_process("status", "--json", "--ca", str(ca_file), env=env)
    with_env = await authpool_process("status", "--json", env={**env, "AUTHPOOL_CA": str(ca_file)})
    plaintext = await authpool_process("status", env=env)

    for run in (with_flag, with_env):
        assert run.code == 0, run.err
        assert run.json()["totals"]["subscriptions"] == 3
    assert_one_line_error(plaintext, "authpool status: UNAVAILABLE: ")


# -- config check, and the documented commands ----------------------------------------------


def test_config_check_json_gives_the_verdict_for_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "authpool_server" / "example-config.json"
    broken = tmp_path / "broken.json"
    broken.write_text('{"subscriptions": []}')

    assert main(["config", "check", str(example), "--json"]) == 0
    valid = json.loads(capsys.readouterr().out)
    assert main(["config", "check", str(broken), "--json"]) == 2
    invalid = json.loads(capsys.readouterr().out)

    assert valid == {**valid, "valid": True, "subscriptions": 3, "weekly_budget_micros": 1368 * UNIT}
    assert isinstance(valid["notes"], list)
    assert invalid == {"source": str(broken), "valid": False, "problems": invalid["problems"]}
    assert invalid["problems"][0].startswith("subscriptions:")


def documented_cli_commands() -> list[list[str]]:
    """Every `authpool ...` command in the README's Operations section and docs/troubleshooting.md, as argv."""
    from tests.integration.test_grpcurl_docs import operations_section, shell_blocks, shell_commands

    troubleshooting = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    found = []
    for markdown in (operations_section(), troubleshooting):
        for block in shell_blocks(markdown):
            for command in shell_commands(block):
                words = shlex.split(command.replace("\\\n", " "), comments=True)
                if words[0] == "authpool":
                    found.append(words[1 : words.index("|")] if "|" in words else words[1:])
    return found


def test_every_documented_cli_command_is_one_the_cli_accepts() -> None:
    commands = documented_cli_commands()

    assert {argv[0] for argv in commands} >= {"status", "watch", "rebalance", "drain", "undrain", "config"}
    for argv in commands:
        try:
            args = _parser().parse_args(argv)
            if argv[0] == "watch":
                event_types(part for value in args.type or () for part in value.split(","))
        except (SystemExit, OpsError):
            pytest.fail(f"the docs show `authpool {shlex.join(argv)}`, which the CLI refuses")
