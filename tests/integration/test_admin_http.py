"""The admin HTTP port as an operator and a Prometheus scraper use it: real gRPC calls, then real HTTP.

Each test starts an in-process server with authentication on (an operator and
a client token), the admin port on an ephemeral port, a real SQLite store and
a FakeClock, and stops it afterwards. Each server has its own Prometheus
registry, so servers running side by side never show each other's series.

- /metrics is the Prometheus text format, open without a token; it is parsed
  with prometheus_client's own parser, so a malformed exposition fails here.
- /debug/auth-pool and /debug/memory need an operator token; their JSON is
  checked by evaluating the guide's `jq` recipes in Python.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authpool_server.domain import PoolSpec
from authpool_server.errors import StartupRefused
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from authpool_server.telemetry import metrics as metrics_module
from authpool_server.telemetry.providers import telemetry_from_env
from tests.conftest import FakeClock, make_spec, secret

OPERATOR_TOKEN = secret("operator-token-5d1e9b7c3a2f4e60")
CLIENT_TOKEN = secret("client-token-8a4c2e6b0d9f1735")
UNIT = 1_000_000
EMAIL = re.compile(r"[\w.+*-]+@[\w-]+(?:\.[\w-]+)+")

Stub = authpool_pb2_grpc.AuthPoolStub
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


AS_CLIENT = bearer(CLIENT_TOKEN)
AS_OPERATOR = bearer(OPERATOR_TOKEN)
OPERATOR_HEADERS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

# The guide's Key Metrics table, row by row, and the sample that answers it.
KEY_METRICS = {
    "Allocation Success Rate": "authpool_allocations_total",
    "Average Health Score": "authpool_pool_health",
    "Rebalancing Frequency": "authpool_rebalance_runs_total",
    "Failover Rate": "authpool_allocations_total",
    "Response Time (p95)": "rpc_server_duration_seconds_bucket",
    "Memory Usage": "authpool_process_memory_bytes",
    "Error Rate": "rpc_server_duration_seconds_count",
}


def security() -> SecuritySettings:
    return SecuritySettings(
        tokens=TokenDirectory(
            [(OPERATOR_TOKEN, Principal("ops", Role.OPERATOR)), (CLIENT_TOKEN, Principal("worker", Role.CLIENT))]
        )
    )


def new_server(spec: PoolSpec, data_dir: Path, clock: FakeClock) -> Server:
    return Server(
        spec,
        data_dir=data_dir,
        security=security(),
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        telemetry=telemetry_from_env({}),  # Prometheus only, whatever OTEL_* the test run has
        background=False,
        clock=clock,
        grace_seconds=1,
    )


@pytest.fixture
async def server(tmp_path: Path, spec: PoolSpec, clock: FakeClock) -> AsyncIterator[Server]:
    server = new_server(spec, tmp_path, clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http(server: Server) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.admin_port}") as session:
        yield session


# -- helpers -------------------------------------------------------------------------


class Scrape:
    """One parsed /metrics response: samples by name and labels (otel_scope_* left out)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, {k: v for k, v in s.labels.items() if not k.startswith("otel_scope_")}, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
        self.names = {name for name, _, _ in self.samples}

    def values(self, name: str, **labels: str) -> list[float]:
        return [v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()]

    def value(self, name: str, **labels: str) -> float:
        """The one sample of `name` with these labels (and any others)."""
        found = self.values(name, **labels)
        assert len(found) == 1, f"{len(found)} samples of {name}{labels}"
        return found[0]

    def by(self, name: str, label: str) -> dict[str, float]:
        found = {ls[label]: v for n, ls, v in self.samples if n == name and label in ls}
        assert len(found) == len(self.values(name)), f"{name} has several series per {label}"
        return found

    def duplicated(self, prefixes: tuple[str, ...] = ("authpool_", "rpc_")) -> list[str]:
        seen = Counter((n, tuple(sorted(ls.items()))) for n, ls, _ in self.samples if n.startswith(prefixes))
        return [f"{n}{dict(ls)}" for (n, ls), count in seen.items() if count > 1]


async def scrape(http: aiohttp.ClientSession) -> Scrape:
    async with http.get("/metrics") as response:  # no token: scrapers carry none
        assert response.status == 200
        assert response.content_type == "text/plain"
        result = Scrape(await response.text())
    assert result.duplicated() == [], "a series appears twice"
    return result


async def get_json(http: aiohttp.ClientSession, path: str) -> dict:
    async with http.get(path, headers=OPERATOR_HEADERS) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        return await response.json()


