"""Hypothesis-driven requests to every AuthPool RPC, through a real channel to a real in-process server.

tests/integration/test_rpc_bad_input.py pins each known bad value to its
exact answer; this module throws generated ones at the server: huge, empty,
unicode (right-to-left overrides, NUL and other control characters, and
surrogates as raw bytes), negative and huge numbers, NaN and infinities,
timestamps and durations far outside their range, and bytes that are not
protobuf at all. Whatever comes in, the caller gets a proper status
(INVALID_ARGUMENT names the field, never UNKNOWN or INTERNAL), a refused
call changes nothing, and afterwards no client holds two leases, no
subscription is over its limit, the event log has no gap, and the server
still answers Health and a plain Allocate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from hypothesis import given
from hypothesis import strategies as st

from authpool_server.server import Server
from tests.conftest import FakeClock
from tests.fuzz.support import (
    HUGE,
    NEVER,
    Stub,
    check_event_log,
    check_invariants,
    check_refusal,
    check_still_serving,
    doubles,
    durations,
    enum_values,
    field_roots,
    fuzz_settings,
    int64s,
    pool_status,
    texts,
    timestamps,
    uint64s,
)
from tests.integration.rich_errors import error_details

LIVE = object()  # stands for the lease id / fencing token of a live lease, filled in at call time

lease_ids = st.one_of(st.just(LIVE), texts)
tokens = st.one_of(st.just(LIVE), uint64s)
subscription_ids = st.one_of(st.sampled_from(["sub1", "sub2", "sub3"]), texts)


def _request(message: type[Message], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of `message`'s fields, each maybe absent."""
    return st.fixed_dictionaries({}, optional=fields)


REQUESTS: dict[str, tuple[type[Message], st.SearchStrategy[dict[str, Any]]]] = {
    "Allocate": (
        pb.AllocateRequest,
        _request(
            pb.AllocateRequest,
            client_id=texts,
            session_id=texts,
            subscription_type=texts,
            labels=st.dictionaries(texts, texts, max_size=18),
        ),
    ),
    "Renew": (pb.RenewRequest, _request(pb.RenewRequest, lease_id=lease_ids, fencing_token=tokens)),
    "Release": (pb.ReleaseRequest, _request(pb.ReleaseRequest, lease_id=lease_ids, fencing_token=tokens)),
    "ReportUsage": (
        pb.ReportUsageRequest,
        _request(
            pb.ReportUsageRequest,
            request_id=texts,
            lease_id=lease_ids,
            fencing_token=tokens,
            cost_micros=int64s,
            input_tokens=int64s,
            output_tokens=int64s,
            model=texts,
            outcome=enum_values(pb.UsageOutcome),
            provider_limits=st.fixed_dictionaries(
                {}, optional={"remaining_fraction": doubles, "reset_time": timestamps}
            ),
        ),
    ),
    "Status": (pb.StatusRequest, _request(pb.StatusRequest, include_clients=st.booleans())),
    "Rebalance": (pb.RebalanceRequest, _request(pb.RebalanceRequest, dry_run=st.booleans())),
    "DrainSubscription": (
        pb.DrainSubscriptionRequest,
        _request(pb.DrainSubscriptionRequest, subscription_id=subscription_ids),
    ),
    "ResumeSubscription": (
        pb.ResumeSubscriptionRequest,
        _request(pb.ResumeSubscriptionRequest, subscription_id=subscription_ids),
    ),
    "WatchEvents": (
        pb.WatchEventsRequest,
        _request(
            pb.WatchEventsRequest,
            after_sequence=st.one_of(st.sampled_from([0, 1, 2**64 - 1]), uint64s),
            types=st.lists(enum_values(pb.EventType), max_size=4),
            subscription_ids=st.lists(subscription_ids, max_size=4),
            client_ids=st.lists(texts, max_size=4),
            progress_interval=durations,
        ),
    ),
}


async def _seed(stub: Stub) -> pb.Lease:
    """State to protect: two live leases, some spend."""
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="worker-1", labels={"team": "a"}))).lease
    await stub.Allocate(pb.AllocateRequest(client_id="worker-2"))
    await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id="seed", lease_id=lease.lease_id, fencing_token=lease.fencing_token, cost_micros=3_000_000
        )
    )
    return lease


