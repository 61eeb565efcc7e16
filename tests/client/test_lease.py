"""The blocking client's `with client.lease(...)` against a real server: allocate, renew, move, lose, release."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from authpool_client import AuthPoolClient, Decision, Lease, LeaseLost, NotFound

from tests.client.observe import lease_history, live_leases
from tests.client.server_thread import TTL

WAIT = 5.0  # seconds a test waits for something that should take one renewal (a third of the TTL)


def test_a_lease_is_allocated_on_entry_and_released_on_normal_exit(client: AuthPoolClient) -> None:
    with client.lease("worker-7", labels={"team": "search"}) as lease:
        assert lease.decision is Decision.NEW
        assert lease.credential_ref == f"/creds/.claude-{lease.subscription_id}"
        assert lease.info.labels == {"team": "search"}
        live = live_leases(client)
        assert set(live) == {lease.lease_id}
        assert live[lease.lease_id].client_id == "worker-7"

    assert lease.released is True
    assert live_leases(client) == {}
    assert lease_history(client, lease.lease_id) == ["LEASE_GRANTED", "LEASE_RELEASED"]


def test_an_exception_in_the_body_releases_the_lease_and_propagates(client: AuthPoolClient) -> None:
    class ProviderDown(Exception):
        pass

    with pytest.raises(ProviderDown), client.lease("worker-7") as lease:
        raise ProviderDown

    assert lease.released is True
    assert live_leases(client) == {}
    assert lease_history(client, lease.lease_id) == ["LEASE_GRANTED", "LEASE_RELEASED"]


def test_the_lease_is_renewed_in_the_background_across_several_ttls(client: AuthPoolClient) -> None:
    # The control: a lease nobody renews is gone after one TTL.
    unrenewed = client.allocate("worker-unrenewed").lease
    with client.lease("worker-7") as lease:
        first_expiry = lease.expires_at
        time.sleep(3.5 * TTL)
        assert not lease.lost
        assert lease.renewals >= 5  # about three a TTL
        assert (lease.expires_at - first_expiry).total_seconds() > 2.5 * TTL
        assert set(live_leases(client)) == {lease.lease_id}
    with pytest.raises(NotFound) as raised:
        client.renew(unrenewed.lease_id, unrenewed.fencing_token)
    assert raised.value.reason == "LEASE_NOT_FOUND"
    assert lease_history(client, lease.lease_id) == ["LEASE_GRANTED", "LEASE_RELEASED"]
    assert lease_history(client, unrenewed.lease_id) == ["LEASE_GRANTED", "LEASE_EXPIRED"]


def test_a_drain_moves_the_lease_and_the_holder_is_told(client: AuthPoolClient) -> None:
    told: list[tuple[str, str, int]] = []
    moved = threading.Event()

    def on_move(lease: Lease) -> None:
        told.append((lease.subscription_id, lease.credential_ref, lease.fencing_token))
        moved.set()

    with client.lease("worker-7", on_move=on_move) as lease:
        old_subscription, old_token = lease.subscription_id, lease.fencing_token
        assert not lease.moved
        assert client.drain_subscription(old_subscription) == 1
        assert moved.wait(WAIT), "the holder was not told of the move"
        assert lease.moved
        assert lease.moves == 1
        assert lease.subscription_id != old_subscription
        assert lease.credential_ref == f"/creds/.claude-{lease.subscription_id}"
        assert lease.fencing_token > old_token
        assert told == [(lease.subscription_id, lease.credential_ref, lease.fencing_token)]
        # Usage from now on is charged to the new subscription.
        assert lease.report_usage(1_000, model="claude-sonnet-4").subscription_id == lease.subscription_id
    assert lease.released is True  # released under the new token, which the server accepts
    assert lease_history(client, lease.lease_id) == ["LEASE_GRANTED", "LEASE_MOVED", "USAGE_RECORDED", "LEASE_RELEASED"]


def test_a_lease_ended_behind_its_holders_back_is_reported_lost_not_renewed(client: AuthPoolClient) -> None:
    lost: list[LeaseLost] = []
    noticed = threading.Event()

    def on_lost(lease: Lease, error: LeaseLost) -> None:
        lost.append(error)
        noticed.set()

    with client.lease("worker-7", on_lost=on_lost) as lease:
        # Someone else (an operator's script, a zombie twin) ends it.
        assert client.release(lease.lease_id, lease.fencing_token) is True
        assert noticed.wait(WAIT), "the holder was not told that its lease is gone"
        assert lease.lost
        assert lost == [lease.lost_error]
        assert lost[0].reason == "LEASE_NOT_FOUND"
        assert lost[0].lease_id == lease.lease_id
        with pytest.raises(LeaseLost):
            lease.raise_if_lost()
        renewals = lease.renewals
        time.sleep(TTL)
        assert lease.renewals == renewals  # it stopped pretending
    assert lease.released is False


def test_usage_reported_through_the_lease_is_charged_to_its_subscription(client: AuthPoolClient) -> None:
    with client.lease("worker-7") as lease:
        receipt = lease.report_usage(25_000, model="claude-sonnet-4", input_tokens=1200, output_tokens=300)
        assert receipt.subscription_id == lease.subscription_id
        assert not receipt.duplicate
        assert uuid.UUID(receipt.request_id)  # generated by the library
        # Money is integer micro-units: a float is refused before anything is sent.
        with pytest.raises(TypeError, match="micro-units"):
            lease.report_usage(0.025)  # type: ignore[arg-type]
    usage = {s.subscription_id: s.weekly_usage_micros for s in client.status().subscriptions}
    assert usage[lease.subscription_id] == 25_000
    assert sum(usage.values()) == 25_000


def test_a_lease_outside_its_with_block_says_how_to_use_it(client: AuthPoolClient) -> None:
    lease = client.lease("worker-7")
    with pytest.raises(RuntimeError, match=r"inside `with client\.lease"):
        _ = lease.credential_ref
    assert live_leases(client) == {}  # nothing was allocated
