"""The channel's retry policy against real failures: a server restart, a response lost on the wire.

Retries are gRPC's own (the service config's `retryPolicy`), so these tests
show them from outside: calls made while the server is down succeed once it
is back, and a usage report whose answer was lost is re-sent with the same
request id and counted once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from authpool_client import AsyncAuthPoolClient, AuthPoolClient, Unavailable
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from tests.client.faults import ResponseDroppingProxy
from tests.client.observe import event_log, live_leases
from tests.client.server_thread import ServerThread, client_spec

# How long the server stays down: well within the default policy's reach (about 1.5 s of backoff on average).
DOWNTIME = 0.3


def restart(server: ServerThread, while_down: Callable[[], None] = lambda: None) -> None:
    """Stop the server, run `while_down`, wait DOWNTIME, start a new one on the same port and data dir."""
    server.stop()
    while_down()
    time.sleep(DOWNTIME)
    server.start()


def test_a_call_made_while_the_server_restarts_succeeds_through_the_retry_policy(
    live: ServerThread, client: AuthPoolClient
) -> None:
    client.status()  # connected
    answers: list[pb.AllocateResponse | BaseException] = []

    def allocate() -> None:
        try:
            answers.append(client.allocate("worker-restart"))
        except BaseException as error:
            answers.append(error)

    caller = threading.Thread(target=allocate)

    def while_down() -> None:
        # The control: the same call on a channel without retries fails at once.
        with grpc.insecure_channel(live.target, options=[("grpc.enable_retries", 0)]) as bare:
            with pytest.raises(grpc.RpcError) as raised:
                authpool_pb2_grpc.AuthPoolStub(bare).Allocate(pb.AllocateRequest(client_id="bare"), timeout=5)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        caller.start()

    restart(live, while_down)
    caller.join(10)
    (answer,) = answers
    assert isinstance(answer, pb.AllocateResponse), answer
    assert answer.lease.client_id == "worker-restart"
    assert set(live_leases(client)) == {answer.lease.lease_id}


async def test_an_async_call_made_while_the_server_restarts_succeeds(live: ServerThread) -> None:
    async with AsyncAuthPoolClient(live.target, insecure=True, timeout=10) as client:
        await client.status()
        await asyncio.to_thread(live.stop)
        call = asyncio.create_task(client.allocate("worker-restart"))
        await asyncio.sleep(DOWNTIME)
        assert not call.done()  # still retrying
        await asyncio.to_thread(live.start)
        answer = await call
        assert answer.lease.client_id == "worker-restart"


@pytest.fixture
def slow_ttl_server(start_server: Callable[..., ServerThread]) -> ServerThread:
    # A restart (stop with its grace, reload from SQLite) must fit well inside one TTL.
    return start_server(client_spec(ttl=4.0))


def test_a_held_lease_outlives_a_server_restart(slow_ttl_server: ServerThread) -> None:
    lost: list[object] = []
    with (
        AuthPoolClient(slow_ttl_server.target, insecure=True, timeout=3) as client,
        client.lease("worker-7", on_lost=lambda _lease, error: lost.append(error)) as lease,
    ):
        restart(slow_ttl_server)
        renewals = lease.renewals
        deadline = time.monotonic() + 5
        while lease.renewals == renewals and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.renewals > renewals, "no renewal succeeded after the restart"
        assert not lost
        assert set(live_leases(client)) == {lease.lease_id}
    assert lease.released is True


def test_a_server_that_stays_down_is_unavailable_once_the_retries_run_out(live: ServerThread) -> None:
    live.stop()
    with AuthPoolClient(live.target, insecure=True, timeout=10) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            client.status()
        assert time.monotonic() - started < 9, "gave up through the retry policy, not the deadline"
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE


# -- usage reports are idempotent -----------------------------------------------------------------


def test_a_report_sent_twice_with_its_request_id_is_counted_once(client: AuthPoolClient) -> None:
    with client.lease("worker-7") as lease:
        first = lease.report_usage(40_000, model="claude-sonnet-4")
        again = lease.report_usage(40_000, model="claude-sonnet-4", request_id=first.request_id)
        other = lease.report_usage(40_000, model="claude-sonnet-4")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.request_id == first.request_id != other.request_id
    assert sum(s.weekly_usage_micros for s in client.status().subscriptions) == 80_000


@pytest.fixture
def proxy(live: ServerThread) -> Iterator[ResponseDroppingProxy]:
    proxy = ResponseDroppingProxy(live.port)
    live.run(proxy.start())
    yield proxy
    live.run(proxy.close())


def test_a_report_whose_answer_was_lost_is_retried_with_its_request_id_and_counted_once(
    client: AuthPoolClient, proxy: ResponseDroppingProxy
) -> None:
    with client.lease("worker-7") as lease, AuthPoolClient(f"127.0.0.1:{proxy.port}", insecure=True) as reporter:
        # Only the report goes through the proxy (the lease renews directly), so its answer is the one lost.
        proxy.drop_next_response()
        receipt = reporter.report_usage(lease.lease_id, lease.fencing_token, 70_000, model="claude-sonnet-4")
        assert proxy.dropped == 1, "the proxy did not lose the first answer"
    # The server saw the report twice (the retry was acknowledged as a duplicate) and counted it once.
    assert receipt.duplicate is True
    assert sum(s.weekly_usage_micros for s in client.status().subscriptions) == 70_000
    recorded = [e for e in event_log(client) if e.type == pb.EVENT_TYPE_USAGE_RECORDED]
    assert len(recorded) == 1