def _fill(fields: dict[str, Any], lease: pb.Lease) -> dict[str, Any]:
    filled = dict(fields)
    if filled.get("lease_id") is LIVE:
        filled["lease_id"] = lease.lease_id
    if filled.get("fencing_token") is LIVE:
        filled["fencing_token"] = lease.fencing_token
    return filled


async def _watch_first(stub: Stub, request: pb.WatchEventsRequest) -> None:
    """Open the stream and wait briefly for its first message; an open, quiet stream is fine."""
    call = stub.WatchEvents(request)
    try:
        await asyncio.wait_for(call.read(), timeout=0.2)
    except TimeoutError:
        pass
    finally:
        call.cancel()


@pytest.fixture
async def seeded(channel: grpc.aio.Channel, stub: Stub) -> AsyncIterator[pb.Lease]:
    """A seeded pool shared by every example of a test; once they are all done, the server must be whole."""
    yield await _seed(stub)
    state = await pool_status(stub)
    check_invariants(state)
    await check_event_log(stub, state.totals.last_sequence)
    await check_still_serving(channel, stub)


@pytest.mark.parametrize("rpc", list(REQUESTS))
@fuzz_settings(40)
@given(data=st.data())
async def test_random_requests_get_a_proper_answer_and_refusals_change_nothing(
    stub: Stub, seeded: pb.Lease, rpc: str, data: st.DataObject
) -> None:
    message, strategy = REQUESTS[rpc]
    request = data.draw(strategy, label="request")
    current = next((c for c in (await pool_status(stub)).clients if c.client_id == "worker-1"), seeded)
    built = message(**_fill(request, current))
    before = await pool_status(stub)
    try:
        if rpc == "WatchEvents":
            await _watch_first(stub, built)
        else:
            await getattr(stub, rpc)(built, timeout=10)
    except grpc.aio.AioRpcError as error:
        check_refusal(error, field_roots(message))
        assert await pool_status(stub) == before, "a refused call changed the pool"
    check_invariants(await pool_status(stub))


# -- operations in random order, valid and not -------------------------------------------------

CLIENTS = [f"client-{i}" for i in range(9)]

operations = st.one_of(
    st.tuples(st.just("allocate"), st.sampled_from(CLIENTS), st.sampled_from(["", "claude-pro", "nope"])),
    st.tuples(st.just("renew"), st.integers(0, 20), st.sampled_from([0, -1, 1, 1000])),
    st.tuples(st.just("release"), st.integers(0, 20), st.sampled_from([0, -1, 1])),
    st.tuples(
        st.just("report"),
        st.integers(0, 20),
        st.sampled_from([0, 1, 40_000_000, 10**12, -1]),
        enum_values(pb.UsageOutcome),
        st.one_of(st.none(), doubles),
        st.one_of(st.none(), st.sampled_from([1, 1_764_003_600, 1_764_000_000 + 86_400 * 365 * 100, 253_402_300_799])),
    ),
    st.tuples(st.sampled_from(["drain", "resume"]), st.sampled_from(["sub1", "sub2", "sub3", "sub4"])),
    st.tuples(st.just("rebalance"), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 29.0, 31.0, 3_600.0, 8 * 86_400.0])),
)


async def _apply(stub: Stub, clock: FakeClock, leases: list[pb.Lease], op: tuple[Any, ...], serial: list[int]) -> None:
    kind = op[0]
    lease = leases[op[1] % len(leases)] if leases and isinstance(op[1], int) else None
    if kind == "allocate":
        reply = await stub.Allocate(pb.AllocateRequest(client_id=op[1], subscription_type=op[2]))
        leases.append(reply.lease)
    elif kind in ("renew", "release") and lease is not None:
        token = max(0, lease.fencing_token + op[2])
        if kind == "renew":
            leases.append((await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, fencing_token=token))).lease)
        else:
            await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=token))
    elif kind == "report" and lease is not None:
        serial[0] += 1
        limits = pb.ProviderLimits()
        if op[4] is not None:
            limits.remaining_fraction = op[4]
        if op[5] is not None:
            limits.reset_time.CopyFrom(Timestamp(seconds=op[5]))
        await stub.ReportUsage(
            pb.ReportUsageRequest(
                request_id=f"r-{serial[0]}",
                lease_id=lease.lease_id,
                fencing_token=lease.fencing_token,
                cost_micros=op[2],
                outcome=op[3],
                provider_limits=limits,
            )
        )
    elif kind == "drain":
        await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id=op[1]))
    elif kind == "resume":
        await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id=op[1]))
    elif kind == "rebalance":
        await stub.Rebalance(pb.RebalanceRequest(dry_run=op[1]))
    elif kind == "advance":
        clock.advance(op[1])


