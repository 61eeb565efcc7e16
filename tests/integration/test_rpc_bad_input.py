"""Bad input for every AuthPool RPC, over a real channel to a real server.

Each case checks what a caller sees (the status code, the `ErrorInfo` reason
in domain "authpool.v1", a `BadRequest` naming every offending field) and that
the refused call changed nothing: `Status` (with every lease) reads the same
before and after, apart from its `as_of` timestamp.

The pool is tests/conftest.py's `make_spec()`: three `claude-pro`
subscriptions of 100 units a week, two clients each, fallback on, a 30 s TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from authpool_server.server import Server
from tests.conftest import FakeClock, make_spec
from tests.integration.rich_errors import error_details

UNIT = 1_000_000
DOMAIN = "authpool.v1"
HUGE = "x" * 10_000
MIB = 1 << 20

Stub = authpool_pb2_grpc.AuthPoolStub


# -- helpers -------------------------------------------------------------------


async def status(stub: Stub) -> pb.StatusResponse:
    response = await stub.Status(pb.StatusRequest(include_clients=True))
    response.ClearField("as_of")
    return response


def usage(lease: pb.Lease, **overrides: object) -> pb.ReportUsageRequest:
    fields: dict[str, object] = {
        "request_id": "req-1",
        "lease_id": lease.lease_id,
        "fencing_token": lease.fencing_token,
        "cost_micros": UNIT,
        "input_tokens": 10,
        "output_tokens": 10,
        "model": "claude-sonnet-4",
        "outcome": pb.USAGE_OUTCOME_OK,
    }
    fields.update(overrides)
    return pb.ReportUsageRequest(**fields)  # type: ignore[arg-type]


def renew(lease: pb.Lease, **overrides: object) -> pb.RenewRequest:
    fields: dict[str, object] = {"lease_id": lease.lease_id, "fencing_token": lease.fencing_token}
    fields.update(overrides)
    return pb.RenewRequest(**fields)  # type: ignore[arg-type]


def release(lease: pb.Lease, **overrides: object) -> pb.ReleaseRequest:
    fields: dict[str, object] = {"lease_id": lease.lease_id, "fencing_token": lease.fencing_token}
    fields.update(overrides)
    return pb.ReleaseRequest(**fields)  # type: ignore[arg-type]


def labels(count: int) -> dict[str, str]:
    return {f"key{i}": "value" for i in range(count)}


@dataclass(frozen=True)
class Case:
    rpc: str
    request: Callable[[pb.Lease], Message]  # built from the live lease of the seeded pool
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    reason: str = "INVALID_ARGUMENT"
    fields: frozenset[str] = field(default_factory=frozenset)  # BadRequest field paths, exactly


def bad(rpc: str, request: Callable[[pb.Lease], Message], *fields: str) -> Case:
    return Case(rpc, request, fields=frozenset(fields))


CASES: dict[str, Case] = {
    # Allocate
    "allocate/empty-client-id": bad("Allocate", lambda _: pb.AllocateRequest(), "client_id"),
    "allocate/huge-client-id": bad("Allocate", lambda _: pb.AllocateRequest(client_id=HUGE), "client_id"),
    "allocate/client-id-129-chars": bad("Allocate", lambda _: pb.AllocateRequest(client_id="c" * 129), "client_id"),
    "allocate/client-id-newline": bad("Allocate", lambda _: pb.AllocateRequest(client_id="worker\n7"), "client_id"),
    "allocate/client-id-nul": bad("Allocate", lambda _: pb.AllocateRequest(client_id="worker\x007"), "client_id"),
    "allocate/client-id-escape": bad("Allocate", lambda _: pb.AllocateRequest(client_id="\x1b[31mred"), "client_id"),
    "allocate/client-id-space": bad("Allocate", lambda _: pb.AllocateRequest(client_id="worker 7"), "client_id"),
    "allocate/client-id-non-ascii": bad("Allocate", lambda _: pb.AllocateRequest(client_id="wörker"), "client_id"),
    "allocate/huge-session-id": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", session_id=HUGE), "session_id"
    ),
    "allocate/session-id-control": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", session_id="s\x07"), "session_id"
    ),
    "allocate/session-id-zero-width": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", session_id="s\u200b1"), "session_id"
    ),
    "allocate/bad-subscription-type": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", subscription_type="Claude Pro"), "subscription_type"
    ),
    "allocate/huge-subscription-type": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", subscription_type=HUGE), "subscription_type"
    ),
    "allocate/17-labels": bad("Allocate", lambda _: pb.AllocateRequest(client_id="w", labels=labels(17)), "labels"),
    "allocate/label-key-with-space": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", labels={"bad key": "v"}), "labels['bad key']"
    ),
    "allocate/empty-label-key": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", labels={"": "v"}), "labels['']"
    ),
    "allocate/label-key-64-chars": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", labels={"k" * 64: "v"}), f"labels[{'k' * 63!r}]"
    ),
    "allocate/huge-label-value": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", labels={"team": HUGE}), "labels['team']"
    ),
    "allocate/label-value-control": bad(
        "Allocate", lambda _: pb.AllocateRequest(client_id="w", labels={"team": "a\tb"}), "labels['team']"
    ),
    "allocate/every-field-bad": bad(
        "Allocate",
        lambda _: pb.AllocateRequest(
            client_id="", session_id="\x00", subscription_type="-x", labels={"ok": "fine", "b@d": "v"}
        ),
        "client_id",
        "session_id",
        "subscription_type",
        "labels['b@d']",
    ),
    # Renew
    "renew/empty": bad("Renew", lambda _: pb.RenewRequest(), "lease_id", "fencing_token"),
    "renew/huge-lease-id": bad("Renew", lambda lease: renew(lease, lease_id=HUGE), "lease_id"),
    "renew/lease-id-control": bad("Renew", lambda lease: renew(lease, lease_id="lease\r\n"), "lease_id"),
    "renew/fencing-token-zero": bad("Renew", lambda lease: renew(lease, fencing_token=0), "fencing_token"),
    "renew/unknown-lease": Case(
        "Renew",
        lambda lease: renew(lease, lease_id="no-such-lease"),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    ),
    # Release
    "release/empty": bad("Release", lambda _: pb.ReleaseRequest(), "lease_id", "fencing_token"),
    "release/huge-lease-id": bad("Release", lambda lease: release(lease, lease_id=HUGE), "lease_id"),
    "release/lease-id-control": bad("Release", lambda lease: release(lease, lease_id="\x7f"), "lease_id"),
    "release/fencing-token-zero": bad("Release", lambda lease: release(lease, fencing_token=0), "fencing_token"),
    # ReportUsage
    "report/empty": bad("ReportUsage", lambda _: pb.ReportUsageRequest(), "request_id", "lease_id", "fencing_token"),
    "report/huge-request-id": bad("ReportUsage", lambda lease: usage(lease, request_id=HUGE), "request_id"),
    "report/request-id-control": bad("ReportUsage", lambda lease: usage(lease, request_id="r\x1f"), "request_id"),
    "report/empty-lease-id": bad("ReportUsage", lambda lease: usage(lease, lease_id=""), "lease_id"),
    "report/huge-lease-id": bad("ReportUsage", lambda lease: usage(lease, lease_id=HUGE), "lease_id"),
    "report/fencing-token-zero": bad("ReportUsage", lambda lease: usage(lease, fencing_token=0), "fencing_token"),
    "report/negative-cost": bad("ReportUsage", lambda lease: usage(lease, cost_micros=-1), "cost_micros"),
    "report/absurd-cost": bad("ReportUsage", lambda lease: usage(lease, cost_micros=10**12 + 1), "cost_micros"),
    "report/negative-input-tokens": bad("ReportUsage", lambda lease: usage(lease, input_tokens=-5), "input_tokens"),
    "report/negative-output-tokens": bad(
        "ReportUsage", lambda lease: usage(lease, output_tokens=-(2**63)), "output_tokens"
    ),
    "report/absurd-tokens": bad("ReportUsage", lambda lease: usage(lease, input_tokens=10**9 + 1), "input_tokens"),
    "report/huge-model": bad("ReportUsage", lambda lease: usage(lease, model=HUGE), "model"),
    "report/model-control": bad("ReportUsage", lambda lease: usage(lease, model="claude\x00"), "model"),
    "report/unknown-outcome": bad("ReportUsage", lambda lease: usage(lease, outcome=99), "outcome"),
    "report/negative-outcome": bad("ReportUsage", lambda lease: usage(lease, outcome=-1), "outcome"),
    "report/every-field-bad": bad(
        "ReportUsage",
        lambda _: pb.ReportUsageRequest(
            request_id=HUGE, cost_micros=-1, input_tokens=-1, output_tokens=-1, model="\n", outcome=7
        ),
        "request_id",
        "lease_id",
        "fencing_token",
        "cost_micros",
        "input_tokens",
        "output_tokens",
        "model",
        "outcome",
    ),
    "report/unknown-lease": Case(
        "ReportUsage",
        lambda lease: usage(lease, lease_id="no-such-lease"),
        grpc.StatusCode.NOT_FOUND,
        "LEASE_NOT_FOUND",
    ),
    "report/token-never-of-the-lease": bad(
        "ReportUsage", lambda lease: usage(lease, fencing_token=lease.fencing_token + 1000), "fencing_token"
    ),
}


@pytest.fixture
async def seeded(stub: Stub) -> pb.Lease:
    """A pool with state to protect: one live lease on sub1 with 3 units spent, one on sub2."""
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="worker-1", labels={"team": "a"}))).lease
    await stub.Allocate(pb.AllocateRequest(client_id="worker-2"))
    await stub.ReportUsage(usage(lease, request_id="seed", cost_micros=3 * UNIT))
    return lease


# -- field validation, unknown leases ---------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_bad_request_is_refused_with_details_and_changes_nothing(
    stub: Stub, seeded: pb.Lease, case: Case
) -> None:
    before = await status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, case.rpc)(case.request(seeded))

    error = caught.value
    assert error.code() == case.code, error.details()
    details = error_details(error)
    info = details.get(error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == case.reason
    assert info.domain == DOMAIN
    bad_request = details.get(error_details_pb2.BadRequest)
    if case.fields:
        assert isinstance(bad_request, error_details_pb2.BadRequest)
        named = [violation.field for violation in bad_request.field_violations]
        assert sorted(named) == sorted(case.fields)
        assert all(violation.description for violation in bad_request.field_violations)
        for name in case.fields:
            assert name in error.details()
    else:
        assert bad_request is None
    assert HUGE not in error.details(), "the error echoes a 10k-character input back"
    assert await status(stub) == before


async def test_unknown_lease_error_names_the_lease(stub: Stub, seeded: pb.Lease) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Renew(pb.RenewRequest(lease_id="lease-404", fencing_token=seeded.fencing_token))

    info = error_details(caught.value)[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert dict(info.metadata) == {"lease_id": "lease-404"}


async def test_release_of_an_unknown_lease_is_success_not_an_error(stub: Stub, seeded: pb.Lease) -> None:
    before = await status(stub)

    response = await stub.Release(pb.ReleaseRequest(lease_id="no-such-lease", fencing_token=1))

    assert response.released is False
    assert await status(stub) == before


async def test_a_huge_but_valid_label_set_is_accepted(stub: Stub) -> None:
    """The limits are inclusive: 16 labels, 63-character keys, 256-character values, 128-character ids."""
    request = pb.AllocateRequest(
        client_id="c" * 128,
        session_id="s" * 128,
        labels={f"{i:02d}" + "k" * 61: "v" * 256 for i in range(16)},
    )

    response = await stub.Allocate(request)

    assert response.decision == pb.DECISION_KIND_NEW
    assert dict(response.lease.labels) == dict(request.labels)


# -- fencing tokens ------------------------------------------------------------------


@pytest.fixture
async def moved(stub: Stub) -> tuple[pb.Lease, pb.Lease]:
    """A lease before and after its subscription ran out and it moved (the holder renewed with the new token)."""
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="worker-1"))).lease
    await stub.ReportUsage(usage(lease, request_id="spend-it-all", cost_micros=100 * UNIT))
    renewed = await stub.Renew(renew(lease))
    assert renewed.moved
    assert renewed.lease.fencing_token > lease.fencing_token
    return lease, renewed.lease


@pytest.mark.parametrize("rpc", ["Renew", "Release"])
async def test_stale_fencing_token_is_aborted(stub: Stub, moved: tuple[pb.Lease, pb.Lease], rpc: str) -> None:
    old, current = moved
    before = await status(stub)

    request = renew(old) if rpc == "Renew" else release(old)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request)

    error = caught.value
    assert error.code() == grpc.StatusCode.ABORTED
    details = error_details(error)
    info = details[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "STALE_FENCING_TOKEN"
    assert info.domain == DOMAIN
    assert info.metadata["lease_id"] == old.lease_id
    assert info.metadata["current_fencing_token"] == str(current.fencing_token)
    assert error_details_pb2.BadRequest not in details
    assert await status(stub) == before
    # The current holder is unaffected.
    assert not (await stub.Renew(renew(current))).moved


async def test_usage_under_an_old_token_is_charged_where_it_was_spent(
    stub: Stub, moved: tuple[pb.Lease, pb.Lease]
) -> None:
    """A late report under the pre-move token is not an error: it counts against the old subscription."""
    old, current = moved
    assert old.subscription_id != current.subscription_id

    ack = await stub.ReportUsage(usage(old, request_id="late", cost_micros=2 * UNIT))

    assert ack.subscription_id == old.subscription_id
    state = await status(stub)
    by_id = {s.subscription_id: s.weekly_usage_micros for s in state.subscriptions}
    assert by_id[old.subscription_id] == 102 * UNIT
    assert by_id[current.subscription_id] == 0


@pytest.mark.parametrize("spec", [make_spec(2, ttl=14 * 86_400)], ids=["two-subs-long-ttl"])
@pytest.mark.parametrize("rpc", ["Renew", "Release"])
async def test_stale_token_at_the_window_roll_leaves_no_gap_in_the_event_log(
    stub: Stub, clock: FakeClock, moved: tuple[pb.Lease, pb.Lease], rpc: str
) -> None:
    """A refused call must not swallow the events of the weekly window roll it happened to trigger.

    Watchers see the log through WatchEvents: a skipped sequence number, or a
    subscription that turned active again without an event, is visible there.
    """
    old, _ = moved
    before = await stub.Status(pb.StatusRequest())
    assert before.subscriptions[0].status == pb.SUBSCRIPTION_STATUS_EXHAUSTED
    last = before.totals.last_sequence
    clock.now = before.subscriptions[0].window_end.ToSeconds() + 1  # Monday 00:00:01 UTC

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(renew(old) if rpc == "Renew" else release(old))
    assert caught.value.code() == grpc.StatusCode.ABORTED

    granted = (await stub.Allocate(pb.AllocateRequest(client_id="worker-2"))).lease
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=last))
    try:
        events = []
        while not events or events[-1].lease_id != granted.lease_id:
            message = await asyncio.wait_for(call.read(), timeout=5)
            events.append(message.event)
    finally:
        call.cancel()
    assert [e.sequence for e in events] == list(range(last + 1, last + 1 + len(events)))
    changes = [
        (e.subscription_id, e.attributes["from"], e.attributes["to"])
        for e in events
        if e.type == pb.EVENT_TYPE_SUBSCRIPTION_STATUS_CHANGED
    ]
    assert ("sub1", "exhausted", "active") in changes


# -- WatchEvents ------------------------------------------------------------------------


async def test_watch_events_after_compacted_history_is_out_of_range(
    server: Server, stub: Stub, clock: FakeClock
) -> None:
    for i in range(3):
        await stub.Allocate(pb.AllocateRequest(client_id=f"worker-{i}"))  # sequences 1..3
    clock.advance(8 * 86_400)  # past the 7-day event retention
    assert await server.pool.reap() == 3  # expiries are sequences 4..6; 1..3 are pruned
    before = await status(stub)
    assert before.totals.last_sequence == 6

    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), timeout=5)

    error = caught.value
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_details(error)[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "EVENTS_COMPACTED"
    assert info.domain == DOMAIN
    assert info.metadata["oldest_sequence"] == "4"
    assert await status(stub) == before

    # Following the advice in the error works: resume from just before the oldest retained event.
    for after in (3, 0):
        resumed = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after))
        try:
            first = await asyncio.wait_for(resumed.read(), timeout=5)
        finally:
            resumed.cancel()
        assert first.event.sequence == 4
        assert first.event.type == pb.EVENT_TYPE_LEASE_EXPIRED


# -- what gRPC itself refuses -----------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def padded(message: Message, size: int) -> bytes:
    """`message` serialised, followed by an unknown length-delimited field so the whole is `size` bytes."""
    head = message.SerializeToString()
    tag = _varint((999 << 3) | 2)
    body = size - len(head) - len(tag)
    body -= len(_varint(body))
    raw = head + tag + _varint(body) + b"\0" * body
    assert len(raw) == size
    return raw


RPCS: dict[str, tuple[str, Message]] = {
    "Allocate": ("unary", pb.AllocateRequest(client_id="worker-9")),
    "Renew": ("unary", pb.RenewRequest(lease_id="x", fencing_token=1)),
    "Release": ("unary", pb.ReleaseRequest(lease_id="x", fencing_token=1)),
    "ReportUsage": ("unary", pb.ReportUsageRequest(request_id="r", lease_id="x", fencing_token=1)),
    "Status": ("unary", pb.StatusRequest()),
    "Rebalance": ("unary", pb.RebalanceRequest()),
    "WatchEvents": ("stream", pb.WatchEventsRequest()),
}


async def _call_raw(channel: grpc.aio.Channel, rpc: str, payload: bytes) -> None:
    kind, _ = RPCS[rpc]
    method = f"/authpool.v1.AuthPool/{rpc}"
    if kind == "unary":
        await asyncio.wait_for(channel.unary_unary(method)(payload), timeout=10)
        return
    call = channel.unary_stream(method)(payload)
    try:
        await asyncio.wait_for(call.read(), timeout=10)
    finally:
        call.cancel()


@pytest.mark.parametrize("rpc", RPCS)
async def test_message_over_1_mib_is_resource_exhausted(
    channel: grpc.aio.Channel, stub: Stub, seeded: pb.Lease, rpc: str
) -> None:
    before = await status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call_raw(channel, rpc, padded(RPCS[rpc][1], MIB + 1))

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await status(stub) == before


async def test_message_of_exactly_1_mib_is_served(channel: grpc.aio.Channel, stub: Stub) -> None:
    raw = await channel.unary_unary("/authpool.v1.AuthPool/Status")(padded(pb.StatusRequest(), MIB))

    assert pb.StatusResponse.FromString(raw).totals.subscriptions == 3


async def test_oversize_allocate_through_the_generated_stub(stub: Stub, seeded: pb.Lease) -> None:
    before = await status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Allocate(pb.AllocateRequest(client_id="w" * (MIB + 1)))

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await status(stub) == before
    assert (await stub.Allocate(pb.AllocateRequest(client_id="worker-3"))).decision == pb.DECISION_KIND_NEW


@pytest.mark.parametrize("rpc", RPCS)
async def test_corrupt_wire_bytes_are_refused_and_the_server_keeps_serving(
    channel: grpc.aio.Channel, stub: Stub, seeded: pb.Lease, rpc: str
) -> None:
    before = await status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # Field 1, length-delimited, claiming far more bytes than follow.
        await _call_raw(channel, rpc, b"\x0a\xff\xff\xff\xff\x0f")

    assert caught.value.code() != grpc.StatusCode.OK
    assert await status(stub) == before
    assert (await stub.Allocate(pb.AllocateRequest(client_id="worker-3"))).decision == pb.DECISION_KIND_NEW


# -- a fault inside the server ---------------------------------------------------------------

SECRET = "/var/lib/authpool/creds/token=sk-ant-0000"

# The Pool method each unary RPC calls, and a request that passes validation.
FAULTS: dict[str, tuple[str, Message]] = {
    "Allocate": ("allocate", pb.AllocateRequest(client_id="worker-9")),
    "Renew": ("renew", pb.RenewRequest(lease_id="lease-1", fencing_token=1)),
    "Release": ("release", pb.ReleaseRequest(lease_id="lease-1", fencing_token=1)),
    "ReportUsage": ("report_usage", pb.ReportUsageRequest(request_id="r", lease_id="lease-1", fencing_token=1)),
    "Status": ("status", pb.StatusRequest()),
    "Rebalance": ("rebalance", pb.RebalanceRequest()),
}


@pytest.mark.parametrize("rpc", FAULTS)
async def test_an_unexpected_server_fault_is_internal_with_error_info_and_leaks_nothing(
    server: Server, stub: Stub, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    """A bug inside the pool must still answer by the contract: INTERNAL with an ErrorInfo, no internals."""
    method, request = FAULTS[rpc]
    real = getattr(server.pool, method)

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"something broke reading {SECRET}")

    async def fail_async(*args: object, **kwargs: object) -> None:
        fail()

    monkeypatch.setattr(server.pool, method, fail if method == "status" else fail_async)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request)

    error = caught.value
    assert SECRET not in (error.details() or ""), "the status message leaks the exception text"
    assert "RuntimeError" not in (error.details() or "")
    assert error.code() == grpc.StatusCode.INTERNAL
    info = error_details(error)[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    assert info.reason == "INTERNAL"

    monkeypatch.setattr(server.pool, method, real)
    assert (await stub.Status(pb.StatusRequest())).totals.subscriptions == 3  # still serving


async def test_an_unexpected_fault_in_the_event_stream_is_internal_with_error_info(
    server: Server, stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_watch(after_sequence: int, **_: object) -> AsyncIterator[object]:
        raise RuntimeError(f"something broke reading {SECRET}")
        yield  # pragma: no cover - makes this an async generator

    monkeypatch.setattr(server.pool.events, "watch_batches", broken_watch)

    call = stub.WatchEvents(pb.WatchEventsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), timeout=5)

    error = caught.value
    assert SECRET not in (error.details() or ""), "the status message leaks the exception text"
    assert error.code() == grpc.StatusCode.INTERNAL
    info = error_details(error)[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.domain, info.reason) == (DOMAIN, "INTERNAL")