async def allocate(stub: Stub, client_id: str) -> pb.AllocateResponse:
    return await stub.Allocate(pb.AllocateRequest(client_id=client_id), metadata=AS_CLIENT)


async def report(stub: Stub, lease: pb.Lease, request_id: str, cost_micros: int, outcome: int) -> None:
    await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id=request_id,
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            cost_micros=cost_micros,
            input_tokens=1200,
            output_tokens=340,
            model="claude-sonnet-4",
            outcome=outcome,  # type: ignore[arg-type]
        ),
        metadata=AS_CLIENT,
    )


async def status(stub: Stub) -> pb.StatusResponse:
    return await stub.Status(pb.StatusRequest(include_clients=True), metadata=AS_OPERATOR)


async def read_through(call: grpc.aio.UnaryStreamCall, sequence: int) -> None:
    """Read the event stream up to and including `sequence`."""
    while True:
        message = await asyncio.wait_for(call.read(), timeout=5)
        assert message is not grpc.aio.EOF, "the event stream ended"
        if message.event.sequence >= sequence:
            return


# -- /metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [make_spec(3, ttl=3_600)])
async def test_metrics_count_the_rpcs_and_show_the_pool_as_status_does(
    server: Server, stub: Stub, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    before = await scrape(http)
    assert not before.values("authpool_allocations_total")
    assert before.value("authpool_leases_live") == 0
    assert before.by("authpool_subscription_live_clients", "subscription_id") == {"sub1": 0, "sub2": 0, "sub3": 0}

    first = (await allocate(stub, "worker-1")).lease
    assert (await allocate(stub, "worker-1")).decision == pb.DECISION_KIND_STICKY
    second = (await allocate(stub, "worker-2")).lease
    assert (first.subscription_id, second.subscription_id) == ("sub1", "sub2")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Renew(pb.RenewRequest(lease_id="no-such-lease", fencing_token=1), metadata=AS_CLIENT)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    await report(stub, first, "req-1", 12_500_000, pb.USAGE_OUTCOME_OK)
    await report(stub, second, "req-2", 1 * UNIT, pb.USAGE_OUTCOME_RATE_LIMITED)
    clock.advance(120)  # both clients idle: rebalancing may move them
    rebalance = await stub.Rebalance(pb.RebalanceRequest(), metadata=AS_OPERATOR)
    assert [m.from_subscription_id for m in rebalance.moves] == ["sub1"]  # off the expensive one

    after = await scrape(http)

    assert after.by("authpool_allocations_total", "decision") == {"new": 2, "sticky": 1}
    calls = {
        (ls["rpc_method"], ls["rpc_grpc_status_code"]): v
        for n, ls, v in after.samples
        if n == "rpc_server_duration_seconds_count" and ls["rpc_service"] == "authpool.v1.AuthPool"
    }
    assert calls == {("Allocate", "0"): 3, ("Renew", "5"): 1, ("ReportUsage", "0"): 2, ("Rebalance", "0"): 1}
    assert after.value("rpc_server_duration_seconds_bucket", rpc_method="Renew", le="+Inf") == 1
    assert after.by("authpool_usage_reports_total", "outcome") == {"ok": 1, "rate_limited": 1}
    assert after.by("authpool_rebalance_runs_total", "trigger") == {"operator": 1}
    assert after.value("authpool_rebalance_moves_total", trigger="operator") == 1
    assert after.value("authpool_rebalance_duration_seconds_count", trigger="operator") == 1

    # The gauges say what Status says.
    state = await status(stub)
    assert after.by("authpool_subscription_health", "subscription_id") == {
        s.subscription_id: s.health_score for s in state.subscriptions
    }
    assert after.by("authpool_subscription_usage", "subscription_id") == {"sub1": 12.5, "sub2": 1.0, "sub3": 0.0}
    assert after.by("authpool_subscription_budget", "subscription_id") == {"sub1": 100, "sub2": 100, "sub3": 100}
    assert after.by("authpool_subscription_utilization", "subscription_id") == {"sub1": 0.125, "sub2": 0.01, "sub3": 0}
    live = after.by("authpool_subscription_live_clients", "subscription_id")
    assert live == {s.subscription_id: s.live_clients for s in state.subscriptions}
    assert live == {"sub1": 0, "sub2": 1, "sub3": 1}  # worker-1 moved to sub3
    assert after.value("authpool_leases_live") == 2 == state.totals.live_clients
    assert after.value("authpool_subscription_status", subscription_id="sub3", status="active") == 1
    assert after.value("authpool_subscription_status", subscription_id="sub2", status="limited") == 1
    for subscription_id in ("sub1", "sub2", "sub3"):  # one status at a time
        assert sum(after.values("authpool_subscription_status", subscription_id=subscription_id)) == 1
    assert after.value("authpool_pool_health") == pytest.approx(sum(s.health_score for s in state.subscriptions) / 3)
    assert after.value("authpool_fallback_clients") == 0
    assert after.value("authpool_process_memory_bytes") > 0

    # Scraping counts nothing: a second scrape shows the same counters.
    again = await scrape(http)
    assert again.by("authpool_allocations_total", "decision") == {"new": 2, "sticky": 1}
    assert again.value("rpc_server_duration_seconds_count", rpc_method="Renew") == 1


async def test_every_key_metric_of_the_guide_is_exported_and_documented(
    server: Server, stub: Stub, http: aiohttp.ClientSession
) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    await report(stub, lease, "req-1", UNIT, pb.USAGE_OUTCOME_SERVER_ERROR)
    await stub.Rebalance(pb.RebalanceRequest(), metadata=AS_OPERATOR)

    scraped = await scrape(http)

    for row, sample in KEY_METRICS.items():
        assert sample in scraped.names, f"the guide's {row!r} has no {sample}"
    # The docstring of telemetry.metrics is the table from the guide's rows to these names.
    table = metrics_module.__doc__ or ""
    ours = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in scraped.names if n.startswith(("authpool_", "rpc_"))}
    assert {name for name in ours if name not in table} == set()


