"""What the fuzz tests share: example budgets, adversarial values, and the pool's invariants checked over the wire.

Example counts are small so that `make test` stays fast and deterministic
(`derandomize=True`: the same examples on every run). Set
`AUTHPOOL_FUZZ_EXAMPLES=<n>` to run every fuzz test with `n` examples and a
fresh random seed each run, e.g. `AUTHPOOL_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/fuzz`.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter

import grpc
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.integration.rich_errors import error_details

Stub = authpool_pb2_grpc.AuthPoolStub

DOMAIN = "authpool.v1"
HEAVY = int(os.environ.get("AUTHPOOL_FUZZ_EXAMPLES", "0") or 0)
HUGE = "h" * 10_000

# Codes a caller may see for bad input; UNKNOWN and INTERNAL mean the server did not handle it.
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})


def fuzz_settings(examples: int) -> settings:
    """`examples` examples, the same ones every run; AUTHPOOL_FUZZ_EXAMPLES overrides both."""
    return settings(
        max_examples=HEAVY or examples,
        deadline=None,
        derandomize=not HEAVY,
        database=None,
        # One real server serves every example of a test: that is the point, not an accident.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- adversarial values -------------------------------------------------------------------

ADVERSARIAL_TEXT = [
    "",
    " ",
    "\x00",
    "worker\x00-1",
    "\u202eevil\u202c",  # right-to-left override
    "\u200b",
    "\ufeffbom",
    "wörker",
    "💥" * 40,
    "\U0010ffff",
    "../../etc/passwd",
    "%s%n%x",
    "'; DROP TABLE leases;--",
    "\r\nInjected: header",
    "\x1b[31mred",
    "\x7f",
    "c" * 128,
    "c" * 129,
    HUGE,
    "sub1",
    "worker-1",
    "claude-pro",
]

texts = st.one_of(
    st.sampled_from(ADVERSARIAL_TEXT),
    st.text(max_size=40),  # every code point but surrogates (those go as raw bytes)
    st.from_regex(r"[A-Za-z0-9._:@/-]{1,20}", fullmatch=True),
)
INT64 = (-(2**63), 2**63 - 1)
int64s = st.one_of(
    st.sampled_from([0, 1, -1, 10**9, 10**9 + 1, 10**12, 10**12 + 1, *INT64]),
    st.integers(*INT64),
)
uint64s = st.one_of(st.sampled_from([0, 1, 2, 3, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
int32s = st.integers(-(2**31), 2**31 - 1)
doubles = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1.0, 1.0000000000000002, -1e-300]),
    st.floats(),
)
# google.protobuf.Timestamp's valid range is 0001-01-01 .. 9999-12-31; proto3 lets a caller send anything.
TIMESTAMP_SECONDS = [-62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800, -1, 0, 1, 1_764_003_600]
timestamps = st.builds(
    lambda seconds, nanos: {"seconds": seconds, "nanos": nanos},
    st.one_of(st.sampled_from(TIMESTAMP_SECONDS), st.integers(*INT64)),
    st.one_of(st.sampled_from([0, 999_999_999, 10**9, -1]), int32s),
)
durations = st.builds(
    lambda seconds, nanos: {"seconds": seconds, "nanos": nanos},
    st.one_of(st.sampled_from([0, 1, 3600, 3601, -1, 315_576_000_001]), st.integers(*INT64)),
    st.one_of(st.sampled_from([0, 999_999_999, -999_999_999, 10**9]), int32s),
)


def enum_values(enum: object) -> st.SearchStrategy[int]:
    known = list(enum.values())  # type: ignore[attr-defined]
    return st.one_of(st.sampled_from(known), int32s)


# -- what a caller sees ---------------------------------------------------------------------


def field_roots(message: type) -> frozenset[str]:
    return frozenset(field.name for field in message.DESCRIPTOR.fields)  # type: ignore[attr-defined]


def check_refusal(error: grpc.aio.AioRpcError, fields: frozenset[str]) -> None:
    """A refusal by the contract: a proper code, an ErrorInfo, and every bad field named."""
    assert error.code() not in NEVER, f"{error.code()}: {error.details()!r}"
    details = error_details(error)
    info = details.get(error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo), details
    assert info.domain == DOMAIN
    assert info.reason
    assert info.reason.upper() == info.reason
    message = error.details() or ""
    assert HUGE not in message, "the error echoes a 10k-character input back"
    if error.code() is grpc.StatusCode.INVALID_ARGUMENT:
        bad = details.get(error_details_pb2.BadRequest)
        assert isinstance(bad, error_details_pb2.BadRequest), "INVALID_ARGUMENT without a BadRequest"
        assert bad.field_violations
        for violation in bad.field_violations:
            root = violation.field.split("[")[0].split(".")[0]
            assert root in fields, f"{violation.field!r} is not a field of the request"
            assert violation.description
            assert violation.field in message


async def pool_status(stub: Stub) -> pb.StatusResponse:
    response = await stub.Status(pb.StatusRequest(include_clients=True))
    response.ClearField("as_of")
    return response


def check_invariants(state: pb.StatusResponse) -> None:
    """No client holds two live leases; no subscription is over its client limit; the totals add up."""
    holders = Counter(lease.client_id for lease in state.clients)
    assert not [c for c, n in holders.items() if n > 1], f"clients with two live leases: {holders}"
    on = Counter(lease.subscription_id for lease in state.clients if not lease.fallback)
    for sub in state.subscriptions:
        assert on[sub.subscription_id] == sub.live_clients, sub.subscription_id
        assert sub.live_clients <= sub.max_clients, f"{sub.subscription_id} over its limit"
    assert state.totals.live_clients == sum(sub.live_clients for sub in state.subscriptions)
    assert state.totals.fallback_clients == sum(1 for lease in state.clients if lease.fallback)


async def check_event_log(stub: Stub, last_sequence: int) -> None:
    """WatchEvents from the oldest retained event reaches `last_sequence` without a gap."""
    if last_sequence == 0:
        return
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0, progress_interval={"seconds": 1}))
    seen: list[int] = []
    try:
        while True:
            message = await asyncio.wait_for(call.read(), timeout=10)
            assert message is not grpc.aio.EOF
            if message.HasField("event"):
                seen.append(message.event.sequence)
                if message.event.sequence >= last_sequence:
                    break
            elif message.progress.sequence >= last_sequence:
                break
    finally:
        call.cancel()
    if seen:
        assert seen == list(range(seen[0], seen[0] + len(seen))), "the event log has a gap"
        assert seen[-1] == last_sequence


async def check_still_serving(channel: grpc.aio.Channel, stub: Stub, client_id: str = "after-the-fuzz") -> None:
    """Health answers SERVING and a plain Allocate is granted: the server survived."""
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="authpool.v1.AuthPool"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    granted = await stub.Allocate(pb.AllocateRequest(client_id=client_id), timeout=5)
    assert granted.lease.lease_id
    await stub.Release(pb.ReleaseRequest(lease_id=granted.lease.lease_id, fencing_token=granted.lease.fencing_token))