EVERY_FIELD = frozenset({"request"}).union(*(field_roots(message) for message, _ in REQUESTS.values()))


@fuzz_settings(25)
@given(ops=st.lists(operations, max_size=14))
async def test_random_sequences_of_calls_keep_the_invariants(
    stub: Stub, clock: FakeClock, seeded: pb.Lease, ops: list[tuple[Any, ...]]
) -> None:
    """Valid and invalid calls interleaved with time passing: the pool stays consistent after every step."""
    leases: list[pb.Lease] = [seeded]
    serial = [int(clock.now * 1000)]  # request ids unique across examples
    for op in ops:
        try:
            await _apply(stub, clock, leases, op, serial)
        except grpc.aio.AioRpcError as error:
            check_refusal(error, EVERY_FIELD)
        check_invariants(await pool_status(stub))
    state = await pool_status(stub)
    await check_event_log(stub, state.totals.last_sequence)
    for sub in state.subscriptions:  # the next example starts from a pool in rotation
        await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id=sub.subscription_id))


# -- bytes that are not the message they claim to be ----------------------------------------------

METHODS = [method.name for method in pb.DESCRIPTOR.services_by_name["AuthPool"].methods]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string_field(number: int, raw: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def _flip(data: tuple[bytes, list[tuple[int, int]]]) -> bytes:
    raw, edits = data
    buffer = bytearray(raw)
    for position, value in edits:
        if buffer:
            buffer[position % len(buffer)] = value
    return bytes(buffer)


VALID = pb.ReportUsageRequest(request_id="r", lease_id="lease", fencing_token=7, cost_micros=5, model="m")
payloads = st.one_of(
    st.binary(max_size=64),
    # Strings that are not UTF-8: lone surrogates (as CESU bytes), overlong forms, stray continuation bytes.
    st.builds(
        _string_field,
        st.integers(1, 9),
        st.one_of(
            st.sampled_from(
                ["worker\ud800".encode("utf-8", "surrogatepass"), b"\xc0\xaf", b"\x80abc", b"\xff\xfe", b"\xed\xbf\xbf"]
            ),
            st.binary(max_size=16),
        ),
    ),
    # A valid message with some bytes overwritten.
    st.builds(
        _flip,
        st.tuples(
            st.just(VALID.SerializeToString()),
            st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)), min_size=1, max_size=4),
        ),
    ),
    # Truncated length prefixes and groups.
    st.sampled_from(
        [
            b"\x0a\xff\xff\xff\xff\x0f",
            b"\x0b",
            b"\x0c",
            b"\x0a\x05ab",
            b"\x08",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        ]
    ),
)


async def _call_raw(channel: grpc.aio.Channel, rpc: str, payload: bytes) -> None:
    method = f"/authpool.v1.AuthPool/{rpc}"
    if rpc != "WatchEvents":
        await channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=10)
        return
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(payload)
    try:
        await asyncio.wait_for(call.read(), timeout=0.2)
    except TimeoutError:
        pass
    finally:
        call.cancel()


@fuzz_settings(60)
@given(rpc=st.sampled_from(METHODS), payload=payloads)
async def test_raw_bytes_to_every_rpc_get_a_proper_answer(
    channel: grpc.aio.Channel, stub: Stub, seeded: pb.Lease, rpc: str, payload: bytes
) -> None:
    try:
        await _call_raw(channel, rpc, payload)
    except grpc.aio.AioRpcError as error:
        check_refusal(error, EVERY_FIELD)
    check_invariants(await pool_status(stub))


# -- regressions: each of these once answered UNKNOWN or INTERNAL ---------------------------------