async def test_metrics_need_no_token_and_name_no_client_or_account(
    server: Server, stub: Stub, http: aiohttp.ClientSession
) -> None:
    await allocate(stub, "worker-with-a-name")

    async with http.get("/metrics") as response:
        assert response.status == 200
        body = await response.text()

    assert "authpool_allocations_total" in body
    assert "worker-with-a-name" not in body
    assert "company.com" not in body  # no email, masked or not
    assert "/creds/" not in body  # nor where a credential lives


async def test_each_server_serves_only_its_own_series(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "refused").mkdir()
    refused = Server(make_spec(), data_dir=tmp_path / "refused", security=SecuritySettings(), listen="127.0.0.1:0")
    with pytest.raises(StartupRefused):  # auth on, no token: it never serves, and releases what it built
        await refused.start()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = new_server(make_spec(), tmp_path / "first", clock)
    second = new_server(make_spec(), tmp_path / "second", clock)
    await first.start()
    await second.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            await allocate(Stub(channel), "worker-1")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{first.admin_port}") as http:
            one = await scrape(http)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{second.admin_port}") as http:
            other = await scrape(http)  # no series twice, none from the refused or the first server
    finally:
        await first.stop()
        await second.stop()
    assert one.value("authpool_allocations_total", decision="new") == 1
    assert one.value("authpool_leases_live") == 1
    assert not other.values("authpool_allocations_total")
    assert other.value("authpool_leases_live") == 0
    assert len(other.values("target_info")) == 1
    assert other.values("process_resident_memory_bytes")  # the process collector, once


async def test_retried_reports_and_refused_callers_do_not_skew_the_rates(
    server: Server, stub: Stub, http: aiohttp.ClientSession
) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    for _ in range(3):  # one report, retried twice with its request id: one provider call
        await report(stub, lease, "req-1", 1000, pb.USAGE_OUTCOME_RATE_LIMITED)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Allocate(pb.AllocateRequest(client_id="intruder"), metadata=bearer("not-a-token-at-all-000"))
    scraped = await scrape(http)
    assert scraped.by("authpool_usage_reports_total", "outcome") == {"rate_limited": 1}
    # The intruder never reached the pool: its refusal is an RPC error, not a failed allocation.
    assert scraped.by("authpool_allocations_total", "decision") == {"new": 1}
    assert scraped.value("rpc_server_duration_seconds_count", rpc_method="Allocate", rpc_grpc_status_code="16") == 1


# -- /debug/auth-pool and /debug/memory: who may read them ----------------------------------


