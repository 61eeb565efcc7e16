"""What a held lease knows and when it renews: the policy shared by the sync and asyncio leases.

No I/O here. The sync lease drives it from a thread, the asyncio one from a
task; each feeds it the responses and errors of its Renew calls and sleeps
for as long as it says.

Schedule: a lease renews once a third of its remaining time has passed, so
two more attempts fit before it would expire. The remaining time is read from
the `expires_at` the server sent against this machine's clock, so clocks must
agree to well within a TTL (NTP does). A renewal that fails with something
that may pass (UNAVAILABLE after the channel's retries, a deadline, a rate
limit) is tried again sooner; one that shows the lease is gone (NOT_FOUND,
a stale fencing token) loses it at once, and so does reaching `expires_at`
without a successful renewal: the server has freed the slot by then.

One stale answer is not a loss: when a Renew that moved the lease loses its
answer (the server died just after committing it) and is sent again, the
server has already told this holder of the new token and refuses the old
one. The lease then asks Allocate, with the same client id, which answers
with the client's live lease and its current token (sticky), and carries on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from authpool_client._errors import AuthPoolError, InvalidArgument, LeaseLost, NotFound, StaleFencingToken
from authpool_client._models import Decision, LeaseInfo
from authpool_client.api import authpool_pb2 as pb

__all__ = ["LeaseState", "LeaseView"]

RENEW_FRACTION = 1 / 3
# Never renew more often than this, even when the clock disagrees with the server's.
MIN_RENEW_INTERVAL = 0.1

# Errors after which renewing again cannot help: the lease is gone or held by someone else.
_PERMANENT = (NotFound, StaleFencingToken, InvalidArgument)


class LeaseState:
    """One held lease's state. Written by its renewer only; readers get whole immutable snapshots (`info`)."""

    def __init__(self, response: pb.AllocateResponse, clock: Callable[[], float] = time.time) -> None:
        self.info = LeaseInfo.from_pb(response.lease)
        self.decision = Decision(response.decision)
        self.reason = response.reason
        self.moves = 0
        self.renewals = 0
        self.lost: LeaseLost | None = None
        self._clock = clock

    def remaining(self) -> float:
        """Seconds until the lease expires unless renewed, by this machine's clock."""
        return self.info.expires_at.timestamp() - self._clock()

    def next_delay(self, *, after_failure: bool = False) -> float:
        """Seconds to wait before the next Renew."""
        delay = self.remaining() * RENEW_FRACTION
        if after_failure:
            # Retry well before the expiry, but not in a tight loop.
            delay = min(delay, 1.0)
        return max(MIN_RENEW_INTERVAL, delay)

    def renewed(self, response: pb.RenewResponse) -> bool:
        """Take a Renew's answer; True when the lease moved (a new credential and fencing token)."""
        self.info = LeaseInfo.from_pb(response.lease)
        self.renewals += 1
        if response.moved:
            self.moves += 1
        return response.moved

    def recovered(self, response: pb.AllocateResponse) -> bool | None:
        """Take the sticky Allocate asked after a stale Renew: whether the lease moved; None if it is not ours."""
        if response.lease.lease_id != self.info.lease_id:
            return None
        moved = response.lease.fencing_token != self.info.fencing_token
        self.info = LeaseInfo.from_pb(response.lease)
        if moved:
            self.moves += 1
        return moved

    def renewal_failed(self, error: AuthPoolError) -> LeaseLost | None:
        """Take a Renew's error; the `LeaseLost` when the lease is gone for good, else None (try again)."""
        lease_id = self.info.lease_id
        if isinstance(error, _PERMANENT):
            self.lost = LeaseLost(
                f"lease {lease_id!r} can no longer be renewed: {error.message}", lease_id=lease_id, cause=error
            )
        elif self.remaining() <= 0:
            self.lost = LeaseLost(
                f"lease {lease_id!r} expired at {self.info.expires_at.isoformat()} before it could be renewed "
                f"(last error: {error})",
                lease_id=lease_id,
                cause=error,
            )
        return self.lost


class LeaseView:
    """What the holder of a lease reads; shared by the sync `Lease` and the asyncio `AsyncLease`."""

    _state: LeaseState | None
    _USE_INSIDE = "with client.lease(...)"

    @property
    def _held(self) -> LeaseState:
        if self._state is None:
            raise RuntimeError(f"the lease is not allocated yet: use it inside `{self._USE_INSIDE}`")
        return self._state

    @property
    def info(self) -> LeaseInfo:
        """The lease as the server last described it (one consistent snapshot)."""
        return self._held.info

    @property
    def lease_id(self) -> str:
        return self._held.info.lease_id

    @property
    def credential_ref(self) -> str:
        """Where the credential is (e.g. its config directory); changes when the lease moves."""
        return self._held.info.credential_ref

    @property
    def subscription_id(self) -> str:
        return self._held.info.subscription_id

    @property
    def fencing_token(self) -> int:
        """The newest fencing token; present it with anything you do under this lease."""
        return self._held.info.fencing_token

    @property
    def fallback(self) -> bool:
        """True when the lease is on the pay-as-you-go fallback rather than the pool."""
        return self._held.info.fallback

    @property
    def expires_at(self) -> datetime:
        return self._held.info.expires_at

    @property
    def decision(self) -> Decision:
        """How the Allocate was answered (NEW, STICKY, FAILOVER, FALLBACK)."""
        return self._held.decision

    @property
    def renewals(self) -> int:
        """Successful renewals so far."""
        return self._held.renewals

    @property
    def moves(self) -> int:
        """How many times the lease moved to another credential while held."""
        return self._held.moves

    @property
    def moved(self) -> bool:
        """True once the lease has moved to another credential while held."""
        return self._held.moves > 0

    @property
    def lost(self) -> bool:
        """True once the lease can no longer be renewed; stop using its credential."""
        return self._held.lost is not None

    @property
    def lost_error(self) -> LeaseLost | None:
        return self._held.lost

    def raise_if_lost(self) -> None:
        """Raise `LeaseLost` if the lease can no longer be renewed."""
        if self._held.lost is not None:
            raise self._held.lost
