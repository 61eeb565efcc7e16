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
"""

from __future__ import annotations

import time
from collections.abc import Callable

from authpool_client._errors import AuthPoolError, InvalidArgument, LeaseLost, NotFound, StaleFencingToken
from authpool_client._models import Decision, LeaseInfo
from authpool_client.api import authpool_pb2 as pb

__all__ = ["LeaseState"]

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