@pytest.mark.parametrize("path", ["/debug/auth-pool", "/debug/memory"])
async def test_debug_pages_are_for_operators_only(server: Server, http: aiohttp.ClientSession, path: str) -> None:
    refusals = {
        "no token": ({}, 401),
        "a wrong token": ({"Authorization": "Bearer operator-token-0000000000000000"}, 401),
        "the operator token as a password": ({"Authorization": f"Basic {OPERATOR_TOKEN}"}, 401),
        "a client token": ({"Authorization": f"Bearer {CLIENT_TOKEN}"}, 403),
    }
    for case, (headers, code) in refusals.items():
        async with http.get(path, headers=headers) as response:
            body = await response.text()
            assert response.status == code, case
            assert "error" in await response.json(), case
            if code == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
            assert OPERATOR_TOKEN not in body
            assert CLIENT_TOKEN not in body

    async with http.get(path, headers=OPERATOR_HEADERS) as response:
        assert response.status == 200


# -- /debug/auth-pool --------------------------------------------------------------------


@pytest.mark.parametrize("spec", [make_spec(2, max_clients=1, ttl=3_600)])
async def test_debug_auth_pool_answers_the_guides_jq_recipes(
    server: Server, stub: Stub, http: aiohttp.ClientSession
) -> None:
    leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(1, 4)]
    assert [lease.subscription_id for lease in leases] == ["sub1", "sub2", "fallback"]  # the pool is full
    await report(stub, leases[1], "req-1", 3 * UNIT, pb.USAGE_OUTCOME_RATE_LIMITED)

    async with http.get("/debug/auth-pool", headers=OPERATOR_HEADERS) as response:
        assert response.status == 200
        body = await response.text()
        document = await response.json()

    # jq '.status[] | select(.status == "limited")'
    limited = [entry for entry in document["status"] if entry["status"] == "limited"]
    assert [entry["id"] for entry in limited] == ["sub2"]
    assert limited[0]["weeklyUsage"] == 3.0
    assert limited[0]["assignedClients"] == ["worker-2"]
    # jq '[.status[].assignedClients | length] | add': every live client, those on the fallback too
    sessions = sum(len(entry["assignedClients"]) for entry in document["status"])
    state = await status(stub)
    assert sessions == 3 == len(state.clients) == state.totals.live_clients + state.totals.fallback_clients
    totals = document["totals"]
    assert (totals["liveClients"], totals["fallbackClients"]) == (2, 1)  # as Status counts them
    assert (totals["subscriptions"], totals["activeSubscriptions"]) == (2, 1)
    assert document["status"][-1] == {
        "id": "fallback",
        "type": "pay-as-you-go",
        "fallback": True,
        "status": "active",
        "assignedClients": ["worker-3"],
        "usage": 0.0,
    }

    # Emails are masked, as in Status: no full address anywhere in the page.
    assert [entry.get("email") for entry in document["status"]] == ["t***@company.com", "t***@company.com", None]
    assert "team+sub" not in body
    assert set(EMAIL.findall(body)) == {"t***@company.com"}


# -- /debug/memory ------------------------------------------------------------------------


async def test_debug_memory_shows_leases_watchers_and_the_commit_queue(
    server: Server, stub: Stub, http: aiohttp.ClientSession
) -> None:
    for i in range(1, 3):
        await allocate(stub, f"worker-{i}")
    idle = await get_json(http, "/debug/memory")
    assert idle["rssBytes"] > 0
    assert idle["pool"]["liveLeases"] == 2
    assert idle["pool"]["commitQueueDepth"] == 0  # every acknowledged write is committed
    assert (idle["pool"]["watchers"], idle["pool"]["watcherBacklogs"]) == (0, [])
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z]*)*", key) for key in idle["pool"]), "camelCase keys"

    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0), metadata=AS_OPERATOR)
    try:
        await read_through(call, (await status(stub)).totals.last_sequence)  # replayed: it follows live events
        watching = await get_json(http, "/debug/memory")
        assert (watching["pool"]["watchers"], watching["pool"]["watcherBacklogs"]) == (1, [0])
        assert (await scrape(http)).value("authpool_watchers") == 1

        # The stream hands events to gRPC as they come, so its queue stays empty while the
        # client keeps up (HTTP/2 flow control, not the queue, holds what it has not read yet).
        await allocate(stub, "worker-3")
        await read_through(call, (await status(stub)).totals.last_sequence)
        following = await get_json(http, "/debug/memory")
        assert following["pool"]["liveLeases"] == 3
        assert (following["pool"]["watchers"], following["pool"]["watcherBacklogs"]) == (1, [0])
    finally:
        call.cancel()

    async def watchers() -> int:
        return (await get_json(http, "/debug/memory"))["pool"]["watchers"]

    for _ in range(100):  # the server sees the cancellation within milliseconds
        if await watchers() == 0:
            break
        await asyncio.sleep(0.02)
    assert await watchers() == 0
    assert (await scrape(http)).value("authpool_watchers") == 0