# Field 1 is a string in these requests (elsewhere a bool or a number, where such bytes are an unknown field).
STRING_FIRST = ["Allocate", "Renew", "Release", "ReportUsage", "DrainSubscription", "ResumeSubscription"]
UNDECODABLE = [
    *[pytest.param(rpc, b"\xff\xff\xff", id=f"corrupt-{rpc}") for rpc in METHODS],
    *[pytest.param(rpc, b"\x0a\x07worker\xed", id=f"truncated-utf8-{rpc}") for rpc in STRING_FIRST],
    *[
        pytest.param(rpc, _string_field(1, "w\ud800".encode("utf-8", "surrogatepass")), id=f"surrogate-{rpc}")
        for rpc in STRING_FIRST
    ],
]


@pytest.mark.parametrize(("rpc", "payload"), UNDECODABLE)
async def test_undecodable_bytes_are_invalid_argument_with_details(
    channel: grpc.aio.Channel, stub: Stub, rpc: str, payload: bytes
) -> None:
    """Once grpc's own answer: UNKNOWN, with "Unexpected <class 'DecodeError'>" as the message."""
    before = await pool_status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call_raw(channel, rpc, payload)

    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error_details(error)
    assert details[error_details_pb2.ErrorInfo].reason == "INVALID_ARGUMENT"
    [violation] = details[error_details_pb2.BadRequest].field_violations
    assert violation.field == "request"
    assert "not a valid protobuf message" in violation.description
    assert "class" not in (error.details() or "")
    assert await pool_status(stub) == before


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(253_402_300_800, 0), (-(2**62), 0), (2**62, 0), (5, -5), (5, 10**9), (5, 2**31 - 1)],
    ids=["year-10000", "before-year-1", "far-future", "negative-nanos", "nanos-1e9", "nanos-int32-max"],
)
async def test_a_reset_time_outside_the_timestamp_range_is_named(
    stub: Stub, server: Server, seconds: int, nanos: int
) -> None:
    """Once INTERNAL: ToNanoseconds raised ValueError inside ReportUsage."""
    lease = await _seed(stub)
    before = await pool_status(stub)
    request = pb.ReportUsageRequest(
        request_id="reset",
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        cost_micros=1,
        provider_limits=pb.ProviderLimits(reset_time=Timestamp(seconds=seconds, nanos=nanos)),
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReportUsage(request)

    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = error_details(caught.value)[error_details_pb2.BadRequest].field_violations
    assert [v.field for v in violations] == ["provider_limits.reset_time"]
    assert await pool_status(stub) == before


async def test_status_survives_a_provider_window_that_ends_in_year_9999(stub: Stub) -> None:
    """Once INTERNAL for every Status: the projected spend to 9999-12-31 overflowed int64.

    Any client may report what its provider said; that must not take Status
    away from the operators.
    """
    lease = await _seed(stub)
    await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id="far",
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            cost_micros=10**12,
            provider_limits=pb.ProviderLimits(remaining_fraction=0.5, reset_time=Timestamp(seconds=253_402_300_799)),
        )
    )

    state = await stub.Status(pb.StatusRequest(include_clients=True))

    sub = next(s for s in state.subscriptions if s.subscription_id == lease.subscription_id)
    assert sub.window_end.ToDatetime().year == 9999
    assert sub.projected_window_usage_micros == 2**63 - 1  # saturated: "more than int64 holds"
    check_invariants(state)


async def test_nan_and_infinite_remaining_fractions_are_named(stub: Stub) -> None:
    lease = await _seed(stub)
    for value in (float("nan"), float("inf"), float("-inf"), -1e-300, 1.0000000000000002):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportUsage(
                pb.ReportUsageRequest(
                    request_id="nan",
                    lease_id=lease.lease_id,
                    fencing_token=lease.fencing_token,
                    provider_limits=pb.ProviderLimits(remaining_fraction=value),
                )
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, value
        check_refusal(caught.value, field_roots(pb.ReportUsageRequest))


async def test_huge_strings_in_every_field_are_named_not_echoed(stub: Stub) -> None:
    lease = await _seed(stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReportUsage(
            pb.ReportUsageRequest(request_id=HUGE, lease_id=HUGE, fencing_token=lease.fencing_token, model=HUGE)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    check_refusal(caught.value, field_roots(pb.ReportUsageRequest))
    assert caught.value.code() not in NEVER
